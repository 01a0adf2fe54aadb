-- The last recipient sent and the last one failed, kept on the batch by the results applier:
-- a socket that (re)connects to a running job is told who went last with the counters,
-- and reading it must not scan the batch's jobs.
ALTER TABLE batches
    ADD COLUMN last_sent_to          text NOT NULL DEFAULT '',
    ADD COLUMN last_sent_sender_id   bigint NOT NULL DEFAULT 0,
    ADD COLUMN last_failed_to        text NOT NULL DEFAULT '',
    ADD COLUMN last_failed_sender_id bigint NOT NULL DEFAULT 0,
    ADD COLUMN last_failed_error     text NOT NULL DEFAULT '';
