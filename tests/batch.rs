//! Statement-batched audit rows (src/log/batch.rs) with real connections: a
//! sealer beside bulk writers never seals part of a statement, a writer that
//! seals in its own transaction right after a bulk statement seals all of it,
//! and without preloading (the library loaded by the first statement) every
//! row is still written.
#![cfg(not(feature = "pg_test"))] // run once, by scripts/test's integration step
mod common;

use std::sync::{Arc, Barrier};
use std::thread;

use common::{Cluster, ClusterOpts};
use postgres::Client;

/// More rows than one multi-insert (1000) takes, so each statement is several batches.
const ROWS: i32 = 2_500;

fn setup(c: &Cluster, tables: usize) {
    let mut a = c.connect("postgres");
    a.batch_execute("CREATE EXTENSION audit_ext; CREATE EXTENSION amcheck;").unwrap();
    for t in 0..tables {
        a.batch_execute(&format!(
            "CREATE TABLE bulk_{t} (id int PRIMARY KEY, v int NOT NULL);
             INSERT INTO bulk_{t} SELECT g, 0 FROM generate_series(1, {ROWS}) g;
             SELECT audit.track('bulk_{t}');"
        ))
        .unwrap();
    }
}

fn one(db: &mut Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).unwrap().get(0)
}

/// Every chained row: the changes, and the read records the worker writes for
/// the tests' own reads of audit.log (drawn from the same sequence).
const CHAINED: &str = "(SELECT id FROM audit.log UNION ALL SELECT id FROM audit.access_log) c";

/// Blocks whose row count is not what the log holds in their range: a row that
/// became visible (committed) after its range was sealed.
fn torn_blocks(db: &mut Client) -> i64 {
    one(
        db,
        &format!(
            "SELECT count(*) FROM audit.blocks b
              WHERE b.row_count <> (SELECT count(*) FROM {CHAINED}
                                     WHERE c.id > b.from_id AND c.id <= b.through_id)"
        ),
    )
}

/// Every committed statement's rows are there whole: per transaction and table,
/// a multiple of ROWS (plus `small`, the short statements); and the log's btree
/// indexes are sound. (That ids follow the order of the changes is a pg_test's:
/// here the tables' rows move as they are updated, so scan order is not id order.)
fn assert_statements_whole(db: &mut Client, small: i64) {
    let bad = one(
        db,
        &format!(
            "SELECT count(*) FROM (SELECT count(*) AS n FROM audit.log WHERE operation = 'UPDATE'
                                    GROUP BY txid, table_name) s
              WHERE n % {ROWS} NOT IN (0, {small})"
        ),
    );
    assert_eq!(bad, 0, "every statement's rows are whole");
    db.batch_execute(
        "SELECT bt_index_check(i.indexrelid) FROM pg_index i JOIN pg_inherits h ON h.inhrelid = i.indrelid
          JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
         WHERE h.inhparent = 'audit.log'::regclass AND a.amname = 'btree'",
    )
    .unwrap();
}

fn assert_verifies(db: &mut Client) {
    let row = db.query_one("SELECT ok, detail FROM audit.verify()", &[]).unwrap();
    assert!(row.get::<_, bool>(0), "{}", row.get::<_, String>(1));
}

