-- How many of a voice batch's pending jobs wait for a later time (`scheduled`) and how many
-- are due. Time moves a job from one side to the other without a write, so no counter can
-- keep the split; counting the due-jobs index is cheap only while one side is small. Instead
-- the pending jobs are counted per minute of their next_attempt_at: the jobs of the minutes
-- after the current one are scheduled, and only the current minute is looked up in the index.
--
-- The counts are appended as deltas by statement triggers (one row per batch and minute per
-- statement): no row is ever updated, so concurrent writers of a batch share no lock here and
-- cannot deadlock with the batch counters. A periodic fold sums them up and drops the minutes
-- that have passed (VoiceRepo.fold_waiting). The functions keep the schema they were made in,
-- whatever the search path of the session that writes the jobs.
CREATE TABLE voice_waiting (
    batch_id uuid NOT NULL,
    minute   timestamptz NOT NULL,
    jobs     bigint NOT NULL
);
CREATE INDEX voice_waiting_batch ON voice_waiting (batch_id, minute);

-- Inserted jobs count +1, deleted ones -1 (the sign is the trigger's argument; both triggers
-- name their transition table `changed`).
CREATE FUNCTION voice_waiting_counted() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO voice_waiting (batch_id, minute, jobs)
    SELECT batch_id, date_trunc('minute', next_attempt_at), TG_ARGV[0]::int * count(*)
    FROM changed WHERE status = 'pending' GROUP BY 1, 2;
    RETURN NULL;
END $$;

CREATE FUNCTION voice_waiting_changed() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO voice_waiting (batch_id, minute, jobs)
    SELECT batch_id, minute, sum(jobs) FROM (
        SELECT batch_id, date_trunc('minute', next_attempt_at) AS minute, -1 AS jobs
        FROM removed WHERE status = 'pending'
        UNION ALL
        SELECT batch_id, date_trunc('minute', next_attempt_at), 1 FROM added WHERE status = 'pending'
    ) d
    GROUP BY 1, 2 HAVING sum(jobs) <> 0;
    RETURN NULL;
END $$;

CREATE TRIGGER voice_waiting_insert AFTER INSERT ON voice_jobs
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION voice_waiting_counted('1');
CREATE TRIGGER voice_waiting_delete AFTER DELETE ON voice_jobs
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION voice_waiting_counted('-1');
CREATE TRIGGER voice_waiting_update AFTER UPDATE ON voice_jobs
    REFERENCING OLD TABLE AS removed NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION voice_waiting_changed();

INSERT INTO voice_waiting (batch_id, minute, jobs)
SELECT batch_id, date_trunc('minute', next_attempt_at), count(*)
FROM voice_jobs WHERE status = 'pending' AND next_attempt_at >= date_trunc('minute', now())
GROUP BY 1, 2;
