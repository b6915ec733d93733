-- The log table of the seed article (000_*.txt, "The table that stores every
-- change"), verbatim: variants plpgsql and floor both write into it.
CREATE SCHEMA audit;

CREATE TYPE audit.operation AS ENUM ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE');

CREATE TABLE audit.audit_log (
    id              bigserial PRIMARY KEY,
    table_name      text NOT NULL,
    operation       audit.operation NOT NULL,
    row_id          text,                            -- PK value of the changed row
    old_values      jsonb,                           -- null on INSERT
    new_values      jsonb,                           -- null on DELETE
    changed_by      text NOT NULL DEFAULT 'unknown',  -- application user
    changed_at      timestamptz NOT NULL DEFAULT now(),
    session_info    jsonb                            -- client_addr, app_name, etc.
);

CREATE INDEX idx_audit_log_table_name ON audit.audit_log (table_name, changed_at DESC);
CREATE INDEX idx_audit_log_row_id ON audit.audit_log (table_name, row_id, changed_at DESC);