#[test]
fn seal_beside_bulk_writers_never_seals_part_of_a_statement() {
    let c = Cluster::start(ClusterOpts::new().preload(true));
    let writers = 3;
    let rounds = 16;
    setup(&c, writers);
    let barrier = Arc::new(Barrier::new(writers + 1));
    let mut handles = Vec::new();
    for w in 0..writers {
        let mut db = c.connect("postgres");
        let b = barrier.clone();
        handles.push(thread::spawn(move || {
            b.wait();
            let t = format!("bulk_{w}");
            // Committed UPDATE rows of this writer's table.
            let mut committed = 0i64;
            for i in 0..rounds {
                match i % 4 {
                    0 => {
                        db.batch_execute(&format!("UPDATE {t} SET v = v + 1")).unwrap();
                        committed += ROWS as i64;
                    }
                    1 => {
                        db.batch_execute(&format!(
                            "BEGIN; UPDATE {t} SET v = v + 1;
                             SAVEPOINT s; UPDATE {t} SET v = v + 1; ROLLBACK TO s;
                             UPDATE {t} SET v = v + 1 WHERE id <= 10; COMMIT;"
                        ))
                        .unwrap();
                        committed += ROWS as i64 + 10;
                    }
                    2 => {
                        // Two statements in one transaction, a late commit.
                        db.batch_execute(&format!(
                            "BEGIN; UPDATE {t} SET v = v + 1; UPDATE {t} SET v = v + 1;
                             SELECT pg_sleep(0.02); COMMIT;"
                        ))
                        .unwrap();
                        committed += 2 * ROWS as i64;
                    }
                    _ => {
                        db.batch_execute(&format!("BEGIN; UPDATE {t} SET v = v + 1; ROLLBACK;"))
                            .unwrap();
                    }
                }
            }
            committed
        }));
    }
    let mut sealer = c.connect("postgres");
    barrier.wait();
    let mut seals = 0;
    while !handles.iter().all(|h| h.is_finished()) {
        sealer.query_one("SELECT audit.seal()", &[]).unwrap();
        assert_eq!(torn_blocks(&mut sealer), 0, "a block sealed part of a committed statement");
        seals += 1;
    }
    let committed: i64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    sealer.query_one("SELECT audit.seal()", &[]).unwrap();
    assert!(seals > 1, "the sealer ran beside the writers ({seals} seals)");
    assert_eq!(
        one(&mut sealer, "SELECT count(*) FROM audit.log WHERE operation = 'UPDATE'"),
        committed
    );
    assert_eq!(torn_blocks(&mut sealer), 0);
    assert_eq!(
        one(&mut sealer, "SELECT sum(row_count)::int8 FROM audit.blocks"),
        one(
            &mut sealer,
            &format!(
                "SELECT count(*) FROM {CHAINED} WHERE c.id <= (SELECT max(through_id) FROM audit.blocks)"
            )
        ),
        "every row in the sealed ranges sealed once"
    );
    // Read records of the checks' own reads may come after the last seal; changes may not.
    assert_eq!(
        one(
            &mut sealer,
            "SELECT count(*) FROM audit.log WHERE id > (SELECT max(through_id) FROM audit.blocks)"
        ),
        0,
        "every committed change sealed"
    );
    assert_statements_whole(&mut sealer, 10);
    assert_verifies(&mut sealer);
    c.assert_no_crash();
}

/// seal() in the writer's own transaction, right after a bulk statement: the
/// statement's rows, kept for multi-inserts until its end, are all in the
/// range sealed. Were one batch still unwritten, it would land in a sealed
/// range and verify() would fail.
#[test]
fn seal_right_after_a_bulk_statement_seals_all_of_it() {
    let c = Cluster::start(ClusterOpts::new().preload(true));
    setup(&c, 1);
    let mut db = c.connect("postgres");
    db.batch_execute(
        "CREATE FUNCTION update_then_seal() RETURNS bigint LANGUAGE plpgsql AS $$
         BEGIN
           UPDATE bulk_0 SET v = v + 1;
           RETURN audit.seal();
         END $$;",
    )
    .unwrap();
    for i in 0..12 {
        let before = one(&mut db, "SELECT count(*) FROM audit.log");
        let sealed = match i % 3 {
            // One transaction block.
            0 => {
                db.batch_execute("BEGIN; UPDATE bulk_0 SET v = v + 1;").unwrap();
                let n = one(&mut db, "SELECT audit.seal()");
                db.batch_execute("COMMIT").unwrap();
                n
            }
            // One query string: an implicit transaction of two statements.
            1 => {
                let rows =
                    db.simple_query("UPDATE bulk_0 SET v = v + 1; SELECT audit.seal()").unwrap();
                rows.iter()
                    .find_map(|m| match m {
                        postgres::SimpleQueryMessage::Row(r) => {
                            r.get(0).map(|s| s.parse().unwrap())
                        }
                        _ => None,
                    })
                    .unwrap()
            }
            // Inside one statement: a function's UPDATE, then its seal().
            _ => one(&mut db, "SELECT update_then_seal()"),
        };
        let after = one(&mut db, "SELECT count(*) FROM audit.log");
        assert_eq!(after - before, ROWS as i64);
        // The first seal also takes the set-up's rows.
        assert!(sealed >= ROWS as i64, "round {i}: sealed {sealed} of the statement's {ROWS}");
        assert_eq!(torn_blocks(&mut db), 0);
    }
    assert_statements_whole(&mut db, 0);
    assert_verifies(&mut db);
    c.assert_no_crash();
}

