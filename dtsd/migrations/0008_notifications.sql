-- Webhook notifications (README, "Failure notifications"): the targets and events each job
-- is to be notified for, and the outbox the leader delivers from.
-- Never edit an applied migration; add a new numbered file instead.

-- Target names ([notify] targets) and events ('failed', 'succeeded'), as resolved when
-- the job was created: the job's own, else [notify] default and on. Empty: none. A constant
-- default: no table rewrite, and unindexed, so a status change stays a cheap update.
ALTER TABLE jobs ADD COLUMN notify text[] NOT NULL DEFAULT '{}';
ALTER TABLE jobs ADD COLUMN notify_on text[] NOT NULL DEFAULT '{}';

-- One row per notification still to deliver, inserted in the transaction that records the
-- job's final state (store.finish, store.recover_lost), so a state that committed is
-- notified and one that rolled back is not. The payload is built from the job row at
-- delivery. A delivered notification's row is deleted, and so is one given up.
CREATE TABLE notifications (
    id           bigserial   PRIMARY KEY,
    delivery_id  uuid        NOT NULL DEFAULT gen_random_uuid(),   -- receivers dedupe by it
    job_id       text        NOT NULL,
    target       text        NOT NULL,
    event        text        NOT NULL CHECK (event IN ('failed', 'succeeded')),
    attempts     integer     NOT NULL DEFAULT 0,       -- POSTs made
    next_at      timestamptz NOT NULL DEFAULT now(),   -- due; a claim moves it past its deadline
    last_error   text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notifications_due ON notifications (next_at);
