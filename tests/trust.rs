//! The trust findings of the adversarial review of 0.2.0, each as a scenario on
//! a real cluster: a database owner's search_path against the worker, retention
//! records and every tampering of the bookkeeping, and a seal() that keeps its
//! word (it waits for writers, only for writers, and seals a transaction's own
//! rows, also with pg_cron).
#![cfg(not(feature = "pg_test"))] // run once, by scripts/test's integration step
mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{Client, Cluster, ClusterOpts};

fn wait_for(what: &str, c: &Cluster, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "timed out waiting for {what}\n--- log ---\n{}",
            c.log_contents()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// A schema of `owner`'s whose operators and functions shadow pg_catalog's. Each
/// one, when run by anybody but `owner`, writes down who ran it, and if that is
/// a superuser, makes `owner` a superuser: exactly what an attacker would plant.
fn plant_shadows(db: &mut Client, owner: &str) {
    db.batch_execute(&format!(
        r#"
        CREATE SCHEMA evil AUTHORIZATION {owner};
        CREATE TABLE evil.calls (who text, what text);
        ALTER TABLE evil.calls OWNER TO {owner};
        GRANT ALL ON evil.calls TO PUBLIC;
        SET ROLE {owner};
        CREATE FUNCTION evil.hit(what text) RETURNS void LANGUAGE plpgsql AS $f$
        BEGIN
          IF current_user::text OPERATOR(pg_catalog.<>) '{owner}' THEN
            INSERT INTO evil.calls VALUES (current_user, what);
            IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) current_user) THEN
              EXECUTE 'ALTER ROLE {owner} SUPERUSER';
            END IF;
          END IF;
        END $f$;
        CREATE FUNCTION evil.ts_ge(timestamptz, timestamptz) RETURNS bool LANGUAGE plpgsql AS
          $f$ BEGIN PERFORM evil.hit('>='); RETURN $1 OPERATOR(pg_catalog.>=) $2; END $f$;
        CREATE FUNCTION evil.ts_lt(timestamptz, timestamptz) RETURNS bool LANGUAGE plpgsql AS
          $f$ BEGIN PERFORM evil.hit('<'); RETURN $1 OPERATOR(pg_catalog.<) $2; END $f$;
        CREATE FUNCTION evil.i8_eq(bigint, bigint) RETURNS bool LANGUAGE plpgsql AS
          $f$ BEGIN PERFORM evil.hit('='); RETURN $1 OPERATOR(pg_catalog.=) $2; END $f$;
        CREATE FUNCTION evil.i8_lt(bigint, bigint) RETURNS bool LANGUAGE plpgsql AS
          $f$ BEGIN PERFORM evil.hit('<'); RETURN $1 OPERATOR(pg_catalog.<) $2; END $f$;
        CREATE FUNCTION evil.txt_eq(text, text) RETURNS bool LANGUAGE plpgsql AS
          $f$ BEGIN PERFORM evil.hit('='); RETURN $1 OPERATOR(pg_catalog.=) $2; END $f$;
        CREATE FUNCTION evil.name_eq(name, name) RETURNS bool LANGUAGE plpgsql AS
          $f$ BEGIN PERFORM evil.hit('='); RETURN $1 OPERATOR(pg_catalog.=) $2; END $f$;
        CREATE FUNCTION evil.oid_eq(oid, oid) RETURNS bool LANGUAGE plpgsql AS
          $f$ BEGIN PERFORM evil.hit('='); RETURN $1 OPERATOR(pg_catalog.=) $2; END $f$;
        CREATE FUNCTION evil.txt_cat(text, text) RETURNS text LANGUAGE plpgsql AS
          $f$ BEGIN PERFORM evil.hit('||'); RETURN $1 OPERATOR(pg_catalog.||) $2; END $f$;
        CREATE OPERATOR evil.>= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = evil.ts_ge);
        CREATE OPERATOR evil.< (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = evil.ts_lt);
        CREATE OPERATOR evil.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = evil.i8_eq);
        CREATE OPERATOR evil.< (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = evil.i8_lt);
        CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.txt_eq);
        CREATE OPERATOR evil.= (LEFTARG = name, RIGHTARG = name, FUNCTION = evil.name_eq);
        CREATE OPERATOR evil.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = evil.oid_eq);
        CREATE OPERATOR evil.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.txt_cat);
        CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE plpgsql AS
          $f$ BEGIN PERFORM evil.hit('now'); RETURN pg_catalog.now(); END $f$;
        CREATE FUNCTION evil.sha256(bytea) RETURNS bytea LANGUAGE plpgsql AS
          $f$ BEGIN PERFORM evil.hit('sha256'); RETURN pg_catalog.sha256($1); END $f$;
        CREATE FUNCTION evil.quote_ident(text) RETURNS text LANGUAGE plpgsql AS
          $f$ BEGIN PERFORM evil.hit('quote_ident'); RETURN pg_catalog.quote_ident($1); END $f$;
        CREATE FUNCTION evil.format(text) RETURNS text LANGUAGE plpgsql AS
          $f$ BEGIN PERFORM evil.hit('format'); RETURN pg_catalog.format($1); END $f$;
        CREATE FUNCTION evil.to_jsonb(anyelement) RETURNS jsonb LANGUAGE plpgsql AS
          $f$ BEGIN PERFORM evil.hit('to_jsonb'); RETURN pg_catalog.to_jsonb($1); END $f$;
        CREATE FUNCTION evil.jsonb_build_object(text, text) RETURNS jsonb LANGUAGE plpgsql AS
          $f$ BEGIN PERFORM evil.hit('jsonb_build_object'); RETURN pg_catalog.jsonb_build_object($1, $2); END $f$;
        RESET ROLE;
        "#
    ))
    .unwrap();
}

