-- Substring search of the admin user list (issue #14): trigram indexes when pg_trgm exists.
--
-- The user list searches by user id, e-mail and name. With the pg_trgm extension, a search
-- finds the term anywhere in them (`lower(x) ILIKE '%term%'`), served by the three GIN
-- trigram indexes below (a BitmapOr of three Bitmap Index Scans at 100 000+ accounts).
-- Without it, search stays the prefix search of 20261125000003_web.sql, served by its "C"
-- collation btree indexes. extproc/web/queries.py finds out which once per connection pool
-- (the extension AND these indexes must exist), so one code base serves both.
--
-- The extension is created only when the server ships it (pg_available_extensions: Debian's
-- PostgreSQL does, a minimal build may not) and the migrating role may create it (trusted
-- since PostgreSQL 13, so a database owner can; otherwise insufficient_privilege, caught:
-- the migration goes on and search stays by prefix). An operator who adds the extension
-- later (as a superuser) creates the three indexes below by hand and restarts the processor.
--
-- The indexes are on lower(...), as the prefix indexes: the search is case-insensitive.
-- They are written only when an account's id, e-mail or name changes, never on the
-- request path's UPDATEs (reserved, used_cycle...), which stay HOT.

-- migrate:up
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS pg_trgm;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'pg_trgm not created (insufficient privilege): the user search stays by prefix';
        END;
    END IF;
END $$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm') THEN
        CREATE INDEX IF NOT EXISTS accounts_user_id_trgm ON accounts USING gin (lower(user_id) gin_trgm_ops);
        CREATE INDEX IF NOT EXISTS accounts_email_trgm ON accounts USING gin (lower(email) gin_trgm_ops);
        CREATE INDEX IF NOT EXISTS accounts_name_trgm ON accounts USING gin (lower(name) gin_trgm_ops);
    END IF;
END $$;

-- migrate:down
DROP INDEX IF EXISTS accounts_name_trgm;
DROP INDEX IF EXISTS accounts_email_trgm;
DROP INDEX IF EXISTS accounts_user_id_trgm;
-- The extension stays: something else may use it, and unused it costs nothing.
