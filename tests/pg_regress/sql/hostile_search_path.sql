-- Every function that switches to the extension owner runs its SQL with a fixed
-- search_path (pg_catalog, pg_temp): a role's own schema first in search_path,
-- holding operators and functions that shadow pg_catalog's, changes nothing and
-- runs nothing. The shadows record who ran them, and try to make their owner a
-- superuser when a superuser does. (The worker and the default-partition move:
-- tests/trust.rs.)
CREATE ROLE audit_regress_eve;
GRANT USAGE ON SCHEMA audit TO audit_regress_eve;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA audit TO audit_regress_eve;
CREATE SCHEMA shadow AUTHORIZATION audit_regress_eve;
CREATE TABLE shadow_calls (who text, what text);
GRANT ALL ON shadow_calls TO PUBLIC;
CREATE TABLE shadow_t (id bigint PRIMARY KEY, v text, amount numeric);
ALTER TABLE shadow_t OWNER TO audit_regress_eve;
-- Partial UPDATE rows (capture 'changes', no whole image by chance): the readers'
-- folds and their extra queries run under the shadows too.
SET audit.image_every = 0;
SET ROLE audit_regress_eve;
CREATE FUNCTION shadow.hit(what text) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
  IF current_user::text OPERATOR(pg_catalog.<>) 'audit_regress_eve' THEN
    INSERT INTO public.shadow_calls VALUES (current_user, what);
    IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) current_user) THEN
      EXECUTE 'ALTER ROLE audit_regress_eve SUPERUSER';
    END IF;
  END IF;
END $f$;
CREATE FUNCTION shadow.ts_ge(timestamptz, timestamptz) RETURNS bool LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('>= timestamptz'); RETURN $1 OPERATOR(pg_catalog.>=) $2; END $f$;
CREATE FUNCTION shadow.ts_lt(timestamptz, timestamptz) RETURNS bool LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('< timestamptz'); RETURN $1 OPERATOR(pg_catalog.<) $2; END $f$;
CREATE FUNCTION shadow.i8_eq(bigint, bigint) RETURNS bool LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('= bigint'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $f$;
CREATE FUNCTION shadow.i8_lt(bigint, bigint) RETURNS bool LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('< bigint'); RETURN $1 OPERATOR(pg_catalog.<) $2; END $f$;
CREATE FUNCTION shadow.i8_ge(bigint, bigint) RETURNS bool LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('>= bigint'); RETURN $1 OPERATOR(pg_catalog.>=) $2; END $f$;
CREATE FUNCTION shadow.txt_eq(text, text) RETURNS bool LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('= text'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $f$;
CREATE FUNCTION shadow.name_eq(name, name) RETURNS bool LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('= name'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $f$;
CREATE FUNCTION shadow.oid_eq(oid, oid) RETURNS bool LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('= oid'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $f$;
CREATE FUNCTION shadow.txt_cat(text, text) RETURNS text LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('|| text'); RETURN $1 OPERATOR(pg_catalog.||) $2; END $f$;
CREATE FUNCTION shadow.jsonb_cat(jsonb, jsonb) RETURNS jsonb LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('|| jsonb'); RETURN $1 OPERATOR(pg_catalog.||) $2; END $f$;
CREATE OPERATOR shadow.>= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = shadow.ts_ge);
CREATE OPERATOR shadow.< (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = shadow.ts_lt);
CREATE OPERATOR shadow.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = shadow.i8_eq);
CREATE OPERATOR shadow.< (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = shadow.i8_lt);
CREATE OPERATOR shadow.>= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = shadow.i8_ge);
CREATE OPERATOR shadow.= (LEFTARG = text, RIGHTARG = text, FUNCTION = shadow.txt_eq);
CREATE OPERATOR shadow.= (LEFTARG = name, RIGHTARG = name, FUNCTION = shadow.name_eq);
CREATE OPERATOR shadow.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = shadow.oid_eq);
CREATE OPERATOR shadow.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = shadow.txt_cat);
CREATE OPERATOR shadow.|| (LEFTARG = jsonb, RIGHTARG = jsonb, FUNCTION = shadow.jsonb_cat);
CREATE FUNCTION shadow.now() RETURNS timestamptz LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('now'); RETURN pg_catalog.now(); END $f$;
CREATE FUNCTION shadow.to_jsonb(anyelement) RETURNS jsonb LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('to_jsonb'); RETURN pg_catalog.to_jsonb($1); END $f$;
CREATE FUNCTION shadow.jsonb_build_object(text, text) RETURNS jsonb LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('jsonb_build_object'); RETURN pg_catalog.jsonb_build_object($1, $2); END $f$;
CREATE FUNCTION shadow.sha256(bytea) RETURNS bytea LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('sha256'); RETURN pg_catalog.sha256($1); END $f$;
CREATE FUNCTION shadow.format(text) RETURNS text LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('format'); RETURN pg_catalog.format($1); END $f$;
CREATE FUNCTION shadow.format(text, VARIADIC text[]) RETURNS text LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('format'); RETURN pg_catalog.format($1, VARIADIC $2); END $f$;
CREATE FUNCTION shadow.quote_ident(text) RETURNS text LANGUAGE plpgsql AS
  $f$ BEGIN PERFORM shadow.hit('quote_ident'); RETURN pg_catalog.quote_ident($1); END $f$;
