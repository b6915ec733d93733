//! The background worker, on a real cluster: it finds databases by itself,
//! seals and makes partitions without being asked, comes back after
//! pg_terminate_backend, survives a database being dropped, and picks up a
//! database created while it runs. Without preload, CREATE EXTENSION says
//! maintenance must be scheduled, and the manual calls do the same work.
#![cfg(not(feature = "pg_test"))] // run once, by scripts/test's integration step
mod common;

use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{Cluster, ClusterOpts};

fn wait_for(what: &str, c: &Cluster, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if ok() {
            return;
        }
        sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}\n--- server log ---\n{}", c.log_contents());
}

fn install(c: &Cluster, db: &str) {
    let mut a = c.connect(db);
    a.batch_execute(
        "CREATE EXTENSION audit_ext;
         CREATE TABLE t (id int PRIMARY KEY, v int);
         SELECT audit.track('t');
         INSERT INTO t SELECT g, 0 FROM generate_series(1, 50) g;",
    )
    .unwrap();
}

fn sealed_rows(c: &Cluster, db: &str) -> i64 {
    c.connect(db)
        .query_one("SELECT coalesce(sum(row_count), 0)::bigint FROM audit.blocks", &[])
        .unwrap()
        .get(0)
}

fn launcher_pid(c: &Cluster) -> Option<i32> {
    c.connect("postgres")
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'audit_ext launcher'",
            &[],
        )
        .unwrap()
        .map(|r| r.get(0))
}

#[test]
fn worker_serves_every_database_and_survives() {
    let c = Cluster::start(
        ClusterOpts::new()
            .preload(true)
            .conf("audit.naptime = 1")
            .conf("log_min_messages = log")
            // The polling below reads audit.log: those reads are not what is counted.
            .conf("audit.access_log_self = off"),
    );
    c.create_db("alpha");
    c.create_db("beta");
    c.create_db("without_ext");
    install(&c, "alpha");
    install(&c, "beta");

    // Seals in both databases without being asked.
    wait_for("sealing in alpha and beta", &c, || {
        sealed_rows(&c, "alpha") == 50 && sealed_rows(&c, "beta") == 50
    });
    for db in ["alpha", "beta"] {
        let ok: bool =
            c.connect(db).query_one("SELECT ok FROM audit.verify()", &[]).unwrap().get(0);
        assert!(ok, "verify in {db}");
    }

    // Comes back after pg_terminate_backend.
    let pid = launcher_pid(&c).expect("launcher is running");
    let killed: bool =
        c.connect("postgres").query_one("SELECT pg_terminate_backend($1)", &[&pid]).unwrap().get(0);
    assert!(killed);
    wait_for("a new launcher", &c, || launcher_pid(&c).is_some_and(|p| p != pid));

    // A dropped database does not stop it; the other one is still served.
    c.connect("postgres").batch_execute("DROP DATABASE beta").unwrap();
    c.connect("alpha").batch_execute("UPDATE t SET v = 1 WHERE id <= 10").unwrap();
    wait_for("sealing after a drop", &c, || sealed_rows(&c, "alpha") == 60);

    // A database created and an extension installed while it runs are picked up,
    // and its partitions kept: with every ranged partition gone, rows land in the
    // default partition, and the worker makes partitions and moves them out.
    c.create_db("gamma");
    c.connect("gamma")
        .batch_execute(
            "CREATE EXTENSION audit_ext;
             SET audit.allow_drop = on;
             DO $$ DECLARE p regclass; BEGIN
               FOR p IN SELECT inhrelid::regclass FROM pg_inherits
                         WHERE inhparent = 'audit.log'::regclass AND inhrelid <> 'audit.log_default'::regclass LOOP
                 EXECUTE format('DROP TABLE %s', p);
               END LOOP; END $$;
             RESET audit.allow_drop;
             CREATE TABLE t (id int PRIMARY KEY, v int);
             SELECT audit.track('t');
             INSERT INTO t SELECT g, 0 FROM generate_series(1, 50) g;",
        )
        .unwrap();
    wait_for("sealing and partitions in a new database", &c, || {
        let mut g = c.connect("gamma");
        let in_default: i64 =
            g.query_one("SELECT count(*) FROM audit.log_default", &[]).unwrap().get(0);
        let parts: i64 = g
            .query_one(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit.log'::regclass",
                &[],
            )
            .unwrap()
            .get(0);
        in_default == 0 && parts > 1 && sealed_rows(&c, "gamma") == 50
    });
    let ok: bool =
        c.connect("gamma").query_one("SELECT ok FROM audit.verify()", &[]).unwrap().get(0);
    assert!(ok, "verify in gamma");

    let log = c.log_contents();
    assert!(log.contains("audit_ext launcher started"), "launcher logs its start");
    assert!(
        log.contains("audit_ext worker in database \"alpha\": sealed"),
        "worker logs what it did at LOG"
    );
    c.assert_no_crash();

    // Clean exit on shutdown: no error from our processes in the log.
    c.stop("fast");
    let log = c.log_contents();
    assert!(
        !log.lines()
            .any(|l| l.contains("audit_ext") && (l.contains("ERROR") || l.contains("FATAL"))),
        "{log}"
    );
}

