-- Variant floor: no trigger. Every measured statement writes the change and an
-- equivalent log row itself (the *_floor.sql files and update_floor.pgbench),
-- into the same log table as variant plpgsql: the cost of storing the row by hand.
\ir log_table.sql
