-- The ledger. Invariants kept by extproc/ledger.py and checked by tests and `extproc reconcile`:
--   I1  a usage entry per exchange id at most (UNIQUE exchange_id): settles are exactly-once;
--   I2  for every account: allowance = SUM(allowance_delta), credits = SUM(credits_delta),
--       so balance (allowance + credits) = SUM(tokens) over its ledger entries;
--   I3  reserved = SUM(tokens) of its reservations in state 'held';
--   I4  no money moves without a ledger entry; no admin change without an audit_log row.

-- migrate:up
CREATE TABLE plans (
    name                text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
    -- NULL means "the deployment default" (GATE_DEFAULT_MONTHLY_TOKENS / GATE_RATE_LIMIT_PER_MINUTE)
    monthly_tokens      bigint CHECK (monthly_tokens >= 0),
    requests_per_minute integer CHECK (requests_per_minute > 0),
    rollover            boolean NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now()
);
INSERT INTO plans (name) VALUES ('default');

CREATE TABLE accounts (
    user_id          text PRIMARY KEY CHECK (length(user_id) BETWEEN 1 AND 256),
    email            text,
    name             text,
    plan             text NOT NULL DEFAULT 'default' REFERENCES plans (name),
    state            text NOT NULL DEFAULT 'active'
                     CHECK (state IN ('active', 'warned_80', 'warned_90', 'blocked', 'suspended')),
    state_reason     text,
    cycle_anchor_day smallint NOT NULL CHECK (cycle_anchor_day BETWEEN 1 AND 31),
    cycle_start      timestamptz NOT NULL,
    cycle_end        timestamptz NOT NULL CHECK (cycle_end > cycle_start),
    -- what the cycle's usage % is measured against: allowance at cycle start plus credits
    -- available in the cycle (grown by every top-up)
    cycle_budget     bigint NOT NULL DEFAULT 0 CHECK (cycle_budget >= 0),
    used_cycle       bigint NOT NULL DEFAULT 0 CHECK (used_cycle >= 0),
    allowance        bigint NOT NULL DEFAULT 0 CHECK (allowance >= 0),
    credits          bigint NOT NULL DEFAULT 0,  -- negative after overspend or a refund
    reserved         bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX accounts_cycle_end ON accounts (cycle_end);
CREATE INDEX accounts_state ON accounts (state);
CREATE INDEX accounts_email ON accounts (lower(email));

CREATE TABLE ledger_entries (
    id               bigserial PRIMARY KEY,
    user_id          text NOT NULL REFERENCES accounts (user_id),
    kind             text NOT NULL
                     CHECK (kind IN ('usage', 'grant', 'purchase', 'refund', 'cycle_reset', 'adjustment')),
    tokens           bigint NOT NULL,            -- signed change of the balance
    allowance_delta  bigint NOT NULL,
    credits_delta    bigint NOT NULL,
    balance_after    bigint NOT NULL,
    exchange_id      text UNIQUE,                -- usage: minted by the processor per ext_proc stream
    idempotency_key  text UNIQUE,                -- grants/purchases: admin dialog key, Stripe session id
    request_id       text,                       -- the client's x-request-id, correlation only
    model            text,
    prompt_tokens    bigint,
    completion_tokens bigint,
    estimate         bigint,                     -- what admission reserved
    prompt_chars     bigint,                     -- the estimate's input, for `extproc calibrate`
    real_tokens      bigint,
    flags            text[] NOT NULL DEFAULT '{}',
    actor            text NOT NULL,
    reason           text,
    cycle_start      timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (tokens = allowance_delta + credits_delta)
);
CREATE INDEX ledger_entries_user ON ledger_entries (user_id, id DESC);
CREATE INDEX ledger_entries_created ON ledger_entries (created_at);

CREATE TABLE reservations (
    exchange_id  text PRIMARY KEY,
    user_id      text NOT NULL REFERENCES accounts (user_id),
    tokens       bigint NOT NULL CHECK (tokens >= 0),
    request_id   text,
    model        text,
    state        text NOT NULL DEFAULT 'held'
                 CHECK (state IN ('held', 'settled', 'released', 'expired')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    closed_at    timestamptz
);
CREATE INDEX reservations_held_expiry ON reservations (expires_at) WHERE state = 'held';
CREATE INDEX reservations_user ON reservations (user_id);

-- One row per (user, cycle, threshold): the UNIQUE key is what makes an alert at most once
-- per threshold per cycle, whatever races the settles run.
CREATE TABLE alert_outbox (
    id              bigserial PRIMARY KEY,
    user_id         text NOT NULL REFERENCES accounts (user_id),
    cycle_start     timestamptz NOT NULL,
    cycle_end       timestamptz NOT NULL,
    threshold       smallint NOT NULL CHECK (threshold BETWEEN 1 AND 100),
    used_pct        numeric(7, 2) NOT NULL,
    used            bigint NOT NULL,
    budget          bigint NOT NULL,
    remaining       bigint NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'sent', 'failed', 'undeliverable')),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    UNIQUE (user_id, cycle_start, threshold)
);
CREATE INDEX alert_outbox_pending ON alert_outbox (next_attempt_at) WHERE state = 'pending';

CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    actor       text NOT NULL,
    action      text NOT NULL,
    target      text,
    before      jsonb,
    after       jsonb,
    reason      text,
    source_ip   text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_target ON audit_log (target, id DESC);
CREATE INDEX audit_log_created ON audit_log (created_at);

-- The audit trail is append-only: no code path, and no admin with SQL by mistake, rewrites it.
CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END $$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();

CREATE TABLE stripe_events (
    event_id    text PRIMARY KEY,
    type        text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- migrate:down
DROP TABLE stripe_events;
DROP TRIGGER audit_log_no_update ON audit_log;
DROP FUNCTION audit_log_is_append_only();
DROP TABLE audit_log;
DROP TABLE alert_outbox;
DROP TABLE reservations;
DROP TABLE ledger_entries;
DROP TABLE accounts;
DROP TABLE plans;
