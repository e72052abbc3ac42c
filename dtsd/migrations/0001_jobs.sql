-- Jobs and their attempts: the record of every job dtsd ever ran.
-- Never edit an applied migration; add a new numbered file instead.
--
-- Every status change rewrites index entries (a change of an indexed column is never a
-- HOT update), and a job changes status at least twice, so each index on jobs costs on
-- the hot path: only the list filters and the housekeeping loops get one, partial where
-- most rows would not be in it.

CREATE TABLE jobs (
    id               text        PRIMARY KEY,
    name             text        NOT NULL DEFAULT '',
    command          text        NOT NULL,
    env              jsonb       NOT NULL DEFAULT '{}',
    cwd              text        NOT NULL DEFAULT '',
    queue            text        NOT NULL DEFAULT 'default',
    priority         smallint    NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    max_retries      integer     NOT NULL DEFAULT 3 CHECK (max_retries >= 0),
    timeout          double precision NOT NULL DEFAULT 0 CHECK (timeout >= 0),
    run_at           timestamptz,
    idempotency_key  text,
    fingerprint      text        NOT NULL DEFAULT '',
    schedule_id      bigint,
    fire_time        timestamptz,
    submitted_by     text        NOT NULL DEFAULT '',
    status           text        NOT NULL DEFAULT 'PENDING'
                     CHECK (status IN ('PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    attempts         integer     NOT NULL DEFAULT 0,   -- attempts started, ever
    failures         integer     NOT NULL DEFAULT 0,   -- failed attempts since the last (re)queue
    worker           text,
    exit_code        integer,
    output           bytea,
    output_truncated boolean     NOT NULL DEFAULT false,
    error            text        NOT NULL DEFAULT '',
    dead_lettered_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);

-- Uniqueness where it applies (nearly every job has neither key).
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX jobs_schedule_slot ON jobs (schedule_id, fire_time) WHERE schedule_id IS NOT NULL;

-- The list filters (newest first, keyset paging on created_at, id).
CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_status_created ON jobs (status, created_at DESC, id DESC);
CREATE INDEX jobs_name_created ON jobs (name, created_at DESC, id DESC) WHERE name <> '';
-- Housekeeping: the reconciler, dead-worker recovery and the dead-letter queue.
CREATE INDEX jobs_pending ON jobs (updated_at, id) WHERE status = 'PENDING';
CREATE INDEX jobs_running_worker ON jobs (worker) WHERE status = 'RUNNING';
CREATE INDEX jobs_dead ON jobs (dead_lettered_at DESC, id DESC) WHERE dead_lettered_at IS NOT NULL;

-- No foreign key: attempts are only inserted by the claim, for the job it just claimed,
-- and pruning deletes a job's attempts with it; the trigger would cost every attempt.
CREATE TABLE job_attempts (
    job_id           text        NOT NULL,
    attempt          integer     NOT NULL,
    worker           text        NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    exit_code        integer,
    output           bytea,
    output_truncated boolean     NOT NULL DEFAULT false,
    error            text        NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, attempt)
);
