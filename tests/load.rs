//! Promises 1 and 2 of the hardening issue, on real connections:
//! - exactly the committed changes are logged, under 8 clients with savepoint
//!   rollbacks and aborted transactions, while seal() and maintain() run;
//! - after `pg_ctl -m immediate` or a SIGKILLed backend in the middle of that
//!   load, verify is ok, the log matches the tables, and the worker is back.
//!
//! Duration: AUDIT_EXT_LOAD_SECS (default 8; the long mode is 60).
#![cfg(not(feature = "pg_test"))] // run once, by scripts/test's integration step
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Cluster, ClusterOpts, Rng};

const CLIENTS: u64 = 8;
const TABLES: [&str; 3] = ["acct", "orders", "notes"];

fn load_secs() -> u64 {
    std::env::var("AUDIT_EXT_LOAD_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(8)
}

fn setup(c: &Cluster) {
    let mut a = c.connect("postgres");
    a.batch_execute("CREATE EXTENSION audit_ext; SET audit.partition_interval = '1 hour'").unwrap();
    for t in TABLES {
        a.batch_execute(&format!(
            "CREATE TABLE {t} (id bigint PRIMARY KEY, v int NOT NULL, note text);
             SELECT audit.track('{t}');"
        ))
        .unwrap();
    }
}

/// Counts of committed changes per (table, operation), as the clients saw them.
type Counts = HashMap<(String, String), i64>;

/// One client: random transactions on its own rows (no conflicts between
/// clients by design, so any error is the extension's). Returns its counts.
fn client(
    c: &Cluster,
    n: u64,
    stop: Arc<AtomicBool>,
    tolerate_disconnect: bool,
) -> Result<Counts, String> {
    let mut db = c.try_connect("postgres").map_err(|e| e.to_string())?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (n + 1));
    let mut live: Vec<Vec<i64>> = vec![Vec::new(); TABLES.len()];
    let mut next_id = (n as i64) * 10_000_000;
    let mut counts = Counts::new();
    let fail = |e: postgres::Error| e.to_string();
    while !stop.load(Ordering::Relaxed) {
        let run = (|| -> Result<(), postgres::Error> {
            let mut tx = db.transaction()?;
            tx.batch_execute(&format!("SET LOCAL \"app.current_user\" = 'client{n}'"))?;
            let mut pending: Counts = Counts::new();
            let mut pending_live = live.clone();
            for _ in 0..1 + rng.below(5) {
                let ti = rng.below(3) as usize;
                let t = TABLES[ti];
                let in_savepoint = rng.below(5) == 0;
                if in_savepoint {
                    tx.batch_execute("SAVEPOINT sp")?;
                }
                let q = &mut tx;
                let rows = &mut pending_live[ti];
                // (op, id, inserted)
                let done: Option<(&str, Option<i64>, bool)> = match (rng.below(3), rows.is_empty())
                {
                    (0, _) | (_, true) => {
                        next_id += 1;
                        q.execute(&format!("INSERT INTO {t} VALUES ($1, 0, 'n')"), &[&next_id])?;
                        Some(("INSERT", Some(next_id), true))
                    }
                    (1, false) => {
                        let id = rows[rng.below(rows.len() as u64) as usize];
                        q.execute(&format!("UPDATE {t} SET v = v + 1 WHERE id = $1"), &[&id])?;
                        Some(("UPDATE", Some(id), false))
                    }
                    _ => {
                        let k = rng.below(rows.len() as u64) as usize;
                        let id = rows[k];
                        q.execute(&format!("DELETE FROM {t} WHERE id = $1"), &[&id])?;
                        Some(("DELETE", Some(id), false))
                    }
                };
                if in_savepoint {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT sp")?; // undone: counts nothing
                    continue;
                }
                if let Some((op, Some(id), inserted)) = done {
                    *pending.entry((t.to_string(), op.to_string())).or_default() += 1;
                    if inserted {
                        rows.push(id);
                    } else if op == "DELETE" {
                        rows.retain(|r| *r != id);
                    }
                }
            }
            if rng.below(5) == 0 {
                tx.rollback()?; // 20% aborted
            } else {
                tx.commit()?;
                for (k, v) in pending {
                    *counts.entry(k).or_default() += v;
                }
                live = pending_live;
            }
            Ok(())
        })();
        if let Err(e) = run {
            if tolerate_disconnect && (e.is_closed() || e.code().is_none()) {
                return Ok(counts);
            }
            let detail = e
                .as_db_error()
                .map(|d| format!("{} {}", d.code().code(), d.message()))
                .unwrap_or_default();
            return Err(format!("client {n}: {} {detail}", fail(e)));
        }
    }
    Ok(counts)
}

