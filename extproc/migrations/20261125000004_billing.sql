-- Credit purchases with Stripe (issue #7); the rules are in extproc/billing.py.
--
-- Money still moves only through extproc/ledger.py: a purchase is a ledger entry of kind
-- 'purchase' keyed by 'stripe:checkout:<session id>' (ledger_entries.idempotency_key is
-- UNIQUE and Ledger.grant checks it under the account's row lock: exactly once), a refund is
-- an entry of kind 'refund' keyed by 'stripe:refund:<payment intent>:<cumulative amount
-- refunded>'. The tables below never hold a balance; they hold what Stripe told us.
--
-- billing_payments: one row per Stripe PaymentIntent. The fulfilment of a Checkout Session
-- writes who bought which pack (a refund event carries the charge, not the session, so this
-- is how a refund finds the user and the tokens); a charge.refunded event writes the charge's
-- amount and the highest cumulative amount refunded it has seen. A refund that arrives before
-- its purchase is kept here and applied when the purchase is fulfilled. user_id has no
-- foreign key on purpose: a paid session whose user has no account is recorded, not lost.
--
-- stripe_events gains what was done with each event (visibility; dedup is by event_id).

-- migrate:up
CREATE TABLE billing_payments (
    payment_intent   text PRIMARY KEY,
    session_id       text UNIQUE,
    user_id          text,
    pack             text,
    tokens           bigint CHECK (tokens > 0),
    amount           bigint CHECK (amount >= 0),          -- minor units (cents)
    currency         text,
    charge_id        text,
    amount_refunded  bigint NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_payments_user ON billing_payments (user_id);

ALTER TABLE stripe_events ADD COLUMN outcome text, ADD COLUMN object_id text;

-- migrate:down
ALTER TABLE stripe_events DROP COLUMN object_id, DROP COLUMN outcome;
DROP TABLE billing_payments;
