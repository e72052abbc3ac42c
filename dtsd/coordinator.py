"""The coordinator child: leadership and the leader's housekeeping loops.

With `[etcd] endpoints` the node takes part in an etcd election (dtsd.election); without,
it runs in single-node mode and always leads. Every leader-only write in PostgreSQL is
fenced by the leader's token (store.Store.fenced), so a deposed leader that wakes late
writes nothing. The loops are written so that two nodes running them at once cannot
corrupt anything: each write is a compare-and-set, a cron slot's job has a unique id,
and pushing an id Redis already holds costs only a claim that fails.

Loops (leader only):
  fire       due cron schedules, with their misfire and overlap policies
  promote    delayed and back-off jobs whose time has come go onto their lists
  recover    jobs of dead workers (lease run out): the attempt is closed as lost, retried
  reconcile  PENDING jobs that Redis holds nowhere are pushed again (a crash between the
             PostgreSQL commit and the Redis push, a Redis restart or flush)
  fold       the job counts' per-statement changes into job_counts (ClusterStatus sums
             those rows instead of counting every job; unfenced: folding is exact twice)
  prune      finished jobs older than [dtsd] retention
  notify     (a thread of its own, dtsd.notify) webhooks of jobs that ended, from the
             outbox store.finish and recover_lost fill: a slow receiver never delays the rest
And on every node: publish this node's record (from the master's node file) for
`dtsctl status`, and report leadership and backlog to the master.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

from . import backing, child, metrics, notify
from . import cron as cronmod
from .config import Config
from .models import JOB_LOGGER, job_label, resolve_notify, schedule_job
from .queue import Queue, Ready, connect
from .store import LEADER_ANSWER_WITHIN, Deposed, Fence, FirePlan, Lost, Store

log = logging.getLogger("dtsd.coordinator")
job_log = logging.getLogger(JOB_LOGGER)

RECONCILE_BATCH = 5000
PRUNE_EVERY = 300.0
STATUS_EVERY = 5.0
_PB_PYTHON = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"


class Coordinator:
    def __init__(self, cfg: Config, index: int, parent: child.Parent, leadership):
        self.cfg = cfg
        self.parent = parent
        # A fenced transaction left open by a leader that was cut off must not outlive
        # its lease: the next leader needs the fence row.
        window = max(1.0, cfg.get("etcd", "lease_ttl") / 2)
        self.store = Store(cfg.get("postgres", "dsn"), min_size=1, max_size=3,
                           name="dtsd-coordinator", hold_limit=window,
                           answer_within=LEADER_ANSWER_WITHIN)
        self.queue = Queue(connect(cfg.get("redis", "url")), cfg.key_prefix)
        self.leadership = leadership
        self.stop = threading.Event()
        self.wake = threading.Event()      # stop, or a schedule changed: look again now
        self.missing_since: dict[str, float] = {}
        self.reconcile_cursor: tuple[datetime, str] | None = None
        self.node_file = os.path.join(cfg.get("dtsd", "runtime_dir"), "node.json")
        self.was_leader = False
        self.missed = 0                 # cron slots the policies dropped, this round
        # A slot later than this was missed (downtime, failover, no quorum) and follows the
        # schedule's misfire policy; the leader wakes at each slot, so on time is a few ms.
        self.grace = max(1.0, 3 * cfg.get("dtsd", "housekeeping_interval"))

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._stop())
        signal.signal(signal.SIGQUIT, lambda *_: self._stop())
        if not child.connect(self.store, self.queue, log, self.stop):
            return child.EXIT_OK
        self.leadership.start()
        threading.Thread(target=self._listen_for_schedules, name="schedules", daemon=True).start()
        notifier = notify.Notifier(self.cfg, self.store, self.leadership, self.stop)
        notifier.start()
        self.parent.ready()
        log.info("coordinator ready (%s)", "single-node mode: this node leads"
                 if self.leadership.single_node else "etcd election")
        interval = self.cfg.get("dtsd", "housekeeping_interval")
        reconcile_every = self.cfg.get("dtsd", "reconcile_interval")
        next_reconcile = time.monotonic() + reconcile_every
        next_status = next_prune = 0.0
        while not self.stop.is_set():
            started = time.monotonic()
            wake_at = started + interval
            self._tick("publishing the node record", self.publish_node)
            # Leadership is read just before the leader's steps (the node record above may
            # have waited on Redis): a token of None means the lease lapsed meanwhile.
            token = self.leadership.token() if self.leadership.is_leader() else None
            leader = token is not None
            self.gauge_leadership(token)
            if leader != self.was_leader:
                self.was_leader = leader
                log.info("this node %s", "leads: leader loops start" if leader
                         else "does not lead: leader loops stop")
            if leader:
                fence = Fence(self.cfg.get("dtsd", "cluster"), token, self.cfg.node_id)
                due = self._tick("firing schedules", lambda: self.fire(fence))
                if due is not None:
                    wake_at = min(wake_at, time.monotonic() + max(0.0, due))
                self._tick("promoting due jobs", self.promote)
                self._tick("recovering dead workers", lambda: self.recover(fence))
                self._tick("folding job counts", self.store.fold_counts)
                if started >= next_reconcile:
                    self._tick("reconciling Redis with PostgreSQL", self.reconcile)
                    next_reconcile = started + reconcile_every
                if started >= next_prune:
                    self._tick("pruning old jobs", lambda: self.prune(fence))
                    self._tick("forgetting old activity", self.store.forget_activity)
                    next_prune = started + PRUNE_EVERY
            self.parent.alive()
            if started >= next_status:
                self._tick("reporting to the master", self.report)
                next_status = started + STATUS_EVERY
            self.wake.wait(max(0.0, wake_at - time.monotonic()))
            self.wake.clear()
        notifier.close()
        self.leadership.stop()
        self.store.close()
        return child.EXIT_OK

    def _stop(self) -> None:
        self.stop.set()
        self.wake.set()

    def _listen_for_schedules(self) -> None:
        """Wake the loop when a schedule is created or resumed (its first slot may be
        sooner than the loop's next look)."""
        while not self.stop.is_set():
            try:
                pubsub = self.queue.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.queue.keys.schedules)
                while not self.stop.is_set():
                    if pubsub.get_message(timeout=1.0):
                        self.wake.set()
            except Exception as exc:
                backing.health.note(exc)
                log.debug("schedule channel lost: %s", exc)
                self.stop.wait(1.0)

    def _tick(self, what: str, step) -> Any:
        try:
            return step()
        except Deposed as exc:
            log.warning("%s refused, a newer leader exists: %s", what, exc)
        except Exception as exc:
            if backing.health.note(exc) is None:    # a store's absence is said once
                log.warning("%s failed: %s", what, exc)
        return None

    def gauge_leadership(self, token: int | None) -> None:
        metrics.LEADER.set(0 if token is None else 1)
        metrics.FENCING_TOKEN.set(token or 0)
        if not self.leadership.single_node:
            polled = self.leadership.status().get("last_poll_ago")
            if polled is not None:
                metrics.ETCD_POLLED.set(time.time() - polled)

    # --- cron -----------------------------------------------------------------------------

    def fire(self, fence: Fence) -> float | None:
        """Fire the due schedules; returns seconds until the next slot (None: none).

        Slots fall due by PostgreSQL's clock, not this host's: a leader whose clock runs
        ahead fired them early by as much, and each failover between hosts whose clocks
        differ moved the firing back and forth."""
        now = self.store.clock()
        read_at = time.monotonic()
        self.missed = 0                 # counted by plan(), which a rollback may undo
        for fired in self.store.fire_due_schedules(fence, now, lambda row, runs:
                                                    self.plan(row, runs, now)):
            self.queue.push([Ready(j.id, j.queue, j.priority) for j in fired.jobs])
            for job_id, previous, attempt in fired.cancelled:
                if previous == "RUNNING":
                    self.queue.request_cancel(job_id, attempt)
            for job in fired.jobs:
                log.info("schedule %s fired job %s for %s", fired.schedule, job.id,
                         job.fire_time.isoformat() if job.fire_time else "now")
                metrics.CRON_FIRED.inc()
                if job.fire_time:
                    metrics.CRON_LATENESS.observe(max(0.0, (now - job.fire_time).total_seconds()))
        if self.missed:
            metrics.CRON_MISSED.inc(self.missed)
            self.missed = 0
        due = self.store.next_due()
        if due is None:
            return None
        return (due - now).total_seconds() - (time.monotonic() - read_at)

    def plan(self, row: dict[str, Any], open_runs: list[tuple[str, str, int]],
             now: datetime) -> FirePlan:
        """The leader's policy for one due schedule (misfire, then overlap)."""
        schedule = cronmod.parse(row["expression"], row["timezone"])
        all_due = slots = cronmod.due_slots(schedule, row["last_fire_time"], row["created_at"],
                                            now, cronmod.Misfire(row["misfire"]),
                                            row["catchup_window"], grace=self.grace)
        overlap = cronmod.Overlap(row["overlap"])
        cancel: list[str] = []
        if slots and overlap is not cronmod.Overlap.ALLOW:
            # One run at a time: of several due slots only the latest can run.
            if overlap is cronmod.Overlap.FORBID and open_runs:
                log.info("schedule %s: slot %s skipped, a run is still going (overlap=forbid)",
                         row["name"], slots[-1].isoformat())
                slots = []
            else:
                slots = slots[-1:]
                cancel = [job_id for job_id, _, _ in open_runs]
        # Slots up to `now` are handled (fired, or dropped by the policy), unless due_slots
        # stopped at its limit: then the rest is taken on the next tick.
        horizon = all_due[-1] if len(all_due) >= cronmod.MAX_DUE else now
        jobs = [resolve_notify(schedule_job(row, slot), self.cfg.get("notify", "default"),
                               self.cfg.get("notify", "on")) for slot in slots]
        self.missed += len(all_due) - len(slots)
        return FirePlan(jobs=jobs, cancel=cancel, last_fire_time=horizon,
                        next_fire_time=now if horizon < now else schedule.next_after(now))

    # --- the other loops ------------------------------------------------------------------

    def promote(self) -> None:
        while self.queue.promote_due() >= 1000:
            pass

    def recover(self, fence: Fence) -> None:
        """Requeue the work of workers whose lease in PostgreSQL has run out.

        The lease is the evidence (Redis, which a job might reach, is not): a worker whose
        renewals stopped hands back or kills its own jobs before its lease runs out. A
        RUNNING job naming a worker that holds no lease row at all comes from a worker of
        an older dtsd (before leases) or one long gone: its Redis heartbeat decides, after
        a whole TTL of absence, as before.
        """
        now = time.monotonic()
        ttl = self.cfg.get("worker", "heartbeat_ttl")
        expired, unknown = self.store.expired_workers()
        dead = list(expired)
        beats = self.queue.alive(unknown)
        for worker in unknown:
            if beats.get(worker):
                self.missing_since.pop(worker, None)
                continue
            first = self.missing_since.setdefault(worker, now)
            if now - first >= ttl:
                dead.append(worker)
        for worker in dead:
            lost = self.store.recover_lost(
                fence, worker, backoff=self.cfg.get("worker", "retry_backoff"),
                backoff_max=self.cfg.get("worker", "retry_backoff_max"))
            requeued = [job for job in lost if not job.dead]
            self.queue.drop_worker(worker)
            self.queue.push([Ready(r.id, r.queue, r.priority, r.run_at) for r in requeued])
            for job in lost:
                queue = metrics.queue_label(job.queue)
                metrics.JOBS_LOST.labels(queue).inc()
                if job.dead:
                    metrics.JOBS_DEAD_LETTERED.labels(queue).inc()
            self.missing_since.pop(worker, None)
            if lost:
                log.warning("worker %s is dead (lease run out): %d job(s) requeued, %d "
                            "dead-lettered", worker, len(requeued), len(lost) - len(requeued))
            else:
                log.info("worker %s is gone; it held no running job", worker)
            for job in lost:
                self._log_lost(job, worker)
        # Redis's list of workers is for `dtsctl status`: forget those without a heartbeat.
        for worker, beat in self.queue.workers().items():
            if beat is None and worker not in unknown:
                self.queue.drop_worker(worker)
                log.info("worker %s is gone from Redis (no heartbeat): forgotten there", worker)

    @staticmethod
    def _log_lost(job: Lost, worker: str) -> None:
        """One line per job lost with its worker, after the recovery committed (this
        leader's record is what requeued or dead-lettered it)."""
        label = job_label(job.id, job.name, job.queue)
        if job.dead:
            job_log.error("%s failed for good at attempt %d: lost with its worker %s, no "
                          "retries left; dead-lettered", label, job.attempt, worker)
            return
        wait = (job.run_at - datetime.now(timezone.utc)).total_seconds() if job.run_at else 0.0
        job_log.warning("%s lost at attempt %d with its worker %s; requeued for retry %d of "
                        "%d in %.1fs", label, job.attempt, worker, job.failures,
                        job.max_retries, max(0.0, wait))

    def reconcile(self) -> None:
        """Rebuild Redis's mirrors of the paused and limited queues from PostgreSQL (first: a flushed
        Redis must not run a paused queue's jobs pushed again below), then walk PENDING
        jobs in batches and push again those Redis holds nowhere."""
        self.queue.set_paused(row["queue"] for row in self.store.paused_queues())
        self.queue.set_limits(self.store.queue_limits())
        rows = self.store.pending_since(self.cfg.get("dtsd", "reconcile_interval"),
                                        self.reconcile_cursor, RECONCILE_BATCH)
        if len(rows) < RECONCILE_BATCH:
            self.reconcile_cursor = None
        else:
            self.reconcile_cursor = (rows[-1][4], rows[-1][0])
        missing = set(self.queue.missing([row[0] for row in rows]))
        lost = [Ready(row[0], row[1], row[2], row[3]) for row in rows if row[0] in missing]
        if lost:
            self.queue.push(lost)
            log.warning("pushed %d PENDING job(s) again that Redis did not hold", len(lost))

    def prune(self, fence: Fence) -> None:
        retention = self.cfg.get("dtsd", "retention")
        if retention <= 0:
            return
        total = 0
        while True:
            pruned = self.store.prune(fence, retention)
            total += pruned
            if pruned < 5000 or self.stop.is_set():
                break
        if total:
            log.info("pruned %d finished job(s) older than %.0fs", total, retention)

    # --- what this node tells others ------------------------------------------------------

    def report(self) -> None:
        """Leadership and backlog, for the master's systemd STATUS line."""
        self.parent.status({"leader": self.leadership.is_leader(),
                            "pending": self.store.pending_count()})

    def publish_node(self) -> None:
        try:
            with open(self.node_file, encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            record = {"node_id": self.cfg.node_id, "children": []}
        record["leader"] = self.leadership.is_leader()
        record["single_node"] = self.leadership.single_node
        record["leader_id"] = self.leadership.leader()
        record["seen_at"] = time.time()
        for item in record.get("children", ()):    # as of now, not of the file's writing
            if item.get("running_since"):
                item["uptime"] = round(max(0.0, record["seen_at"] - item["running_since"]), 1)
        self.queue.publish_node(self.cfg.node_id, record,
                                ttl=max(5.0, 5 * self.cfg.get("dtsd", "housekeeping_interval")))


def _etcd_loads() -> bool:
    """PyPI's etcd3 0.12 ships stubs that protobuf >= 4 (upb) refuses to load; Debian's
    python3-etcd3 is regenerated and loads fine. Test it in a throwaway interpreter."""
    import subprocess
    probe = subprocess.run([sys.executable, "-c", "import etcd3"], capture_output=True,
                           stdin=subprocess.DEVNULL)
    return probe.returncode == 0


def main(argv: list[str] | None = None) -> int:
    cfg, index, parent = child.boot("coordinator", argv)
    if cfg.get("etcd", "endpoints") and _PB_PYTHON not in os.environ and not _etcd_loads():
        # Confined to this process, whose etcd traffic is a few calls a second: the API
        # servers keep the fast protobuf.
        log.info("etcd3 needs the pure-Python protobuf here: restarting the coordinator with it")
        os.environ[_PB_PYTHON] = "python"
        os.execv(sys.executable, [sys.executable, "-m", "dtsd.coordinator", *sys.argv[1:]])
    from . import election
    leadership = election.create(cfg)
    return Coordinator(cfg, index, parent, leadership).run()


if __name__ == "__main__":
    sys.exit(main())
