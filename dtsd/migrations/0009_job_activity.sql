-- Jobs that reached a final state, per minute, for the web UI's overview (JobActivity):
-- the count triggers of 0006 also count, under the key 'm:<epoch of the minute>:<status>',
-- the jobs whose finished_at falls in that minute and whose status is final. An update
-- that ends a job adds 1 there; one that takes a final job back (a retry, a requeue)
-- takes it away again, and one that changes a final job in place (dead-lettering) adds
-- and takes away the same key, so nothing. Deletes (the prune) are not counted: a
-- minute's count is how many jobs ended in it, not how many are still stored. The keys
-- ride in the same statement the counts already write (one more row per minute and
-- status a statement touches), and the leader's fold drops keys older than two hours.
-- Never edit an applied migration; add a new numbered file instead.
CREATE OR REPLACE FUNCTION jobs_count_changes() RETURNS trigger LANGUAGE plpgsql AS $$
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
            UNION ALL SELECT 'm:' || floor(extract(epoch FROM finished_at) / 60)::bigint * 60
                             || ':' || status, 1
                      FROM new_rows
                      WHERE finished_at IS NOT NULL
                        AND status IN ('SUCCEEDED', 'FAILED', 'CANCELLED')
            UNION ALL SELECT 'm:' || floor(extract(epoch FROM finished_at) / 60)::bigint * 60
                             || ':' || status, -1
                      FROM old_rows
                      WHERE finished_at IS NOT NULL
                        AND status IN ('SUCCEEDED', 'FAILED', 'CANCELLED')
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

-- A schedule's recent runs (ListJobs `schedule`), newest first: only cron runs have
-- entries, so ordinary jobs pay nothing for it.
CREATE INDEX jobs_schedule_created ON jobs (schedule_id, created_at DESC, id DESC)
    WHERE schedule_id IS NOT NULL;
