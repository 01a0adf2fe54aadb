-- The credit ledger. Every change of a balance is an immutable entry; the balance columns on
-- accounts are a cache the database itself keeps equal to the sum of the entries (trigger
-- below), and the CHECKs make a negative balance or an over-reservation impossible whatever
-- the application does. Amounts are numeric, never float.
--
-- The application writes each entry's balance_after / held_after (it holds the account row
-- lock, so it knows them); the trigger checks that they continue from the cached values and
-- then moves the cache, once per statement, so a batch of captures costs one UPDATE.
--
-- Units: `credits` (credit_based and unlimited plans) or `minutes` (minutes_based plans).
-- Per entry: amount = change of the balance, held_change = change of the reserved amount,
-- used_change = change of the used amount. So, per account and unit:
--   balance  = sum(amount)       (credits: credit_balance; minutes: purchased - used)
--   reserved = sum(held_change)
--   used     = sum(used_change)

ALTER TABLE accounts
    ADD COLUMN credit_balance    numeric(18, 4) NOT NULL DEFAULT 0,
    ADD COLUMN credit_reserved   numeric(18, 4) NOT NULL DEFAULT 0,
    ADD COLUMN credit_used       numeric(18, 4) NOT NULL DEFAULT 0,
    ADD COLUMN minutes_purchased numeric(18, 4) NOT NULL DEFAULT 0,
    ADD COLUMN minutes_used      numeric(18, 4) NOT NULL DEFAULT 0,
    ADD COLUMN minutes_reserved  numeric(18, 4) NOT NULL DEFAULT 0,
    -- Prices, in credits. The defaults are the documented ones (0.15 per voice minute is
    -- what the reference dashboard figures imply: 47.50 for 316.67 minutes).
    ADD COLUMN cost_per_minute           numeric(18, 4) NOT NULL DEFAULT 0.15 CHECK (cost_per_minute >= 0),
    ADD COLUMN cost_per_call_setup       numeric(18, 4) NOT NULL DEFAULT 0.02 CHECK (cost_per_call_setup >= 0),
    ADD COLUMN cost_per_whatsapp_message numeric(18, 4) NOT NULL DEFAULT 0.01
        CHECK (cost_per_whatsapp_message >= 0),
    ADD CONSTRAINT credit_never_negative
        CHECK (credit_balance >= 0 AND credit_reserved >= 0 AND credit_used >= 0),
    ADD CONSTRAINT credit_reserved_within_balance CHECK (credit_reserved <= credit_balance),
    ADD CONSTRAINT minutes_never_negative CHECK (minutes_used >= 0 AND minutes_reserved >= 0),
    ADD CONSTRAINT minutes_reserved_within_balance CHECK (minutes_used + minutes_reserved <= minutes_purchased);

CREATE TABLE holds (
    -- "<batch_id>:<window>": one reservation of credit for work about to be released.
    hold_id         text PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts (account_id),
    unit            text NOT NULL CHECK (unit IN ('credits', 'minutes')),
    -- false on unlimited plans: nothing is reserved and captures only record usage.
    reserving       boolean NOT NULL,
    amount_held     numeric(18, 4) NOT NULL CHECK (amount_held >= 0),
    amount_captured numeric(18, 4) NOT NULL DEFAULT 0 CHECK (amount_captured >= 0),
    amount_released numeric(18, 4) NOT NULL DEFAULT 0 CHECK (amount_released >= 0),
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'released')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- A capture never exceeds what is left of its hold.
    CONSTRAINT hold_not_overdrawn
        CHECK (NOT reserving OR amount_captured + amount_released <= amount_held),
    CONSTRAINT hold_released_in_full
        CHECK (status = 'open' OR NOT reserving OR amount_captured + amount_released = amount_held)
);
CREATE INDEX holds_account_open_idx ON holds (account_id) WHERE status = 'open';

