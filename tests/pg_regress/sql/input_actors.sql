-- Any actor value is recorded somehow and never fails the user's write: as a JSON
-- object when jsonb can hold it exactly, else as its text.
CREATE TABLE act (id int PRIMARY KEY);
SELECT audit.track('act');
CREATE TEMP TABLE actor_cases (n int PRIMARY KEY, actor text);
INSERT INTO actor_cases VALUES
  (1, '{"email": "eve\u0000@corp"}'),
  (2, '{"email\u0000": "eve@corp"}'),
  (3, '{"email": "\ud800 lone high"}'),
  (4, '{"email": "\udc00 lone low"}'),
  (5, '{"email": "\ud83d\ude00 pair"}'),
  (6, '{"email": "q\" b\\ s\/ \b\f\n\r\t \u00e9 \u20ac"}'),
  (7, '{"user_id": 1e1000000}'),
  (8, '{"user_id": 123456789012345678901234567890.000000000000000000001}'),
  (9, '{"a": ' || repeat('[', 200) || repeat(']', 200) || '}'),
  (10, '{"a": ' || repeat('{"b": ', 100) || '1' || repeat('}', 100) || '}'),
  (11, '{"email": "ok@corp", "email": "dup@corp"}'),
  (12, '{"email": "\u0041"}'),
  (13, '{"email": "a@b"} trailing'),
  (14, '{"email": "\x"}');
DO $$
DECLARE c record;
BEGIN
  FOR c IN SELECT * FROM actor_cases ORDER BY n LOOP
    PERFORM set_config('app.current_user', c.actor, false);
    INSERT INTO act VALUES (c.n);
  END LOOP;
  PERFORM set_config('app.current_user', '', false);
END $$;
SELECT l.row_id::int AS n, l.changed_by = c.actor AS by_is_text,
       jsonb_typeof(l.session_info->'app.current_user') AS kept_as,
       CASE WHEN jsonb_typeof(l.session_info->'app.current_user') = 'string'
            THEN l.session_info->>'app.current_user' = c.actor END AS text_exact
  FROM audit.log l JOIN actor_cases c ON c.n = l.row_id::int
 WHERE l.table_name = 'act' ORDER BY 1;
SELECT changed_by FROM audit.log WHERE table_name = 'act' AND row_id IN ('5', '6', '8', '11', '12') ORDER BY row_id::int;
SELECT ok FROM audit.verify();
