-- Reference "stored_chg" of the article experiment: as "stored", with the row
-- that capture 'changes' writes for the same UPDATE.
\set capture changes
\ir setup_stored.sql
