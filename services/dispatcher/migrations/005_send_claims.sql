-- A sender's version moves on every edit. An attempt is claimed just before its request goes
-- out, through the sender version the dispatcher holds: a claim through an edited, disabled
-- or deleted sender finds no row and is refused, so nothing leaves through a device after
-- the API has answered its change.
ALTER TABLE senders ADD COLUMN version bigint NOT NULL DEFAULT 1;
