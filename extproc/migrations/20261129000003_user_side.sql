-- The user's side (issue #14): a cap the user sets, an allowance an admin sets per user,
-- notification preferences, in-chat notices and LGPD erasure. The rules are in
-- extproc/accounting.py (effective limit) and extproc/ledger.py (every write, audited).
--
--   personal_cap        the user's own monthly cap, in debited tokens (what used_cycle counts);
--                       NULL = none. Admission refuses when used_cycle + reserved + estimate
--                       would pass it; alerts and states count against the effective limit,
--                       min(cycle_budget, personal_cap).
--   allowance_override  an admin's monthly allowance for this user instead of the plan's;
--                       NULL = the plan's. Like a plan change it applies from the next cycle.
--   notify_80/notify_90 the user's 80 % and 90 % e-mails (100 % always goes out).
--   language            pages and e-mails for this user: 'pt-BR' or 'en'; NULL = the deployment's
--                       GATE_LANGUAGE / the browser's Accept-Language.
--   inline_notice       the highest threshold already shown in the chat this cycle (0 = none);
--                       set back to 0 when a cycle starts. Claimed by a conditional UPDATE, so a
--                       threshold is shown once per cycle whatever races run.
--   erased_at           when the account's personal data was erased (LGPD); the row then holds a
--                       pseudonymous user_id and no e-mail or name.
--
-- Erasure rewrites user_id to a pseudonym: the foreign keys that point at accounts now follow
-- such an update (ON UPDATE CASCADE), so the ledger keeps every amount under the new id in
-- the same transaction. erased_users remembers a SHA-256 of the old id, so the gateway can
-- refuse it afterwards without keeping the id itself. The audit trail stays append-only except
-- for that one rewrite: an UPDATE is let through only inside a transaction that set
-- solaris.erasure = 'on' (SET LOCAL; only Ledger.erase does) and only if the row's id, action
-- and time stay as they were.

--
-- web_sessions: console and /me sessions kept on the server, so an admin can list them (with
-- their last use) and revoke them ("sign out everywhere"). The cookie carries a random session
-- id; the table keeps only its SHA-256, so a copy of the table signs nobody in.

-- migrate:up
ALTER TABLE accounts
    ADD COLUMN personal_cap bigint CHECK (personal_cap >= 0),
    ADD COLUMN allowance_override bigint CHECK (allowance_override >= 0),
    ADD COLUMN notify_80 boolean NOT NULL DEFAULT true,
    ADD COLUMN notify_90 boolean NOT NULL DEFAULT true,
    ADD COLUMN language text CHECK (language IN ('pt-BR', 'en')),
    ADD COLUMN inline_notice smallint NOT NULL DEFAULT 0 CHECK (inline_notice BETWEEN 0 AND 100),
    ADD COLUMN erased_at timestamptz;

CREATE TABLE erased_users (
    id_sha256   text PRIMARY KEY,
    pseudonym   text NOT NULL UNIQUE REFERENCES accounts (user_id) ON UPDATE CASCADE,
    erased_at   timestamptz NOT NULL
);

CREATE TABLE web_sessions (
    sid_sha256   text PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('admin', 'me')),
    subject      text NOT NULL,            -- the admin's name, or the account's user_id
    created_at   timestamptz NOT NULL,
    last_used_at timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    source_ip    text,
    user_agent   text
);
CREATE INDEX web_sessions_subject ON web_sessions (kind, subject, last_used_at DESC);
CREATE INDEX web_sessions_expires ON web_sessions (expires_at);

ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_user_id_fkey,
    ADD CONSTRAINT ledger_entries_user_id_fkey FOREIGN KEY (user_id) REFERENCES accounts (user_id) ON UPDATE CASCADE;
ALTER TABLE reservations DROP CONSTRAINT reservations_user_id_fkey,
    ADD CONSTRAINT reservations_user_id_fkey FOREIGN KEY (user_id) REFERENCES accounts (user_id) ON UPDATE CASCADE;
ALTER TABLE alert_outbox DROP CONSTRAINT alert_outbox_user_id_fkey,
    ADD CONSTRAINT alert_outbox_user_id_fkey FOREIGN KEY (user_id) REFERENCES accounts (user_id) ON UPDATE CASCADE;
ALTER TABLE magic_links DROP CONSTRAINT magic_links_user_id_fkey,
    ADD CONSTRAINT magic_links_user_id_fkey FOREIGN KEY (user_id) REFERENCES accounts (user_id) ON UPDATE CASCADE ON DELETE CASCADE;

-- An alert the user turned off is recorded (the outbox keeps "at most once") but not sent.
ALTER TABLE alert_outbox DROP CONSTRAINT alert_outbox_state_check,
    ADD CONSTRAINT alert_outbox_state_check CHECK (state IN ('pending', 'sent', 'failed', 'undeliverable', 'skipped'));

CREATE OR REPLACE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND current_setting('solaris.erasure', true) = 'on'
       AND NEW.id = OLD.id AND NEW.action = OLD.action AND NEW.created_at = OLD.created_at THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only';
END $$;

-- migrate:down
CREATE OR REPLACE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END $$;
ALTER TABLE alert_outbox DROP CONSTRAINT alert_outbox_state_check,
    ADD CONSTRAINT alert_outbox_state_check CHECK (state IN ('pending', 'sent', 'failed', 'undeliverable'));
ALTER TABLE magic_links DROP CONSTRAINT magic_links_user_id_fkey,
    ADD CONSTRAINT magic_links_user_id_fkey FOREIGN KEY (user_id) REFERENCES accounts (user_id);
ALTER TABLE alert_outbox DROP CONSTRAINT alert_outbox_user_id_fkey,
    ADD CONSTRAINT alert_outbox_user_id_fkey FOREIGN KEY (user_id) REFERENCES accounts (user_id);
ALTER TABLE reservations DROP CONSTRAINT reservations_user_id_fkey,
    ADD CONSTRAINT reservations_user_id_fkey FOREIGN KEY (user_id) REFERENCES accounts (user_id);
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_user_id_fkey,
    ADD CONSTRAINT ledger_entries_user_id_fkey FOREIGN KEY (user_id) REFERENCES accounts (user_id);
DROP TABLE web_sessions;
DROP TABLE erased_users;
ALTER TABLE accounts
    DROP COLUMN erased_at, DROP COLUMN inline_notice, DROP COLUMN language, DROP COLUMN notify_90,
    DROP COLUMN notify_80, DROP COLUMN allowance_override, DROP COLUMN personal_cap;
