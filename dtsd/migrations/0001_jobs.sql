-- Jobs and their attempts: the record of every job dtsd ever ran.
-- Never edit an applied migration; add a new numbered file instead.

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
    idempotency_key  text        UNIQUE,
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
    finished_at      timestamptz,
    UNIQUE (schedule_id, fire_time)
);

-- The list filters (newest first, keyset paging on created_at, id).
CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_status_created ON jobs (status, created_at DESC, id DESC);
CREATE INDEX jobs_queue_created ON jobs (queue, created_at DESC, id DESC);
CREATE INDEX jobs_name_created ON jobs (name, created_at DESC, id DESC) WHERE name <> '';
-- Housekeeping: the reconciler, dead-worker recovery and the dead-letter queue.
CREATE INDEX jobs_pending ON jobs (updated_at, id) WHERE status = 'PENDING';
CREATE INDEX jobs_running_worker ON jobs (worker) WHERE status = 'RUNNING';
CREATE INDEX jobs_dead ON jobs (dead_lettered_at DESC, id DESC) WHERE dead_lettered_at IS NOT NULL;

CREATE TABLE job_attempts (
    job_id           text        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
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
