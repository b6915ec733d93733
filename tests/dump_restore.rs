//! pg_dump and pg_restore carry the whole audit trail: every partition (also
//! those made after CREATE EXTENSION), every row with its hash, the blocks and
//! the redaction secret. Verify passes on the copy, and tracking goes on there.
#![cfg(not(feature = "pg_test"))] // run once, by scripts/test's integration step
mod common;

use std::io::Write;
use std::process::Stdio;

use common::{Cluster, ClusterOpts};

fn partitions(c: &mut postgres::Client) -> Vec<String> {
    c.query(
        "SELECT c.relname::text || ' ' || pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'audit.log'::regclass ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn audit_rows(c: &mut postgres::Client) -> Vec<(i64, Vec<u8>, String)> {
    c.query("SELECT id, row_hash, coalesce(new_values::text, '') FROM audit.log ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[test]
fn dump_and_restore_keep_the_trail() {
    let c = Cluster::start(ClusterOpts::new().preload(false));
    c.create_db("src");
    let mut s = c.connect("src");
    s.batch_execute(
        "CREATE EXTENSION audit_ext;
         CREATE TABLE users (id int PRIMARY KEY, email text, pw text);
         SELECT audit.track('users', redact => '{pw}');
         INSERT INTO users SELECT g, 'u' || g || '@x', 'secret' || g FROM generate_series(1, 20) g;
         UPDATE users SET email = 'changed@x' WHERE id = 3;",
    )
    .unwrap();
    // A separate transaction, as an application would seal.
    s.batch_execute(
        "ALTER TABLE users RENAME TO people;
         SELECT audit.seal();
         -- partitions made after CREATE EXTENSION, as the worker makes them
         SELECT audit.maintain(now() + interval '7 months');
         DELETE FROM people WHERE id = 4;",
    )
    .unwrap();
    let ok: bool = s.query_one("SELECT ok FROM audit.verify()", &[]).unwrap().get(0);
    assert!(ok);

    c.dump_and_restore("src", "dst");

    let mut d = c.connect("dst");
    assert_eq!(partitions(&mut s), partitions(&mut d), "the same partitions");
    assert_eq!(audit_rows(&mut s), audit_rows(&mut d), "the same rows and row hashes");
    let blocks = |c: &mut postgres::Client| -> Vec<Vec<u8>> {
        c.query("SELECT block_hash FROM audit.blocks ORDER BY block_id", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert_eq!(blocks(&mut s), blocks(&mut d), "the same blocks");
    let (ok, detail): (bool, Option<String>) = {
        let r = d.query_one("SELECT ok, detail FROM audit.verify()", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert!(ok, "verify on the restored database: {detail:?}");
    // The digest taken before the dump still proves the restored chain.
    let digest: serde_json::Value = s
        .query_one("SELECT audit.digest()::text", &[])
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .unwrap();
    let ok: bool = d
        .query_one("SELECT ok FROM audit.verify($1::text::jsonb)", &[&digest.to_string()])
        .unwrap()
        .get(0);
    assert!(ok, "the source's digest verifies the copy");

    // The history logged before the rename (as users) follows the table into the copy,
    // where its oid differs: audit.table_names is dumped by name.
    let n: i64 =
        d.query_one("SELECT count(*) FROM audit.history('people', '3')", &[]).unwrap().get(0);
    assert_eq!(n, 2, "INSERT and UPDATE logged under the old name");
    d.batch_execute("ALTER TABLE people RENAME TO users").unwrap();

    // Tracking goes on in the copy, with the same redaction secret.
    d.batch_execute("UPDATE users SET pw = 'secret1' , email = 'again@x' WHERE id = 2; INSERT INTO users VALUES (100, 'n@x', 'secret1')")
        .unwrap();
    let same: bool = d
        .query_one(
            "SELECT (SELECT new_values->>'pw' FROM audit.log WHERE row_id = '100')
                  = (SELECT new_values->>'pw' FROM audit.log WHERE row_id = '1' AND operation = 'INSERT')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(same, "the restored secret gives the same markers");
    let n: i64 = d.query_one("SELECT count(*) FROM audit.log WHERE row_id IN ('2', '100') AND id > (SELECT max(last_id) FROM audit.blocks)", &[]).unwrap().get(0);
    assert_eq!(n, 2, "changes in the copy are captured");
    let sealed: i64 = d.query_one("SELECT audit.seal()", &[]).unwrap().get(0);
    assert_eq!(
        sealed, 4,
        "the DELETE left unsealed in the source, the rename back, and the two new rows"
    );
    let ok: bool = d.query_one("SELECT ok FROM audit.verify()", &[]).unwrap().get(0);
    assert!(ok);
    c.assert_no_crash();
}

#[test]
fn dumpall_into_a_new_cluster_and_the_worker_serves_it() {
    let a = Cluster::start(ClusterOpts::new().preload(false));
    a.create_db("app");
    let mut s = a.connect("app");
    s.batch_execute(
        "CREATE EXTENSION audit_ext;
         CREATE TABLE users (id int PRIMARY KEY, email text);
         SELECT audit.track('users');
         INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 30) g;
         UPDATE users SET email = 'x' WHERE id < 5;",
    )
    .unwrap();
    s.batch_execute(
        "SELECT audit.seal();
         SELECT audit.maintain(now() + interval '2 months');",
    )
    .unwrap();
    let dump = a.client("pg_dumpall").output().unwrap();
    assert!(dump.status.success(), "pg_dumpall: {}", String::from_utf8_lossy(&dump.stderr));

    // The worker is paused while restoring (see the README: it must not make
    // partitions between CREATE EXTENSION and the dumped ones), then resumed.
    let b = Cluster::start(ClusterOpts::new().preload(true).conf("audit.naptime = 0"));
    let mut psql = b
        .client("psql")
        .args(["-X", "-q", "-d", "postgres", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    psql.stdin.take().unwrap().write_all(&dump.stdout).unwrap();
    let out = psql.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("ERROR") && !l.contains("role \"postgres\" already exists"))
        .collect();
    assert!(out.status.success() && errors.is_empty(), "restore errors: {errors:#?}\n{stderr}");

    let mut d = b.connect("app");
    assert_eq!(partitions(&mut s), partitions(&mut d));
    assert_eq!(audit_rows(&mut s), audit_rows(&mut d));
    let ok: bool = d.query_one("SELECT ok FROM audit.verify()", &[]).unwrap().get(0);
    assert!(ok);

    // Resume the worker: it finds the restored database and seals new changes.
    let mut admin = b.connect("postgres");
    admin.batch_execute("ALTER SYSTEM SET audit.naptime = 1").unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    d.batch_execute("INSERT INTO users VALUES (100, 'new')").unwrap();
    let t = std::time::Instant::now();
    loop {
        let left: i64 = d
            .query_one("SELECT count(*) FROM audit.log WHERE id > (SELECT coalesce(max(through_id), 0) FROM audit.blocks)", &[])
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "the worker did not seal in the restored database"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let ok: bool = d.query_one("SELECT ok FROM audit.verify()", &[]).unwrap().get(0);
    assert!(ok);
    b.assert_no_crash();
}
