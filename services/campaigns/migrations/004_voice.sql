-- Voice-call campaigns. A batch of channel 'voice' holds one job per debtor (or contact);
-- each job is called until a conversation completes, phone by phone, within its calling
-- window, at most max_attempts rounds. The batch counters stay maintained as for WhatsApp
-- (sent_jobs counts completed calls for voice), so status polls never count rows.
ALTER TABLE batches
    ADD COLUMN description       text NOT NULL DEFAULT '',
    ADD COLUMN priority          smallint NOT NULL DEFAULT 1 CHECK (priority BETWEEN 1 AND 4),
    ADD COLUMN call_settings     jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN use_case          text NOT NULL DEFAULT '',
    ADD COLUMN country           text NOT NULL DEFAULT '',
    ADD COLUMN processing_type   text NOT NULL DEFAULT 'basic',
    ADD COLUMN allow_duplicates  boolean NOT NULL DEFAULT false,
    ADD COLUMN estimated_cost    numeric(18, 4) NOT NULL DEFAULT 0,
    ADD COLUMN total_seconds     numeric(18, 3) NOT NULL DEFAULT 0,
    -- Jobs with at least one ended call: the call history's total without counting rows.
    ADD COLUMN called_jobs       integer NOT NULL DEFAULT 0,
    ADD COLUMN cancellation_reason text NOT NULL DEFAULT '';

CREATE TABLE voice_jobs (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id            uuid NOT NULL,
    account_id          text NOT NULL,
    -- pending (due at next_attempt_at) | in_progress (a call released) | completed | failed
    -- | cancelled | suspended
    status              text NOT NULL DEFAULT 'pending',
    -- One per debtor: RUT / DNI normalised, else the first phone (duplicates across batches).
    debtor_key          text NOT NULL,
    name                text NOT NULL DEFAULT '',
    dni                 text NOT NULL DEFAULT '',
    phones              text[] NOT NULL,
    next_phone_index    integer NOT NULL DEFAULT 0,
    payload             jsonb NOT NULL DEFAULT '{}'::jsonb,
    attempts            integer NOT NULL DEFAULT 0,
    max_attempts        integer NOT NULL DEFAULT 3,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    -- The call in flight (attempt id "<batch>:<job>:<round>.<phone>"), so a redelivered
    -- result applies once.
    current_attempt     text,
    call_result         jsonb,
    call_started_at     timestamptz,
    call_ended_at       timestamptz,
    call_duration_seconds numeric(12, 3),
    cost                numeric(18, 4) NOT NULL DEFAULT 0,
    estimated_cost      numeric(18, 4) NOT NULL DEFAULT 0,
    fecha_pago_cliente  date,
    monto_pago_cliente  numeric(18, 2),
    cancellation_reason text NOT NULL DEFAULT '',
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80);
CREATE INDEX voice_jobs_batch ON voice_jobs (batch_id, id);
CREATE INDEX voice_jobs_account ON voice_jobs (account_id, id DESC);
-- The dialer's question: which jobs of a batch are due now.
CREATE INDEX voice_jobs_due ON voice_jobs (batch_id, next_attempt_at) WHERE status = 'pending';
-- Duplicates across an account's active batches.
CREATE INDEX voice_jobs_debtor ON voice_jobs (account_id, debtor_key)
    WHERE status IN ('pending', 'in_progress', 'suspended');
-- Call history and the dashboard's recent activity: finished calls, newest first.
CREATE INDEX voice_jobs_finished ON voice_jobs (account_id, call_ended_at DESC) WHERE call_ended_at IS NOT NULL;
CREATE INDEX voice_jobs_finished_all ON voice_jobs (call_ended_at DESC) WHERE call_ended_at IS NOT NULL;

-- Answered calls per debtor: Chilean debt collection allows one answered contact per debtor
-- per week, counted across the account's batches.
CREATE TABLE debtor_contacts (
    account_id  text NOT NULL,
    debtor_key  text NOT NULL,
    answered_at timestamptz NOT NULL,
    PRIMARY KEY (account_id, debtor_key, answered_at)
);

-- Calls per batch and hour, kept as results arrive: the summary's hourly_stats.
CREATE TABLE batch_hours (
    batch_id  uuid NOT NULL,
    hour      timestamptz NOT NULL,
    calls     integer NOT NULL DEFAULT 0,
    completed integer NOT NULL DEFAULT 0,
    failed    integer NOT NULL DEFAULT 0,
    cost      numeric(18, 4) NOT NULL DEFAULT 0,
    seconds   numeric(18, 3) NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, hour)
);