/// Not preloaded: a new connection's first statement loads the library from the
/// trigger, under no hook of ours (its rows are written one by one); the
/// statements after it are batched. Either way every row is there.
#[test]
fn without_preload_every_row_is_written() {
    let c = Cluster::start(ClusterOpts::new().preload(false));
    setup(&c, 2);
    let mut handles = Vec::new();
    for w in 0..2 {
        let c_rounds = 4;
        let mut conns: Vec<Client> = (0..c_rounds).map(|_| c.connect("postgres")).collect();
        handles.push(thread::spawn(move || {
            for db in conns.iter_mut() {
                for _ in 0..2 {
                    db.batch_execute(&format!("UPDATE bulk_{w} SET v = v + 1")).unwrap();
                }
            }
            (c_rounds * 2) as i64 * ROWS as i64
        }));
    }
    let expected: i64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let mut db = c.connect("postgres");
    assert_eq!(one(&mut db, "SELECT count(*) FROM audit.log WHERE operation = 'UPDATE'"), expected);
    assert_statements_whole(&mut db, 0);
    db.query_one("SELECT audit.seal()", &[]).unwrap();
    assert_eq!(torn_blocks(&mut db), 0);
    assert_verifies(&mut db);
    c.assert_no_crash();
}

/// audit.baseline writes its SNAPSHOT rows in multi-inserts: each batch is
/// written before the next one's known-keys query and before baseline returns,
/// so its own transaction sees every row at once; a baseline cancelled part-way
/// leaves none, and the log's indexes stay sound either way.
#[test]
fn a_baseline_in_multi_inserts_is_whole_at_once_and_nothing_when_cancelled() {
    let c = Cluster::start(ClusterOpts::new().preload(true));
    setup(&c, 1);
    let mut db = c.connect("postgres");
    let snapshots = "SELECT count(*) FROM audit.log WHERE operation = 'SNAPSHOT'";
    // Batches (700) that neither fill a multi-insert (1000) nor divide ROWS.
    db.batch_execute("BEGIN").unwrap();
    assert_eq!(one(&mut db, "SELECT audit.baseline('bulk_0', batch_size => 700)"), ROWS as i64);
    assert_eq!(one(&mut db, snapshots), ROWS as i64, "visible in its own transaction");
    assert_eq!(
        one(&mut db, "SELECT count(DISTINCT row_id) FROM audit.log WHERE operation = 'SNAPSHOT'"),
        ROWS as i64
    );
    assert_statements_whole(&mut db, 0);
    db.batch_execute("COMMIT").unwrap();
    let ok: bool = db.query_one("SELECT ok FROM audit.verify_table('bulk_0')", &[]).unwrap().get(0);
    assert!(ok);

    // A bigger table, and a baseline stopped by statement_timeout part-way.
    db.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, v text NOT NULL);
         INSERT INTO big SELECT g, repeat('x', 50) FROM generate_series(1, 40000) g;
         SELECT audit.track('big');",
    )
    .unwrap();
    let mut cancelled = 0;
    for ms in [800, 400, 200, 100, 50, 25] {
        db.batch_execute(&format!("BEGIN; SET LOCAL statement_timeout = {ms}; SAVEPOINT s;"))
            .unwrap();
        match db.query_one("SELECT audit.baseline('big', batch_size => 300)", &[]) {
            Ok(_) => db.batch_execute("ROLLBACK").unwrap(),
            Err(e) => {
                assert_eq!(e.code(), Some(&postgres::error::SqlState::QUERY_CANCELED), "{e}");
                cancelled += 1;
                db.batch_execute("ROLLBACK TO s; SET LOCAL statement_timeout = 0").unwrap();
                assert_eq!(
                    one(&mut db, "SELECT count(*) FROM audit.log WHERE table_name = 'big' AND operation = 'SNAPSHOT'"),
                    0,
                    "a cancelled baseline ({ms} ms) leaves no row"
                );
                assert_statements_whole(&mut db, 0);
                db.batch_execute("COMMIT").unwrap();
            }
        }
    }
    assert!(cancelled > 0, "no timeout stopped a baseline of 40000 rows");
    assert_eq!(one(&mut db, "SELECT audit.baseline('big')"), 40_000);
    let ok: bool = db.query_one("SELECT ok FROM audit.verify_table('big')", &[]).unwrap().get(0);
    assert!(ok);
    db.query_one("SELECT audit.seal()", &[]).unwrap();
    assert_verifies(&mut db);
    c.assert_no_crash();
}
