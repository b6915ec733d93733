//! A streaming-replication standby: the audit history replicates, the reading
//! functions (verify, digest, state_at, table_at, history, version) work there,
//! the writing ones refuse with 25006, and the background worker stays out of
//! recovery. On the primary, reading functions take no transaction id.
#![cfg(not(feature = "pg_test"))] // run once, by scripts/test's integration step
mod common;

use std::time::{Duration, Instant};

use common::{Cluster, ClusterOpts};
use postgres::Client;

fn one<T: for<'a> postgres::types::FromSql<'a>>(c: &mut Client, sql: &str) -> T {
    c.query_one(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// Waits until the standby has replayed everything the primary has written so far.
fn caught_up(primary: &mut Client, standby: &mut Client) {
    let lsn: String = one(primary, "SELECT pg_current_wal_lsn()::text");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !one::<bool>(standby, &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn")) {
        assert!(Instant::now() < deadline, "the standby did not replay up to {lsn}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn reading_functions_work_on_a_standby_and_writing_ones_refuse() {
    let primary = Cluster::start(ClusterOpts::new().conf("audit.naptime = 0"));
    let mut p = primary.connect("postgres");
    p.batch_execute(
        "SET client_min_messages = warning;
         CREATE EXTENSION audit_ext;
         CREATE TABLE acct (id int PRIMARY KEY, balance int);
         SELECT audit.track('acct', reads => true);
         INSERT INTO acct SELECT g, 100 FROM generate_series(1, 50) g;
         UPDATE acct SET balance = balance - 10 WHERE id <= 5;",
    )
    .unwrap();
    p.batch_execute("SELECT audit.seal()").unwrap(); // its own transaction: it seals committed rows

    // Reading functions take no xid on the primary either.
    p.batch_execute("BEGIN").unwrap();
    for f in [
        "SELECT count(*) FROM audit.verify()",
        "SELECT audit.digest()::text",
        "SELECT audit.state_at('acct', '3', now())::text",
        "SELECT count(*) FROM audit.history('acct', '3')",
        "SELECT count(*) FROM audit.table_at('acct', now())",
        "SELECT audit.version()::text",
    ] {
        p.query_one(f, &[]).unwrap_or_else(|e| panic!("{f}: {e}"));
        let xid: Option<String> = one(&mut p, "SELECT pg_current_xact_id_if_assigned()::text");
        assert_eq!(xid, None, "{f} gave the transaction an xid");
    }
    p.batch_execute("COMMIT").unwrap();

    let standby = Cluster::standby_of(&primary, ClusterOpts::new());
    let mut s = standby.connect("postgres");
    assert!(one::<bool>(&mut s, "SELECT pg_is_in_recovery()"));
    caught_up(&mut p, &mut s);

    let digest: String = one(&mut p, "SELECT audit.digest()::text");
    assert_eq!(one::<String>(&mut s, "SELECT audit.digest()::text"), digest, "the same chain head");
    assert!(one::<bool>(&mut s, &format!("SELECT ok AND rows = 55 FROM audit.verify('{digest}')")));
    assert_eq!(
        one::<String>(&mut s, "SELECT audit.state_at('acct', '3', now())::text"),
        r#"{"id": 3, "balance": 90}"#
    );
    assert_eq!(one::<i64>(&mut s, "SELECT count(*) FROM audit.history('acct', '3')"), 2);
    assert_eq!(one::<i64>(&mut s, "SELECT count(*) FROM audit.table_at('acct', now())"), 50);
    assert_eq!(
        one::<String>(&mut s, "SELECT audit.version()->>'extension_version'"),
        env!("CARGO_PKG_VERSION")
    );

    // Reads on the standby cannot be stored: each is one structured line in its log.
    assert_eq!(one::<i32>(&mut s, "SELECT balance FROM acct WHERE id = 9"), 100);
    let log = standby.log_contents();
    let line = log
        .lines()
        .find(|l| l.contains("audit_ext read on a standby") && l.contains("WHERE id = 9"))
        .unwrap_or_else(|| panic!("no read line in the standby's log:\n{log}"));
    assert!(
        line.contains(r#""table_name":"acct""#) && line.contains(r#""outcome":"ok""#),
        "{line}"
    );
    assert!(
        log.contains(r#""command":"audit.state_at""#),
        "the reading functions' reads are logged too"
    );

    for f in [
        "audit.seal()",
        "audit.maintain()",
        "audit.undo(1)",
        "audit.track('acct')",
        "audit.untrack('acct')",
    ] {
        let err = s.query_one(&format!("SELECT {f}"), &[]).expect_err(f);
        let db = err.as_db_error().unwrap_or_else(|| panic!("{f}: {err}"));
        assert_eq!(db.code().code(), "25006", "{f}: {}", db.message());
        assert!(db.message().contains("during recovery"), "{f}: {}", db.message());
    }

    // New history keeps arriving, and still verifies; tampering on the primary shows on the standby.
    p.batch_execute("UPDATE acct SET balance = 0 WHERE id = 7").unwrap();
    p.batch_execute("SELECT audit.seal()").unwrap();
    caught_up(&mut p, &mut s);
    assert!(one::<bool>(&mut s, "SELECT ok AND rows = 56 FROM audit.verify()"));
    p.batch_execute(
        "UPDATE audit.log SET changed_by = 'mallory' WHERE row_id = '7' AND operation = 'UPDATE'",
    )
    .unwrap();
    caught_up(&mut p, &mut s);
    assert!(
        !one::<bool>(&mut s, "SELECT ok FROM audit.verify()"),
        "the standby sees the tampering"
    );

    // The worker waits for the end of recovery: a launcher on the primary, none on the standby.
    let launchers =
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'audit_ext launcher'";
    assert_eq!(one::<i64>(&mut p, launchers), 1);
    assert_eq!(
        one::<i64>(
            &mut s,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'audit_ext launcher'"
        ),
        0
    );
    standby.assert_no_crash();
    primary.assert_no_crash();
}
