//! SQL-level randomized test of audit.verify: random rows, sealed, then many
//! random single edits of one row or one block, each made as a superuser and
//! undone again. Every edit must be detected; the undone state must verify ok.
//! Seed: AUDIT_EXT_FUZZ_SEED (printed on failure); trials: AUDIT_EXT_FUZZ_TRIALS.
#![cfg(not(feature = "pg_test"))] // run once, by scripts/test's integration step
mod common;

use common::{Cluster, ClusterOpts, Rng};

/// (description, edit SQL, undo SQL); `$id` is the row or block id.
const ROW_EDITS: &[(&str, &str, &str)] = &[
    ("changed_by char", "UPDATE audit.log SET changed_by = changed_by || 'x' WHERE id = $id",
     "UPDATE audit.log SET changed_by = left(changed_by, -1) WHERE id = $id"),
    ("db_user", "UPDATE audit.log SET db_user = upper(db_user) || '_' WHERE id = $id",
     "UPDATE audit.log SET db_user = lower(left(db_user, -1)) WHERE id = $id"),
    ("row_id", "UPDATE audit.log SET row_id = row_id || '0' WHERE id = $id",
     "UPDATE audit.log SET row_id = left(row_id, -1) WHERE id = $id"),
    ("table_name", "UPDATE audit.log SET table_name = table_name || 's' WHERE id = $id",
     "UPDATE audit.log SET table_name = left(table_name, -1) WHERE id = $id"),
    ("operation", "UPDATE audit.log SET operation = lower(operation) WHERE id = $id",
     "UPDATE audit.log SET operation = upper(operation) WHERE id = $id"),
    ("txid", "UPDATE audit.log SET txid = txid # 1 WHERE id = $id", "UPDATE audit.log SET txid = txid # 1 WHERE id = $id"),
    ("changed_at", "UPDATE audit.log SET changed_at = changed_at + interval '1 microsecond' WHERE id = $id",
     "UPDATE audit.log SET changed_at = changed_at - interval '1 microsecond' WHERE id = $id"),
    ("new_values key", "UPDATE audit.log SET new_values = new_values || '{\"zz\": 1}' WHERE id = $id",
     "UPDATE audit.log SET new_values = new_values - 'zz' WHERE id = $id"),
    ("session_info", "UPDATE audit.log SET session_info = session_info || '{\"zz\": 1}' WHERE id = $id",
     "UPDATE audit.log SET session_info = session_info - 'zz' WHERE id = $id"),
    ("row_hash byte", "UPDATE audit.log SET row_hash = set_byte(row_hash, 5, get_byte(row_hash, 5) # 1) WHERE id = $id",
     "UPDATE audit.log SET row_hash = set_byte(row_hash, 5, get_byte(row_hash, 5) # 1) WHERE id = $id"),
    ("row deleted", "CREATE TEMP TABLE saved AS SELECT * FROM audit.log WHERE id = $id; DELETE FROM audit.log WHERE id = $id",
     "INSERT INTO audit.log SELECT * FROM saved; DROP TABLE saved"),
    ("row inserted", "CREATE TEMP TABLE saved AS SELECT * FROM audit.log WHERE id = $id;
                      INSERT INTO audit.log SELECT id + 1000000, changed_at, txid, schema_name, table_name, operation, row_id,
                        old_row_id, old_values, new_values, changed_fields, changed_by, db_user, session_info, row_hash FROM saved;
                      UPDATE audit.log SET id = $id + 500000 WHERE id = $id + 1000000",
     "DELETE FROM audit.log WHERE id = $id + 500000; DROP TABLE saved"),
];

