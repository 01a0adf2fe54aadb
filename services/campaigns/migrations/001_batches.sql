-- A batch is one campaign: a WhatsApp bulk send or a voice-call batch.
CREATE TABLE batches (
    batch_id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- The dashboards expect a 24-hex `_id` beside the readable id.
    object_id         text NOT NULL UNIQUE DEFAULT substr(md5(random()::text || clock_timestamp()::text), 1, 24),
    account_id        text NOT NULL,
    channel           text NOT NULL CHECK (channel IN ('whatsapp', 'voice')),
    name              text NOT NULL DEFAULT '',
    status            text NOT NULL DEFAULT 'pending',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
-- Every listing is per account, newest first.
CREATE INDEX batches_account_created ON batches (account_id, created_at DESC);