/// Runs seal() and maintain() in a loop beside the clients; returns their errors.
fn housekeeper(c: &Cluster, stop: Arc<AtomicBool>, tolerate_disconnect: bool) -> Vec<String> {
    let mut errors = Vec::new();
    let Ok(mut db) = c.try_connect("postgres") else {
        return vec!["housekeeper could not connect".into()];
    };
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let q = if i.is_multiple_of(4) {
            "SELECT audit.maintain()::text"
        } else {
            "SELECT audit.seal()::text"
        };
        if let Err(e) = db.query_one(q, &[]) {
            if tolerate_disconnect && (e.is_closed() || e.code().is_none()) {
                break;
            }
            let detail = e
                .as_db_error()
                .map(|d| format!("{} {}", d.code().code(), d.message()))
                .unwrap_or_default();
            errors.push(format!("{q}: {e} {detail}"));
        }
        i += 1;
        thread::sleep(Duration::from_millis(50));
    }
    errors
}

fn run_load(
    c: &Arc<Cluster>,
    secs: u64,
    tolerate_disconnect: bool,
    during: impl FnOnce(),
) -> (Counts, Vec<String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for n in 0..CLIENTS {
        let (c, stop) = (c.clone(), stop.clone());
        handles.push(thread::spawn(move || client(&c, n, stop, tolerate_disconnect)));
    }
    let hk = {
        let (c, stop) = (c.clone(), stop.clone());
        thread::spawn(move || housekeeper(&c, stop, tolerate_disconnect))
    };
    let t = Instant::now();
    thread::sleep(Duration::from_secs(secs / 2));
    during();
    thread::sleep(Duration::from_secs(secs).saturating_sub(t.elapsed()));
    stop.store(true, Ordering::Relaxed);
    let mut total = Counts::new();
    for h in handles {
        match h.join().unwrap() {
            Ok(counts) => {
                for (k, v) in counts {
                    *total.entry(k).or_default() += v;
                }
            }
            Err(e) => errors.lock().unwrap().push(e),
        }
    }
    errors.lock().unwrap().extend(hk.join().unwrap());
    let errors = errors.lock().unwrap().clone();
    (total, errors)
}

/// Every live row equals the state of its last audit row, and no deleted row lingers.
fn log_matches_tables(db: &mut postgres::Client) {
    for t in TABLES {
        let bad: i64 = db
            .query_one(
                &format!(
                    "WITH last AS (
                        SELECT DISTINCT ON (row_id) row_id, operation, new_values FROM audit.log
                         WHERE table_name = '{t}' AND operation IN ('INSERT', 'UPDATE', 'DELETE')
                         ORDER BY row_id, id DESC)
                     SELECT count(*) FROM {t} x
                       FULL JOIN (SELECT * FROM last WHERE operation <> 'DELETE') l ON l.row_id = x.id::text
                      WHERE l.new_values IS DISTINCT FROM to_jsonb(x)"
                ),
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(bad, 0, "{t}: rows whose log does not match the table");
    }
}

fn verify_ok(db: &mut postgres::Client) {
    db.query_one("SELECT audit.seal()", &[]).unwrap();
    let r = db.query_one("SELECT ok, detail FROM audit.verify()", &[]).unwrap();
    let (ok, detail): (bool, Option<String>) = (r.get(0), r.get(1));
    assert!(ok, "verify: {detail:?}");
}