/// Rows waiting in audit.log_default: every premade partition dropped (they are empty).
/// What the planted shadows recorded: each call as "who: what".
fn shadow_calls(db: &mut Client) -> Vec<String> {
    db.query("SELECT who || ': ' || what FROM evil.calls", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn rows_in_default(db: &mut Client) {
    common::drop_premade_partitions(db);
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY, v text);
         SELECT audit.track('t');
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20) g;",
    )
    .unwrap();
    let n: i64 = db.query_one("SELECT count(*) FROM audit.log_default", &[]).unwrap().get(0);
    assert!(n >= 20, "rows wait in the default partition");
}

#[test]
fn worker_ignores_a_database_owners_search_path() {
    let c = Cluster::start(ClusterOpts::new().preload(true).conf("audit.naptime = 0"));
    let mut su = c.connect("postgres");
    su.batch_execute("CREATE ROLE eve LOGIN").unwrap();
    su.batch_execute("CREATE DATABASE evildb OWNER eve").unwrap();
    let mut db = c.connect("evildb");
    db.batch_execute("CREATE EXTENSION audit_ext").unwrap();
    rows_in_default(&mut db);
    plant_shadows(&mut db, "eve");
    // The database owner's own setting, as any database owner may make it.
    db.batch_execute(
        "SET SESSION AUTHORIZATION eve;
         ALTER DATABASE evildb SET search_path = evil, pg_catalog, public;
         ALTER DATABASE evildb SET work_mem = '64kB';
         RESET SESSION AUTHORIZATION;",
    )
    .unwrap();
    su.batch_execute("ALTER SYSTEM SET audit.naptime = 1").unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for("the worker to drain the default partition and seal", &c, || {
        let mut db = c.connect("evildb");
        let left: i64 = db.query_one("SELECT count(*) FROM audit.log_default", &[]).unwrap().get(0);
        let sealed: i64 = db.query_one("SELECT count(*) FROM audit.blocks", &[]).unwrap().get(0);
        left == 0 && sealed > 0
    });
    let mut db = c.connect("evildb");
    db.batch_execute("RESET search_path").unwrap();
    let calls = shadow_calls(&mut db);
    assert!(calls.is_empty(), "the worker ran the owner's code: {calls:?}");
    let su_eve: bool =
        su.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'eve'", &[]).unwrap().get(0);
    assert!(!su_eve, "eve became a superuser through the worker");
    let ok: bool = db.query_one("SELECT ok FROM audit.verify()", &[]).unwrap().get(0);
    assert!(ok);
    c.assert_no_crash();
}

