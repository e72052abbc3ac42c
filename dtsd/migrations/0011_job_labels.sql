-- Labels of jobs (JobSpec.labels), for selection: `list --selector`, CancelJobs, RetryJobs.
-- NULL when a job has none, so that the index below holds only labelled jobs: a job is
-- updated non-HOT at each status change (status is indexed), and every index whose
-- predicate the new row meets takes a new entry each time (0007). Unlabelled jobs pay
-- nothing; a labelled one pays one GIN entry per label per version. jsonb_path_ops: one
-- hashed entry per key=value pair (jsonb_ops would add one per key and one per value),
-- serving `labels @> '{"k":"v"}'`, the selector's `k=v` and `k in (...)`; `k`, `!k` and
-- `k!=v` filter the rows the other conditions found. fastupdate (the default) batches the
-- entries of an update in the pending list, merged into the tree in bulk by (auto)vacuum
-- or when it passes gin_pending_list_limit. README, "Labels and selection", has the
-- measured cost.
-- Never edit an applied migration; add a new numbered file instead.
ALTER TABLE jobs ADD COLUMN labels jsonb;
CREATE INDEX jobs_labels ON jobs USING gin (labels jsonb_path_ops) WHERE labels IS NOT NULL;