#[test]
fn exactly_the_committed_changes() {
    let c = Arc::new(Cluster::start(ClusterOpts::new().preload(true).conf("audit.naptime = 1")));
    setup(&c);
    let (counts, errors) = run_load(&c, load_secs(), false, || {});
    assert!(errors.is_empty(), "errors under load (none may come from the extension): {errors:#?}");
    let mut db = c.connect("postgres");
    let logged: Counts = db
        .query(
            "SELECT table_name, operation, count(*) FROM audit.log
              WHERE operation IN ('INSERT', 'UPDATE', 'DELETE') GROUP BY 1, 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| ((r.get::<_, String>(0), r.get::<_, String>(1)), r.get::<_, i64>(2)))
        .collect();
    assert!(counts.values().sum::<i64>() > 100, "the load did real work: {counts:?}");
    assert_eq!(logged, counts, "audit rows equal the committed changes, per table and operation");
    log_matches_tables(&mut db);
    verify_ok(&mut db);
    // Sealing waits until no older transaction can still add a lower id, which
    // can take a further call (or the worker's next round) after the load.
    let unsealed = |db: &mut postgres::Client| -> i64 {
        db.query_one("SELECT count(*) FROM audit.log WHERE id > (SELECT coalesce(max(through_id), 0) FROM audit.blocks)", &[])
            .unwrap()
            .get(0)
    };
    for _ in 0..20 {
        if unsealed(&mut db) == 0 {
            break;
        }
        db.query_one("SELECT audit.seal()", &[]).unwrap();
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(unsealed(&mut db), 0, "every committed row sealed");
    verify_ok(&mut db);
    c.assert_no_crash();
}

fn launcher_back(c: &Cluster) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if let Ok(mut db) = c.try_connect("postgres") {
            let n: i64 = db
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'audit_ext launcher'", &[])
                .unwrap()
                .get(0);
            if n == 1 {
                return;
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    panic!("the worker did not come back\n{}", c.log_contents());
}

#[test]
fn immediate_shutdown_mid_load() {
    let c = Arc::new(Cluster::start(ClusterOpts::new().preload(true).conf("audit.naptime = 1")));
    setup(&c);
    let cc = c.clone();
    let (_, errors) = run_load(&c, load_secs(), true, move || cc.stop("immediate"));
    assert!(errors.is_empty(), "{errors:#?}");
    c.start_again();
    let mut db = c.connect("postgres");
    log_matches_tables(&mut db);
    verify_ok(&mut db);
    launcher_back(&c);
    c.assert_no_crash();
}

#[test]
fn sigkilled_backend_mid_load() {
    let c = Arc::new(Cluster::start(ClusterOpts::new().preload(true).conf("audit.naptime = 1")));
    setup(&c);
    let cc = c.clone();
    let killed = Arc::new(Mutex::new(0i32));
    let k2 = killed.clone();
    let (_, errors) = run_load(&c, load_secs(), true, move || {
        let mut db = cc.connect("postgres");
        let pid: i32 = db
            .query_one(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
                  ORDER BY pid LIMIT 1",
                &[],
            )
            .unwrap()
            .get(0);
        *k2.lock().unwrap() = pid;
        let st =
            std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
        assert!(st.success());
    });
    assert!(errors.is_empty(), "{errors:#?}");
    // The postmaster restarts every backend after a SIGKILL; wait until it takes connections.
    let t = Instant::now();
    let mut db = loop {
        match c.try_connect("postgres") {
            Ok(db) => break db,
            Err(_) if t.elapsed() < Duration::from_secs(60) => {
                thread::sleep(Duration::from_millis(200))
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    };
    log_matches_tables(&mut db);
    verify_ok(&mut db);
    launcher_back(&c);
    // The only crash in the log is the one this test caused.
    let pid = *killed.lock().unwrap();
    let log = c.log_contents();
    let crashes: Vec<&str> =
        log.lines().filter(|l| l.contains("terminated by signal") || l.contains("PANIC")).collect();
    assert!(
        crashes.iter().all(|l| l.contains(&format!("PID {pid}")) && l.contains("signal 9")),
        "unexpected crash lines: {crashes:#?}"
    );
}
