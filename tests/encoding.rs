//! Databases whose encoding is not UTF-8. audit_ext stores and hashes text as
//! bytes in the database encoding, so LATIN1 values, keys and actors, and bytes
//! that are not UTF-8 at all (SQL_ASCII), are captured exactly and verify()
//! checks the same bytes: no false alarm, and tampering is still found.
//! (Identifiers and function arguments must be ASCII there: README, "Database
//! encodings".)
#![cfg(not(feature = "pg_test"))] // run once, by scripts/test's integration step
mod common;

use common::{Cluster, ClusterOpts};
use postgres::Client;

/// A cluster with audit_ext preloaded, and a new database of `encoding` in it.
fn started(name: &str, encoding: &str) -> (Cluster, Client) {
    let cluster = Cluster::start(ClusterOpts::new().preload(true).conf("audit.naptime = 0"));
    let c = database(&cluster, name, encoding);
    (cluster, c)
}

fn database(cluster: &Cluster, name: &str, encoding: &str) -> Client {
    let mut admin = cluster.connect("postgres");
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ))
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name} ({encoding}): {e}"));
    let mut c = cluster.connect(name);
    c.batch_execute("SET client_min_messages = warning; CREATE EXTENSION audit_ext").unwrap();
    c
}

/// A tracked table t (k text key, v text, s text redacted), for SQL_ASCII tests.
/// There E'\xfc' is the single byte 0xfc: not UTF-8, and stored as it is.
fn tracked_t(c: &mut Client) {
    c.batch_execute(
        "CREATE TABLE t (k text PRIMARY KEY, v text, s text);
         SELECT audit.track('t', redact => '{s}');",
    )
    .unwrap();
}

