-- audit.secret, the redaction key, is write-once (src/secret.rs): markers in the
-- log are comparable only with markers made by the same key. Even the extension
-- owner (here a superuser) is refused, with 42501, and the key stays.
SELECT count(*) AS keys, min(length(key)) >= 32 AS long_enough FROM audit.secret;
CREATE TEMP TABLE secret_before AS SELECT key FROM audit.secret;
CREATE FUNCTION pg_temp.refused(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE stmt;
  RETURN 'not refused';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
SELECT pg_temp.refused('UPDATE audit.secret SET key = key');
SELECT pg_temp.refused($$UPDATE audit.secret SET key = decode(repeat('00', 32), 'hex')$$);
SELECT pg_temp.refused('DELETE FROM audit.secret');
SELECT pg_temp.refused('TRUNCATE audit.secret');
SELECT (SELECT key FROM audit.secret) = (SELECT key FROM secret_before) AS key_unchanged;
