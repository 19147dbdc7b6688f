-- Stripe disputes (chargebacks); the rules are in extproc/billing.py.
--
-- As for refunds, money moves only through extproc/ledger.py: a dispute's clawback is a ledger
-- entry of kind 'refund' and its return (dispute won, inquiry closed) one of kind
-- 'adjustment', both keyed 'stripe:dispute:<payment intent>:<n>:<dispute id>' (n counts the
-- payment's dispute entries, so a clawback, its return and a later clawback each get their own
-- key; the UNIQUE idempotency key makes each exactly once). This table never holds a balance.
--
-- billing_disputes: one row per Stripe Dispute, what Stripe last told us about it. A dispute
-- names its PaymentIntent, which is how it finds the purchase (billing_payments); a dispute
-- that arrives before its purchase stays here and is applied when the purchase is fulfilled.
-- No foreign key to billing_payments on purpose: either may be written first.
-- Events may arrive out of order, so the status kept is the one of the newest event
-- (status_at = the event's `created`), ties broken by how far along the dispute's life the
-- status is (status_rank): an older event delivered late never moves a dispute back.

-- migrate:up
CREATE TABLE billing_disputes (
    dispute_id      text PRIMARY KEY,
    payment_intent  text NOT NULL,
    charge_id       text,
    amount          bigint CHECK (amount >= 0),          -- minor units, as Stripe reports it
    currency        text,
    status          text NOT NULL,                       -- Stripe's dispute status
    status_rank     smallint NOT NULL,
    status_at       timestamptz NOT NULL,                -- `created` of the event that set status
    reason          text,                                -- Stripe's dispute reason (fraudulent, ...)
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_disputes_payment ON billing_disputes (payment_intent);

-- migrate:down
DROP TABLE billing_disputes;
