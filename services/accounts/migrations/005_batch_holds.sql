-- Campaigns settle a batch's holds ("<batch_id>:<n>") together, once the captures booked
-- against them add up to what the batch spent. amount_requested is what captures asked for
-- (amount_captured can be less when a capture was clamped), so that sum is one cheap read.
ALTER TABLE holds ADD COLUMN amount_requested numeric(18, 4) NOT NULL DEFAULT 0;
UPDATE holds h SET amount_requested = c.requested
FROM (SELECT hold_id, sum(requested) AS requested FROM ledger_entries
      WHERE kind = 'capture' AND hold_id IS NOT NULL GROUP BY hold_id) c
WHERE h.hold_id = c.hold_id;
-- A batch's holds by prefix, whatever their status.
CREATE INDEX holds_account_prefix ON holds (account_id, hold_id text_pattern_ops);
