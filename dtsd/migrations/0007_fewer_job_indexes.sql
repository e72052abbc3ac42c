-- Every status change of a job is a non-HOT update (status is indexed), so it writes one
-- new entry into every index of jobs whose predicate the row meets: three changes per job
-- (submit, claim, result) times each index. Three indexes only served listings that
-- (status, ...) indexes serve as well: store.list_jobs reads a listing without a status
-- filter as one branch per status, each newest first from its own index, merged and cut
-- at the page, the way it already read several statuses. So a job costs 6 fewer index
-- entries, and a listing reads at most a page more index entries than it did.
-- Never edit an applied migration; add a new numbered file instead.
DROP INDEX jobs_created;           -- all jobs: jobs_status_created, one branch per status
DROP INDEX jobs_queue_created;     -- by queue: jobs_queue_status_created
DROP INDEX jobs_name_created;      -- by name: jobs_name_status_created

-- Dead letters are listed newest created first, like every listing; their index was in
-- dead_lettered_at order, which nothing reads, so a page sorted all of them (120 ms at
-- 30,000). The same rows, in the listing's order; only dead-lettered jobs have entries.
DROP INDEX jobs_dead;
CREATE INDEX jobs_dead ON jobs (created_at DESC, id DESC) WHERE dead_lettered_at IS NOT NULL;
