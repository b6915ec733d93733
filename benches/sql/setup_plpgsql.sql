-- Variant plpgsql: the common design of the seed articles (000_*.txt): one
-- generic PL/pgSQL AFTER row trigger (SECURITY DEFINER, as in the article) that
-- writes to_jsonb(OLD) and to_jsonb(NEW), the application user and session
-- information into the article's log table. Written by us: compared with the
-- article's function it computes each jsonb once (assignment instead of
-- SELECT ... INTO) and takes the key column from the trigger argument.
\ir log_table.sql

CREATE FUNCTION audit.audit_trigger() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    old_row jsonb;
    new_row jsonb;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_row := to_jsonb(OLD);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        new_row := to_jsonb(NEW);
    END IF;
    INSERT INTO audit.audit_log (table_name, operation, row_id, old_values, new_values, changed_by, session_info)
    VALUES (TG_TABLE_NAME, TG_OP::audit.operation, coalesce(new_row, old_row) ->> TG_ARGV[0], old_row, new_row,
            coalesce(nullif(current_setting('app.current_user', true), ''), session_user),
            jsonb_build_object('client_addr', inet_client_addr(),
                               'client_port', inet_client_port(),
                               'backend_pid', pg_backend_pid(),
                               'application_name', current_setting('application_name', true)));
    RETURN NULL;
END;
$$;

CREATE TRIGGER audit_bench
    AFTER INSERT OR UPDATE OR DELETE ON bench
    FOR EACH ROW EXECUTE FUNCTION audit.audit_trigger('id');
