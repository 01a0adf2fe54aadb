-- What a WhatsApp device needs to send: credentials (the secret only encrypted), pacing and
-- provider settings. Deletion is soft so past attempts keep pointing at their sender.
ALTER TABLE senders
    ADD COLUMN token           text NOT NULL DEFAULT '',
    ADD COLUMN secret_enc      bytea,
    ADD COLUMN secret_hint     text NOT NULL DEFAULT '',
    ADD COLUMN is_receiver     boolean NOT NULL DEFAULT false,
    ADD COLUMN phone           text NOT NULL DEFAULT '',
    -- 0 means no limit.
    ADD COLUMN rate_per_minute integer NOT NULL DEFAULT 60 CHECK (rate_per_minute >= 0),
    ADD COLUMN jitter_ms       integer NOT NULL DEFAULT 0 CHECK (jitter_ms >= 0),
    ADD COLUMN concurrency     integer NOT NULL DEFAULT 4 CHECK (concurrency >= 1),
    ADD COLUMN provider_config jsonb NOT NULL DEFAULT '{}'::jsonb
                               CHECK (jsonb_typeof(provider_config) = 'object'),
    ADD COLUMN deleted_at      timestamptz;

-- The senders a dispatch or a `devices_limit` check may use: an account's live, active ones.
CREATE INDEX senders_account_active ON senders (account_id, channel, id)
    WHERE status = 'active' AND deleted_at IS NULL;
