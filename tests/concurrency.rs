//! Real connections: writers never wait on each other for the audit log, and a
//! sealer running beside writers (with late commits and rollbacks) seals every
//! committed row exactly once.
#![cfg(not(feature = "pg_test"))] // run once, by scripts/test's integration step
mod common;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{Cluster, ClusterOpts};

fn setup(c: &Cluster) {
    let mut a = c.connect("postgres");
    a.batch_execute(
        "CREATE EXTENSION audit_ext;
         CREATE TABLE acct (id int PRIMARY KEY, bal int);
         INSERT INTO acct SELECT g, 0 FROM generate_series(1, 100) g;
         SELECT audit.track('acct');",
    )
    .unwrap();
}

#[test]
fn two_writers_on_different_rows_never_wait() {
    let c = Cluster::start(ClusterOpts::new().preload(true));
    setup(&c);
    let mut w1 = c.connect("postgres");
    let mut w2 = c.connect("postgres");
    // w1 holds an open transaction that has written an audit row...
    w1.batch_execute("BEGIN; UPDATE acct SET bal = 1 WHERE id = 1;").unwrap();
    // ...and w2, on another row, must not wait for it (a lock_timeout turns waiting into an error).
    w2.batch_execute("SET lock_timeout = '2s'").unwrap();
    let t = Instant::now();
    w2.batch_execute("UPDATE acct SET bal = 2 WHERE id = 2").unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "second writer waited {:?}", t.elapsed());
    // A sealer meanwhile never seals past the open transaction: audit.seal() waits
    // for it, up to lock_timeout, then gives up having sealed nothing.
    let mut s = c.connect("postgres");
    s.batch_execute("SET lock_timeout = '500ms'").unwrap();
    let err = s.query_one("SELECT audit.seal()", &[]).unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("55P03"), "{err}");
    let sealed: i64 = s.query_one("SELECT count(*) FROM audit.blocks", &[]).unwrap().get(0);
    assert_eq!(sealed, 0, "nothing is final while an older transaction may still hold a lower id");
    w1.batch_execute("COMMIT").unwrap();
    let sealed: i64 = s.query_one("SELECT audit.seal() + audit.seal()", &[]).unwrap().get(0);
    assert_eq!(sealed, 2);
    let ok: bool = s.query_one("SELECT ok FROM audit.verify()", &[]).unwrap().get(0);
    assert!(ok);
    c.assert_no_crash();
}

#[test]
fn sealing_beside_writers_seals_each_committed_row_once() {
    let c = Cluster::start(ClusterOpts::new().preload(true));
    setup(&c);
    let writers = 4;
    let rounds = 150;
    let barrier = Arc::new(Barrier::new(writers + 1));
    let mut handles = Vec::new();
    for w in 0..writers {
        let mut conn = c.connect("postgres");
        let b = barrier.clone();
        handles.push(thread::spawn(move || {
            b.wait();
            let mut committed = 0i64;
            for i in 0..rounds {
                let id = (w * 25 + i % 25 + 1) as i32;
                conn.batch_execute("BEGIN").unwrap();
                conn.execute("UPDATE acct SET bal = bal + 1 WHERE id = $1", &[&id]).unwrap();
                conn.batch_execute("SAVEPOINT s").unwrap();
                conn.execute("UPDATE acct SET bal = bal + 1000 WHERE id = $1", &[&id]).unwrap();
                conn.batch_execute("ROLLBACK TO s").unwrap();
                if i % 5 == 0 {
                    conn.batch_execute("ROLLBACK").unwrap(); // 20% aborted
                } else {
                    if i % 7 == 0 {
                        thread::sleep(Duration::from_millis(5)); // a late commit
                    }
                    conn.batch_execute("COMMIT").unwrap();
                    committed += 1;
                }
            }
            committed
        }));
    }
    let mut sealer = c.connect("postgres");
    barrier.wait();
    let mut sealed = 0i64;
    while !handles.iter().all(|h| h.is_finished()) {
        sealed += sealer.query_one("SELECT audit.seal()", &[]).unwrap().get::<_, i64>(0);
    }
    let committed: i64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    for _ in 0..3 {
        sealed += sealer.query_one("SELECT audit.seal()", &[]).unwrap().get::<_, i64>(0);
    }
    let logged: i64 = sealer
        .query_one("SELECT count(*) FROM audit.log WHERE table_name = 'acct'", &[])
        .unwrap()
        .get(0);
    assert_eq!(logged, committed, "exactly the committed changes are logged");
    assert_eq!(sealed, committed, "every committed row sealed exactly once");
    let in_blocks: i64 =
        sealer.query_one("SELECT sum(row_count)::int8 FROM audit.blocks", &[]).unwrap().get(0);
    assert_eq!(in_blocks, committed);
    let row = sealer.query_one("SELECT ok, detail FROM audit.verify()", &[]).unwrap();
    assert!(row.get::<_, bool>(0), "{}", row.get::<_, String>(1));
    c.assert_no_crash();
}
