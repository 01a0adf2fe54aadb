-- WhatsApp bulk sends: one job per recipient, counters kept on the batch so progress reads
-- never count rows.
ALTER TABLE batches
    ADD COLUMN message_template text NOT NULL DEFAULT '',
    ADD COLUMN devices_limit    integer NOT NULL DEFAULT 5,
    ADD COLUMN sender_ids       bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN window_size      integer NOT NULL DEFAULT 1000,
    ADD COLUMN file_name        text NOT NULL DEFAULT '',
    ADD COLUMN total_jobs       integer NOT NULL DEFAULT 0,
    ADD COLUMN sent_jobs        integer NOT NULL DEFAULT 0,
    ADD COLUMN failed_jobs      integer NOT NULL DEFAULT 0,
    ADD COLUMN cancelled_jobs   integer NOT NULL DEFAULT 0,
    ADD COLUMN unknown_jobs     integer NOT NULL DEFAULT 0,
    -- Released to the dispatchers and not yet resolved: the feeder's window.
    ADD COLUMN queued_jobs      integer NOT NULL DEFAULT 0,
    -- Keyset of the first pass: jobs with job_id <= released_upto have been released once.
    ADD COLUMN released_upto    bigint NOT NULL DEFAULT 0,
    ADD COLUMN invalid_rows     integer NOT NULL DEFAULT 0,
    ADD COLUMN duplicate_rows   integer NOT NULL DEFAULT 0,
    ADD COLUMN devices_used     integer NOT NULL DEFAULT 0,
    ADD COLUMN error            text NOT NULL DEFAULT '',
    ADD COLUMN started_at       timestamptz,
    ADD COLUMN finished_at      timestamptz;

-- The feeder only looks at batches that may have work to release.
CREATE INDEX batches_runnable ON batches (created_at) WHERE status IN ('pending', 'processing');

-- Chunk numbers for Nats-Msg-Id: a sequence never hands out a number twice, even when the
-- transaction that took it rolls back, so a retried release is never deduplicated away.
CREATE SEQUENCE chunk_seq;

-- No foreign key to batches: COPY of a million rows would check it row by row; jobs are
-- deleted with their batch by the repository.
CREATE TABLE jobs (
    batch_id    uuid NOT NULL,
    job_id      bigint NOT NULL,            -- 1..N in file order
    phone       text NOT NULL,
    vals        text[] NOT NULL DEFAULT '{}',
    -- pending (not resolved yet; released when job_id <= batches.released_upto) | requeue
    -- (handed back by a dispatcher unsent) | sent | failed | cancelled | unknown
    status      text NOT NULL DEFAULT 'pending',
    attempts    integer NOT NULL DEFAULT 0,
    sender_id   bigint,
    error       text,
    finished_at timestamptz,
    PRIMARY KEY (batch_id, job_id)
) WITH (fillfactor = 70);
-- fillfactor 70 and no index on status: a job's one result update stays on its page (HOT)
-- and touches no index, which is most of the database's work per message.

-- Jobs handed back unsent (pause, a dispatcher's requeue) wait here for the next release.
CREATE TABLE requeued (
    batch_id uuid NOT NULL,
    job_id   bigint NOT NULL,
    PRIMARY KEY (batch_id, job_id)
);
