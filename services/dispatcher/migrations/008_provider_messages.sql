-- The attempt behind each message a provider accepted, by the provider's message id: WAHA's
-- `message.ack` webhooks name only that id (WhatsApp Web takes no id of ours), and a delivery
-- report must find its recipient. Kept apart from `attempts`: an index on attempts'
-- provider_message_id would make every outcome write there a non-HOT update (see 003), at
-- full fan-out speed, for the few providers that need it. Written after each accepted send of
-- those providers (a few a second per device).
CREATE TABLE provider_messages (
    provider   text NOT NULL,
    message_id text NOT NULL,
    sender_id  bigint NOT NULL,
    attempt_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, message_id)
);
