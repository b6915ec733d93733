-- Reference "stmt" of the article experiment: the same tables as "stored"
-- (setup_stored.sql); its script (article_stmt.pgbench) stores nothing.
\ir setup_stored.sql
