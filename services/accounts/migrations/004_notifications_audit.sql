-- Notifications for the people of an account, made from events; and the audit log.
CREATE TABLE notifications (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  text NOT NULL REFERENCES accounts (account_id),
    -- NULL: account-wide (every member of the account and the admins see it).
    user_id     text,
    kind        text NOT NULL,                -- batch_completed | batch_failed | credit_low | ...
    level       text NOT NULL DEFAULT 'info' CHECK (level IN ('success', 'error', 'warning', 'info')),
    title       text NOT NULL,
    message     text NOT NULL DEFAULT '',
    data        jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- The event a notification comes from: a redelivered event finds its row and adds none.
    source_key  text NOT NULL UNIQUE,
    read_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notifications_account_idx ON notifications (account_id, id DESC);
CREATE INDEX notifications_unread_idx ON notifications (account_id) WHERE read_at IS NULL;

-- Append-only record of critical actions.
CREATE TABLE audit_log (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor_user_id  text NOT NULL DEFAULT '',
    actor_role     text NOT NULL DEFAULT '',
    actor_account  text NOT NULL DEFAULT '',
    -- The account the action concerns ('' when none), for the admin's account filter.
    account_id     text NOT NULL DEFAULT '',
    action         text NOT NULL,
    target         text NOT NULL DEFAULT '',
    details        jsonb NOT NULL DEFAULT '{}'::jsonb,
    at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_action_idx ON audit_log (action, id DESC);
CREATE INDEX audit_log_account_idx ON audit_log (account_id, id DESC);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only' USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
