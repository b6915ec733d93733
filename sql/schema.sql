-- audit_ext: tables, indexes and views. Functions come from src/ (pgrx).
-- Nothing here is granted to PUBLIC: see the README's security model.

-- CACHE 1 on purpose: sealing reads last_value as "every id handed out so far".
CREATE SEQUENCE audit.log_id_seq CACHE 1;

CREATE TABLE audit.log (
    id             bigint      NOT NULL DEFAULT nextval('audit.log_id_seq'),
    changed_at     timestamptz NOT NULL,
    txid           bigint      NOT NULL,
    schema_name    text        NOT NULL,
    table_name     text        NOT NULL,
    operation      text        NOT NULL,
    row_id         text,
    old_row_id     text,
    old_values     jsonb,
    new_values     jsonb,
    changed_fields text[],
    changed_by     text        NOT NULL,
    db_user        text        NOT NULL,
    session_info   jsonb,
    row_hash       bytea       NOT NULL
) PARTITION BY RANGE (changed_at);

COMMENT ON TABLE audit.log IS 'One row per change to a tracked table (audit_ext).';
COMMENT ON COLUMN audit.log.old_row_id IS 'For an UPDATE that changed the key: the key before the change.';

CREATE TABLE audit.log_default PARTITION OF audit.log DEFAULT;

-- Indexes live on each partition, not on audit.log: an index on the parent
-- would be re-created by every ATTACH during a restore and collide with the
-- dumped partition indexes. maintain() gives new partitions the same three.
-- The btrees do not deduplicate: each entry ends in the row's unique id, so
-- searching a full page for duplicates before it splits is always in vain.
-- Row history and point-in-time probes: one index probe per question.
CREATE INDEX log_default_row_idx ON audit.log_default (table_name, row_id, changed_at, id) WITH (deduplicate_items = off);
-- Key changes: find the row under its former key.
CREATE INDEX log_default_old_row_idx ON audit.log_default (table_name, old_row_id, changed_at, id) WITH (deduplicate_items = off) WHERE old_row_id IS NOT NULL;
-- Sealing and verification walk ids; undo finds a transaction. Both are insertion-ordered, so BRIN is enough,
-- and one index on both columns costs each audit row one BRIN insert instead of two.
CREATE INDEX log_default_brin ON audit.log_default USING brin (id, txid);

CREATE TABLE audit.tracked (
    relid         regclass    PRIMARY KEY,
    exclude       text[]      NOT NULL DEFAULT '{}',
    redact        text[]      NOT NULL DEFAULT '{}',
    tracked_since timestamptz NOT NULL DEFAULT now(),
    -- What is recorded: changes (audit.log), reads (audit.access_log), or both.
    writes        boolean     NOT NULL DEFAULT true,
    reads         boolean     NOT NULL DEFAULT false,
    -- What an UPDATE's new_values holds: the whole row ('full') or only the
    -- changed columns ('changes'); src/image.rs says how states are rebuilt.
    capture       text        NOT NULL DEFAULT 'full' CHECK (capture IN ('full', 'changes'))
);

CREATE VIEW audit.tracked_tables AS
SELECT t.relid         AS tbl,
       n.nspname::text AS schema_name,
       c.relname::text AS table_name,
       t.exclude,
       t.redact,
       t.tracked_since,
       t.writes,
       t.reads,
       t.capture
  FROM audit.tracked t
  JOIN pg_catalog.pg_class c ON c.oid = t.relid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace;

-- The names each tracked table has had, and from when: time travel reads a table's
-- log rows under every name it had at the time (src/time_travel.rs), so its history
-- follows renames of the table and of its schema, and survives dump and restore
-- (where oids change but regclass is dumped by name).
CREATE TABLE audit.table_names (
    relid       regclass    NOT NULL,
    schema_name text        NOT NULL,
    table_name  text        NOT NULL,
    valid_from  timestamptz NOT NULL,
    PRIMARY KEY (relid, valid_from)
);

-- The per-database HMAC key for redaction markers; created by the first audit.track().
CREATE TABLE audit.secret (
    id  int   PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    key bytea NOT NULL CHECK (length(key) >= 32)
);

