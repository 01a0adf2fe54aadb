-- What a provider reports after accepting a message (WhatsApp Cloud API status webhooks):
-- delivered, read, or failed after all. Nullable columns without defaults: adding them
-- rewrites nothing, and a report updates its job's row in place (no index on them).
ALTER TABLE jobs
    ADD COLUMN delivery       text,
    ADD COLUMN delivered_at   timestamptz,
    ADD COLUMN read_at        timestamptz,
    ADD COLUMN delivery_error text;
