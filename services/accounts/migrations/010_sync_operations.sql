-- Operations a client queued while offline (`POST /api/sync`), one row per user and client
-- id: the row is claimed before the operation runs and its outcome written after, so a
-- client that sends its queue again gets the stored outcome and nothing runs twice.
CREATE TABLE sync_operations (
    account_id   text NOT NULL,
    user_id      text NOT NULL,
    client_op_id text NOT NULL CHECK (length(client_op_id) BETWEEN 1 AND 128),
    method       text NOT NULL,
    path         text NOT NULL,
    -- SHA-256 of method, path and body: the same id with other content is refused.
    digest       bytea NOT NULL CHECK (length(digest) = 32),
    status       int CHECK (status BETWEEN 100 AND 599),
    body         text,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (account_id, user_id, client_op_id),
    -- An outcome is whole: a status with its body and time, or none of them.
    CHECK ((status IS NULL) = (finished_at IS NULL) AND (status IS NULL) = (body IS NULL))
);
CREATE INDEX sync_operations_claimed_idx ON sync_operations (claimed_at);

-- An outcome, once written, is what every repeat gets: it never changes.
CREATE FUNCTION sync_operations_outcome_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.finished_at IS NOT NULL THEN
        RAISE EXCEPTION 'the outcome of sync operation % is final', OLD.client_op_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER sync_operations_outcome_final BEFORE UPDATE ON sync_operations
    FOR EACH ROW EXECUTE FUNCTION sync_operations_outcome_final();