/// A role granted EXECUTE on audit.maintain() (SECURITY.md allows it), its own
/// schema first in search_path, calls maintain() while rows wait in the default
/// partition: the move runs as the extension owner and must run none of its code.
#[test]
fn maintain_by_a_granted_role_runs_no_user_code() {
    let c = Cluster::start(ClusterOpts::new().preload(true).conf("audit.naptime = 0"));
    let mut db = c.connect("postgres");
    db.batch_execute(
        "CREATE EXTENSION audit_ext;
         CREATE ROLE eve;
         GRANT USAGE ON SCHEMA audit TO eve;
         GRANT EXECUTE ON FUNCTION audit.maintain(timestamptz), audit.seal(), audit.verify(jsonb, regclass[]) TO eve;",
    )
    .unwrap();
    rows_in_default(&mut db);
    plant_shadows(&mut db, "eve");
    db.batch_execute("SET SESSION AUTHORIZATION eve; SET search_path = evil, pg_catalog, public;")
        .unwrap();
    let report: String = db.query_one("SELECT audit.maintain()::text", &[]).unwrap().get(0);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(report["moved_from_default"].as_i64().unwrap_or(0) >= 20, "{report}");
    db.query_one("SELECT audit.seal()", &[]).unwrap();
    db.batch_execute("RESET search_path; RESET SESSION AUTHORIZATION;").unwrap();
    let calls = shadow_calls(&mut db);
    assert!(calls.is_empty(), "maintain ran eve's code as another role: {calls:?}");
    let su: bool =
        db.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'eve'", &[]).unwrap().get(0);
    assert!(!su, "eve became a superuser through maintain()");
    let left: i64 = db.query_one("SELECT count(*) FROM audit.log_default", &[]).unwrap().get(0);
    assert_eq!(left, 0);
    c.assert_no_crash();
}

// ---- Retention records ----------------------------------------------------------------------

/// Two hand-made partitions split at a moment `t_mid` a few seconds ahead, so that
/// rows written before and after it land in different partitions while ids
/// interleave across them (a transaction's rows carry its start time).
struct Split {
    c: Cluster,
}

impl Split {
    fn new() -> Split {
        let c = Cluster::start(ClusterOpts::new().preload(true).conf("audit.naptime = 0"));
        let mut db = c.connect("postgres");
        db.batch_execute(
            "CREATE EXTENSION audit_ext;
             CREATE TABLE t (id int PRIMARY KEY, v text);
             SELECT audit.track('t');",
        )
        .unwrap();
        common::drop_premade_partitions(&mut db);
        db.batch_execute(
            "CREATE TABLE split_at AS SELECT date_trunc('second', clock_timestamp()) + interval '3 seconds' AS t_mid;
             DO $$ DECLARE m timestamptz := (SELECT t_mid FROM split_at); BEGIN
               EXECUTE format('CREATE TABLE audit.log_old PARTITION OF audit.log FOR VALUES FROM (%L) TO (%L)',
                              m - interval '1 hour', m);
               EXECUTE format('CREATE TABLE audit.log_new PARTITION OF audit.log FOR VALUES FROM (%L) TO (%L)',
                              m, m + interval '1 hour');
             END $$;",
        )
        .unwrap();
        Split { c }
    }

    fn sleep_past_split(&self) {
        let mut db = self.c.connect("postgres");
        db.batch_execute("SELECT pg_sleep(EXTRACT(epoch FROM (SELECT t_mid FROM split_at) - clock_timestamp()) + 0.2)")
            .unwrap();
    }