fn holds(c: &mut Client, sql: &str) -> bool {
    c.query_one(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

fn verify_ok(c: &mut Client) -> bool {
    c.query_one("SELECT ok FROM audit.verify()", &[]).expect("verify").get(0)
}

/// Tampering with one stored value is found, and undoing it restores ok.
fn tamper_is_found(c: &mut Client, column: &str, value: &str) {
    let id: i64 = c
        .query_one("SELECT max(id) FROM audit.log WHERE operation = 'UPDATE'", &[])
        .unwrap()
        .get(0);
    let old: String = c
        .query_one(&format!("SELECT {column}::text FROM audit.log WHERE id = {id}"), &[])
        .unwrap()
        .get(0);
    c.batch_execute(&format!("UPDATE audit.log SET {column} = {value} WHERE id = {id}")).unwrap();
    assert!(!verify_ok(c), "changing {column} to {value} must be found");
    c.execute(
        &format!(
            "UPDATE audit.log SET {column} = $1::text::{} WHERE id = {id}",
            if column == "new_values" { "jsonb" } else { "text" }
        ),
        &[&old],
    )
    .unwrap();
    assert!(verify_ok(c), "restoring {column} makes verify ok again");
}

#[test]
fn latin1_values_keys_and_actors_are_captured_and_verified() {
    let (cluster, mut c) = started("latin", "LATIN1");
    // The client speaks UTF-8; the server stores LATIN1 (ü is one byte, 0xfc).
    c.batch_execute(
        "CREATE TABLE grosse (name text PRIMARY KEY, notiz text, geheim text, n numeric);
         SELECT audit.track('grosse', redact => '{geheim}');
         SET \"app.current_user\" = 'José';
         INSERT INTO grosse VALUES ('Müller', 'café', 'süß', 1.5), ('plain', 'x', 'y', 2);
         UPDATE grosse SET notiz = 'naïve', n = 2.25 WHERE name = 'Müller';
         DELETE FROM grosse WHERE name = 'plain';",
    )
    .unwrap();
    assert!(holds(&mut c, "SELECT octet_length('ü') = 1"), "the database really is LATIN1");
    assert!(holds(
        &mut c,
        "SELECT count(*) = 4 AND bool_and(table_name = 'grosse' AND schema_name = 'public' AND changed_by = 'José')
           FROM audit.log"
    ));
    assert!(holds(
        &mut c,
        "SELECT row_id = 'Müller' AND changed_fields = '{notiz,n}' AND old_values = '{\"notiz\": \"café\", \"n\": 1.5}'
            AND new_values->>'notiz' = 'naïve' AND new_values->>'geheim' LIKE 'redacted:%'
           FROM audit.log WHERE operation = 'UPDATE'"
    ));
    // The marker of an equal value is equal (HMAC over the same bytes).
    assert!(holds(
        &mut c,
        "SELECT count(DISTINCT new_values->>'geheim') = 1 FROM audit.log WHERE row_id = 'Müller'"
    ));
    assert!(holds(&mut c, "SELECT audit.state_at('grosse', 'plain', now()) IS NULL"));
    // The table's own proof: a row older than tracking, with a LATIN1 key and
    // values, is baselined; the table verifies, and an edit behind the trigger of
    // one LATIN1 byte is found.
    c.batch_execute(
        "SET session_replication_role = replica;
         INSERT INTO grosse VALUES ('Ärger', 'früh', 'ß', 0.10);
         RESET session_replication_role;",
    )
    .unwrap();
    assert!(holds(&mut c, "SELECT unexplained = 1 FROM audit.verify_table('grosse')"));
    assert!(holds(&mut c, "SELECT audit.baseline('grosse') = 1"));
    assert!(holds(
        &mut c,
        "SELECT new_values->>'notiz' = 'früh' AND new_values->>'geheim' LIKE 'redacted:%'
           FROM audit.log WHERE operation = 'SNAPSHOT' AND row_id = 'Ärger'"
    ));
    assert!(holds(&mut c, "SELECT ok AND rows_checked = 2 FROM audit.verify_table('grosse')"));
    c.batch_execute(
        "SET session_replication_role = replica;
         UPDATE grosse SET notiz = 'früher' WHERE name = 'Ärger';
         RESET session_replication_role;",
    )
    .unwrap();
    assert!(holds(
        &mut c,
        "SELECT NOT ok AND changed = 1 AND first_bad_row_id = 'Ärger'
                AND detail LIKE '%row Ärger differs from the log''s last image of it in column(s) notiz:%'
           FROM audit.verify_table('grosse')"
    ));
    c.batch_execute(
        "SET session_replication_role = replica;
         UPDATE grosse SET notiz = 'früh' WHERE name = 'Ärger';
         RESET session_replication_role;",
    )
    .unwrap();

    assert!(verify_ok(&mut c), "unsealed rows verify");
    c.batch_execute("SELECT audit.seal()").unwrap();
    assert!(holds(&mut c, "SELECT rows = 5 AND ok FROM audit.verify()"), "sealed rows verify");
    tamper_is_found(&mut c, "changed_by", "'Josè'");
    tamper_is_found(&mut c, "new_values", "jsonb_set(new_values, '{notiz}', '\"naïvé\"')");
    cluster.assert_no_crash();
}

#[test]
fn sql_ascii_bytes_that_are_not_utf8_are_captured_and_verified() {
    let (cluster, mut c) = started("bytes", "SQL_ASCII");
    tracked_t(&mut c);
    c.batch_execute(
        "SELECT length(set_config('app.current_user', E'jos\\xe9', false));
         INSERT INTO t VALUES (E'M\\xfcller', E'caf\\xe9 \\xff', E'\\xfe'), ('ascii', 'a', 'b');
         UPDATE t SET v = E'na\\xefve' WHERE k = E'M\\xfcller';",
    )
    .unwrap();
    assert!(holds(&mut c, "SELECT octet_length(E'\\xfc') = 1"), "the byte is stored as one byte");
    assert!(holds(
        &mut c,
        "SELECT count(*) = 3 AND bool_and(changed_by = E'jos\\xe9') FROM audit.log"
    ));
    assert!(holds(
        &mut c,
        "SELECT row_id = E'M\\xfcller' AND changed_fields = '{v}' AND new_values->>'v' = E'na\\xefve'
            AND old_values->>'v' = E'caf\\xe9 \\xff'
           FROM audit.log WHERE operation = 'UPDATE'"
    ));
    assert!(verify_ok(&mut c), "unsealed rows verify");
    c.batch_execute("SELECT audit.seal()").unwrap();
    assert!(holds(&mut c, "SELECT rows = 3 AND ok FROM audit.verify()"), "sealed rows verify");
    assert!(holds(&mut c, "SELECT audit.state_at('t', 'ascii', now()) ->> 'v' = 'a'"));
    // The table's own proof names the row edited behind the trigger by its very bytes.
    assert!(holds(&mut c, "SELECT ok AND rows_checked = 2 FROM audit.verify_table('t')"));
    c.batch_execute(
        "SET session_replication_role = replica;
         UPDATE t SET v = E'x\\xfd' WHERE k = E'M\\xfcller';
         RESET session_replication_role;",
    )
    .unwrap();
    assert!(holds(
        &mut c,
        "SELECT NOT ok AND changed = 1 AND first_bad_row_id = E'M\\xfcller'
                AND position(E'row M\\xfcller differs' IN detail) > 0 AND detail LIKE '%column(s) v:%'
           FROM audit.verify_table('t')"
    ));
    assert!(holds(
        &mut c,
        "SELECT NOT ok AND position(E'row M\\xfcller differs' IN detail) > 0 FROM audit.verify(tables => '{t}')"
    ));
    c.batch_execute(
        "SET session_replication_role = replica;
         UPDATE t SET v = E'na\\xefve' WHERE k = E'M\\xfcller';
         RESET session_replication_role;",
    )
    .unwrap();
    c.batch_execute("UPDATE audit.log SET changed_by = E'jos\\xe8' WHERE row_id = 'ascii'")
        .unwrap();
    assert!(!verify_ok(&mut c), "a changed byte is found");
    cluster.assert_no_crash();
}

/// Time travel and undo in a LATIN1 database: keys, values, actors and
/// redaction markers come back as the bytes the log holds, and undo writes
/// back the very bytes it had (a trip through UTF-8 text would change or
/// refuse them).
#[test]
fn latin1_time_travel_and_undo_give_back_the_bytes_the_log_holds() {
    let (cluster, mut c) = started("latin_tt", "LATIN1");
    c.batch_execute(
        "CREATE TABLE grosse (name text PRIMARY KEY, notiz text, geheim text, n numeric);
         INSERT INTO grosse VALUES ('Ärger', 'früh', 'ß', 0.10);
         SELECT audit.track('grosse', redact => '{geheim}', baseline => true);
         SET \"app.current_user\" = 'José';
         INSERT INTO grosse VALUES ('Müller', 'café', 'süß', 1.50), ('k1', 'naïve', 'x', 2);
         SELECT pg_sleep(0.01);",
    )
    .unwrap();
    let before: String = c.query_one("SELECT now()::text", &[]).unwrap().get(0);
    // Each in a transaction of its own: undo takes back a whole transaction.
    c.batch_execute("SELECT pg_sleep(0.01)").unwrap();
    c.batch_execute("UPDATE grosse SET notiz = 'später', n = 3.000 WHERE name = 'Müller'").unwrap();
    c.batch_execute("UPDATE grosse SET notiz = 'neu' WHERE name = 'k1'").unwrap();
    assert!(holds(&mut c, "SELECT octet_length('café') = 4"), "the database really is LATIN1");
    // state_at: a LATIN1 key, LATIN1 values, the numeric's scale, as of before the update.
    assert!(holds(
        &mut c,
        &format!(
            "SELECT s->>'notiz' = 'café' AND s->>'n' = '1.50' AND octet_length(s->>'notiz') = 4
               FROM audit.state_at('grosse', 'Müller', '{before}') s"
        )
    ));
    assert!(holds(
        &mut c,
        &format!("SELECT s->>'notiz' = 'naïve' FROM audit.state_at('grosse', 'k1', '{before}') s")
    ));
    // history: the actor and the states.
    assert!(holds(
        &mut c,
        "SELECT count(*) = 2 AND bool_and(changed_by = 'José')
                AND bool_or(operation = 'UPDATE' AND state->>'notiz' = 'später' AND old_values->>'notiz' = 'café')
           FROM audit.history('grosse', 'Müller')"
    ));
    // table_at: live rows (the baselined one too) and log images alike; a live
    // row's redaction marker is the one the trigger logged.
    assert!(holds(
        &mut c,
        &format!(
            "SELECT count(*) = 3 AND bool_or(r->>'name' = 'Ärger' AND r->>'notiz' = 'früh')
                    AND bool_or(r->>'name' = 'Müller' AND r->>'notiz' = 'café')
               FROM audit.table_at('grosse', '{before}') r"
        )
    ));
    assert!(holds(
        &mut c,
        "SELECT (SELECT r->>'geheim' FROM audit.table_at('grosse', now()) r WHERE r->>'name' = 'Müller')
              = (SELECT new_values->>'geheim' FROM audit.log WHERE operation = 'UPDATE' AND row_id = 'Müller')"
    ));
    // undo of the update puts back the LATIN1 bytes and the numeric as they were.
    assert!(holds(
        &mut c,
        "SELECT audit.undo(txid) = 1 FROM audit.log WHERE operation = 'UPDATE' AND row_id = 'Müller'"
    ));
    assert!(holds(
        &mut c,
        "SELECT notiz = 'café' AND octet_length(notiz) = 4 AND n::text = '1.50' FROM grosse WHERE name = 'Müller'"
    ));
    assert!(holds(&mut c, "SELECT ok FROM audit.verify_table('grosse')"));
    // DDL whose text is not ASCII goes ahead, and its row holds the statement's bytes.
    c.batch_execute("ALTER TABLE grosse ADD COLUMN größe text DEFAULT 'süß'").unwrap();
    assert!(holds(
        &mut c,
        "SELECT new_values->>'statement' = 'ALTER TABLE grosse ADD COLUMN größe text DEFAULT ''süß'''
           FROM audit.log WHERE operation = 'DDL' ORDER BY id DESC LIMIT 1"
    ));
    cluster.assert_no_crash();
}

/// The same in SQL_ASCII, with bytes that are not UTF-8 at all.
#[test]
fn sql_ascii_time_travel_and_undo_give_back_the_bytes_the_log_holds() {
    let (cluster, mut c) = started("bytes_tt", "SQL_ASCII");
    tracked_t(&mut c);
    c.batch_execute("INSERT INTO t VALUES (E'M\\xfcller', E'caf\\xe9 \\xff', E'\\xfe')").unwrap();
    // In a transaction of its own: undo takes back a whole transaction.
    c.batch_execute("UPDATE t SET v = E'na\\xefve' WHERE k = E'M\\xfcller'").unwrap();
    assert!(holds(
        &mut c,
        "SELECT audit.state_at('t', E'M\\xfcller', now()) ->> 'v' = E'na\\xefve'"
    ));
    assert!(holds(
        &mut c,
        "SELECT count(*) = 2 AND bool_or(state->>'v' = E'caf\\xe9 \\xff')
           FROM audit.history('t', E'M\\xfcller')"
    ));
    assert!(holds(
        &mut c,
        "SELECT (SELECT r->>'s' FROM audit.table_at('t', now()) r)
              = (SELECT new_values->>'s' FROM audit.log WHERE operation = 'UPDATE')"
    ));
    assert!(holds(&mut c, "SELECT audit.undo(txid) = 1 FROM audit.log WHERE operation = 'UPDATE'"));
    assert!(holds(&mut c, "SELECT v = E'caf\\xe9 \\xff' FROM t"));
    assert!(holds(&mut c, "SELECT ok FROM audit.verify_table('t')"));
    cluster.assert_no_crash();
}
