-- Credit in the campaign path. The feeder reserves credit (a hold in accounts) before it
-- releases jobs; jobs it cannot pay for become `suspended` until the account has credit again.
--
-- Holds are taken in blocks ("<batch_id>:<n>", n = 1..hold_seq) so one hold covers many
-- releases; hold_left is what the current one still covers. Holds up to holds_settled_upto
-- are released in accounts: the feeder settles a batch once nothing of it is in flight and it
-- is not running (paused, suspended, cancelled, completed).
ALTER TABLE batches
    ADD COLUMN suspended_jobs     integer NOT NULL DEFAULT 0,
    ADD COLUMN suspension_reason  text NOT NULL DEFAULT '',
    ADD COLUMN hold_seq           integer NOT NULL DEFAULT 0,
    ADD COLUMN hold_left          numeric(18, 4) NOT NULL DEFAULT 0 CHECK (hold_left >= 0),
    -- The current hold reserves nothing (unlimited plan, or a price of zero).
    ADD COLUMN hold_unlimited     boolean NOT NULL DEFAULT false,
    ADD COLUMN holds_settled_upto integer NOT NULL DEFAULT 0,
    ADD COLUMN unit_price         numeric(18, 4) NOT NULL DEFAULT 0,
    ADD COLUMN total_cost         numeric(18, 4) NOT NULL DEFAULT 0;

-- The feeder's settlement scan looks only at batches with holds still open.
CREATE INDEX batches_unsettled ON batches (updated_at) WHERE holds_settled_upto < hold_seq;
-- Top-ups resume an account's suspended batches.
CREATE INDEX batches_suspended ON batches (account_id) WHERE status = 'suspended';
