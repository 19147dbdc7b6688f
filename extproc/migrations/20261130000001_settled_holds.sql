-- A settled reservation moves into its usage entry (issue #13, PostgreSQL CPU per request).
--
-- Until now a settle closed its hold with an UPDATE to state 'settled'. That update is never
-- HOT: `state` is in the predicate of reservations_held_expiry, so every settle wrote a new
-- row version and an entry in each of the table's three indexes, and the table kept one dead
-- weight row per request forever. Now the settle DELETEs the hold in the statement that
-- wrote the UPDATE (a deletion marks the row; no index is written) and copies what only the
-- hold knew into the usage entry, in the same transaction:
--
--   held         the tokens the reservation held (the estimate x the model's weight), which
--                `estimate` does not say when a model has a weight;
--   admitted_at  when the reservation was made (the entry's created_at is the settle's time).
--
-- Both are NULL on entries that closed no hold (grants, purchases, an exchange replayed from
-- the spool) and on entries written before this migration. Holds that end otherwise keep
-- their row: 'expired' (charged by the sweep; a late release finds it there and gives the
-- charge back, a late settle trues it up from the sweep's entry) and 'released' (no debit; the
-- row is the only record that the exchange ended so). Rows settled before this migration stay
-- as they were. Invariant I3 (reserved = SUM of held reservations) is unchanged. Going down
-- drops the two columns: the tokens and times of the holds settled meanwhile are then gone.
--
-- idempotency_key: usage entries have none, yet a UNIQUE constraint indexes its NULLs too;
-- a partial unique index keeps the same rule for the keys that exist and skips the NULLs.
-- Lookups by key (`idempotency_key = $1`) imply NOT NULL, so they still use it.
--
-- Locks: the migration holds ledger_entries' ACCESS EXCLUSIVE lock for its whole transaction,
-- index build included, so on a large ledger every read and write of the entries waits for
-- it: migrate when traffic is low. The new columns have no default and no constraint, so
-- adding them rewrites and scans nothing.

-- migrate:up
ALTER TABLE ledger_entries ADD COLUMN held bigint,  -- from reservations.tokens, never negative
                           ADD COLUMN admitted_at timestamptz;
CREATE UNIQUE INDEX ledger_entries_idempotency_key ON ledger_entries (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_idempotency_key_key;

-- migrate:down
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_idempotency_key_key UNIQUE (idempotency_key);
DROP INDEX ledger_entries_idempotency_key;
ALTER TABLE ledger_entries DROP COLUMN admitted_at, DROP COLUMN held;