-- One row per statement that read a read-tracked table (src/access/). Its ids come
-- from audit.log's sequence, so one hash chain covers both tables.
CREATE TABLE audit.access_log (
    id           bigint      NOT NULL,
    accessed_at  timestamptz NOT NULL,
    schema_name  text        NOT NULL,
    table_name   text        NOT NULL,
    command      text        NOT NULL,
    columns      text[],
    rows         bigint,
    outcome      text        NOT NULL,
    sqlstate     text,
    accessed_by  text        NOT NULL,
    db_user      text        NOT NULL,
    role         text        NOT NULL,
    txid         bigint,
    session_info jsonb,
    query_id     bigint,
    statement    text,
    parameters   jsonb,
    backend_pid  integer     NOT NULL,
    row_hash     bytea       NOT NULL
) PARTITION BY RANGE (accessed_at);

COMMENT ON TABLE audit.access_log IS 'One row per statement that read a read-tracked table, and per loss of such rows (audit_ext).';

CREATE TABLE audit.access_log_default PARTITION OF audit.access_log DEFAULT;
-- Who read this table, and when: one index probe.
CREATE INDEX access_log_default_table_idx ON audit.access_log_default (table_name, accessed_at, id) WITH (deduplicate_items = off);
-- Sealing and verification walk ids.
CREATE INDEX access_log_default_brin ON audit.access_log_default USING brin (id);

CREATE TABLE audit.blocks (
    block_id   bigint      PRIMARY KEY,
    from_id    bigint      NOT NULL,  -- the block covers ids in (from_id, through_id]
    through_id bigint      NOT NULL,
    first_id   bigint,
    last_id    bigint,
    row_count  bigint      NOT NULL,
    root       bytea       NOT NULL,
    prev_hash  bytea       NOT NULL,
    block_hash bytea       NOT NULL,
    sealed_at  timestamptz NOT NULL,
    -- 'rows': seals the ids in (from_id, through_id]. 'prune': a retention record
    -- (src/chain/prune.rs), covering no ids (from_id = through_id); its root
    -- commits its audit.prune_parts.
    kind       text        NOT NULL DEFAULT 'rows' CHECK (kind IN ('rows', 'prune'))
);

-- The worker's sealing candidate (src/chain/seal.rs): every id up to pending_id is final
-- once the transactions in pending_writers (packed virtual transaction ids) have ended.
CREATE TABLE audit.seal_state (
    id              int      PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    pending_id      bigint,
    pending_writers bigint[]
);

-- The last maintenance and sealing run and how each ended, for audit.status().
CREATE TABLE audit.status_state (
    id              int         PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    maintain_at     timestamptz,
    maintain_ok     boolean,
    maintain_detail text,
    seal_at         timestamptz,
    seal_ok         boolean,
    seal_detail     text
);

-- What each retention record removed from each data block: how many rows, the hash of
-- their (id, row_hash) pairs, and whether the block is now empty. The record's root
-- commits these, so they cannot be edited unnoticed.
CREATE TABLE audit.prune_parts (
    prune_block bigint  NOT NULL,
    block_id    bigint  NOT NULL,
    removed     bigint  NOT NULL,
    rows_hash   bytea   NOT NULL,
    completes   boolean NOT NULL,
    PRIMARY KEY (prune_block, block_id)
);
-- (id, row_hash) of rows removed by retention from blocks that still hold rows, so verify
-- can recompute those blocks' roots; checked against their retention record's part.
CREATE TABLE audit.pruned (
    id          bigint PRIMARY KEY,
    row_hash    bytea  NOT NULL,
    prune_block bigint NOT NULL
);

-- pg_dump carries these (with the rows) even though they belong to the extension.
SELECT pg_catalog.pg_extension_config_dump('audit.log_default', '');
SELECT pg_catalog.pg_extension_config_dump('audit.access_log_default', '');
SELECT pg_catalog.pg_extension_config_dump('audit.log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('audit.tracked', '');
SELECT pg_catalog.pg_extension_config_dump('audit.table_names', '');
SELECT pg_catalog.pg_extension_config_dump('audit.secret', '');
SELECT pg_catalog.pg_extension_config_dump('audit.blocks', '');
SELECT pg_catalog.pg_extension_config_dump('audit.pruned', '');
SELECT pg_catalog.pg_extension_config_dump('audit.prune_parts', '');

-- The earliest time history is complete for: written by retention when it removes partitions
-- (no row: no limit, so a restore never collides with the install script).
CREATE TABLE audit.horizon (
    id      int         PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    horizon timestamptz NOT NULL DEFAULT '-infinity'
);
SELECT pg_catalog.pg_extension_config_dump('audit.horizon', '');
