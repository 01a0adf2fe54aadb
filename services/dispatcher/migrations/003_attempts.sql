-- One row per send attempt, written before the provider is called: a redelivered attempt
-- that was already sent is answered from here and never sent again.
CREATE TABLE attempts (
    attempt_id          text PRIMARY KEY,          -- "<batch_id>:<job_id>:<attempt_no>"
    batch_id            uuid NOT NULL,
    job_id              bigint NOT NULL,
    sender_id           bigint NOT NULL,
    -- sending (recorded, outcome not yet known) | sent | failed | unknown
    status              text NOT NULL DEFAULT 'sending',
    provider_message_id text,
    error               text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz
) WITH (fillfactor = 50);
-- Half-empty pages: the one update that records the outcome stays on the row's page (HOT)
-- and leaves the indexes alone.
CREATE INDEX attempts_batch ON attempts (batch_id);
