-- A user's own time zone, to read the dates a user writes without an offset. Empty: the
-- account's zone (itself its country's unless set). Only the shape is checked here; that
-- the name is one IANA knows is zoneinfo's to say, in the service.
ALTER TABLE users
    ADD COLUMN timezone text NOT NULL DEFAULT ''
        CHECK (timezone ~ '^([A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*)?$' AND length(timezone) <= 64);
