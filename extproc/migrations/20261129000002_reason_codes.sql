-- Reasons as codes: a row the gate writes itself (account opened, new cycle, purchase, refund,
-- dispute) also records what its reason means, so pages and exports show it in the reader's
-- language (extproc/reasons.py has the codes and their parameters; the texts are in the
-- message catalogue, extproc/templates/i18n.json, under reason.*).
--
--   reason         the text as written, unchanged: what psql, backups and older versions read
--   reason_code    a key of the catalogue's reason.* section; NULL for reasons an admin typed
--   reason_params  the code's parameters as raw JSON values (ISO dates, token counts, minor
--                  units with their currency, Stripe ids); NULL exactly when reason_code is
--
-- No money column changes. The ledger's own opening and new-cycle entries written before this
-- migration get their code from their English text (the only form the ledger ever wrote);
-- every other older row keeps no code and is shown as written. audit_log is append-only (its
-- trigger): only columns are added there, no row is rewritten.

-- migrate:up
ALTER TABLE ledger_entries
    ADD COLUMN reason_code text,
    ADD COLUMN reason_params jsonb,
    ADD CONSTRAINT ledger_entries_reason_params CHECK ((reason_code IS NULL) = (reason_params IS NULL));
ALTER TABLE audit_log
    ADD COLUMN reason_code text,
    ADD COLUMN reason_params jsonb,
    ADD CONSTRAINT audit_log_reason_params CHECK ((reason_code IS NULL) = (reason_params IS NULL));

UPDATE ledger_entries SET reason_code = 'account_opened', reason_params = '{}'
WHERE kind = 'cycle_reset' AND actor = 'system' AND reason = 'account opened';

UPDATE ledger_entries e
SET reason_code = CASE WHEN m[4] IS NULL THEN 'new_cycle' ELSE 'new_cycle_expired' END,
    reason_params = CASE WHEN m[4] IS NULL THEN jsonb_build_object('start', m[1], 'end', m[2])
                         ELSE jsonb_build_object('start', m[1], 'end', m[2], 'expired', m[4]::bigint) END
FROM (SELECT id, regexp_match(reason,
             '^new cycle (\d{4}-\d{2}-\d{2}) to (\d{4}-\d{2}-\d{2})(; (\d+) unused tokens expired)?$') AS m
      FROM ledger_entries WHERE kind = 'cycle_reset' AND actor = 'system' AND reason LIKE 'new cycle %') r
WHERE e.id = r.id AND r.m IS NOT NULL;

-- migrate:down
ALTER TABLE audit_log
    DROP CONSTRAINT audit_log_reason_params,
    DROP COLUMN reason_params,
    DROP COLUMN reason_code;
ALTER TABLE ledger_entries
    DROP CONSTRAINT ledger_entries_reason_params,
    DROP COLUMN reason_params,
    DROP COLUMN reason_code;
