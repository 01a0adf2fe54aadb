-- What the provider last said of a device (device gateways, WhatsApp Web sessions), and the
-- daily cap of each device. A device that is disconnected or waits for a QR scan is given no
-- work (connections.py tells every engine); 'unknown' (never asked, or a provider without
-- device state) sends.
ALTER TABLE senders
    ADD COLUMN connection            text NOT NULL DEFAULT 'unknown'
                                     CHECK (connection IN ('connected', 'disconnected', 'qr_needed', 'unknown')),
    ADD COLUMN connection_reason     text NOT NULL DEFAULT '',
    -- Messages the provider still allows today; -1 = it did not say.
    ADD COLUMN quota_left            bigint NOT NULL DEFAULT -1 CHECK (quota_left >= -1),
    ADD COLUMN connection_checked_at timestamptz,
    -- The most this device sends in one of its local days; 0 = no cap.
    ADD COLUMN daily_limit           integer NOT NULL DEFAULT 0 CHECK (daily_limit >= 0),
    -- The provider's name of the device (a WAHA session): a webhook names it, not our id.
    ADD COLUMN session               text NOT NULL DEFAULT '';

-- A webhook's session must lead to one device, whatever the code does.
CREATE UNIQUE INDEX senders_one_session ON senders (provider, session) WHERE session <> '';

-- The device's local day: its provider_config `timezone` (validated as an IANA zone when
-- the device is saved), else Chile's. One definition for the claim, the cap and the API.
CREATE FUNCTION sender_day(config jsonb, at timestamptz) RETURNS date
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN (at AT TIME ZONE coalesce(config ->> 'timezone', 'America/Santiago'))::date;

-- Sends claimed through each device per local day: a new day is a new row, so the count
-- starts from 0 at the device's midnight without anything resetting it. Claims, not
-- deliveries: the cap bounds what reaches the provider, failed sends included. One upsert
-- per claim statement and device (CLAIM_SENDS), so half-empty pages keep it a HOT update.
CREATE TABLE sender_days (
    sender_id bigint NOT NULL REFERENCES senders (id),
    day       date NOT NULL,
    sent      bigint NOT NULL DEFAULT 0 CHECK (sent >= 0),
    PRIMARY KEY (sender_id, day)
) WITH (fillfactor = 50);

-- What GET /devices shows as sent_today.
CREATE FUNCTION sender_sent_today(sender bigint, config jsonb) RETURNS bigint
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN coalesce((SELECT d.sent FROM sender_days AS d
                     WHERE d.sender_id = sender AND d.day = sender_day(config, now())), 0);

-- The cap is never exceeded: CLAIM_SENDS claims only what fits, and two claims racing for
-- the last places of the same device (two replicas) make the later one fail here and be
-- tried again, when it sees the count and claims what is left.
CREATE FUNCTION sender_days_within_cap() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    cap integer;
BEGIN
    SELECT daily_limit INTO cap FROM senders WHERE id = NEW.sender_id;
    IF cap > 0 AND NEW.sent > cap AND (TG_OP = 'INSERT' OR NEW.sent > OLD.sent) THEN
        RAISE EXCEPTION 'sender % would send % messages on %, over its daily limit of %',
            NEW.sender_id, NEW.sent, NEW.day, cap
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER sender_days_within_cap BEFORE INSERT OR UPDATE ON sender_days
    FOR EACH ROW EXECUTE FUNCTION sender_days_within_cap();

-- The senders the state poller asks about, least recently checked first.
CREATE INDEX senders_connection_due ON senders (connection_checked_at NULLS FIRST)
    WHERE status = 'active' AND deleted_at IS NULL;
