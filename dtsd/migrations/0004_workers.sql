-- Worker leases: the evidence the leader uses to declare a worker dead. A worker renews its
-- row every second or so; once `lease_until` has passed, the leader closes its open
-- attempts as lost and deletes the row. Jobs cannot reach PostgreSQL (Redis they might, on
-- a host where it is left open), so a job cannot forge a worker's death, and a worker that
-- cannot renew its lease stops its own jobs before it expires (see dtsd/worker.py).
CREATE TABLE workers (
    id           text        PRIMARY KEY,
    node         text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    lease_until  timestamptz NOT NULL
);
