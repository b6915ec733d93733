//! Exact history and writes that never fail: undo against concurrent later
//! changes (two real sessions), for UPDATE and for DELETE.
#![cfg(not(feature = "pg_test"))] // run once, by scripts/test's integration step
mod common;

use std::thread;
use std::time::Duration;

use common::{Client, Cluster, ClusterOpts};

fn setup(c: &Cluster) -> Client {
    let mut db = c.connect("postgres");
    db.batch_execute(
        "CREATE EXTENSION audit_ext;
         CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t VALUES (1, 'orig'), (2, 'orig');
         SELECT audit.track('t');",
    )
    .unwrap();
    db
}

fn txid_of(db: &mut Client, sql: &str) -> i64 {
    db.batch_execute("BEGIN").unwrap();
    db.batch_execute(sql).unwrap();
    let x: i64 = db.query_one("SELECT txid_current()", &[]).unwrap().get(0);
    db.batch_execute("COMMIT").unwrap();
    x
}

/// undo(A) that has to wait for B, which changed the same row after A and commits
/// while undo waits: refused with 40001, B's change kept.
fn undo_waits_then_refuses(c: &Cluster, a_sql: &str, b_sql: &str, id: i32) {
    let mut db = c.connect("postgres");
    let a = txid_of(&mut db, a_sql);
    let mut b = c.connect("postgres");
    b.batch_execute("BEGIN").unwrap();
    b.batch_execute(b_sql).unwrap();
    let mut u = c.connect("postgres");
    let undo = thread::spawn(move || {
        u.query_one("SELECT audit.undo($1)", &[&a]).map(|r| r.get::<_, i64>(0))
    });
    thread::sleep(Duration::from_millis(500));
    assert!(!undo.is_finished(), "undo did not wait for the later transaction's row");
    b.batch_execute("COMMIT").unwrap();
    let err = undo.join().unwrap().expect_err("undo overwrote a later change");
    assert_eq!(err.code().map(|c| c.code()), Some("40001"), "{err}");
    let v: String = db.query_one("SELECT v FROM t WHERE id = $1", &[&id]).unwrap().get(0);
    assert_eq!(v, "later-fix");
}

#[test]
fn undo_of_an_update_refuses_a_later_concurrent_update() {
    let c = Cluster::start(ClusterOpts::new().conf("audit.naptime = 0"));
    setup(&c);
    undo_waits_then_refuses(
        &c,
        "UPDATE t SET v = 'a-change' WHERE id = 1",
        "UPDATE t SET v = 'later-fix' WHERE id = 1",
        1,
    );
    c.assert_no_crash();
}

#[test]
fn undo_of_a_delete_refuses_a_later_concurrent_insert() {
    let c = Cluster::start(ClusterOpts::new().conf("audit.naptime = 0"));
    setup(&c);
    undo_waits_then_refuses(
        &c,
        "DELETE FROM t WHERE id = 2",
        "INSERT INTO t VALUES (2, 'later-fix')",
        2,
    );
    c.assert_no_crash();
}

#[test]
fn undo_of_an_insert_refuses_a_later_concurrent_update() {
    let c = Cluster::start(ClusterOpts::new().conf("audit.naptime = 0"));
    setup(&c);
    undo_waits_then_refuses(
        &c,
        "INSERT INTO t VALUES (3, 'new')",
        "UPDATE t SET v = 'later-fix' WHERE id = 3",
        3,
    );
    c.assert_no_crash();
}

