-- Per-job resource limits asked for by the submitter ({"processes": 64, "memory": 1073741824}).
-- Empty: the worker's [worker] limits apply. A constant default makes this instant.
ALTER TABLE jobs ADD COLUMN limits jsonb NOT NULL DEFAULT '{}';
