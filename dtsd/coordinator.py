"""The coordinator child: leadership and the leader's housekeeping loops.

Without `[etcd] endpoints` the node runs in single-node mode and always leads. (The etcd
election with fencing plugs in behind `Leadership`.) The loops are written so that two
nodes running them at once cannot corrupt anything: every write they make is a
compare-and-set in PostgreSQL, and pushing an id Redis already holds twice only costs
a claim that fails.

Loops:
  promote    delayed and back-off jobs whose time has come go onto their lists
  recover    jobs of dead workers (heartbeat gone): the attempt is closed as lost, retried
  reconcile  PENDING jobs that Redis holds nowhere are pushed again (a crash between the
             PostgreSQL commit and the Redis push, a Redis restart or flush)
  publish    this node's record (from the master's node file) for `dtsctl status`
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime

from . import child
from .config import Config
from .queue import Queue, Ready, connect
from .store import Store

log = logging.getLogger("dtsd.coordinator")

RECONCILE_BATCH = 5000


class Leadership:
    """Who leads. Single-node mode: this node, always."""

    single_node = True

    def is_leader(self) -> bool:
        return True


class Coordinator:
    def __init__(self, cfg: Config, index: int, parent: child.Parent):
        self.cfg = cfg
        self.parent = parent
        self.store = Store(cfg.get("postgres", "dsn"), min_size=1, max_size=2,
                           name="dtsd-coordinator")
        self.queue = Queue(connect(cfg.get("redis", "url")), cfg.key_prefix)
        self.leadership = Leadership()
        self.stop = threading.Event()
        self.missing_since: dict[str, float] = {}
        self.reconcile_cursor: tuple[datetime, str] | None = None
        self.node_file = os.path.join(cfg.get("dtsd", "runtime_dir"), "node.json")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGQUIT, lambda *_: self.stop.set())
        if child.retry_forever("connecting to PostgreSQL and Redis", self._connect, log,
                               self.stop) is None:
            return child.EXIT_OK
        self.parent.ready()
        if self.cfg.get("etcd", "endpoints"):
            log.warning("[etcd] endpoints is set, but this version has no etcd election yet: "
                        "running in single-node mode (this node leads)")
        log.info("coordinator ready (%s)", "single-node mode: this node leads"
                 if self.leadership.single_node else "etcd election")
        interval = self.cfg.get("dtsd", "housekeeping_interval")
        reconcile_every = self.cfg.get("dtsd", "reconcile_interval")
        next_reconcile = time.monotonic() + reconcile_every
        next_status = 0.0
        while not self.stop.is_set():
            started = time.monotonic()
            self._tick("publishing the node record", self.publish_node)
            if self.leadership.is_leader():
                self._tick("promoting due jobs", self.promote)
                self._tick("recovering dead workers", self.recover)
                if started >= next_reconcile:
                    self._tick("reconciling Redis with PostgreSQL", self.reconcile)
                    next_reconcile = started + reconcile_every
            self.parent.alive()
            if started >= next_status:
                self._tick("reporting to the master", self.report)
                next_status = started + 5.0
            self.stop.wait(max(0.0, interval - (time.monotonic() - started)))
        self.store.close()
        return child.EXIT_OK

    def _connect(self) -> bool:
        self.store.open(wait=True, timeout=30)
        self.queue.redis.ping()
        return True

    def _tick(self, what: str, step) -> None:
        try:
            step()
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)

    # --- the loops ------------------------------------------------------------------------

    def promote(self) -> None:
        while self.queue.promote_due() >= 1000:
            pass

    def recover(self) -> None:
        """Requeue the work of workers whose heartbeat is gone."""
        now = time.monotonic()
        ttl = self.cfg.get("worker", "heartbeat_ttl")
        registered = self.queue.workers()
        in_database = self.store.running_workers()
        candidates = set(registered) | set(in_database)
        alive = self.queue.alive(sorted(candidates))
        for worker in sorted(candidates):
            if alive.get(worker):
                self.missing_since.pop(worker, None)
                continue
            if worker not in registered:
                # Known only to PostgreSQL (Redis may have restarted): give the worker a
                # whole TTL to beat again before calling it dead.
                first = self.missing_since.setdefault(worker, now)
                if now - first < ttl:
                    continue
            requeued = self.store.recover_lost(
                worker, backoff=self.cfg.get("worker", "retry_backoff"),
                backoff_max=self.cfg.get("worker", "retry_backoff_max"))
            self.queue.drop_worker(worker)
            self.queue.push([Ready(r.id, r.queue, r.priority, r.run_at) for r in requeued])
            self.missing_since.pop(worker, None)
            if requeued:
                log.warning("worker %s is dead: %d job(s) requeued", worker, len(requeued))
            else:
                log.info("worker %s is gone; it held no running job", worker)

    def reconcile(self) -> None:
        """Walk PENDING jobs in batches; push again those Redis holds nowhere."""
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
        record["seen_at"] = time.time()
        self.queue.publish_node(self.cfg.node_id, record,
                                ttl=max(5.0, 5 * self.cfg.get("dtsd", "housekeeping_interval")))


def main(argv: list[str] | None = None) -> int:
    cfg, index, parent = child.boot("coordinator", argv)
    return Coordinator(cfg, index, parent).run()


if __name__ == "__main__":
    sys.exit(main())