    /// Removes log_old through retention, as the worker would.
    fn retention(&self, db: &mut Client) -> serde_json::Value {
        db.batch_execute("SET audit.retention = '1 day'").unwrap();
        let text: String = db
            .query_one(
                "SELECT audit.maintain((SELECT t_mid FROM split_at) + interval '1 day' + interval '1 minute')::text",
                &[],
            )
            .unwrap()
            .get(0);
        db.batch_execute("RESET audit.retention").unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

fn verify(db: &mut Client, digest: Option<&str>) -> (bool, String) {
    let r = match digest {
        None => db.query_one("SELECT ok, detail FROM audit.verify()", &[]).unwrap(),
        Some(d) => {
            db.query_one("SELECT ok, detail FROM audit.verify($1::text::jsonb)", &[&d]).unwrap()
        }
    };
    (r.get(0), r.get(1))
}

fn digest(db: &mut Client) -> String {
    db.query_one("SELECT audit.digest()::text", &[]).unwrap().get(0)
}

/// Blocks whose rows lie in both partitions, partly pruned: at the start, at the end,
/// on both ends, and one emptied; verify stays ok and never panics. seal() waits for
/// writers, so each old transaction has begun (fixing its rows' changed_at) before
/// the split and writes only when its block is due.
fn partly_pruned(s: &Split) -> Client {
    let mut db = s.c.connect("postgres");
    let mut new = s.c.connect("postgres");
    let mut old: Vec<Client> = (0..4).map(|_| s.c.connect("postgres")).collect();
    for o in old.iter_mut() {
        o.batch_execute("BEGIN; SELECT 1;").unwrap();
    }
    old[0].batch_execute("INSERT INTO t VALUES (1, 'old'); COMMIT;").unwrap();
    s.sleep_past_split();
    // Block 1: old, new (pruned at its start).
    new.batch_execute("INSERT INTO t VALUES (2, 'new')").unwrap();
    db.query_one("SELECT audit.seal()", &[]).unwrap();
    // Block 2: new, old (pruned at its end).
    new.batch_execute("INSERT INTO t VALUES (3, 'new')").unwrap();
    old[1].batch_execute("INSERT INTO t VALUES (4, 'old'); COMMIT;").unwrap();
    db.query_one("SELECT audit.seal()", &[]).unwrap();
    // Block 3: old, new, old (pruned on both ends).
    old[2].batch_execute("INSERT INTO t VALUES (5, 'old')").unwrap();
    new.batch_execute("INSERT INTO t VALUES (6, 'new')").unwrap();
    old[2].batch_execute("INSERT INTO t VALUES (7, 'old'); COMMIT;").unwrap();
    db.query_one("SELECT audit.seal()", &[]).unwrap();
    // Block 4: old only (emptied).
    old[3]
        .batch_execute("INSERT INTO t VALUES (8, 'old'); INSERT INTO t VALUES (9, 'old'); COMMIT;")
        .unwrap();
    db.query_one("SELECT audit.seal()", &[]).unwrap();
    let (ok, detail) = verify(&mut db, None);
    assert!(ok, "{detail}");
    db
}

#[test]
fn retention_of_partly_sealed_blocks_verifies_and_a_digest_refuses_later_removals() {
    let s = Split::new();
    let mut db = partly_pruned(&s);
    let shapes: i64 = db
        .query_one(
            "SELECT count(*) FROM audit.blocks b WHERE kind = 'rows'
               AND EXISTS (SELECT FROM audit.log_old o WHERE o.id > b.from_id AND o.id <= b.through_id)
               AND EXISTS (SELECT FROM audit.log_new n WHERE n.id > b.from_id AND n.id <= b.through_id)",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(shapes >= 3, "blocks spanning both partitions: {shapes}");
    let before = digest(&mut db);
    let report = s.retention(&mut db);
    assert_eq!(report["retention"][0]["partition"], "log_old", "{report}");
    let records: i64 =
        db.query_one("SELECT count(*) FROM audit.blocks WHERE kind = 'prune'", &[]).unwrap().get(0);
    assert_eq!(records, 1);
    let emptied: i64 =
        db.query_one("SELECT count(*) FROM audit.prune_parts WHERE completes", &[]).unwrap().get(0);
    assert!(emptied >= 1, "the old-only block is emptied");
    let (ok, detail) = verify(&mut db, None);
    assert!(ok, "after ordinary retention: {detail}");
    let after = digest(&mut db);
    let (ok, detail) = verify(&mut db, Some(&after));
    assert!(ok, "against a digest taken after retention: {detail}");
    let (ok, detail) = verify(&mut db, Some(&before));
    assert!(!ok, "a digest taken before retention cannot vouch for rows removed after it");
    assert!(detail.contains("removed by retention recorded after the digest"), "{detail}");
    s.c.assert_no_crash();
}

/// Every edit of the bookkeeping, each on a fresh copy of the same history,
/// is caught by verify against a digest taken after retention.
#[test]
fn tampering_with_retention_bookkeeping_is_detected() {
    let tampers: &[(&str, &str)] = &[
        (
            "a sealed row planted in audit.pruned and deleted",
            "INSERT INTO audit.pruned SELECT id, row_hash, (SELECT max(block_id) FROM audit.blocks WHERE kind = 'prune')
               FROM audit.log WHERE id = (SELECT min(id) FROM audit.log_new);
             SET audit.allow_drop = on;
             DELETE FROM audit.log WHERE id = (SELECT min(id) FROM audit.log_new);",
        ),
        (
            "a block marked as emptied, one of its rows deleted and another rewritten",
            "INSERT INTO audit.prune_parts
               SELECT (SELECT max(block_id) FROM audit.blocks WHERE kind = 'prune'), b.block_id, b.row_count,
                      '\\x00', true
                 FROM audit.blocks b WHERE b.kind = 'rows'
                  AND NOT EXISTS (SELECT FROM audit.prune_parts p WHERE p.block_id = b.block_id)
                ORDER BY b.block_id LIMIT 1;
             DELETE FROM audit.log WHERE id = (SELECT min(id) FROM audit.log_new);
             UPDATE audit.log SET changed_by = 'mallory' WHERE id = (SELECT max(id) FROM audit.log_new);",
        ),
        ("a retention part deleted", "DELETE FROM audit.prune_parts WHERE ctid = (SELECT min(ctid) FROM audit.prune_parts)"),
        ("a retention part's count changed", "UPDATE audit.prune_parts SET removed = removed + 1 WHERE NOT completes"),
        ("a kept pair deleted", "DELETE FROM audit.pruned WHERE id = (SELECT min(id) FROM audit.pruned)"),
        ("a kept pair's hash changed", "UPDATE audit.pruned SET row_hash = sha256(row_hash) WHERE id = (SELECT min(id) FROM audit.pruned)"),
        ("a retention record turned into a block of rows", "UPDATE audit.blocks SET kind = 'rows' WHERE kind = 'prune'"),
        ("a block of rows turned into a retention record", "UPDATE audit.blocks SET kind = 'prune' WHERE block_id = 1"),
        (
            "the chain re-sealed from scratch after a rewrite",
            "DELETE FROM audit.blocks; DELETE FROM audit.prune_parts; DELETE FROM audit.pruned; DELETE FROM audit.seal_state;
             UPDATE audit.log SET changed_by = 'mallory' WHERE id = (SELECT max(id) FROM audit.log);
             SELECT audit.seal();",
        ),
    ];
    let s = Split::new();
    let mut db = partly_pruned(&s);
    s.retention(&mut db);
    let d = digest(&mut db);
    let (ok, detail) = verify(&mut db, Some(&d));
    assert!(ok, "{detail}");
    for (what, sql) in tampers {
        db.batch_execute("BEGIN").unwrap();
        db.batch_execute(sql).unwrap_or_else(|e| panic!("{what}: {e}"));
        let (ok, detail) = verify(&mut db, Some(&d));
        db.batch_execute("ROLLBACK").unwrap();
        assert!(!ok, "not detected: {what}");
        eprintln!("detected: {what}: {detail}");
    }
    let (ok, detail) = verify(&mut db, Some(&d));
    assert!(ok, "untouched again: {detail}");
    s.c.assert_no_crash();
}

/// audit.seal_state only ever holds the worker's candidate. Editing it can make the
/// worker seal a range early, never hide anything: the late row then shows up as
/// inserted into a sealed range.
#[test]
fn tampering_with_seal_state_is_detected() {
    let c = Cluster::start(ClusterOpts::new().preload(true).conf("audit.naptime = 0"));
    let mut db = tracked(&c);
    db.batch_execute("UPDATE acct SET bal = 1 WHERE id = 1").unwrap();
    db.query_one("SELECT audit.seal()", &[]).unwrap();
    let d = digest(&mut db);
    let mut w = c.connect("postgres");
    w.batch_execute("BEGIN; UPDATE acct SET bal = 2 WHERE id = 2;").unwrap();
    db.batch_execute("UPDATE acct SET bal = 3 WHERE id = 3").unwrap(); // committed, above w's id
    let late: i64 = db.query_one("SELECT last_value FROM audit.log_id_seq", &[]).unwrap().get(0);
    db.execute(
        "INSERT INTO audit.seal_state (id, pending_id, pending_writers) VALUES (1, $1, '{}')
         ON CONFLICT (id) DO UPDATE SET pending_id = EXCLUDED.pending_id, pending_writers = EXCLUDED.pending_writers",
        &[&late],
    )
    .unwrap();
    db.batch_execute("ALTER SYSTEM SET audit.naptime = 1").unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for("the worker to seal on the tampered candidate", &c, || {
        max_sealed(&mut c.connect("postgres")) >= late
    });
    w.batch_execute("COMMIT").unwrap();
    let (ok, detail) = verify(&mut db, Some(&d));
    assert!(!ok, "a row committed into a range sealed early must show");
    assert!(detail.contains("inserted into its sealed id range"), "{detail}");
    c.assert_no_crash();
}

// ---- seal() keeps its word ----------------------------------------------------------------

fn tracked(c: &Cluster) -> Client {
    let mut db = c.connect("postgres");
    db.batch_execute(
        "CREATE EXTENSION audit_ext;
         CREATE TABLE acct (id int PRIMARY KEY, bal int);
         CREATE TABLE scratch (id int);
         INSERT INTO acct SELECT g, 0 FROM generate_series(1, 100) g;
         SELECT audit.track('acct');",
    )
    .unwrap();
    db
}

fn max_sealed(db: &mut Client) -> i64 {
    db.query_one("SELECT coalesce(max(through_id), 0) FROM audit.blocks", &[]).unwrap().get(0)
}

#[test]
fn seal_waits_for_writers_and_only_for_them() {
    let c = Cluster::start(ClusterOpts::new().preload(true).conf("audit.naptime = 0"));
    let mut db = tracked(&c);
    // A long report that holds an xid but wrote no audit row never holds sealing back.
    let mut report = c.connect("postgres");
    report.batch_execute("BEGIN; INSERT INTO scratch VALUES (1);").unwrap();
    db.batch_execute("UPDATE acct SET bal = 1 WHERE id = 1").unwrap();
    let t = Instant::now();
    let sealed: i64 = db.query_one("SELECT audit.seal()", &[]).unwrap().get(0);
    assert!(
        sealed >= 1 && t.elapsed() < Duration::from_secs(2),
        "sealed {sealed} in {:?}",
        t.elapsed()
    );
    // A writer still open: seal() waits for it, then seals its row too.
    let mut w = c.connect("postgres");
    w.batch_execute("BEGIN; UPDATE acct SET bal = 2 WHERE id = 2;").unwrap();
    let committer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(700));
        w.batch_execute("COMMIT").unwrap();
    });
    let t = Instant::now();
    let sealed: i64 = db.query_one("SELECT audit.seal()", &[]).unwrap().get(0);
    let waited = t.elapsed();
    committer.join().unwrap();
    assert_eq!(sealed, 1, "the open writer's row, once it committed");
    assert!(
        waited >= Duration::from_millis(500),
        "seal() returned before the writer ended: {waited:?}"
    );
    // Bounded by lock_timeout, with a clear error, and nothing sealed.
    let mut w = c.connect("postgres");
    w.batch_execute("BEGIN; UPDATE acct SET bal = 3 WHERE id = 3;").unwrap();
    db.batch_execute("SET lock_timeout = '300ms'").unwrap();
    let err = db.query_one("SELECT audit.seal()", &[]).unwrap_err();
    let e = err.as_db_error().unwrap();
    assert_eq!(e.code().code(), "55P03", "{e}");
    assert!(e.message().contains("gave up waiting"), "{e}");
    w.batch_execute("COMMIT").unwrap();
    db.batch_execute("RESET lock_timeout").unwrap();
    // A transaction's own rows, also from subtransactions, are sealed by its own seal().
    db.batch_execute(
        "BEGIN;
         SAVEPOINT a; UPDATE acct SET bal = 4 WHERE id = 4; RELEASE a;
         SAVEPOINT b; UPDATE acct SET bal = 5 WHERE id = 5; ROLLBACK TO b;
         SAVEPOINT c; UPDATE acct SET bal = 6 WHERE id = 6; RELEASE c;",
    )
    .unwrap();
    let sealed: i64 = db.query_one("SELECT audit.seal()", &[]).unwrap().get(0);
    db.batch_execute("COMMIT").unwrap();
    assert_eq!(sealed, 3, "the earlier writer's row and this transaction's two");
    let top: i64 = db.query_one("SELECT max(id) FROM audit.log", &[]).unwrap().get(0);
    assert_eq!(max_sealed(&mut db), top);
    report.batch_execute("COMMIT").unwrap();
    let (ok, detail) = verify(&mut db, None);
    assert!(ok, "{detail}");
    c.assert_no_crash();
}

