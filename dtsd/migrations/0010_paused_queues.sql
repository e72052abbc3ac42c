-- Paused queues (PauseQueue, `dtsctl queue pause`): workers take no new job of a queue
-- named here; submits are still accepted and wait. PostgreSQL is the record; Redis holds a
-- mirror (the `paused` set) that the workers' fetch reads in the same Lua call that takes
-- ids, and that the leader rebuilds from this table at every reconcile. A queue absent
-- here runs. Never edit an applied migration; add a new numbered file instead.
CREATE TABLE paused_queues (
    queue text PRIMARY KEY,
    paused_by text NOT NULL DEFAULT '',
    paused_at timestamptz NOT NULL DEFAULT now()
);