/// Runs CREATE EXTENSION on a connection that keeps the notices it receives.
fn create_extension_notices(c: &Cluster) -> (postgres::Client, String) {
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let n2 = notices.clone();
    let mut cfg = postgres::Config::new();
    cfg.host_path(c.host()).port(c.port()).user("postgres").dbname("postgres");
    cfg.notice_callback(move |n| n2.lock().unwrap().push(n.message().to_string()));
    let mut a = cfg.connect(postgres::NoTls).unwrap();
    a.batch_execute("CREATE EXTENSION audit_ext").unwrap();
    let got = notices.lock().unwrap().join("\n");
    (a, got)
}

#[test]
fn without_preload_maintenance_is_manual() {
    let c = Cluster::start(ClusterOpts::new().preload(false));
    let (mut a, got) = create_extension_notices(&c);
    assert!(
        got.contains("cron.schedule"),
        "CREATE EXTENSION without preload names pg_cron: {got:?}"
    );
    assert!(launcher_pid(&c).is_none(), "no launcher without preload");
    a.batch_execute("CREATE TABLE t (id int PRIMARY KEY); SELECT audit.track('t'); INSERT INTO t VALUES (1), (2)").unwrap();
    sleep(Duration::from_secs(2));
    assert_eq!(sealed_rows(&c, "postgres"), 0, "nothing seals by itself");
    let sealed: i64 = a.query_one("SELECT audit.seal()", &[]).unwrap().get(0);
    assert_eq!(sealed, 2);
    let ok: bool = a.query_one("SELECT ok FROM audit.verify()", &[]).unwrap().get(0);
    assert!(ok);
}

#[test]
fn with_preload_create_extension_is_quiet() {
    let c = Cluster::start(ClusterOpts::new().preload(true));
    let (_a, got) = create_extension_notices(&c);
    assert!(!got.contains("cron.schedule"), "no scheduling notice with the worker: {got:?}");
}

/// A fast shutdown that comes while the launcher goes through its round of
/// databases is prompt. pgrx's SIGTERM flag is cleared by reading it: the
/// launcher once read it between two databases, left the round, and then napped
/// on for good, as if no shutdown had come (seen in the package install test).
/// Stops at spread-out points of the rounds, several databases each.
#[test]
fn a_fast_shutdown_during_the_launchers_round_is_prompt() {
    let c = Cluster::start(ClusterOpts::new().preload(true).conf("audit.naptime = 1"));
    for db in ["w1", "w2", "w3", "w4"] {
        c.create_db(db);
        install(&c, db);
    }
    for round in 0..12u64 {
        sleep(Duration::from_millis(1000 + 97 * round));
        let t = Instant::now();
        c.stop("fast");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "round {round}: the stop took {:?}\n--- server log ---\n{}",
            t.elapsed(),
            c.log_contents()
        );
        c.start_again();
    }
    c.assert_no_crash();
}
