-- Reads group, variant none: no auditing. audit_ext is preloaded in the
-- cluster but not created in this database; pgaudit is preloaded too and told
-- to log nothing here (its default, spelt out).
-- psql variable: db (this database's name).
SET client_min_messages = warning;
ALTER DATABASE :"db" SET pgaudit.log = 'none';