CREATE TABLE ledger_entries (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id    text NOT NULL REFERENCES accounts (account_id),
    kind          text NOT NULL CHECK (kind IN ('topup', 'hold', 'capture', 'release', 'refund', 'adjustment')),
    unit          text NOT NULL CHECK (unit IN ('credits', 'minutes')),
    amount        numeric(18, 4) NOT NULL,
    held_change   numeric(18, 4) NOT NULL DEFAULT 0,
    used_change   numeric(18, 4) NOT NULL DEFAULT 0,
    -- Captures: the cost asked for; `-amount` (or used_change) is what was charged.
    requested     numeric(18, 4),
    -- Top-up / refund / adjustment idempotency key, hold id, or attempt id.
    cause         text NOT NULL CHECK (cause <> ''),
    hold_id       text REFERENCES holds (hold_id),
    -- Digest of the client request that carried an idempotency key.
    fingerprint   text NOT NULL DEFAULT '',
    note          text NOT NULL DEFAULT '',
    -- Checked by the trigger against the entries before it: every entry is a sound state.
    balance_after numeric(18, 4) NOT NULL,
    held_after    numeric(18, 4) NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- A replayed top-up, hold, capture or release finds its first entry and writes nothing.
    -- Per account: holds are per account, so an attempt can only be charged to its own.
    CONSTRAINT ledger_once_per_cause UNIQUE (account_id, kind, cause),
    -- available = balance - reserved >= 0 (so balance >= 0) after every single entry.
    CONSTRAINT ledger_entry_sound CHECK (held_after >= 0 AND held_after <= balance_after),
    CONSTRAINT ledger_entry_shape CHECK (
        CASE kind
            WHEN 'topup' THEN amount > 0 AND held_change = 0 AND used_change = 0
            WHEN 'hold' THEN amount = 0 AND held_change > 0 AND used_change = 0 AND hold_id IS NOT NULL
            -- Reserving holds: the charge leaves balance and reservation alike; unlimited
            -- plans: only usage is recorded.
            WHEN 'capture' THEN used_change >= 0 AND held_change = amount
                AND (amount = -used_change OR amount = 0) AND hold_id IS NOT NULL
                AND requested IS NOT NULL AND requested >= used_change
            WHEN 'release' THEN amount = 0 AND held_change < 0 AND used_change = 0 AND hold_id IS NOT NULL
            WHEN 'refund' THEN amount > 0 AND used_change = -amount AND held_change = 0
            WHEN 'adjustment' THEN amount <> 0 AND held_change = 0 AND used_change = 0
        END
    )
);
CREATE INDEX ledger_entries_account_idx ON ledger_entries (account_id, id DESC);
CREATE INDEX ledger_entries_hold_idx ON ledger_entries (hold_id) WHERE hold_id IS NOT NULL;

-- Applying entries is part of inserting them: the cached balance cannot drift from the sum.
-- The CHECKs on accounts fire inside this UPDATE, so entries that would overdraw are refused
-- with their insert.
CREATE FUNCTION ledger_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad bigint;
BEGIN
    -- Normally held already by the writer; taken here too so no writer can skip it.
    PERFORM 1 FROM accounts WHERE account_id IN (SELECT account_id FROM added) ORDER BY account_id FOR UPDATE;
    SELECT e.id INTO bad FROM (
        SELECT n.id, n.balance_after, n.held_after,
               CASE n.unit WHEN 'credits' THEN a.credit_balance ELSE a.minutes_purchased - a.minutes_used END
                   + sum(n.amount) OVER w AS balance,
               CASE n.unit WHEN 'credits' THEN a.credit_reserved ELSE a.minutes_reserved END
                   + sum(n.held_change) OVER w AS held
        FROM added n JOIN accounts a USING (account_id)
        WINDOW w AS (PARTITION BY n.account_id, n.unit ORDER BY n.id)) e
    WHERE e.balance_after <> e.balance OR e.held_after <> e.held
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger entry % does not follow the balance before it', bad
            USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_entries_follow';
    END IF;
    -- Minutes: balance = purchased - used, so purchased moves by amount + used_change.
    UPDATE accounts a
       SET credit_balance = a.credit_balance + s.c_amount,
           credit_reserved = a.credit_reserved + s.c_held,
           credit_used = a.credit_used + s.c_used,
           minutes_purchased = a.minutes_purchased + s.m_amount + s.m_used,
           minutes_reserved = a.minutes_reserved + s.m_held,
           minutes_used = a.minutes_used + s.m_used,
           updated_at = now()
      FROM (SELECT account_id,
                   coalesce(sum(amount) FILTER (WHERE unit = 'credits'), 0) AS c_amount,
                   coalesce(sum(held_change) FILTER (WHERE unit = 'credits'), 0) AS c_held,
                   coalesce(sum(used_change) FILTER (WHERE unit = 'credits'), 0) AS c_used,
                   coalesce(sum(amount) FILTER (WHERE unit = 'minutes'), 0) AS m_amount,
                   coalesce(sum(held_change) FILTER (WHERE unit = 'minutes'), 0) AS m_held,
                   coalesce(sum(used_change) FILTER (WHERE unit = 'minutes'), 0) AS m_used
            FROM added GROUP BY account_id) s
     WHERE a.account_id = s.account_id;
    RETURN NULL;
END $$;

CREATE TRIGGER ledger_entries_apply AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_apply();

CREATE FUNCTION ledger_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger entries are immutable' USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER ledger_entries_immutable BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_immutable();

-- Balance columns change only through an entry (ledger_apply runs one trigger level down).
CREATE FUNCTION accounts_balance_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.credit_balance <> 0 OR NEW.credit_reserved <> 0 OR NEW.credit_used <> 0
           OR NEW.minutes_purchased <> 0 OR NEW.minutes_used <> 0 OR NEW.minutes_reserved <> 0 THEN
            RAISE EXCEPTION 'a new account starts at zero; credit it with a ledger entry'
                USING ERRCODE = 'check_violation';
        END IF;
    ELSIF pg_trigger_depth() < 2 AND (
           NEW.credit_balance <> OLD.credit_balance OR NEW.credit_reserved <> OLD.credit_reserved
        OR NEW.credit_used <> OLD.credit_used OR NEW.minutes_purchased <> OLD.minutes_purchased
        OR NEW.minutes_used <> OLD.minutes_used OR NEW.minutes_reserved <> OLD.minutes_reserved) THEN
        RAISE EXCEPTION 'balances change only through ledger entries' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER accounts_balance_guard BEFORE INSERT OR UPDATE ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_balance_guard();
