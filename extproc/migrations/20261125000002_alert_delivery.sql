-- Alert delivery (issue #4). alert_outbox (previous migration) holds WHAT to say: one row per
-- (user, cycle, threshold), written by the settle transaction. alert_deliveries holds TO WHOM:
-- one row per (alert, channel, recipient), each with its own state, attempts and backoff, so a
-- failing webhook never re-sends an e-mail, a bouncing admin address never re-sends the user's
-- e-mail, and vice versa. The worker (extproc/alerts.py) creates the delivery rows ("plans" an
-- alert) from the configuration it runs with, then claims them one at a time with
-- FOR UPDATE SKIP LOCKED. alert_outbox.state/attempts/last_error/next_attempt_at/sent_at are kept
-- as a roll-up of its deliveries (the worst outcome wins: failed > undeliverable > sent).

-- migrate:up
-- NULL until the worker has created the alert's delivery rows.
ALTER TABLE alert_outbox ADD COLUMN planned_at timestamptz;
CREATE INDEX alert_outbox_unplanned ON alert_outbox (id) WHERE planned_at IS NULL;

CREATE TABLE alert_deliveries (
    id              bigserial PRIMARY KEY,
    outbox_id       bigint NOT NULL REFERENCES alert_outbox (id) ON DELETE CASCADE,
    channel         text NOT NULL CHECK (channel IN ('email', 'webhook')),
    audience        text NOT NULL CHECK (audience IN ('user', 'admin')),
    -- The e-mail address; '' for the webhook, which always goes to the URL configured now
    -- (a Slack/Teams webhook URL is itself a secret: it is not copied into the database).
    recipient       text NOT NULL DEFAULT '',
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'sent', 'failed', 'undeliverable')),
    -- Incremented when a worker claims the row; also the fence that lets only the claimer
    -- record the outcome of that attempt.
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error      text,
    -- Pending: when the row may be claimed next (a claim pushes it forward by the lease).
    next_attempt_at timestamptz NOT NULL,
    last_attempt_at timestamptz,
    created_at      timestamptz NOT NULL,
    sent_at         timestamptz,
    UNIQUE (outbox_id, channel, recipient)
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (next_attempt_at) WHERE state = 'pending';

-- migrate:down
DROP TABLE alert_deliveries;
DROP INDEX alert_outbox_unplanned;
ALTER TABLE alert_outbox DROP COLUMN planned_at;
