-- The WhatsApp scheduler's address book: contacts, groups and who is in which, per account,
-- and the numbers that asked never to be contacted again (opt-outs, honoured by every send).

CREATE TABLE contacts (
    contact_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  text NOT NULL,
    name        text NOT NULL DEFAULT '' CHECK (length(name) <= 200),
    phone       text NOT NULL CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),   -- E.164
    email       text NOT NULL DEFAULT '' CHECK (length(email) <= 254),
    is_active   boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- One contact per phone and account: an import updates or skips, never duplicates.
    UNIQUE (account_id, phone)
);
-- Listings page an account's contacts in id order.
CREATE INDEX contacts_account ON contacts (account_id, contact_id);

CREATE TABLE contact_groups (
    group_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id    text NOT NULL,
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description   text NOT NULL DEFAULT '' CHECK (length(description) <= 2000),
    created_by    text NOT NULL DEFAULT '',
    -- Kept by the statement triggers below, so it is exact without counting members per read.
    contact_count integer NOT NULL DEFAULT 0 CHECK (contact_count >= 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, name)
);

-- Deleting a contact takes it out of its groups; deleting a group keeps its contacts.
CREATE TABLE group_members (
    group_id   bigint NOT NULL REFERENCES contact_groups ON DELETE CASCADE,
    contact_id bigint NOT NULL REFERENCES contacts ON DELETE CASCADE,
    added_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, contact_id)
);
CREATE INDEX group_members_contact ON group_members (contact_id);

-- Statement-level with transition tables: an import adding 100,000 members to one group
-- updates its count once, not 100,000 times.
CREATE FUNCTION group_members_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE contact_groups g SET contact_count = g.contact_count + a.n
    FROM (SELECT group_id, count(*) AS n FROM added GROUP BY group_id) a
    WHERE g.group_id = a.group_id;
    RETURN NULL;
END $$;

CREATE FUNCTION group_members_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE contact_groups g SET contact_count = g.contact_count - r.n
    FROM (SELECT group_id, count(*) AS n FROM removed GROUP BY group_id) r
    WHERE g.group_id = r.group_id;
    RETURN NULL;
END $$;

CREATE TRIGGER group_members_count_added AFTER INSERT ON group_members
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION group_members_added();
CREATE TRIGGER group_members_count_removed AFTER DELETE ON group_members
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION group_members_removed();

-- Numbers no send of the account reaches: scheduled messages, bulk files and voice calls.
CREATE TABLE opt_outs (
    account_id text NOT NULL,
    phone      text NOT NULL CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    -- user (added through the API) | inbound (the number replied STOP, BAJA or NO)
    source     text NOT NULL DEFAULT 'user' CHECK (source IN ('user', 'inbound')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, phone)
);

-- An import's rows on their way in: COPYed here, upserted into contacts and deleted again, all
-- in the import's transaction, so no other session ever sees them. A table of the schema
-- rather than a temporary one, so that every statement on it is a named query prepared at
-- start; unlogged, since nothing in it outlives a transaction.
CREATE UNLOGGED TABLE contact_import_rows (
    import_id  bigint NOT NULL,
    row_no     integer NOT NULL,
    name       text NOT NULL,
    phone      text NOT NULL,
    email      text NOT NULL,
    group_name text NOT NULL
);
CREATE SEQUENCE contact_import_seq;
