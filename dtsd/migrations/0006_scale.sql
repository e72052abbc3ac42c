-- A million stored jobs (issue 13): indexes for the list filters and the prune that had
-- none, and job counts that ClusterStatus reads without counting every row.
-- Never edit an applied migration; add a new numbered file instead.
--
-- The runner applies each file in one transaction, so these are plain CREATE INDEX (not
-- CONCURRENTLY): writes to jobs wait while they build, a few seconds per index at a
-- million rows. Each index costs every status change one more entry (see 0001).

-- ListJobs by queue, and by queue and status (a rare queue's FAILED jobs were found by
-- walking all FAILED jobs newest first), in the list's order: created_at DESC, id DESC.
-- Statuses are compared with = (store.list_jobs): = ANY would lose the index order.
CREATE INDEX jobs_queue_created ON jobs (queue, created_at DESC, id DESC);
CREATE INDEX jobs_queue_status_created ON jobs (queue, status, created_at DESC, id DESC);
-- The same for a name and a status (a name's CANCELLED runs).
CREATE INDEX jobs_name_status_created ON jobs (name, status, created_at DESC, id DESC)
    WHERE name <> '';

-- The leader's prune every 5 minutes: finished jobs past the retention that are not
-- dead-lettered. Without it the prune read the whole table even when nothing was old.
CREATE INDEX jobs_prunable ON jobs (finished_at)
    WHERE finished_at IS NOT NULL AND dead_lettered_at IS NULL;

-- Job counts by status, and the dead-lettered count under the key 'dead_lettered'.
-- The count is the sum of job_counts and job_count_deltas for the key. Every statement
-- that inserts, updates or deletes jobs appends its net change per key to
-- job_count_deltas (statement triggers over the transition tables, in the writer's own
-- transaction), so the counts commit and roll back with the change itself. Appending
-- rows takes no lock another writer waits for: concurrent claims, results and cancels
-- never queue behind a counter row, and cannot deadlock on one. The leader folds the
-- deltas into job_counts (one statement: DELETE ... RETURNING, summed, upserted), and a
-- reader's single statement sees either the deltas or their fold, never both.
CREATE TABLE job_counts (
    key text   PRIMARY KEY,
    n   bigint NOT NULL
);
CREATE TABLE job_count_deltas (
    key text   NOT NULL,
    n   bigint NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);

CREATE FUNCTION jobs_count_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO job_count_deltas (key, n)
        SELECT key, sum(n) FROM (
            SELECT status AS key, 1 AS n FROM new_rows
            UNION ALL SELECT 'dead_lettered', 1 FROM new_rows WHERE dead_lettered_at IS NOT NULL
        ) c GROUP BY key;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO job_count_deltas (key, n)
        SELECT key, sum(n) FROM (
            SELECT status AS key, 1 AS n FROM new_rows
            UNION ALL SELECT 'dead_lettered', 1 FROM new_rows WHERE dead_lettered_at IS NOT NULL
            UNION ALL SELECT status, -1 FROM old_rows
            UNION ALL SELECT 'dead_lettered', -1 FROM old_rows WHERE dead_lettered_at IS NOT NULL
        ) c GROUP BY key HAVING sum(n) <> 0;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO job_count_deltas (key, n)
        SELECT key, -sum(n) FROM (
            SELECT status AS key, 1 AS n FROM old_rows
            UNION ALL SELECT 'dead_lettered', 1 FROM old_rows WHERE dead_lettered_at IS NOT NULL
        ) c GROUP BY key;
    ELSE  -- TRUNCATE
        DELETE FROM job_count_deltas;
        DELETE FROM job_counts;
    END IF;
    RETURN NULL;
END $$;

-- A trigger with transition tables serves one event, hence three (and one for TRUNCATE).
CREATE TRIGGER jobs_count_inserts AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_changes();
CREATE TRIGGER jobs_count_updates AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_changes();
CREATE TRIGGER jobs_count_deletes AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_changes();
CREATE TRIGGER jobs_count_truncates AFTER TRUNCATE ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_changes();

-- The jobs stored before: counted once, here. CREATE TRIGGER locked jobs against writes
-- (SHARE ROW EXCLUSIVE) until this migration commits, so no change slips between the
-- count and the triggers.
INSERT INTO job_counts (key, n)
SELECT status, count(*) FROM jobs GROUP BY status
UNION ALL
SELECT 'dead_lettered', count(*) FROM jobs WHERE dead_lettered_at IS NOT NULL;