#[test]
fn undo_without_later_changes_still_restores() {
    let c = Cluster::start(ClusterOpts::new().conf("audit.naptime = 0"));
    let mut db = setup(&c);
    let a = txid_of(&mut db, "UPDATE t SET v = 'bad' WHERE id = 1; DELETE FROM t WHERE id = 2;");
    let n: i64 = db.query_one("SELECT audit.undo($1)", &[&a]).unwrap().get(0);
    assert_eq!(n, 2);
    let rows: Vec<(i32, String)> = db
        .query("SELECT id, v FROM t ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, vec![(1, "orig".to_string()), (2, "orig".to_string())]);
    c.assert_no_crash();
}

/// A database whose maintenance fails keeps being sealed by the worker, and the
/// failure is visible in SQL through audit.status().
#[test]
fn worker_keeps_sealing_when_maintenance_fails_and_status_says_why() {
    let c = Cluster::start(ClusterOpts::new().conf("audit.naptime = 0"));
    let mut db = setup(&c);
    // A table squatting on the name of the next partition maintain() wants to make.
    db.batch_execute(
        "SET audit.allow_drop = on;
         DO $$ DECLARE p text; BEGIN
           SELECT c.relname INTO p FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'audit.log'::regclass AND c.relname <> 'log_default' ORDER BY c.relname DESC LIMIT 1;
           EXECUTE format('DROP TABLE audit.%I', p);
           EXECUTE format('CREATE TABLE audit.%I (x int)', p);
         END $$;
         RESET audit.allow_drop;",
    )
    .unwrap();
    let err = db.query_one("SELECT audit.maintain()", &[]).unwrap_err();
    let msg = err.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
    assert!(msg.contains("already exists"), "{err:?}");
    db.batch_execute("UPDATE t SET v = 'x' WHERE id = 1").unwrap();
    db.batch_execute("ALTER SYSTEM SET audit.naptime = 1").unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    let t = std::time::Instant::now();
    loop {
        let r = db
            .query_one("SELECT maintain_ok, coalesce(maintain_detail, ''), seal_ok, unsealed_rows FROM audit.status()", &[])
            .unwrap();
        let (m_ok, detail, s_ok, unsealed): (Option<bool>, String, Option<bool>, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        if m_ok == Some(false) && s_ok == Some(true) && unsealed == 0 {
            assert!(detail.contains("already exists"), "{detail}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "status: {m_ok:?} {detail} {s_ok:?} {unsealed}\n{}",
            c.log_contents()
        );
        thread::sleep(Duration::from_millis(200));
    }
    // The worker keeps going: a later write is sealed too.
    db.batch_execute("UPDATE t SET v = 'y' WHERE id = 1").unwrap();
    let t = std::time::Instant::now();
    while db.query_one("SELECT unsealed_rows FROM audit.status()", &[]).unwrap().get::<_, i64>(0)
        > 0
    {
        assert!(t.elapsed() < Duration::from_secs(60), "not sealed\n{}", c.log_contents());
        thread::sleep(Duration::from_millis(200));
    }
    assert!(c.log_contents().contains("maintenance failed"));
    c.assert_no_crash();
}

/// A session that was already connected (a pooled connection) and has written to a
/// tracked partitioned table logs the new name once another session renames the
/// table, or its schema; history under the new name finds every row.
#[test]
fn renames_reach_pooled_sessions_of_partitioned_tables() {
    let c = Cluster::start(ClusterOpts::new().conf("audit.naptime = 0"));
    let mut db = c.connect("postgres");
    db.batch_execute(
        "CREATE EXTENSION audit_ext;
         CREATE SCHEMA ps;
         CREATE TABLE ps.ev (id int, k int, v text, PRIMARY KEY (id, k)) PARTITION BY LIST (k);
         CREATE TABLE ps.ev_1 PARTITION OF ps.ev FOR VALUES IN (1);
         SELECT audit.track('ps.ev');",
    )
    .unwrap();
    let mut pooled = c.connect("postgres");
    pooled.batch_execute("INSERT INTO ps.ev VALUES (1, 1, 'a')").unwrap();
    db.batch_execute("ALTER TABLE ps.ev RENAME TO ev2").unwrap();
    pooled.batch_execute("UPDATE ps.ev2 SET v = 'b' WHERE id = 1").unwrap();
    db.batch_execute("ALTER SCHEMA ps RENAME TO ps2").unwrap();
    pooled.batch_execute("UPDATE ps2.ev2 SET v = 'c' WHERE id = 1").unwrap();
    let names: Vec<String> = db
        .query("SELECT schema_name || '.' || table_name FROM audit.log WHERE operation <> 'DDL' ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, vec!["ps.ev", "ps.ev2", "ps2.ev2"]);
    let n: i64 = db
        .query_one("SELECT count(*) FROM audit.history('ps2.ev2', '[1, 1]')", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    c.assert_no_crash();
}

/// The current partition is missing, so rows land in audit.log_default; then
/// maintain() creates the partition and moves the rows while 4 writers keep
/// writing. No writer may fail, and the default partition must drain.
fn default_partition_drains_under_writers(worker: bool) {
    let naptime = if worker { "audit.naptime = 1" } else { "audit.naptime = 0" };
    let c = Cluster::start(
        ClusterOpts::new()
            .conf(naptime)
            .conf("log_lock_waits = on")
            .conf("deadlock_timeout = 50ms"),
    );
    let mut db = c.connect("postgres");
    db.batch_execute(
        "CREATE EXTENSION audit_ext;
         CREATE TABLE t (id int PRIMARY KEY, v int);
         INSERT INTO t SELECT g, 0 FROM generate_series(1, 100) g;
         SELECT audit.track('t');",
    )
    .unwrap();
    common::drop_premade_partitions(&mut db);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut conn = c.connect("postgres");
        let stop = stop.clone();
        writers.push(thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, Vec::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = w * 25 + i % 25 + 1;
                match conn.execute("UPDATE t SET v = v + 1 WHERE id = $1", &[&id]) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("{e:?}")),
                }
                i += 1;
            }
            (ok, failed)
        }));
    }
    thread::sleep(Duration::from_millis(500));
    let t0 = std::time::Instant::now();
    let mut busy = 0;
    loop {
        if !worker {
            let r: String = db.query_one("SELECT audit.maintain()::text", &[]).unwrap().get(0);
            if r.contains("\"busy\": true") {
                busy += 1;
            }
        }
        let in_default: i64 =
            db.query_one("SELECT count(*) FROM audit.log_default", &[]).unwrap().get(0);
        let parts: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit.log'::regclass",
                &[],
            )
            .unwrap()
            .get(0);
        if in_default == 0 && parts > 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the default partition never drained ({in_default} rows, {busy} busy runs)\n{}",
            c.log_contents()
                .lines()
                .filter(|l| l.contains("lock"))
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
        thread::sleep(Duration::from_millis(if worker { 200 } else { 50 }));
    }
    thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in writers {
        let (ok, failed) = w.join().unwrap();
        assert!(failed.is_empty(), "writers failed: {failed:?}");
        total += ok;
    }
    assert!(total > 0);
    let in_default: i64 =
        db.query_one("SELECT count(*) FROM audit.log_default", &[]).unwrap().get(0);
    assert_eq!(in_default, 0, "rows written after the move went to the new partition");
    let logged: i64 = db
        .query_one("SELECT count(*) FROM audit.log WHERE operation = 'UPDATE'", &[])
        .unwrap()
        .get(0);
    assert_eq!(logged as u64, total, "every committed write logged once");
    c.assert_no_crash();
}

#[test]
fn default_partition_drains_under_writers_by_maintain() {
    default_partition_drains_under_writers(false);
}

#[test]
fn default_partition_drains_under_writers_by_the_worker() {
    default_partition_drains_under_writers(true);
}
