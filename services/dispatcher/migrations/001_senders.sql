-- Senders: WhatsApp devices and voice caller ids, each paced to its own rate.
CREATE TABLE senders (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id        text NOT NULL,
    channel           text NOT NULL DEFAULT 'whatsapp' CHECK (channel IN ('whatsapp', 'voice')),
    provider          text NOT NULL DEFAULT 'simulated',
    device_name       text NOT NULL DEFAULT '',
    status            text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX senders_account ON senders (account_id, channel, status);
