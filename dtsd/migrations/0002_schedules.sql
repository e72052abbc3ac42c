-- Cron schedules, and the fence that keeps a deposed leader from writing.

-- The leader's fencing token (its etcd leader key's create revision) only moves forward.
-- Every leader-only transaction first moves the fence to its own token; one holding an
-- older token finds the fence ahead of it, writes nothing and steps down.
CREATE TABLE leader_fence (
    cluster    text        PRIMARY KEY,
    token      bigint      NOT NULL,
    holder     text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE schedules (
    id             bigserial   PRIMARY KEY,
    name           text        NOT NULL UNIQUE,
    expression     text        NOT NULL,
    timezone       text        NOT NULL DEFAULT 'UTC',
    overlap        text        NOT NULL DEFAULT 'allow'
                   CHECK (overlap IN ('allow', 'forbid', 'replace')),
    misfire        text        NOT NULL DEFAULT 'run_once'
                   CHECK (misfire IN ('skip', 'run_once', 'run_all')),
    catchup_window double precision NOT NULL DEFAULT 3600 CHECK (catchup_window > 0),
    job            jsonb       NOT NULL,          -- the template each firing submits
    paused         boolean     NOT NULL DEFAULT false,
    next_fire_time timestamptz,                   -- the next slot; NULL while paused
    last_fire_time timestamptz,                   -- the last slot handled (fired or skipped)
    last_job_id    text,
    created_by     text        NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX schedules_due ON schedules (next_fire_time) WHERE NOT paused;
-- Overlap checks look for a schedule's unfinished runs.
CREATE INDEX jobs_schedule_open ON jobs (schedule_id)
    WHERE schedule_id IS NOT NULL AND status IN ('PENDING', 'RUNNING');
