//! Databases whose encoding is not UTF-8. audit_ext stores and hashes text as
//! bytes in the database encoding, so LATIN1 values, keys and actors, and bytes
//! that are not UTF-8 at all (SQL_ASCII), are captured exactly and verify()
//! checks the same bytes: no false alarm, and tampering is still found.
//! Names must be ASCII there, and are refused with an error of their own
//! otherwise (README, "Database encodings").
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

/// The SQLSTATE `sql` fails with (it must fail).
fn fails_with(c: &mut Client, sql: &str) -> String {
    match c.batch_execute(sql) {
        Ok(()) => panic!("{sql}: succeeded, but must fail"),
        Err(e) => {
            let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e}"));
            format!("{}: {}", db.code().code(), db.message())
        }
    }
}

/// Outside UTF-8, audit_ext takes only ASCII names (it writes them into its
/// own SQL, which pgrx carries as UTF-8): every function that reads a schema,
/// table, column or type name refuses one that is not with 0A000 and a message
/// that shows its bytes, never with a panic (XX000). Capture needs no name in
/// SQL: a tracked table renamed so goes on being recorded.
#[test]
fn latin1_names_that_are_not_ascii_are_refused_not_panicked_on() {
    let (cluster, mut c) = started("latin_names", "LATIN1");
    let refused = |c: &mut Client, sql: &str, shown: &str| {
        let got = fails_with(c, sql);
        assert!(
            got.starts_with("0A000: ") && got.contains(&format!("\"{shown}\" is not ASCII")),
            "{sql}: {got}"
        );
    };
    c.batch_execute(
        "CREATE TABLE \"größe\" (id int PRIMARY KEY, v text);
         CREATE TABLE t2 (id int PRIMARY KEY, \"spalte_ä\" text, v text);
         CREATE SCHEMA \"schä\"; CREATE TABLE \"schä\".t4 (id int PRIMARY KEY);
         CREATE DOMAIN \"schlüssel\" AS int; CREATE TABLE t5 (id \"schlüssel\" PRIMARY KEY);",
    )
    .unwrap();
    refused(&mut c, "SELECT audit.track('\"größe\"')", "gr\\xf6\\xdfe");
    refused(&mut c, "SELECT audit.track('\"schä\".t4')", "sch\\xe4");
    // A column of the table, named in a list or only there.
    refused(&mut c, "SELECT audit.track('t2', exclude => '{spalte_ä}')", "spalte_\\xe4");
    refused(&mut c, "SELECT audit.track('t2', redact => '{v, spalte_ä}')", "spalte_\\xe4");
    refused(&mut c, "SELECT audit.track('t2')", "spalte_\\xe4");
    // The key's type goes into time travel's SQL (a cast), not into capture's.
    // (format_type quotes it, so the message shows the quotes too.)
    c.batch_execute("SELECT audit.track('t5'); INSERT INTO t5 VALUES (1);").unwrap();
    refused(&mut c, "SELECT audit.state_at('t5', '1', now())", "\"schl\\xfcssel\"");
    c.batch_execute("SELECT audit.untrack('t5')").unwrap();
    // An argument that is not a name, and not ASCII: the argument's own error.
    let got = fails_with(&mut c, "SELECT audit.track('\"größe\"', capture => 'völlig')");
    assert!(got.starts_with("0A000: ") || got.starts_with("22023: "), "{got}");
    assert!(holds(&mut c, "SELECT count(*) = 0 FROM audit.tracked"));

    // Tracked under ASCII names, then renamed: still captured, and refused by name.
    c.batch_execute(
        "CREATE TABLE t3 (id int PRIMARY KEY, a text);
         SELECT audit.track('t3', baseline => true);
         INSERT INTO t3 VALUES (1, 'x');
         ALTER TABLE t3 RENAME COLUMN a TO \"ä\";
         INSERT INTO t3 VALUES (2, 'y');
         UPDATE t3 SET \"ä\" = 'z' WHERE id = 1;",
    )
    .unwrap();
    // A column's name: read wherever a live row is encoded.
    for sql in [
        "SELECT * FROM audit.verify_table('t3')",
        "SELECT audit.baseline('t3')",
        "SELECT audit.state_at('t3', '2', now())",
        "SELECT * FROM audit.table_at('t3', now())",
        "SELECT audit.track('t3')",
    ] {
        refused(&mut c, sql, "\\xe4");
    }
    // history answers from the log: the changed column comes back as its bytes.
    assert!(holds(
        &mut c,
        "SELECT changed_fields = '{ä}' AND octet_length(changed_fields[1]) = 1
           FROM audit.history('t3', '1') WHERE operation = 'UPDATE'"
    ));
    c.batch_execute(
        "ALTER TABLE t3 RENAME TO \"tä\";
         INSERT INTO \"tä\" VALUES (3, 'w');",
    )
    .unwrap();
    assert!(holds(
        &mut c,
        "SELECT count(*) = 1 FROM audit.log WHERE table_name = 'tä' AND operation = 'INSERT' AND row_id = '3'"
    ));
    for sql in [
        "SELECT * FROM audit.verify_table('\"tä\"')",
        "SELECT * FROM audit.history('\"tä\"', '1')",
        "SELECT audit.state_at('\"tä\"', '1', now())",
        "SELECT audit.untrack('\"tä\"')",
        "SELECT audit.undo(txid) FROM audit.log WHERE table_name = 'tä' AND operation = 'INSERT'",
    ] {
        refused(&mut c, sql, "t\\xe4");
    }
    // The chain is untouched by all of it.
    c.batch_execute("SELECT audit.seal()").unwrap();
    assert!(verify_ok(&mut c));
    // Back to ASCII names: the old one stays in the table's history, where time
    // travel would have to match it as a literal, so it is still refused.
    c.batch_execute("ALTER TABLE \"tä\" RENAME TO t3b; ALTER TABLE t3b RENAME COLUMN \"ä\" TO a;")
        .unwrap();
    refused(&mut c, "SELECT audit.state_at('t3b', '3', now())", "t\\xe4");
    cluster.assert_no_crash();
}

/// In a UTF-8 database names are any text: tracked, baselined, verified,
/// travelled in time and undone under names that are not ASCII.
#[test]
fn utf8_names_that_are_not_ascii_work_everywhere() {
    let (cluster, mut c) = started("utf8_names", "UTF8");
    c.batch_execute(
        "CREATE SCHEMA \"schä\";
         CREATE DOMAIN \"schä\".\"schlüssel\" AS int;
         CREATE TABLE \"schä\".\"größe\" (id \"schä\".\"schlüssel\" PRIMARY KEY, \"straße\" text, \"geheimnis\" text, \"auslassen_ö\" text);
         INSERT INTO \"schä\".\"größe\" VALUES (1, 'a', 's', 'o');
         SELECT audit.track('\"schä\".\"größe\"', exclude => '{auslassen_ö}', redact => '{geheimnis}', baseline => true);
         SELECT pg_sleep(0.01);",
    )
    .unwrap();
    let before: String = c.query_one("SELECT now()::text", &[]).unwrap().get(0);
    c.batch_execute("SELECT pg_sleep(0.01)").unwrap();
    c.batch_execute("UPDATE \"schä\".\"größe\" SET \"straße\" = 'b' WHERE id = 1").unwrap();
    assert!(holds(&mut c, "SELECT ok FROM audit.verify_table('\"schä\".\"größe\"')"));
    assert!(holds(
        &mut c,
        &format!("SELECT s->>'straße' = 'a' AND NOT s ? 'auslassen_ö' FROM audit.state_at('\"schä\".\"größe\"', '1', '{before}') s")
    ));
    assert!(holds(
        &mut c,
        "SELECT changed_fields = '{straße}' FROM audit.history('\"schä\".\"größe\"', '1') WHERE operation = 'UPDATE'"
    ));
    assert!(holds(&mut c, "SELECT count(*) = 1 FROM audit.table_at('\"schä\".\"größe\"', now())"));
    assert!(holds(&mut c, "SELECT audit.undo(txid) = 1 FROM audit.log WHERE operation = 'UPDATE'"));
    assert!(holds(&mut c, "SELECT \"straße\" = 'a' FROM \"schä\".\"größe\""));
    assert!(holds(&mut c, "SELECT ok FROM audit.verify_table('\"schä\".\"größe\"')"));
    c.batch_execute("SELECT audit.untrack('\"schä\".\"größe\"')").unwrap();
    assert!(holds(&mut c, "SELECT count(*) = 0 FROM audit.tracked"));
    cluster.assert_no_crash();
}
