-- Per-queue concurrency limits (SetQueueLimit, `dtsctl queue limit`): at most max_running
-- jobs of the queue RUNNING at once, across the cluster. A worker claims ids of a limited
-- queue in a transaction that locks the queue's row here, counts its RUNNING jobs
-- (jobs_queue_status_created) and claims only what fits; so two workers cannot both take
-- the last place, and no process holds the count but PostgreSQL. Redis mirrors the
-- limits (hash `limits`) only to route ids to that path. A queue absent here has no limit.
-- Never edit an applied migration; add a new numbered file instead.
CREATE TABLE queue_limits (
    queue text PRIMARY KEY,
    max_running integer NOT NULL CHECK (max_running > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
