//! Access auditing on real connections: reads of read-tracked tables become rows
//! of audit.access_log, written by the background worker, in the same hash chain
//! as audit.log; reads that fail or roll back are recorded too.
#![cfg(not(feature = "pg_test"))] // run once, by scripts/test's integration step
mod common;

use std::time::{Duration, Instant};

use common::{Client, Cluster, ClusterOpts};

fn cluster() -> Cluster {
    Cluster::start(ClusterOpts::new().conf("audit.naptime = 3600"))
}

fn setup(db: &mut Client) {
    db.batch_execute(
        "CREATE EXTENSION audit_ext;
         CREATE TABLE customers (id int PRIMARY KEY, name text, card text);
         INSERT INTO customers SELECT g, 'name ' || g, 'card ' || g FROM generate_series(1, 10) g;
         CREATE TABLE other (id int);
         SELECT audit.track('customers', reads => true);",
    )
    .unwrap();
}

/// Waits until audit.access_log holds `n` reads of customers (the worker writes them soon after).
fn wait_rows(db: &mut Client, n: i64) -> i64 {
    let t = Instant::now();
    loop {
        let got: i64 = db
            .query_one("SELECT count(*) FROM audit.access_log WHERE table_name = 'customers'", &[])
            .unwrap()
            .get(0);
        if got >= n || t.elapsed() > Duration::from_secs(30) {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn verify(db: &mut Client) -> (bool, String) {
    let r = db.query_one("SELECT ok, detail FROM audit.verify()", &[]).unwrap();
    (r.get(0), r.get(1))
}

type Row = (String, String, Option<i64>, String, Option<String>, Vec<String>);

fn rows(db: &mut Client) -> Vec<Row> {
    db.query(
        "SELECT command, outcome, rows, accessed_by, sqlstate, coalesce(columns, '{}')
           FROM audit.access_log WHERE table_name = 'customers' ORDER BY id",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
    .collect()
}

#[test]
fn reads_are_recorded_with_actor_columns_rows_and_outcome() {
    let c = cluster();
    let mut db = c.connect("postgres");
    setup(&mut db);
    let mut app = c.connect("postgres");
    app.batch_execute(
        "SET \"app.current_user\" = 'alice@corp';
         SELECT name FROM customers WHERE id = 2;
         SELECT count(*) FROM other;
         BEGIN READ ONLY; SELECT * FROM customers WHERE id < 4; ROLLBACK;",
    )
    .unwrap();
    // A failing statement is recorded with its SQLSTATE.
    let err = app.batch_execute("SELECT 1 / (id - 5) FROM customers").unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22012");
    // EXPLAIN without ANALYZE reads nothing.
    app.batch_execute("EXPLAIN SELECT * FROM customers").unwrap();
    assert_eq!(wait_rows(&mut db, 3), 3);
    std::thread::sleep(Duration::from_millis(300));
    let r = rows(&mut db);
    assert_eq!(r.len(), 3, "{r:?}");
    assert_eq!(
        r[0],
        (
            "SELECT".into(),
            "ok".into(),
            Some(1),
            "alice@corp".into(),
            None,
            vec!["id".to_string(), "name".to_string()]
        )
    );
    assert_eq!((r[1].1.as_str(), r[1].2), ("ok", Some(3)), "read-only, rolled back: {r:?}");
    assert_eq!(r[1].5, vec!["id", "name", "card"]);
    assert_eq!((r[2].1.as_str(), r[2].4.as_deref()), ("error", Some("22012")), "{r:?}");
    // Reading took no transaction id: the reader never writes.
    let txids: Vec<Option<i64>> = db
        .query("SELECT txid FROM audit.access_log WHERE table_name = 'customers' ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(txids, vec![None, None, None]);

    // In one chain with the changes: sealed and verified.
    db.batch_execute("UPDATE customers SET name = 'x' WHERE id = 1").unwrap();
    let sealed: i64 = db.query_one("SELECT audit.seal()", &[]).unwrap().get(0);
    assert!(sealed >= 4, "sealed {sealed}");
    let (ok, detail) = verify(&mut db);
    assert!(ok, "{detail}");
    // Tampering with a read record is caught.
    db.batch_execute(
        "SET audit.allow_drop = on;
         UPDATE audit.access_log SET accessed_by = 'mallory' WHERE accessed_by = 'alice@corp' AND rows = 1;",
    )
    .unwrap();
    let (ok, detail) = verify(&mut db);
    assert!(!ok && detail.contains("altered"), "{detail}");
    c.assert_no_crash();
}

#[test]
fn denied_copy_and_dml_reads() {
    let c = cluster();
    let mut db = c.connect("postgres");
    setup(&mut db);
    db.batch_execute("CREATE ROLE clerk LOGIN; GRANT SELECT (id) ON customers TO clerk;").unwrap();
    let mut clerk = c.connect_as("postgres", "clerk");
    let err = clerk.batch_execute("SELECT card FROM customers").unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42501");
    // The clerk's abort, which queues the record, follows the error the client got.
    assert_eq!(wait_rows(&mut db, 1), 1);
    db.batch_execute(
        "COPY customers (id, card) TO '/dev/null';
         COPY (SELECT name FROM customers WHERE id = 3) TO '/dev/null';
         UPDATE other SET id = 1 FROM customers WHERE customers.id = other.id;",
    )
    .unwrap();
    assert_eq!(wait_rows(&mut db, 4), 4);
    let r = rows(&mut db);
    assert_eq!(
        (r[0].0.as_str(), r[0].1.as_str(), r[0].4.as_deref(), r[0].2),
        ("SELECT", "denied", Some("42501"), Some(0))
    );
    assert_eq!(
        (r[1].0.as_str(), r[1].2, r[1].5.clone()),
        ("COPY", Some(10), vec!["id".into(), "card".into()])
    );
    assert_eq!((r[2].0.as_str(), r[2].2), ("COPY", Some(1)));
    assert_eq!(r[3].0, "UPDATE");
    // The role that only reads cannot see or change the record of its reads.
    let err = clerk.batch_execute("SELECT * FROM audit.access_log").unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42501");
    c.assert_no_crash();
}

#[test]
fn reads_need_preload() {
    let c = Cluster::start(ClusterOpts::new().preload(false));
    let mut db = c.connect("postgres");
    db.batch_execute("CREATE EXTENSION audit_ext; CREATE TABLE t (id int PRIMARY KEY);").unwrap();
    let err = db.batch_execute("SELECT audit.track('t', reads => true)").unwrap_err();
    assert_eq!(err.code().unwrap().code(), "55000");
    let err = db.batch_execute("SELECT audit.track('t', writes => false)").unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22023");
    c.assert_no_crash();
}

/// Pauses or resumes the worker (audit.naptime, reloaded).
fn set_naptime(db: &mut Client, secs: u32) {
    db.batch_execute(&format!("ALTER SYSTEM SET audit.naptime = {secs}")).unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn a_full_queue_loses_nothing_silently() {
    let c = Cluster::start(
        ClusterOpts::new().conf("audit.naptime = 0").conf("audit.access_queue_size = 16"),
    );
    let mut db = c.connect("postgres");
    setup(&mut db);
    db.batch_execute("SET audit.access_log_self = off").unwrap();
    let mut app = c.connect("postgres");
    app.batch_execute("SET audit.access_overflow = 'drop'").unwrap();
    for _ in 0..20 {
        app.batch_execute("SELECT * FROM customers WHERE id = 1").unwrap();
    }
    // `error` refuses a read it cannot record (and counts it too).
    app.batch_execute("SET audit.access_overflow = 'error'").unwrap();
    let err = app.batch_execute("SELECT * FROM customers WHERE id = 2").unwrap_err();
    assert_eq!(err.code().unwrap().code(), "53000");
    // `block` waits, then drops.
    app.batch_execute("SET audit.access_overflow = 'block'; SET audit.access_block_timeout = 50")
        .unwrap();
    let t = Instant::now();
    app.batch_execute("SELECT * FROM customers WHERE id = 3").unwrap();
    assert!(t.elapsed() >= Duration::from_millis(50));
    set_naptime(&mut db, 3600);
    assert_eq!(wait_rows(&mut db, 16), 16);
    // The next read reports the 6 that were lost before it.
    app.batch_execute("SELECT * FROM customers WHERE id = 4").unwrap();
    let t = Instant::now();
    let lost = loop {
        let r = db
            .query_opt("SELECT rows, backend_pid FROM audit.access_log WHERE command = 'LOST'", &[])
            .unwrap();
        if r.is_some() || t.elapsed() > Duration::from_secs(30) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let lost = lost.expect("a LOST row");
    assert_eq!(lost.get::<_, i64>(0), 6);
    let said: String = db
        .query_one("SELECT statement FROM audit.access_log WHERE command = 'LOST'", &[])
        .unwrap()
        .get(0);
    assert!(said.contains(" between ") && said.contains("6 read record(s)"), "{said}");
    let pid: i32 = app.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    assert_eq!(lost.get::<_, i32>(1), pid);
    assert_eq!(wait_rows(&mut db, 17), 17);
    db.query_one("SELECT audit.seal()", &[]).unwrap();
    let (ok, detail) = verify(&mut db);
    assert!(ok, "{detail}");
    c.assert_no_crash();
}

#[test]
fn own_reads_are_quiet_but_the_reading_functions_and_log_reads_are_recorded() {
    let c = cluster();
    let mut db = c.connect("postgres");
    setup(&mut db);
    db.batch_execute(
        "UPDATE customers SET name = 'n' WHERE id = 1;
         SELECT audit.state_at('customers', '1', now());
         SELECT count(*) FROM audit.table_at('customers', now());
         SELECT count(*) FROM audit.history('customers', '1');
         SELECT audit.seal(); SELECT * FROM audit.verify();
         SELECT rows_checked FROM audit.verify_table('customers');
         SELECT ok FROM audit.verify(tables => ARRAY['customers']::regclass[]);
         SELECT count(*) FROM audit.log;",
    )
    .unwrap();
    let t = Instant::now();
    let logs = loop {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM audit.access_log WHERE schema_name = 'audit' AND table_name = 'log'",
                &[],
            )
            .unwrap()
            .get(0);
        if n > 0 || t.elapsed() > Duration::from_secs(30) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(logs, 1, "the read of audit.log itself");
    let own: i64 = db
        .query_one("SELECT count(*) FROM audit.access_log WHERE table_name = 'customers'", &[])
        .unwrap()
        .get(0);
    assert_eq!(own, 6, "the UPDATE's read, and one per reading function: {own}");
    let functions: Vec<(String, i64)> = db
        .query(
            "SELECT command, rows FROM audit.access_log
              WHERE table_name = 'customers' AND command LIKE 'audit.%' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        functions,
        vec![
            ("audit.state_at".to_string(), 1),
            ("audit.table_at".to_string(), 10),
            ("audit.history".to_string(), 1),
            ("audit.verify_table".to_string(), 10),
            ("audit.verify".to_string(), 10)
        ]
    );
    c.assert_no_crash();
}

#[test]
fn errors_pass_through_the_hooks_untouched() {
    let c = cluster();
    let mut db = c.connect("postgres");
    setup(&mut db);
    db.batch_execute(
        "CREATE FUNCTION boom() RETURNS void LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO customers VALUES (1, 'again', NULL); END $$;",
    )
    .unwrap();
    // Through a tracked table, a read-tracked table, and a function: every field of the
    // error is PostgreSQL's own.
    let err = db.batch_execute("SELECT boom()").unwrap_err();
    let e = err.as_db_error().expect("a database error");
    assert_eq!(e.code().code(), "23505");
    assert_eq!(e.constraint(), Some("customers_pkey"));
    assert_eq!(e.table(), Some("customers"));
    assert_eq!(e.schema(), Some("public"));
    assert!(e.detail().is_some_and(|d| d.contains("(id)=(1)")), "{:?}", e.detail());
    assert!(e.where_().is_some_and(|w| w.contains("PL/pgSQL function boom()")), "{:?}", e.where_());
    let err = db.batch_execute("SELECT 1 / (id - id) FROM customers").unwrap_err();
    let e = err.as_db_error().unwrap();
    assert_eq!((e.code().code(), e.message()), ("22012", "division by zero"));
    assert!(e.detail().is_none(), "nothing added: {:?}", e.detail());
    c.assert_no_crash();
}

#[test]
fn read_records_are_partitioned_and_retained_like_changes() {
    let c = cluster();
    let mut db = c.connect("postgres");
    setup(&mut db);
    db.batch_execute("SET audit.access_log_self = off").unwrap();
    for id in 1..=3 {
        db.batch_execute(&format!("SELECT * FROM customers WHERE id = {id}")).unwrap();
    }
    assert_eq!(wait_rows(&mut db, 3), 3);
    // In this month's partition, made with audit.log's by CREATE EXTENSION's maintain().
    let parts: Vec<String> = db
        .query("SELECT DISTINCT tableoid::regclass::text FROM audit.access_log", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(parts.len(), 1, "{parts:?}");
    assert!(parts[0].starts_with("audit.access_log_p"), "{parts:?}");
    db.query_one("SELECT audit.seal()", &[]).unwrap();
    db.batch_execute("SET audit.retention = '1 day'").unwrap();
    let report: String = db
        .query_one("SELECT audit.maintain(now() + interval '100 days')::text", &[])
        .unwrap()
        .get(0);
    assert!(report.contains(&parts[0].replace("audit.", "")), "{report}");
    let left: i64 = db
        .query_one("SELECT count(*) FROM audit.access_log WHERE table_name = 'customers'", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let (ok, detail) = verify(&mut db);
    assert!(ok, "{detail}");
    c.assert_no_crash();
}

#[test]
fn prepared_statements_definer_functions_views_ctes_and_subtransactions() {
    let c = cluster();
    let mut db = c.connect("postgres");
    setup(&mut db);
    db.batch_execute(
        "SET audit.access_log_self = off;
         CREATE VIEW names AS SELECT id, name FROM customers;
         CREATE ROLE teller;
         CREATE FUNCTION card_of(i int) RETURNS text LANGUAGE sql SECURITY DEFINER
           AS 'SELECT card FROM customers WHERE id = i';
         GRANT EXECUTE ON FUNCTION card_of(int) TO teller;
         CREATE ROLE lookup LOGIN; GRANT teller TO lookup;",
    )
    .unwrap();
    let mut app = c.connect("postgres");
    app.batch_execute("SET audit.access_parameters = on; SET audit.access_parameter_max_size = 4")
        .unwrap();
    app.query("SELECT name FROM customers WHERE id = $1 AND name <> $2", &[&2i32, &"long name"])
        .unwrap();
    app.batch_execute(
        "SELECT * FROM names WHERE id = 5;
         WITH c AS (SELECT id FROM customers) SELECT count(*) FROM c JOIN other USING (id);
         BEGIN; SAVEPOINT s; SELECT card FROM customers WHERE id = 7; ROLLBACK TO s; COMMIT;",
    )
    .unwrap();
    let mut lookup = c.connect_as("postgres", "lookup");
    lookup.batch_execute("SET ROLE teller; SELECT card_of(3);").unwrap();
    assert_eq!(wait_rows(&mut db, 5), 5);
    let got: Vec<(String, Option<String>, String, Option<i64>)> = db
        .query(
            "SELECT command, parameters::text, role, rows FROM audit.access_log
              WHERE table_name = 'customers' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(got[0].1.as_deref(), Some(r#"["2", "long..."]"#), "{got:?}");
    assert_eq!(got[1].1, None, "a statement without parameters: {got:?}");
    assert_eq!(got[1].3, Some(1), "through the view: {got:?}");
    assert_eq!(got[3].3, Some(1), "in a rolled-back savepoint: {got:?}");
    // Inside SECURITY DEFINER, the privileges checked are the definer's.
    assert_eq!(got[4].2, "postgres", "{got:?}");
    let who: String = db
        .query_one("SELECT db_user FROM audit.access_log ORDER BY id DESC LIMIT 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(who, "lookup");
    c.assert_no_crash();
}

fn customer_reads(db: &mut Client) -> i64 {
    db.query_one("SELECT count(*) FROM audit.access_log WHERE table_name = 'customers'", &[])
        .unwrap()
        .get(0)
}

/// The LOST rows so far: (rows, statement), oldest first.
fn lost_rows(db: &mut Client) -> Vec<(Option<i64>, String)> {
    db.query("SELECT rows, statement FROM audit.access_log WHERE command = 'LOST' ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits until audit.access_log holds `n` LOST rows.
fn wait_lost(db: &mut Client, n: usize) -> Vec<(Option<i64>, String)> {
    let t = Instant::now();
    loop {
        let l = lost_rows(db);
        if l.len() >= n || t.elapsed() > Duration::from_secs(30) {
            return l;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn queued_reads_survive_stops_and_an_abrupt_stop_is_said() {
    let c = Cluster::start(ClusterOpts::new().conf("audit.naptime = 0"));
    let mut db = c.connect("postgres");
    setup(&mut db);
    db.batch_execute("ALTER SYSTEM SET audit.access_log_self = off").unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    drop(db);
    let read = |n: i32| {
        let mut app = c.connect("postgres");
        for id in 1..=n {
            app.batch_execute(&format!("SELECT * FROM customers WHERE id = {id}")).unwrap();
        }
    };
    // The worker is paused: reads wait in the queue across a fast stop (the postmaster
    // spools them), and the worker writes them afterwards. Nothing was lost.
    read(5);
    c.stop("fast");
    c.start_again();
    let mut db = c.connect("postgres");
    assert_eq!(customer_reads(&mut db), 0, "still queued");
    set_naptime(&mut db, 3600);
    assert_eq!(wait_rows(&mut db, 5), 5);
    assert_eq!(lost_rows(&mut db), vec![], "a fast stop loses nothing");

    // An immediate stop: the queue is spooled too, but statements running then
    // could not record their reads, so the next start says they may be missing.
    set_naptime(&mut db, 0);
    drop(db);
    read(2);
    // Under read load: a reader goes on until the server goes away under it.
    let mut reader = c.connect("postgres");
    let load = std::thread::spawn(move || {
        // Paced, so that it cannot fill the queue (2048) before the stop.
        while reader.batch_execute("SELECT count(*) FROM customers").is_ok() {
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    c.stop("immediate");
    load.join().unwrap();
    c.start_again();
    let mut db = c.connect("postgres");
    set_naptime(&mut db, 3600);
    // The queued reads were kept: the 7, and the load's (all complete before the stop
    // but perhaps one).
    let kept = wait_rows(&mut db, 8);
    assert!(kept >= 8, "{kept}");
    let by_id: i64 = db
        .query_one("SELECT count(*) FROM audit.access_log WHERE statement LIKE '%WHERE id =%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(by_id, 7);
    let lost = wait_lost(&mut db, 1);
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].0, None, "how many is unknown");
    assert!(lost[0].1.contains("may be missing"), "{lost:?}");

    // A postmaster that dies outright cannot save its queue: the next start says so.
    set_naptime(&mut db, 0);
    drop(db);
    read(3);
    let pid: i32 = std::fs::read_to_string(c.datadir().join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    // It dies, its children notice and leave; then the server can start again.
    let t = Instant::now();
    let alive = |pid: i32| {
        std::process::Command::new("kill")
            .args(["-0", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    };
    while alive(pid) {
        assert!(t.elapsed() < Duration::from_secs(60), "the postmaster stays");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    c.start_again();
    let mut db = c.connect("postgres");
    set_naptime(&mut db, 3600);
    let lost = wait_lost(&mut db, 2);
    assert_eq!(lost.len(), 2, "{lost:?}");
    assert_eq!(customer_reads(&mut db), kept, "the 3 queued reads died with it");
    db.query_one("SELECT audit.seal()", &[]).unwrap();
    let (ok, detail) = verify(&mut db);
    assert!(ok, "{detail}");
}

fn access_rows(db: &mut Client) -> Vec<(i64, Vec<u8>)> {
    db.query("SELECT id, row_hash FROM audit.access_log ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[test]
fn dump_and_restore_carry_the_reads_and_a_dump_is_a_read() {
    let c = cluster();
    c.create_db("src");
    let mut s = c.connect("src");
    setup(&mut s);
    s.batch_execute("SET audit.access_log_self = off").unwrap();
    for id in 1..=3 {
        s.batch_execute(&format!("SELECT * FROM customers WHERE id = {id}")).unwrap();
    }
    assert_eq!(wait_rows(&mut s, 3), 3);
    s.query_one("SELECT audit.seal()", &[]).unwrap();
    let before = access_rows(&mut s);
    c.dump_and_restore("src", "dst");
    // pg_dump read the table: a bulk export is a read like any other.
    assert_eq!(wait_rows(&mut s, 4), 4);
    let (cmd, rows): (String, Option<i64>) = s
        .query_one(
            "SELECT command, rows FROM audit.access_log WHERE table_name = 'customers'
              ORDER BY id DESC LIMIT 1",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((cmd.as_str(), rows), ("COPY", Some(10)));
    let mut d = c.connect("dst");
    d.batch_execute("SET audit.access_log_self = off").unwrap();
    assert_eq!(access_rows(&mut d), before, "the same read records and hashes");
    let (ok, detail) = verify(&mut d);
    assert!(ok, "{detail}");
    // Reads go on being recorded in the copy.
    d.batch_execute("SELECT * FROM customers WHERE id = 9").unwrap();
    assert_eq!(wait_rows(&mut d, 4), 4);
    c.assert_no_crash();
}

#[test]
fn records_the_worker_cannot_write_are_counted() {
    let c = cluster();
    let mut db = c.connect("postgres");
    setup(&mut db);
    // A superuser's trigger on the log refuses read records (but not LOST rows).
    db.batch_execute(
        "SET audit.access_log_self = off;
         CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.command <> 'LOST' THEN RAISE EXCEPTION 'refused'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse BEFORE INSERT ON audit.access_log FOR EACH ROW EXECUTE FUNCTION public.refuse();",
    )
    .unwrap();
    for id in 1..=3 {
        db.batch_execute(&format!("SELECT * FROM customers WHERE id = {id}")).unwrap();
    }
    // One LOST row per batch the worker took: they add up to the three reads.
    let t = Instant::now();
    let lost = loop {
        let l = lost_rows(&mut db);
        if l.iter().map(|r| r.0.unwrap_or(0)).sum::<i64>() >= 3
            || t.elapsed() > Duration::from_secs(30)
        {
            break l;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(lost.iter().map(|r| r.0.unwrap_or(0)).sum::<i64>(), 3, "{lost:?}");
    assert!(lost.iter().all(|r| r.1.contains("could not be written")), "{lost:?}");
    assert_eq!(customer_reads(&mut db), 0);
    c.assert_no_crash();
}

#[test]
fn reads_queued_for_a_dropped_extension_neither_stall_the_worker_nor_the_shutdown() {
    let c = Cluster::start(ClusterOpts::new().conf("audit.naptime = 0"));
    c.create_db("gone");
    let mut g = c.connect("gone");
    setup(&mut g);
    for id in 1..=3 {
        g.batch_execute(&format!("SELECT * FROM customers WHERE id = {id}")).unwrap();
    }
    g.batch_execute("SET audit.allow_drop = on; DROP EXTENSION audit_ext CASCADE;").unwrap();
    drop(g);
    let mut db = c.connect("postgres");
    set_naptime(&mut db, 1);
    // The launcher finds nobody to write them and lets them go; meanwhile it keeps
    // serving: another database's reads are written.
    c.create_db("kept");
    let mut k = c.connect("kept");
    setup(&mut k);
    k.batch_execute("SELECT * FROM customers WHERE id = 1").unwrap();
    assert_eq!(wait_rows(&mut k, 1), 1);
    std::thread::sleep(Duration::from_secs(2));
    drop(k);
    drop(db);
    let t = Instant::now();
    c.stop("fast");
    assert!(t.elapsed() < Duration::from_secs(20), "shutdown took {:?}", t.elapsed());
}

/// The audit_ext workers connected to a database now, by pid.
fn workers(db: &mut Client, dbname: &str) -> Vec<i32> {
    db.query(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'audit_ext worker' AND datname = $1",
        &[&dbname],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Reads `customers` in `dbname` until `stop`; returns how many reads it made.
fn reader(c: &Cluster, dbname: &str, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> i64 {
    let mut app = c.connect(dbname);
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        app.batch_execute("SELECT name FROM customers WHERE id = 1").unwrap();
        n += 1;
    }
    n
}

/// One worker writes a stream of reads (a worker per burst of reads cost more
/// than the records), it leaves soon after the reads stop, so that DROP DATABASE
/// is not held up, and a lone read after a quiet spell wakes the launcher at
/// once: with naptime at an hour, only the latch can.
#[test]
fn one_worker_writes_a_stream_of_reads_and_a_lone_read_wakes_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let c = cluster();
    let mut db = c.connect("postgres");
    setup(&mut db);
    db.batch_execute("SET audit.access_log_self = off").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut seen = std::collections::BTreeSet::new();
    let reads = std::thread::scope(|scope| {
        let reading = scope.spawn(|| reader(&c, "postgres", stop.clone()));
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            seen.extend(workers(&mut db, "postgres"));
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        reading.join().unwrap()
    });
    assert!(reads > 500, "the reader made only {reads} reads");
    // A worker stays up to 10 s; a round at start-up may add one. Before, a new
    // worker started every few milliseconds of a stream.
    assert!(seen.len() <= 2, "{} workers wrote one 3-second stream of reads", seen.len());
    assert_eq!(wait_rows(&mut db, reads), reads);
    // It leaves soon after the reads stop.
    let t = Instant::now();
    while !workers(&mut db, "postgres").is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the worker stayed {:?} after the reads",
        t.elapsed()
    );
    // Lone reads after quiet spells are each written within a second or two.
    for i in 1..=4 {
        std::thread::sleep(Duration::from_millis(700));
        let mut app = c.connect("postgres");
        app.batch_execute("SELECT name FROM customers WHERE id = 2").unwrap();
        let t = Instant::now();
        let want = reads + i;
        while customer_reads(&mut db) < want && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(t.elapsed() < Duration::from_secs(3), "lone read {i} waited {:?}", t.elapsed());
    }
    c.assert_no_crash();
}

/// Two databases read at once: neither waits for the other's stream to end (a
/// worker makes way when another database's records wait), every read of both
/// is written, and a database can be dropped as soon as its reads stop.
#[test]
fn two_reading_databases_share_the_worker() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let c = cluster();
    c.create_db("second");
    let mut one = c.connect("postgres");
    let mut two = c.connect("second");
    setup(&mut one);
    setup(&mut two);
    one.batch_execute("SET audit.access_log_self = off").unwrap();
    two.batch_execute("SET audit.access_log_self = off").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (a, b, n) = std::thread::scope(|scope| {
        let readers: Vec<_> = ["postgres", "second"]
            .into_iter()
            .map(|name| {
                let (c, stop) = (&c, stop.clone());
                scope.spawn(move || reader(c, name, stop))
            })
            .collect();
        // Both databases' records are written while both keep reading.
        std::thread::sleep(Duration::from_secs(1));
        let t = Instant::now();
        while (customer_reads(&mut one) == 0 || customer_reads(&mut two) == 0)
            && t.elapsed() < Duration::from_secs(3)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (a, b) = (customer_reads(&mut one), customer_reads(&mut two));
        stop.store(true, Ordering::Relaxed);
        let n: Vec<i64> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        (a, b, n)
    });
    assert!(a > 0 && b > 0, "while both read, one database's records waited: {a} and {b} written");
    assert_eq!(wait_rows(&mut one, n[0]), n[0]);
    assert_eq!(wait_rows(&mut two, n[1]), n[1]);
    drop(two);
    one.batch_execute("DROP DATABASE second").unwrap();
    c.assert_no_crash();
}

/// A COPY that fails inside a caught error (PL/pgSQL EXCEPTION) is recorded as
/// a failed COPY, and the statements after it are not labeled COPY.
#[test]
fn a_caught_error_in_a_copy_leaves_later_reads_labeled_as_they_are() {
    let c = cluster();
    let mut db = c.connect("postgres");
    setup(&mut db);
    db.batch_execute("SET audit.access_log_self = off").unwrap();
    let mut app = c.connect("postgres");
    app.batch_execute(
        "DO $$
         BEGIN
           BEGIN
             COPY (SELECT 1 / (id - 1) FROM customers) TO '/dev/null';
           EXCEPTION WHEN division_by_zero THEN NULL;
           END;
           PERFORM name FROM customers WHERE id = 2;
         END $$;
         SELECT name FROM customers WHERE id = 3;",
    )
    .unwrap();
    assert_eq!(wait_rows(&mut db, 3), 3);
    let r: Vec<(String, String, Option<String>)> = rows(&mut db)
        .into_iter()
        .map(|(cmd, outcome, _, _, state, _)| (cmd, outcome, state))
        .collect();
    assert_eq!(
        r,
        vec![
            // A caught error is never reported, so its SQLSTATE is not known (README).
            ("COPY".into(), "error".into(), None),
            ("SELECT".into(), "ok".into(), None),
            ("SELECT".into(), "ok".into(), None),
        ]
    );
    c.assert_no_crash();
}

/// A database the worker does not serve (audit.databases) cannot start
/// recording reads, and reads there while it is left out are not queued (they
/// would fill the queue every database shares): they are counted, and a LOST
/// row says how many once the database is served again.
#[test]
fn reads_in_a_database_the_worker_does_not_serve() {
    let c = cluster();
    let mut db = c.connect("postgres");
    setup(&mut db);
    db.batch_execute("SET audit.access_log_self = off").unwrap();
    let set_databases = |db: &mut Client, v: &str| {
        db.batch_execute(&format!("ALTER SYSTEM SET audit.databases = '{v}'")).unwrap();
        db.batch_execute("SELECT pg_reload_conf()").unwrap();
        std::thread::sleep(Duration::from_millis(300));
    };
    set_databases(&mut db, "elsewhere");
    let mut app = c.connect("postgres");
    let err = app.batch_execute("SELECT audit.track('other', reads => true)").unwrap_err();
    let e = err.as_db_error().unwrap();
    assert_eq!(e.code().code(), "55000");
    assert!(e.message().contains("audit.databases"), "{}", e.message());
    for _ in 0..5 {
        app.batch_execute("SELECT name FROM customers WHERE id = 1").unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(customer_reads(&mut db), 0);
    set_databases(&mut db, "");
    app.batch_execute("SELECT name FROM customers WHERE id = 2").unwrap();
    assert_eq!(wait_rows(&mut db, 1), 1);
    let lost = wait_lost(&mut db, 1);
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].0, Some(5));
    c.assert_no_crash();
}

/// A fast shutdown while the launcher waits on a reads worker ends at once. That
/// wait resets the launcher's latch, SIGTERM's wake-up included, and a launcher
/// that only looked at the latch then slept out its nap (an hour here) while
/// the postmaster waited for it. Several rounds, at different points of the
/// worker's stay.
#[test]
fn a_fast_shutdown_while_a_reads_worker_runs_is_prompt() {
    let c = cluster();
    {
        let mut db = c.connect("postgres");
        setup(&mut db);
    }
    for round in 0..6u64 {
        {
            let mut app = c.connect("postgres");
            app.batch_execute("SELECT name FROM customers WHERE id = 1").unwrap();
        }
        std::thread::sleep(Duration::from_millis(20 + 60 * round));
        let t = Instant::now();
        c.stop("fast");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "round {round}: the stop took {:?}",
            t.elapsed()
        );
        c.start_again();
    }
    c.assert_no_crash();
}

/// In a database that is not UTF-8, a COPY's column list names its columns by
/// their bytes: a column whose name is not ASCII is recorded as read, as the
/// same read through SELECT is (a lossy copy of the name would match none).
#[test]
fn a_copy_of_a_column_named_in_latin1_records_that_column() {
    let c = Cluster::start(ClusterOpts::new().conf("audit.naptime = 1"));
    c.connect("postgres")
        .batch_execute(
            "CREATE DATABASE latin ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        )
        .unwrap();
    let mut db = c.connect("latin");
    db.batch_execute(
        "CREATE EXTENSION audit_ext;
         CREATE TABLE customers (id int PRIMARY KEY, size text, card text);
         INSERT INTO customers VALUES (1, 'L', 'c');
         SELECT audit.track('customers', reads => true);
         -- (track takes only ASCII names here: the column is renamed after it.)
         ALTER TABLE customers RENAME COLUMN size TO \"größe\";
         COPY customers (\"größe\", id) TO '/dev/null';
         SELECT \"größe\" FROM customers;",
    )
    .unwrap();
    assert_eq!(wait_rows(&mut db, 2), 2);
    let r = rows(&mut db);
    assert_eq!((r[0].0.as_str(), r[0].2), ("COPY", Some(1)));
    assert_eq!(r[0].5, vec!["id".to_string(), "größe".to_string()]);
    assert_eq!((r[1].0.as_str(), r[1].5.clone()), ("SELECT", vec!["größe".to_string()]));
    c.assert_no_crash();
}
