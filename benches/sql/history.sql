-- Helpers for the audit_ext-only measurements (state_at, table_at), loaded into
-- the history database after setup_audit_ext.sql.

-- Writes `total` changes to tbl: 2-column UPDATEs of `chunk` rows at a time
-- (ids in order, wrapping around), one transaction per chunk, so that the
-- changes are spread over many distinct changed_at values.
CREATE PROCEDURE bench_churn(tbl regclass, total bigint, chunk bigint)
LANGUAGE plpgsql AS $$
DECLARE
    done bigint := 0;
    lo   bigint := 0;
    n    bigint;
BEGIN
    PERFORM set_config('app.current_user', 'churn-job@example.com', false);
    WHILE done < total LOOP
        EXECUTE format('UPDATE %s SET balance = balance + 1, updated_at = now() WHERE id > $1 AND id <= $2', tbl)
          USING lo, lo + least(chunk, total - done);
        GET DIAGNOSTICS n = ROW_COUNT;
        done := done + n;
        lo := CASE WHEN n = 0 THEN 0 ELSE lo + n END;
        COMMIT;
    END LOOP;
END;
$$;

-- Server-side latency of audit.state_at on random rows at random times in
-- [t0, t1]: `warmup` untimed calls, then `n` timed ones (clock_timestamp()
-- around each call). Returns p50, p99 and mean in ms, and how many calls
-- returned NULL (every row exists throughout, so this should be 0).
CREATE FUNCTION bench_state_at_latency(tbl regclass, nrows bigint, t0 timestamptz, t1 timestamptz,
                                       n int, warmup int DEFAULT 50)
RETURNS TABLE (p50_ms float8, p99_ms float8, mean_ms float8, nulls int)
LANGUAGE plpgsql AS $$
DECLARE
    lat   float8[] := '{}';
    nnull int := 0;
    s     timestamptz;
    r     jsonb;
BEGIN
    FOR i IN 1 .. warmup + n LOOP
        s := clock_timestamp();
        r := audit.state_at(tbl, (1 + floor(random() * nrows))::bigint::text, t0 + random() * (t1 - t0));
        IF i > warmup THEN
            lat := lat || (extract(epoch FROM clock_timestamp() - s) * 1000)::float8;
            IF r IS NULL THEN nnull := nnull + 1; END IF;
        END IF;
    END LOOP;
    RETURN QUERY
      SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x),
             percentile_cont(0.99) WITHIN GROUP (ORDER BY x),
             avg(x), nnull
        FROM unnest(lat) AS x;
END;
$$;

-- Updates one row `total` times, one transaction each: a row with a long history.
CREATE PROCEDURE bench_hot(tbl regclass, row_id bigint, total int)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('app.current_user', 'hot-row-job@example.com', false);
    FOR i IN 1 .. total LOOP
        EXECUTE format('UPDATE %s SET balance = balance + 1, updated_at = now() WHERE id = $1', tbl) USING row_id;
        COMMIT;
    END LOOP;
END;
$$;