#[test]
fn maintain_then_seal_in_one_transaction_seals_everything() {
    let c = Cluster::start(ClusterOpts::new().preload(false));
    let mut db = tracked(&c);
    db.batch_execute("UPDATE acct SET bal = bal + 1 WHERE id <= 10").unwrap();
    // One query string: one transaction, as pg_cron runs the README's recipe.
    let msgs = db.simple_query("SELECT audit.maintain(); SELECT audit.seal()").unwrap();
    let sealed: i64 = msgs
        .iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .last()
        .unwrap();
    assert!(sealed >= 10, "sealed {sealed}");
    let top: i64 = db.query_one("SELECT max(id) FROM audit.log", &[]).unwrap().get(0);
    assert_eq!(max_sealed(&mut db), top);
    c.assert_no_crash();
}

/// 30 rounds beside 4 writers and the worker at naptime = 1: when seal() returns,
/// every row committed before the call is sealed.
#[test]
fn seal_returns_with_every_earlier_commit_sealed_beside_the_worker() {
    let c = Cluster::start(ClusterOpts::new().preload(true).conf("audit.naptime = 1"));
    let mut db = tracked(&c);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut conn = c.connect("postgres");
        let stop = stop.clone();
        writers.push(thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = w * 25 + i % 25 + 1;
                conn.execute("UPDATE acct SET bal = bal + 1 WHERE id = $1", &[&id]).unwrap();
                i += 1;
            }
        }));
    }
    // The first writer's commit first: before it there is nothing to seal, and
    // digest() rightly refuses an empty chain (55000), on a slow machine too.
    let t = std::time::Instant::now();
    while db.query_one("SELECT count(*) FROM audit.log", &[]).unwrap().get::<_, i64>(0) == 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "no writer committed within 30 s");
        thread::sleep(Duration::from_millis(10));
    }
    for round in 0..30 {
        let committed: i64 =
            db.query_one("SELECT coalesce(max(id), 0) FROM audit.log", &[]).unwrap().get(0);
        db.query_one("SELECT audit.seal()", &[]).unwrap();
        let through: i64 =
            db.query_one("SELECT (audit.digest()->>'through_id')::int8", &[]).unwrap().get(0);
        assert!(
            through >= committed,
            "round {round}: digest through {through} < committed {committed}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    db.query_one("SELECT audit.seal()", &[]).unwrap();
    let (ok, detail) = verify(&mut db, None);
    assert!(ok, "{detail}");
    c.assert_no_crash();
}

/// The README's recipe without preload, scheduled with Debian's pg_cron exactly as
/// written, seals on its first run. pg_cron is packaged for PostgreSQL 15 only.
#[test]
fn pg_cron_recipe_seals_on_its_first_run() {
    let pgc = std::env::var("AUDIT_EXT_PG_CONFIG")
        .unwrap_or_else(|_| common::DEFAULT_PG_CONFIG.to_string());
    let pkglib = std::process::Command::new(&pgc).arg("--pkglibdir").output().unwrap();
    let pkglib = String::from_utf8_lossy(&pkglib.stdout).trim().to_string();
    if !std::path::Path::new(&pkglib).join("pg_cron.so").exists() {
        eprintln!("skipped: no pg_cron for {pgc} (Debian packages it for PostgreSQL 15)");
        return;
    }
    let c = Cluster::start(
        ClusterOpts::new()
            .preload(false)
            .conf("shared_preload_libraries = 'pg_cron'")
            .conf("cron.database_name = 'postgres'")
            .conf("cron.use_background_workers = on"),
    );
    let mut db = tracked(&c);
    db.batch_execute("CREATE EXTENSION pg_cron; UPDATE acct SET bal = bal + 1 WHERE id <= 5;")
        .unwrap();
    let top: i64 = db.query_one("SELECT max(id) FROM audit.log", &[]).unwrap().get(0);
    db.batch_execute(
        "SELECT cron.schedule('audit-maintain', '* * * * *', $c$SELECT audit.maintain(); SELECT audit.seal()$c$);",
    )
    .unwrap();
    wait_for("pg_cron's first run", &c, || {
        let n: i64 = c
            .connect("postgres")
            .query_one(
                "SELECT count(*) FROM cron.job_run_details WHERE status IN ('succeeded', 'failed')",
                &[],
            )
            .unwrap()
            .get(0);
        n > 0
    });
    let (status, msg): (String, String) = {
        let r = db.query_one("SELECT status, coalesce(return_message, '') FROM cron.job_run_details ORDER BY runid LIMIT 1", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(status, "succeeded", "{msg}");
    assert!(
        max_sealed(&mut db) >= top,
        "the first run sealed nothing: sealed through {} < {top}",
        max_sealed(&mut db)
    );
    c.assert_no_crash();
}

/// The reference verifier printed in docs/hashing.md, run as printed on an export
/// of a history with retention records: it agrees with audit.verify(), both ways.
#[test]
fn reference_verifier_in_hashing_md_agrees_with_verify() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/hashing.md")).unwrap();
    let block = |lang: &str, starts: &str| -> String {
        doc.split(&format!("```{lang}\n"))
            .skip(1)
            .map(|b| b.split("```").next().unwrap().to_string())
            .find(|b| b.starts_with(starts))
            .unwrap_or_else(|| {
                panic!("no {lang} block starting with {starts:?} in docs/hashing.md")
            })
    };
    let export = block("sql", "\\pset tuples_only");
    let script = block("python", "import hashlib");
    let s = Split::new();
    let mut db = partly_pruned(&s);
    s.retention(&mut db);
    db.batch_execute("UPDATE t SET v = 'after' WHERE id = 2").unwrap();
    // Reads too: audit.access_log rows are in the same chain.
    db.batch_execute("SELECT audit.track('t', reads => true)").unwrap();
    db.batch_execute("SELECT v FROM t WHERE id = 2").unwrap();
    db.batch_execute("ALTER SYSTEM SET audit.naptime = 3600").unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    let t = Instant::now();
    while db
        .query_one("SELECT count(*) FROM audit.access_log WHERE table_name = 't'", &[])
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(t.elapsed() < Duration::from_secs(30), "the worker wrote no read record");
        thread::sleep(Duration::from_millis(50));
    }
    db.query_one("SELECT audit.seal()", &[]).unwrap();
    let d = digest(&mut db);
    let dir = std::env::temp_dir().join(format!("audit_ext_refverify_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("export.sql"), export).unwrap();
    std::fs::write(dir.join("verify.py"), script).unwrap();
    std::fs::write(dir.join("digest.json"), &d).unwrap();
    let run = |what: &str| -> (bool, String) {
        let out =
            s.c.client("psql")
                .args(["-X", "-q", "-d", "postgres", "-f"])
                .arg(dir.join("export.sql"))
                .current_dir(&dir)
                .output()
                .unwrap();
        assert!(
            out.status.success(),
            "{what}: export failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = std::process::Command::new("python3")
            .arg("verify.py")
            .arg("digest.json")
            .current_dir(&dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    // psql as root runs through sudo -u postgres: let it write there.
    let _ = std::process::Command::new("chmod").arg("777").arg(&dir).status();
    let (ok, out) = run("untouched");
    assert!(ok, "the reference verifier refuses an untouched history: {out}");
    let (ok, detail) = verify(&mut db, Some(&d));
    assert!(ok, "{detail}");
    db.batch_execute("DELETE FROM audit.pruned WHERE id = (SELECT min(id) FROM audit.pruned)")
        .unwrap();
    let (ok, out) = run("a kept pair deleted");
    assert!(!ok, "the reference verifier missed a deleted pair: {out}");
    let (ok, _) = verify(&mut db, Some(&d));
    assert!(!ok);
    let _ = std::fs::remove_dir_all(&dir);
    s.c.assert_no_crash();
}

// ---- the redaction key follows the extension's incarnation ------------------------------

/// The redaction marker the log holds for row `id` of table r.
fn marker(db: &mut Client, id: i32) -> String {
    db.query_one(
        "SELECT new_values->>'v' FROM audit.log WHERE table_name = 'r' AND row_id = $1::text
          ORDER BY id DESC LIMIT 1",
        &[&id.to_string()],
    )
    .unwrap()
    .get(0)
}

#[test]
fn redaction_key_follows_recreation() {
    let c = Cluster::start(ClusterOpts::new());
    let setup = "CREATE EXTENSION audit_ext;
                 CREATE TABLE IF NOT EXISTS r (id int PRIMARY KEY, v text);
                 SELECT audit.track('r', redact => ARRAY['v']);";
    let mut a = c.connect("postgres");
    a.batch_execute(setup).unwrap();
    a.batch_execute("INSERT INTO r VALUES (1, 'same')").unwrap();
    // Another session caches the key too.
    let mut b = c.connect("postgres");
    b.batch_execute("INSERT INTO r VALUES (2, 'same')").unwrap();
    let first = marker(&mut a, 1);
    assert_eq!(marker(&mut a, 2), first, "one key, one marker per value");

    // A new incarnation, made by session a: a new key.
    a.batch_execute(
        "SET audit.allow_drop = on; DROP EXTENSION audit_ext CASCADE; RESET audit.allow_drop",
    )
    .unwrap();
    a.batch_execute(setup).unwrap();
    a.batch_execute("INSERT INTO r VALUES (3, 'same')").unwrap();
    b.batch_execute("INSERT INTO r VALUES (4, 'same')").unwrap();
    let mut fresh = c.connect("postgres");
    fresh.batch_execute("INSERT INTO r VALUES (5, 'same')").unwrap();
    let second = marker(&mut fresh, 5);
    assert_ne!(second, first, "a re-created extension has a new key");
    assert_eq!(marker(&mut a, 3), second, "the session that re-created it uses the new key");
    assert_eq!(marker(&mut b, 4), second, "another running session uses the new key");
    // Time travel compares live rows through markers made with the same key.
    let live: String = b
        .query_one(
            "SELECT s->>'v' FROM audit.table_at('r', now()) s WHERE (s->>'id')::int = 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(live, second, "time travel in a running session uses the new key");
    c.assert_no_crash();
}
