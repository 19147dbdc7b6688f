-- The admin console and the user's statement page (issue #5).
--
-- Indexes for the admin user list at 100 000+ accounts: the default order, the search, the
-- plan filter and the sorts by id, e-mail, name and creation date are served by indexes, and
-- paging is by keyset, so a page costs the same on page 1 and on page 2 000.
-- pg_trgm is not assumed (the embedded PostgreSQL of a fresh machine lacks it): search is by
-- prefix of user id, e-mail or name, served by btree indexes in the "C"
-- collation, which PostgreSQL can use both for `LIKE 'prefix%'` and for ORDER BY.
-- Columns that change on the request path (reserved, allowance, credits, used_cycle,
-- updated_at) are deliberately NOT indexed: admission's and settle's single-row UPDATEs stay
-- HOT updates (no index writes), and the money path pays nothing for the console. Sorting or
-- filtering by usage % therefore scans the accounts table (a bounded top-N sort, tens of
-- milliseconds at 100 000 accounts); the default list, search and the other sorts do not.
--
-- magic_links: the single-use sign-in links of /me. The link itself is HMAC-signed (forgery
-- needs the key); this table makes each link usable once and lets the sender refuse to
-- mail the same user again within a minute.

-- migrate:up
CREATE INDEX accounts_user_id_c ON accounts ((user_id COLLATE "C"));
CREATE INDEX accounts_email_c ON accounts ((COALESCE(lower(email), '') COLLATE "C"), (user_id COLLATE "C"));
CREATE INDEX accounts_name_c ON accounts ((COALESCE(lower(name), '') COLLATE "C"), (user_id COLLATE "C"));
CREATE INDEX accounts_created ON accounts (created_at, (user_id COLLATE "C"));
CREATE INDEX accounts_plan ON accounts (plan);

CREATE INDEX audit_log_actor ON audit_log (actor, id DESC);
CREATE INDEX audit_log_action ON audit_log (action, id DESC);

CREATE TABLE magic_links (
    nonce       text PRIMARY KEY,
    user_id     text NOT NULL REFERENCES accounts (user_id),
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX magic_links_user ON magic_links (user_id, created_at DESC);
CREATE INDEX magic_links_expires ON magic_links (expires_at);

-- migrate:down
DROP TABLE magic_links;
DROP INDEX audit_log_action;
DROP INDEX audit_log_actor;
DROP INDEX accounts_plan;
DROP INDEX accounts_created;
DROP INDEX accounts_name_c;
DROP INDEX accounts_email_c;
DROP INDEX accounts_user_id_c;
