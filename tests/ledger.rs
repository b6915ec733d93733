//! audit.baseline and audit.verify_table with more than one session: a baseline
//! taken while writers run misses no row and doubles none (two baselines at
//! once included); verify_table beside committing writers raises no false
//! alarm, also for a `changes`-mode key folded in a transaction that has
//! written; and a dump and restore keeps a baselined table verifying.
#![cfg(not(feature = "pg_test"))] // run once, by scripts/test's integration step
mod common;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{Cluster, ClusterOpts, Rng};

type Verdict = (bool, i64, i64, i64, i64, Option<String>, String);

fn verify_table(c: &mut postgres::Client, table: &str) -> Verdict {
    let r = c
        .query_one(
            "SELECT ok, rows_checked, missing, unexplained, changed, first_bad_row_id, detail
               FROM audit.verify_table($1::text::regclass)",
            &[&table],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6))
}

/// Writers change, insert, delete and re-key rows through the trigger while two
/// baselines run in small batches. Afterwards every live row must be explained
/// (nothing missed), no key may have two SNAPSHOTs (nothing doubled), and the
/// table must verify.
#[test]
fn a_baseline_beside_writers_misses_and_doubles_nothing() {
    let c = Cluster::start(ClusterOpts::new().preload(false));
    let mut a = c.connect("postgres");
    a.batch_execute("CREATE EXTENSION audit_ext").unwrap();
    let writers = 3u64;
    for round in 0..4 {
        let table = format!("acct_{round}");
        a.batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, bal numeric, tag text);
             INSERT INTO {table} SELECT g, g * 1.50, 'pre' FROM generate_series(1, 4000) g;
             SELECT audit.track('{table}');"
        ))
        .unwrap();
        let barrier = Arc::new(Barrier::new(writers as usize + 2));
        let mut handles = Vec::new();
        for w in 0..writers {
            let (mut db, barrier, table) = (c.connect("postgres"), barrier.clone(), table.clone());
            handles.push(thread::spawn(move || {
                let mut rng = Rng(round * 100 + w + 1);
                barrier.wait();
                for i in 0..400u64 {
                    let id = 1 + rng.below(4000) as i32;
                    let fresh = (100_000 * (w + 1) + i) as i32;
                    let sql = match rng.below(4) {
                        0 => format!("DELETE FROM {table} WHERE id = {id}"),
                        1 => format!("INSERT INTO {table} VALUES ({fresh}, 0, 'new')"),
                        2 => format!("UPDATE {table} SET id = {fresh} WHERE id = {id}"),
                        _ => format!("UPDATE {table} SET bal = bal + 1.25 WHERE id = {id}"),
                    };
                    db.batch_execute(&sql).unwrap();
                }
            }));
        }
        for _ in 0..2 {
            let (mut db, barrier, table) = (c.connect("postgres"), barrier.clone(), table.clone());
            handles.push(thread::spawn(move || {
                barrier.wait();
                db.query_one("SELECT audit.baseline($1::text::regclass, 50)", &[&table]).unwrap();
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
        let doubled: i64 = a
            .query_one(
                "SELECT count(*) FROM (SELECT row_id FROM audit.log
                   WHERE table_name = $1 AND operation = 'SNAPSHOT' GROUP BY row_id HAVING count(*) > 1) d",
                &[&table],
            )
            .unwrap()
            .get(0);
        assert_eq!(doubled, 0, "round {round}: keys with two SNAPSHOTs");
        let live: i64 = a.query_one(&format!("SELECT count(*) FROM {table}"), &[]).unwrap().get(0);
        let v = verify_table(&mut a, &table);
        assert!(v.0, "round {round}: {v:?}");
        assert_eq!(v.1, live, "round {round}: every live row checked");
        // A re-run finds every key in the log.
        let again: i64 =
            a.query_one("SELECT audit.baseline($1::text::regclass)", &[&table]).unwrap().get(0);
        assert_eq!(again, 0, "round {round}: a second baseline writes nothing");
    }
    let ok: bool = a.query_one("SELECT ok FROM audit.verify()", &[]).unwrap().get(0);
    assert!(ok);
    c.assert_no_crash();
}

/// verify_table reads the table and the log on one snapshot: writers that commit
/// changes while it runs never make it report a row as changed, missing or
/// unexplained.
#[test]
fn verify_table_beside_committing_writers_raises_no_alarm() {
    let c = Cluster::start(ClusterOpts::new().preload(false));
    let mut a = c.connect("postgres");
    a.batch_execute(
        "CREATE EXTENSION audit_ext;
         CREATE TABLE acct (id int PRIMARY KEY, bal int);
         INSERT INTO acct SELECT g, 0 FROM generate_series(1, 50000) g;
         SELECT audit.track('acct', baseline => true);",
    )
    .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut handles = Vec::new();
    for w in 0..2u64 {
        let (mut db, stop) = (c.connect("postgres"), stop.clone());
        handles.push(thread::spawn(move || {
            let mut rng = Rng(w + 7);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (x, y) = (1 + rng.below(50000), 1 + rng.below(50000));
                // Two rows per transaction, at both ends of the key order.
                db.batch_execute(&format!(
                    "BEGIN; UPDATE acct SET bal = bal + 1 WHERE id = {x};
                     DELETE FROM acct WHERE id = {y};
                     INSERT INTO acct VALUES ({y}, 1) ON CONFLICT (id) DO UPDATE SET bal = 2; COMMIT;"
                ))
                .unwrap();
                n += 1;
            }
            n
        }));
    }
    let t = Instant::now();
    let mut runs = 0;
    while runs < 8 || t.elapsed() < Duration::from_secs(3) {
        let v = verify_table(&mut a, "acct");
        assert!(v.0, "run {runs}: {v:?}");
        runs += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let commits: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(commits > 0, "the writers committed while verify_table ran");
    // And a change behind the trigger is still seen.
    a.batch_execute(
        "SET session_replication_role = replica; UPDATE acct SET bal = -1 WHERE id = 777;
         RESET session_replication_role;",
    )
    .unwrap();
    let v = verify_table(&mut a, "acct");
    assert_eq!((v.0, v.4, v.5.as_deref()), (false, 1, Some("777")), "{v:?}");
    c.assert_no_crash();
}

/// In `changes` mode a key whose newest log row holds only changed columns is
/// folded back from its earlier rows, by a query of its own while the merge
/// runs. That query must read the merge's snapshot even when the verifying
/// transaction has written (where a plain SPI query takes a fresh one): a
/// change another session commits meanwhile must not make the key look changed.
/// The verifier is held, mid-merge, inside a user's cast to json (the first
/// row's encoding) on an advisory lock, while the other session commits.
#[test]
fn a_folded_image_reads_the_merge_snapshot_in_a_transaction_that_wrote() {
    let c = Cluster::start(ClusterOpts::new().preload(false));
    let mut setup = c.connect("postgres");
    setup
        .batch_execute(
            "CREATE EXTENSION audit_ext;
             CREATE TYPE gate AS ENUM ('g');
             CREATE FUNCTION gate_json(gate) RETURNS json LANGUAGE plpgsql AS $$
             BEGIN
               IF current_setting('vt.gate', true) = 'on' THEN
                 PERFORM pg_advisory_lock(4242);
                 PERFORM pg_advisory_unlock(4242);
               END IF;
               RETURN '\"g\"'::json;
             END $$;
             CREATE CAST (gate AS json) WITH FUNCTION gate_json(gate);
             CREATE TABLE snap (id int PRIMARY KEY, g gate, v text);
             SELECT audit.track('snap', capture => 'changes');
             INSERT INTO snap SELECT n, 'g', 'a' FROM generate_series(1, 3) n;
             SET audit.image_every = 0;
             UPDATE snap SET v = 'b' WHERE id = 2;",
        )
        .unwrap();
    // Key 2's newest row holds only v: its image is folded.
    let partial: bool = setup
        .query_one(
            "SELECT new_values = '{\"v\": \"b\"}' FROM audit.log
              WHERE table_name = 'snap' AND row_id = '2' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(partial, "the newest row of key 2 is partial");
    let mut gatekeeper = c.connect("postgres");
    gatekeeper.batch_execute("SELECT pg_advisory_lock(4242)").unwrap();
    let mut verifier = c.connect("postgres");
    let waiter = thread::spawn(move || {
        // The transaction has written: it holds a transaction id.
        verifier.batch_execute("BEGIN; SELECT txid_current(); SET vt.gate = 'on'").unwrap();
        let v = verify_table(&mut verifier, "snap");
        verifier.batch_execute("COMMIT").unwrap();
        v
    });
    let t = Instant::now();
    loop {
        let waiting: i64 = setup
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "verify_table never reached the gate");
        thread::sleep(Duration::from_millis(20));
    }
    // Committed after the verifier's snapshot: not in what it compares.
    setup.batch_execute("SET audit.image_every = 0; UPDATE snap SET v = 'c' WHERE id = 2").unwrap();
    gatekeeper.batch_execute("SELECT pg_advisory_unlock(4242)").unwrap();
    let v = waiter.join().unwrap();
    assert_eq!((v.0, v.1, v.4), (true, 3, 0), "{v:?}");
    // The same check afterwards sees the new state on both sides.
    let v = verify_table(&mut setup, "snap");
    assert_eq!((v.0, v.1, v.4), (true, 3, 0), "{v:?}");
    c.assert_no_crash();
}

/// A baselined table with excluded and redacted columns, dumped and restored:
/// the copy verifies (the redaction key travels with the dump), and a quiet
/// edit on the copy is caught there.
#[test]
fn a_restored_baseline_still_verifies() {
    let c = Cluster::start(ClusterOpts::new().preload(false));
    c.create_db("src");
    let mut s = c.connect("src");
    s.batch_execute(
        "CREATE EXTENSION audit_ext;
         CREATE TABLE users (id int PRIMARY KEY, email text, pw text, seen timestamptz, n numeric);
         INSERT INTO users SELECT g, 'u' || g || '@x', 'secret' || g, NULL, g / 3.0
           FROM generate_series(1, 200) g;
         SELECT audit.track('users', exclude => '{seen}', redact => '{pw}', baseline => true);
         UPDATE users SET email = 'changed@x' WHERE id = 3;
         DELETE FROM users WHERE id = 4;
         INSERT INTO users VALUES (1000, 'late@x', 'pw', now(), 1.10);
         SELECT audit.seal();",
    )
    .unwrap();
    assert!(verify_table(&mut s, "users").0);
    c.dump_and_restore("src", "dst");
    let mut d = c.connect("dst");
    let v = verify_table(&mut d, "users");
    assert!(v.0, "{v:?}");
    assert_eq!(v.1, 200);
    let (ok, detail): (bool, String) = {
        let r = d
            .query_one(
                "SELECT ok, detail FROM audit.verify(tables => ARRAY['users'::regclass])",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(ok, "{detail}");
    d.batch_execute(
        "SET session_replication_role = replica; UPDATE users SET pw = 'stolen' WHERE id = 9;
         RESET session_replication_role;",
    )
    .unwrap();
    let v = verify_table(&mut d, "users");
    assert_eq!((v.0, v.4, v.5.as_deref()), (false, 1, Some("9")), "{v:?}");
    assert!(v.6.contains("pw"), "the detail names the column: {}", v.6);
    let ok: bool = d
        .query_one("SELECT ok FROM audit.verify(tables => ARRAY['users'::regclass])", &[])
        .unwrap()
        .get(0);
    assert!(!ok, "verify() with the table fails too");
    c.assert_no_crash();
}
