-- The table of the seed article's measurement (000_*.txt): 15 columns (text,
-- numeric, timestamps), about 400 bytes a row. Loaded once into database
-- bench_template; every measurement runs on a fresh copy of it.
--
-- psql variables: rows (rows in bench), batch (rows in bench_new, the rows that
-- INSERT ... SELECT and COPY add), copy_file (server-side file for COPY FROM).
\set ON_ERROR_STOP 1
SET client_min_messages = warning;

CREATE EXTENSION pg_prewarm;

CREATE TABLE bench (
  id          bigint        PRIMARY KEY,
  email       text          NOT NULL,
  name        text          NOT NULL,
  plan        text          NOT NULL,
  status      text          NOT NULL,
  country     text          NOT NULL,
  city        text          NOT NULL,
  address     text          NOT NULL,
  phone       text          NOT NULL,
  balance     numeric(12,2) NOT NULL,
  score       int           NOT NULL,
  created_at  timestamptz   NOT NULL,
  updated_at  timestamptz   NOT NULL,
  flags       int           NOT NULL,
  notes       text
);

-- Deterministic rows: the same ids always get the same values.
CREATE FUNCTION bench_rows(lo bigint, hi bigint) RETURNS SETOF bench
LANGUAGE sql AS $$
  SELECT i,
         'user' || i || '.' || substr(md5('e' || i), 1, 8) || '@example.com',
         initcap(substr(md5('n' || i), 1, 7)) || ' ' || initcap(substr(md5('s' || i), 1, 10)),
         (ARRAY['free', 'pro', 'team', 'enterprise'])[1 + i % 4],
         (ARRAY['active', 'trial', 'suspended', 'closed'])[1 + (i / 4) % 4],
         (ARRAY['US', 'DE', 'FR', 'GB', 'JP', 'BR', 'IN', 'CA'])[1 + i % 8],
         (ARRAY['Springfield', 'Berlin', 'Paris', 'London', 'Tokyo', 'Sao Paulo', 'Mumbai', 'Toronto'])[1 + i % 8],
         (1 + i % 9999) || ' ' || initcap(substr(md5('a' || i), 1, 12)) || ' Street, Apt ' || (1 + i % 300),
         '+1-555-' || lpad((i % 10000000)::text, 7, '0'),
         ((abs(hashint8(i)) % 10000000) / 100.0)::numeric(12,2),
         (abs(hashint8(i + 1)) % 1000)::int,
         timestamptz '2024-01-01 00:00+00' + (i % 700) * interval '1 day' + (i % 86400) * interval '1 second',
         timestamptz '2024-02-01 00:00+00' + (i % 700) * interval '1 day' + (i % 86400) * interval '1 second',
         (i % 16)::int,
         substr(md5('1' || i) || md5('2' || i) || md5('3' || i) || md5('4' || i) || md5('5' || i) || md5('6' || i)
                || md5('7' || i), 1, 190 + (i % 21)::int)
    FROM generate_series(lo, hi) AS i
$$;

INSERT INTO bench SELECT * FROM bench_rows(1, :rows);

-- The rows that INSERT ... SELECT adds (ids after the last one), and the file
-- that COPY FROM reads (the same rows, written once).
CREATE TABLE bench_new (LIKE bench);
INSERT INTO bench_new SELECT * FROM bench_rows(:rows + 1, :rows + :batch);
COPY bench_new TO :'copy_file';

VACUUM (FREEZE, ANALYZE) bench, bench_new;