CREATE FUNCTION shadow.count(anyelement) RETURNS bigint LANGUAGE sql AS $f$ SELECT 1::bigint $f$;
-- Eve's own table, tracked by eve, then every function with the shadows first.
SELECT audit.track('shadow_t', capture => 'changes');
SET search_path = shadow, pg_catalog, public;
INSERT INTO public.shadow_t VALUES (1, 'a', 1.50), (2, 'b', 2);
UPDATE public.shadow_t SET v = 'a2' WHERE id = 1;
DELETE FROM public.shadow_t WHERE id = 2;
SELECT pg_catalog.count(*) AS changes FROM audit.history('public.shadow_t', '1');
SELECT audit.state_at('public.shadow_t', '1', pg_catalog.now()) OPERATOR(pg_catalog.->>) 'v' AS v_now;
SELECT pg_catalog.count(*) AS rows_now FROM audit.table_at('public.shadow_t', pg_catalog.now());
SELECT audit.seal() OPERATOR(pg_catalog.>) 0 AS sealed;
SELECT ok FROM audit.verify();
SELECT ok FROM audit.verify(audit.digest());
SELECT audit.baseline('public.shadow_t') AS baselined;
SELECT ok, rows_checked FROM audit.verify_table('public.shadow_t');
SELECT ok FROM audit.verify(audit.digest(), ARRAY['public.shadow_t'::pg_catalog.regclass]);
SELECT audit.maintain() OPERATOR(pg_catalog.?) 'created' AS maintained;
SELECT seal_ok, maintain_ok FROM audit.status();
SELECT audit.undo((SELECT l.txid FROM audit.history('public.shadow_t', '2') l
                    WHERE l.operation OPERATOR(pg_catalog.=) 'DELETE')) AS undone;
SELECT audit.untrack('public.shadow_t');
RESET search_path;
RESET ROLE;
-- Nothing ran as anybody but eve, and eve is no superuser.
SELECT who, what FROM shadow_calls;
SELECT rolsuper FROM pg_roles WHERE rolname = 'audit_regress_eve';
SELECT id, v, amount FROM shadow_t ORDER BY id;
DROP TABLE shadow_t;
DROP SCHEMA shadow CASCADE;
DROP TABLE shadow_calls;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA audit FROM audit_regress_eve;
REVOKE ALL ON SCHEMA audit FROM audit_regress_eve;
DROP ROLE audit_regress_eve;
