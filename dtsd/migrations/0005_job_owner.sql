-- Who owns a job: the principal that submitted it (`user:alice`, `token:ci-bot`,
-- `anonymous`, `schedule:NAME` for cron runs). Only the owner and admins see its env values,
-- and cancel or retry it; idempotency keys are per owner.
-- Never edit an applied migration; add a new numbered file instead.

ALTER TABLE jobs ADD COLUMN owner text NOT NULL DEFAULT '';

-- Jobs from before: the principal is submitted_by's part before '@' (`token:ci-bot@ipv4:...`
-- -> `token:ci-bot`). A job submitted without authentication recorded only its peer
-- (`ipv4:127.0.0.1:PORT`), which no caller can be again: only admins may act on it.
UPDATE jobs SET owner = split_part(submitted_by, '@', 1);

-- The idempotency-key space is each owner's own: another owner's key must neither return
-- nor reveal their job. The old index made the keys global.
DROP INDEX jobs_idempotency_key;
CREATE UNIQUE INDEX jobs_owner_idempotency_key ON jobs (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
