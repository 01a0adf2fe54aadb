-- The dashboards read balances as the original data model keeps them: credit_balance is all
-- credit ever added (top-ups, refunds, adjustments), credit_used all credit ever charged, and
-- they show balance - used. The ledger books a refund as usage given back (used_change < 0),
-- so `used` is net of refunds and the totals served need what was refunded: kept here, per
-- unit, by the same trigger that keeps the other balance columns (so it cannot drift from
-- the entries either). The balance, reservation and usage columns keep their meaning.
ALTER TABLE accounts
    ADD COLUMN credit_refunded  numeric(18, 4) NOT NULL DEFAULT 0,
    ADD COLUMN minutes_refunded numeric(18, 4) NOT NULL DEFAULT 0,
    ADD CONSTRAINT refunded_never_negative CHECK (credit_refunded >= 0 AND minutes_refunded >= 0);

UPDATE accounts a
   SET credit_refunded = s.credits, minutes_refunded = s.minutes
  FROM (SELECT account_id,
               coalesce(sum(amount) FILTER (WHERE unit = 'credits'), 0) AS credits,
               coalesce(sum(amount) FILTER (WHERE unit = 'minutes'), 0) AS minutes
        FROM ledger_entries WHERE kind = 'refund' GROUP BY account_id) s
 WHERE a.account_id = s.account_id;

-- As in 002, plus the refunded totals.
CREATE OR REPLACE FUNCTION ledger_apply() RETURNS trigger LANGUAGE plpgsql AS $$
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
           credit_refunded = a.credit_refunded + s.c_refunded,
           minutes_purchased = a.minutes_purchased + s.m_amount + s.m_used,
           minutes_reserved = a.minutes_reserved + s.m_held,
           minutes_used = a.minutes_used + s.m_used,
           minutes_refunded = a.minutes_refunded + s.m_refunded,
           updated_at = now()
      FROM (SELECT account_id,
                   coalesce(sum(amount) FILTER (WHERE unit = 'credits'), 0) AS c_amount,
                   coalesce(sum(held_change) FILTER (WHERE unit = 'credits'), 0) AS c_held,
                   coalesce(sum(used_change) FILTER (WHERE unit = 'credits'), 0) AS c_used,
                   coalesce(sum(amount) FILTER (WHERE unit = 'credits' AND kind = 'refund'), 0) AS c_refunded,
                   coalesce(sum(amount) FILTER (WHERE unit = 'minutes'), 0) AS m_amount,
                   coalesce(sum(held_change) FILTER (WHERE unit = 'minutes'), 0) AS m_held,
                   coalesce(sum(used_change) FILTER (WHERE unit = 'minutes'), 0) AS m_used,
                   coalesce(sum(amount) FILTER (WHERE unit = 'minutes' AND kind = 'refund'), 0) AS m_refunded
            FROM added GROUP BY account_id) s
     WHERE a.account_id = s.account_id;
    RETURN NULL;
END $$;

-- As in 002, with the refunded totals among the columns only an entry changes.
CREATE OR REPLACE FUNCTION accounts_balance_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.credit_balance <> 0 OR NEW.credit_reserved <> 0 OR NEW.credit_used <> 0
           OR NEW.minutes_purchased <> 0 OR NEW.minutes_used <> 0 OR NEW.minutes_reserved <> 0
           OR NEW.credit_refunded <> 0 OR NEW.minutes_refunded <> 0 THEN
            RAISE EXCEPTION 'a new account starts at zero; credit it with a ledger entry'
                USING ERRCODE = 'check_violation';
        END IF;
    ELSIF pg_trigger_depth() < 2 AND (
           NEW.credit_balance <> OLD.credit_balance OR NEW.credit_reserved <> OLD.credit_reserved
        OR NEW.credit_used <> OLD.credit_used OR NEW.minutes_purchased <> OLD.minutes_purchased
        OR NEW.minutes_used <> OLD.minutes_used OR NEW.minutes_reserved <> OLD.minutes_reserved
        OR NEW.credit_refunded <> OLD.credit_refunded OR NEW.minutes_refunded <> OLD.minutes_refunded) THEN
        RAISE EXCEPTION 'balances change only through ledger entries' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