const BLOCK_EDITS: &[(&str, &str, &str)] = &[
    ("root byte", "UPDATE audit.blocks SET root = set_byte(root, 0, get_byte(root, 0) # 128) WHERE block_id = $id",
     "UPDATE audit.blocks SET root = set_byte(root, 0, get_byte(root, 0) # 128) WHERE block_id = $id"),
    ("block_hash byte", "UPDATE audit.blocks SET block_hash = set_byte(block_hash, 31, get_byte(block_hash, 31) # 1) WHERE block_id = $id",
     "UPDATE audit.blocks SET block_hash = set_byte(block_hash, 31, get_byte(block_hash, 31) # 1) WHERE block_id = $id"),
    ("prev_hash byte", "UPDATE audit.blocks SET prev_hash = set_byte(prev_hash, 3, get_byte(prev_hash, 3) # 2) WHERE block_id = $id",
     "UPDATE audit.blocks SET prev_hash = set_byte(prev_hash, 3, get_byte(prev_hash, 3) # 2) WHERE block_id = $id"),
    ("row_count", "UPDATE audit.blocks SET row_count = row_count + 1 WHERE block_id = $id",
     "UPDATE audit.blocks SET row_count = row_count - 1 WHERE block_id = $id"),
    ("sealed_at", "UPDATE audit.blocks SET sealed_at = sealed_at + interval '1 microsecond' WHERE block_id = $id",
     "UPDATE audit.blocks SET sealed_at = sealed_at - interval '1 microsecond' WHERE block_id = $id"),
    ("block deleted", "CREATE TEMP TABLE savedb AS SELECT * FROM audit.blocks WHERE block_id = $id; DELETE FROM audit.blocks WHERE block_id = $id",
     "INSERT INTO audit.blocks SELECT * FROM savedb; DROP TABLE savedb"),
];

#[test]
fn every_random_edit_is_detected_and_nothing_else() {
    let seed: u64 = std::env::var("AUDIT_EXT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xA0D1_7E57);
    let trials: u64 =
        std::env::var("AUDIT_EXT_FUZZ_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let mut rng = Rng(seed | 1);
    let c = Cluster::start(ClusterOpts::new().preload(false));
    let mut db = c.connect("postgres");
    db.batch_execute(
        "CREATE EXTENSION audit_ext;
         CREATE TABLE f (id int PRIMARY KEY, a text, b jsonb, n numeric);
         SELECT audit.track('f');",
    )
    .unwrap();
    // Random rows in several transactions and blocks: unicode, quotes, nulls.
    for round in 0..6 {
        let mut sql = String::from("BEGIN;");
        for k in 0..15 {
            let id = round * 100 + k;
            let a = ["plain", "quo'te", "ünï\u{1F600}", "", "comma,sep", "new\nline"]
                [rng.below(6) as usize];
            sql.push_str(&format!(
                "INSERT INTO f VALUES ({id}, $q${a}$q$, '{{\"k\": {}}}', {}.{});",
                rng.below(1000),
                rng.below(100),
                rng.below(100)
            ));
            if rng.below(2) == 0 {
                sql.push_str(&format!("UPDATE f SET n = n + 1 WHERE id = {id};"));
            }
        }
        if rng.below(3) == 0 {
            sql.push_str(&format!("DELETE FROM f WHERE id = {};", round * 100));
        }
        sql.push_str("COMMIT; SELECT audit.seal();");
        db.batch_execute(&sql).unwrap();
    }
    let verify = |db: &mut postgres::Client| -> (bool, Option<String>) {
        let r = db.query_one("SELECT ok, detail FROM audit.verify()", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert!(verify(&mut db).0, "clean log verifies");
    let ids: Vec<i64> = db
        .query("SELECT id FROM audit.log ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let blocks: Vec<i64> = db
        .query("SELECT block_id FROM audit.blocks ORDER BY block_id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(blocks.len() >= 6 && ids.len() >= 90);

    for trial in 0..trials {
        let on_block = rng.below(4) == 0;
        let (what, edit, undo, id) = if on_block {
            let (w, e, u) = BLOCK_EDITS[rng.below(BLOCK_EDITS.len() as u64) as usize];
            (w, e, u, blocks[rng.below(blocks.len() as u64) as usize])
        } else {
            let (w, e, u) = ROW_EDITS[rng.below(ROW_EDITS.len() as u64) as usize];
            (w, e, u, ids[rng.below(ids.len() as u64) as usize])
        };
        db.batch_execute(&edit.replace("$id", &id.to_string())).unwrap();
        let (ok, detail) = verify(&mut db);
        assert!(!ok, "seed {seed} trial {trial}: {what} on {id} was not detected");
        assert!(detail.is_some_and(|d| !d.is_empty()), "seed {seed} trial {trial}: no detail");
        db.batch_execute(&undo.replace("$id", &id.to_string())).unwrap();
        let (ok, detail) = verify(&mut db);
        assert!(
            ok,
            "seed {seed} trial {trial}: false alarm after undoing {what} on {id}: {detail:?}"
        );
    }
    c.assert_no_crash();
}
