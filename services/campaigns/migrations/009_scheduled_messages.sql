-- Scheduled WhatsApp messages. A message is written (draft), scheduled for a time, and when
-- that time comes one campaigns replica turns it into a WhatsApp batch whose jobs are its
-- recipients, fixed then; from there the batch's own path sends it (feeder, dispatcher,
-- credit holds, pacing), and the message's state while sending is its batch's.
CREATE TABLE messages (
    message_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id    text NOT NULL,
    created_by    text NOT NULL DEFAULT '',
    content       text NOT NULL CHECK (length(content) BETWEEN 1 AND 4096),
    scheduled_for timestamptz,
    -- draft | scheduled | sending (started: the batch tells sending, paused, sent, failed or
    -- cancelled) | cancelled (before it started) | failed (it could not start)
    status        text NOT NULL DEFAULT 'draft'
                  CHECK (status IN ('draft', 'scheduled', 'sending', 'cancelled', 'failed')),
    -- It started more than a little after its time (campaigns was down when it fell due).
    late          boolean NOT NULL DEFAULT false,
    error         text NOT NULL DEFAULT '',
    batch_id      uuid UNIQUE REFERENCES batches ON DELETE SET NULL,
    started_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (status <> 'scheduled' OR scheduled_for IS NOT NULL)
);
-- Listings page an account's messages newest first.
CREATE INDEX messages_account ON messages (account_id, message_id DESC);
-- The due loop's question, asked every half second: which scheduled messages are due.
CREATE INDEX messages_due ON messages (scheduled_for) WHERE status = 'scheduled';

-- Deleting a group takes it out of the messages that named it.
CREATE TABLE message_groups (
    message_id bigint NOT NULL REFERENCES messages ON DELETE CASCADE,
    group_id   bigint NOT NULL REFERENCES contact_groups ON DELETE CASCADE,
    PRIMARY KEY (message_id, group_id)
);
CREATE INDEX message_groups_group ON message_groups (group_id);

-- A batch made from a scheduled message names it (its events become the message's), and its
-- template is written with {{name}} / {{phone}} rather than the bulk file's @valorN.
ALTER TABLE batches
    ADD COLUMN message_id      bigint,
    ADD COLUMN template_syntax text NOT NULL DEFAULT 'valor' CHECK (template_syntax IN ('valor', 'named'));

-- A message as the API shows it: while sending, its state and counters are its batch's.
CREATE VIEW message_states AS
SELECT m.*,
       CASE WHEN m.status <> 'sending' OR b.batch_id IS NULL THEN m.status
            WHEN b.status IN ('paused', 'suspended') THEN 'paused'
            WHEN b.status = 'completed' THEN 'sent'
            WHEN b.status IN ('failed', 'cancelled') THEN b.status
            ELSE 'sending' END AS state,
       coalesce(b.total_jobs, 0) AS total_jobs,
       coalesce(b.sent_jobs, 0) AS sent_jobs,
       coalesce(b.failed_jobs, 0) AS failed_jobs,
       coalesce(b.cancelled_jobs, 0) AS cancelled_jobs,
       coalesce(b.unknown_jobs, 0) AS unknown_jobs,
       b.finished_at AS finished_at,
       coalesce(nullif(b.suspension_reason, ''), b.error, '') AS batch_error
FROM messages m LEFT JOIN batches b ON b.batch_id = m.batch_id;
