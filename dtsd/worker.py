"""The worker child: takes job ids from Redis, claims them in PostgreSQL, runs them, reports.

One worker process runs up to `[worker] concurrency` jobs at once on as many long-lived
job threads, each running one `Execution` at a time. The main thread fetches: it moves
as many ids as it has free slots into its processing list (one Lua call), claims them
all with one statement, and hands them to the job threads; nothing else happens on that
path, so the next fetch follows at once. Finished attempts go to a writer thread that records them in batches
(one transaction) and acknowledges them in Redis (one pipeline), so under load the
database sees a few statements per batch rather than several per job.

Jobs are started by the worker's launcher (dtsd/launcher.py), a single-threaded child
that the worker starts before anything else and that alone keeps the privilege to switch
users; the worker then drops every capability it had. Job thread N runs its jobs in the
launcher's slot N, a uid of its own.

The worker holds a lease in PostgreSQL (table `workers`), renewed every second or so; the
leader declares a worker dead only once its lease has run out. A worker that cannot renew
its lease for half of `[worker] heartbeat_ttl` hands its running jobs back, and kills them
before the lease can run out by its own clock: so an attempt never runs twice at once, and
nothing a job can reach (Redis, on a host where it is left open) can forge a worker's death.

Signals: TERM drains (no new jobs; running ones may finish within `stopwaitsecs`,
then they are handed back: PENDING again, no retry spent). QUIT hands back at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue as queuemod
import random
import signal
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

from . import backing, child, metrics
from . import launcher as launchermod
from .config import Config
from .config import ConfigError
from .executor import Execution, Result, build_env
from .jobbox import JobBox, Launcher, LauncherError, OomCounter
from .models import JOB_LOGGER, EndReason, JobStatus, job_label, retry_delay
from .queue import Event, Queue, Ready, Taken, connect
from .store import ANSWER_WITHIN, Claimed, Outcome, Store

log = logging.getLogger("dtsd.worker")
job_log = logging.getLogger(JOB_LOGGER)

WRITE_BATCH = 500
CANCEL_MEMORY = 60.0   # seconds a cancel is remembered for an attempt still being started
EXIT_LAUNCHER_DIED = 1


class Worker:
    def __init__(self, cfg: Config, index: int, parent: child.Parent, box: JobBox,
                 launcher: Launcher):
        self.cfg = cfg
        self.box = box
        self.launcher = launcher
        self.settings = cfg.worker
        self.index = index
        self.parent = parent
        self.id = f"{cfg.node_id}-w{index}-{os.getpid()}"
        self.queues = list(self.settings.queues)
        self.concurrency = self.settings.concurrency
        self.log_jobs = cfg.get("dtsd", "log_jobs")
        self.store = Store(cfg.get("postgres", "dsn"), min_size=1, max_size=3,
                           name=f"dtsd-worker-{index}", custom_plans=True,
                           answer_within=ANSWER_WITHIN)
        self.queue = Queue(connect(cfg.get("redis", "url")), cfg.key_prefix)
        self.started = time.time()
        self.ooms = OomCounter()

        self.lock = threading.Condition()
        self.running: dict[str, tuple[Execution, int]] = {}  # job id -> (execution, attempt)
        self.starting = 0                         # claimed, thread not yet registered
        self.recent_cancels: dict[tuple[str, int], float] = {}   # (job, attempt) -> when
        self.ttl = self.settings.heartbeat_ttl
        self.lease_ok_at = time.monotonic()       # when the last renewal that worked was sent
        self.lease_lapsed = False                 # running jobs were stopped for it
        self.exit_code = child.EXIT_OK
        self.results: queuemod.SimpleQueue[Outcome | None] = queuemod.SimpleQueue()
        self.stopping = threading.Event()         # take no new jobs
        self.hand_back_now = threading.Event()    # QUIT, or the drain time is over
        self.give_up = threading.Event()          # stopping, and the stores had their time
        self.done = threading.Event()             # threads may go
        self.todo: queuemod.SimpleQueue[Claimed | None] = queuemod.SimpleQueue()
        self.limited: set[str] = set()            # queues it met with a max_running
        self.unsure: set[str] = set()             # ids of claims whose answer was lost

    # --- life cycle -----------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGQUIT, lambda *_: (self.stopping.set(), self.hand_back_now.set()))
        if not child.connect(self.store, self.queue, log, self.stopping, self._register,
                             self._beat):
            self.launcher.close()
            return child.EXIT_OK
        threads = [threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True),
                   threading.Thread(target=self._guard_lease, name="lease", daemon=True),
                   threading.Thread(target=self._listen_for_cancels, name="cancels", daemon=True)]
        threads += [threading.Thread(target=self._job_thread, args=(n,), name=f"job-{n}",
                                     daemon=True)
                    for n in range(self.concurrency)]
        writer = threading.Thread(target=self._write_results, name="writer")
        for thread in (*threads, writer):
            thread.start()
        log.info("worker %s ready: queues %s, concurrency %d",
                 self.id, ",".join(self.queues), self.concurrency)
        self.parent.ready()
        self._fetch_loop()
        self._drain()
        # The stores get FINISH_GRACE to take the last results, not more: a worker whose
        # master is gone has nobody to KILL it, and a store that went too must not keep it.
        timer = threading.Timer(max(0.0, child.FINISH_GRACE - 1.0), self.give_up.set)
        timer.daemon = True
        timer.start()
        for _ in range(self.concurrency):
            self.todo.put(None)
        self.results.put(None)
        writer.join()
        self.done.set()
        self.launcher.close()
        if self.give_up.is_set():
            log.warning("not retiring worker %s: its lease runs out by itself", self.id)
        else:
            try:
                self.queue.retire(self.id)
            except Exception as exc:
                log.warning("could not retire from Redis: %s", exc)
            try:
                self.store.retire_worker(self.id)
            except Exception as exc:
                log.warning("could not end the lease in PostgreSQL (it runs out by itself): %s",
                            exc)
        self.store.close(timeout=1.0)
        log.info("worker %s stopped", self.id)
        return self.exit_code

    def _drain(self) -> None:
        """Let running jobs finish within stopwaitsecs; then hand the rest back."""
        deadline = time.monotonic() + self.settings.stopwaitsecs
        with self.lock:
            if self.running:
                log.info("draining: waiting up to %.0fs for %d running job(s)",
                         self.settings.stopwaitsecs, len(self.running))
            while self.running and not self.hand_back_now.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.lock.wait(min(left, 0.2))
            if self.running:
                log.info("handing back %d running job(s)", len(self.running))
            for execution, _ in self.running.values():
                execution.stop(EndReason.HANDED_BACK)
            while self.running or self.starting:
                self.lock.wait(0.2)

    # --- fetching -------------------------------------------------------------------------

    def _free_slots(self) -> int:
        return self.concurrency - len(self.running) - self.starting

    def _fetch_loop(self) -> None:
        backoff = 0.2
        strays = False      # a failed fetch may have moved ids without telling this worker
        while not self.stopping.is_set():
            if self.launcher.dead.is_set():
                self._launcher_died()
            if self.lease_lapsed:        # take nothing while the lease is in doubt
                self.stopping.wait(0.2)
                continue
            with self.lock:
                while self._free_slots() <= 0 and not self.stopping.is_set():
                    self.lock.wait(0.5)
                free = self._free_slots()
            if self.stopping.is_set():
                break
            try:
                if strays:
                    self._claim_strays()
                    strays = False
                taken = self.queue.fetch(self.id, self.queues, free)
                if not taken:
                    self.queue.wait_for_work(self.queues, timeout=1.0)
                    continue
                self._claim_and_start(taken)
                backoff = 0.2
            except Exception as exc:
                strays = True
                if backing.health.note(exc) is None:    # a store's absence is said once
                    log.warning("fetch failed: %s; retrying in %.1fs", exc, backoff)
                self.stopping.wait(backoff)
                backoff = min(5.0, backoff * 2)

    def _claim(self, taken: list[Taken]) -> tuple[list[Claimed], list[Taken]]:
        """Claim what was taken: (claimed, ids a limited queue had no room for).

        Ids of queues with a max_running (by Redis's mirror, or found by the plain claim,
        which takes none of them) go through `claim_limited`, one queue at a time."""
        by_id = {item.id: item for item in taken}
        limited: dict[str, list[str]] = {}
        for item in taken:
            if item.limit:
                limited.setdefault(item.queue, []).append(item.id)
        plain = [item.id for item in taken if not item.limit]
        claimed = self.store.claim(plain, self.id)
        if len(claimed) < len(plain):
            mine = {job.id for job in claimed}
            for queue, ids in self.store.limited([i for i in plain if i not in mine]).items():
                limited.setdefault(queue, []).extend(ids)
                for job_id in ids:          # a stray's queue was not known: it is now
                    if not by_id[job_id].queue:
                        by_id[job_id] = dataclasses.replace(by_id[job_id], queue=queue)
        no_room: list[Taken] = []
        for queue, ids in limited.items():
            self.limited.add(queue)
            try:
                got, left = self.store.claim_limited(ids, queue, self.id)
            except Exception:
                if not claimed:
                    raise
                # What it claimed already must start: these ids are let go (unclaimed).
                log.warning("claiming ids of limited queue %s failed", queue, exc_info=True)
                continue
            claimed += got
            no_room += [by_id[job_id] for job_id in left]
        return claimed, no_room

    def _claim_strays(self) -> None:
        """Take what a failed round left to this worker without telling it.

        A claim whose statement committed but whose answer was lost (the connection cut
        in between) left its jobs RUNNING under this worker's live lease: nobody would
        run or recover them, so they stayed RUNNING for good. They are found by their open
        attempt and run now.

        A connection cut after the fetch's script ran, before its reply came, leaves ids
        in the processing list that this worker never saw: nobody else takes them while it
        lives (the leader drops only dead workers' lists), and the reconciler counts them
        as held, so their jobs stayed PENDING for good. They are claimed as a fetch's
        would be (only PENDING jobs are; the others are let go)."""
        if self.unsure:
            found = self.store.claimed_by(sorted(self.unsure), self.id)
            self.unsure.clear()
            if found:
                log.warning("starting %d job(s) claimed by a round whose answer was lost",
                            len(found))
                self._start(found)
                for job in found:
                    self.todo.put(job)
        held = self.queue.processing_ids(self.id)
        with self.lock:
            mine = set(self.running)
        strays = [job_id for job_id in held if job_id not in mine]
        if strays:
            log.info("claiming %d id(s) a failed fetch left in this worker's list", len(strays))
            # Where they came from is not known: the claim finds a limited queue's ids.
            self._claim_and_start([Taken(job_id, "", 0) for job_id in strays])

    def _claim_and_start(self, taken: list[Taken]) -> None:
        ids = [item.id for item in taken]
        try:
            claimed, no_room = self._claim(taken)
        except Exception:
            # PostgreSQL refused: let go of the ids; the reconciler pushes them again. If
            # the claim committed and only its answer was lost, the jobs are RUNNING here
            # and nobody else will take them: the next round looks (`_claim_strays`).
            self.unsure.update(ids)
            self.queue.ack(self.id, ids)
            raise
        if no_room:
            try:
                self.queue.give_back(self.id, no_room)
            except Exception as exc:     # let go of them below; the reconciler pushes them
                log.debug("ids without room not given back: %s", exc)
            else:
                ids = [job_id for job_id in ids if job_id not in {t.id for t in no_room}]
        mine = {job.id for job in claimed}
        unclaimed = [job_id for job_id in ids if job_id not in mine]
        self._start(claimed)
        # Let go of the ids not claimed (done, cancelled or running elsewhere) and tell
        # watchers the claimed ones run (before they can end), in one round trip.
        events = [(job.id, Event("state", attempt=job.attempt, status=JobStatus.RUNNING))
                  for job in claimed]
        try:
            self.queue.ack(self.id, unclaimed, events=events)
        except Exception as exc:  # watchers also poll PostgreSQL; the ids are reconciled
            if unclaimed:
                raise
            log.debug("RUNNING events not published: %s", exc)
        finally:
            for job in claimed:
                self.todo.put(job)

    def _start(self, claimed: list[Claimed]) -> None:
        """Count `claimed` as starting (the job threads take them from `todo`)."""
        with self.lock:
            self.starting += len(claimed)
        for job in claimed:
            queue = metrics.queue_label(job.queue)
            metrics.JOBS_STARTED.labels(queue).inc()
            metrics.JOB_WAIT.labels(queue).observe(max(0.0, job.waited))

    def _job_thread(self, slot: int) -> None:
        while True:
            job = self.todo.get()
            if job is None:
                return
            self._run_job(job, slot)

    def _launcher_died(self) -> None:
        """Without its launcher the worker cannot start, end or even be sure of its jobs
        (whatever ran is now nobody's child). Record nothing: the master sweeps the slots as
        soon as this process is gone, and the leader recovers the attempts as lost once the
        lease runs out."""
        log.error("the job launcher (pid %s) died: exiting; the master kills what it left",
                  self.launcher.pid)
        logging.shutdown()
        os._exit(EXIT_LAUNCHER_DIED)

    # --- running one job ------------------------------------------------------------------

    def _run_job(self, job: Claimed, slot: int) -> None:
        settings = self.settings
        limits = self.box.limits_for(job.limits)
        execution = Execution(
            job.command,
            env=build_env({**self.box.env_for(self.launcher.uids[slot]), **job.env},
                          path=settings.path, job_id=job.id,
                          attempt=job.attempt),
            cwd=job.cwd or settings.cwd, launcher=self.launcher, slot=slot,
            shell=settings.shell, limits=self.box.rlimits(limits),
            timeout=job.timeout or settings.default_timeout, kill_grace=settings.kill_grace,
            max_output=settings.max_output_bytes,
            on_output=lambda data, offset: self._publish_output(job, data, offset))
        with self.lock:
            self.starting -= 1
            self.running[job.id] = (execution, job.attempt)
            if (job.id, job.attempt) in self.recent_cancels:
                execution.stop(EndReason.CANCELLED)
            elif self.hand_back_now.is_set() or self.lease_lapsed:
                execution.stop(EndReason.HANDED_BACK, kill_by=self._lease_kill_by())
        if self.log_jobs:
            job_log.info("%s: attempt %d started on worker %s",
                         job_label(job.id, job.name, job.queue), job.attempt, self.id)
        try:
            result = execution.run()
        except Exception as exc:  # never lose an attempt to a bug: record it as failed
            log.exception("job %s attempt %d crashed the executor", job.id, job.attempt)
            result = Result(exit_code=None, signal=None, output=b"", truncated=False,
                            reason=EndReason.SPAWN_FAILED, error=f"executor error: {exc}",
                            duration=0.0)
        metrics.JOB_RUN.labels(metrics.queue_label(job.queue)).observe(result.duration)
        if self.launcher.dead.is_set():
            self._launcher_died()
        if result.reason is None and result.exit_code != 0:
            killed = result.signal == signal.SIGKILL or result.exit_code == 128 + signal.SIGKILL
            why = self.box.explain(limits, result.exit_code, result.signal, result.output,
                                   oom_killed=killed and self.ooms.claim())
            if why:
                result.error = f"{result.error or f'exit code {result.exit_code}'}: {why}"
        self.results.put(self._outcome(job, result))
        with self.lock:
            del self.running[job.id]
            self.lock.notify_all()

    def _publish_output(self, job: Claimed, data: bytes, offset: int) -> None:
        try:
            self.queue.publish_output(job.id, job.attempt, offset, data)
        except Exception as exc:  # live output is a convenience; the record is in PostgreSQL
            log.debug("live output of %s not published: %s", job.id, exc)

    def _outcome(self, job: Claimed, result: Result) -> Outcome:
        """Decide what the attempt means for the job: success, retry, failure, hand-back."""
        # A death by signal N is stored as exit code -N (subprocess's convention).
        exit_code = result.exit_code if result.exit_code is not None else (
            -result.signal if result.signal else None)
        outcome = Outcome(job_id=job.id, attempt=job.attempt, status=JobStatus.SUCCEEDED,
                          exit_code=exit_code, output=result.output,
                          truncated=result.truncated, error=result.error, failed=False,
                          queue=job.queue, priority=job.priority, name=job.name,
                          duration=result.duration, notified=job.notified)
        if result.reason is EndReason.HANDED_BACK:
            outcome.status = JobStatus.PENDING
            outcome.error = str(EndReason.HANDED_BACK)
        elif result.reason is EndReason.CANCELLED:
            outcome.status = JobStatus.CANCELLED
        elif result.reason is None and result.exit_code == 0:
            pass
        else:
            outcome.failed = True
            failures = job.failures + 1
            if not outcome.error:
                outcome.error = f"exit code {exit_code}"
            if failures <= job.max_retries:
                delay = retry_delay(failures, self.settings.retry_backoff,
                                    self.settings.retry_backoff_max, random.random())
                outcome.status = JobStatus.PENDING
                outcome.run_at = datetime.now(timezone.utc) + timedelta(seconds=delay)
            else:
                outcome.status = JobStatus.FAILED
                outcome.dead = True
        return outcome

    # --- recording results ----------------------------------------------------------------

    def _write_results(self) -> None:
        """Record finished attempts in batches; nothing is dropped while PostgreSQL is down."""
        finished = False
        while not finished:
            first = self.results.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < WRITE_BATCH:
                try:
                    item = self.results.get_nowait()
                except queuemod.Empty:
                    break
                if item is None:
                    finished = True
                    break
                batch.append(item)
            # Retried as long as the worker runs (a PostgreSQL restart loses no result),
            # until `give_up` once it stops.
            if child.retry_forever("recording results", lambda: self._record(batch) or True,
                                   log, self.give_up) is None:
                self._unrecorded(batch, finished)
                return

    def _unrecorded(self, batch: list[Outcome], finished: bool) -> None:
        """Say which attempts' ends a stopping worker could not record. Their jobs stay
        RUNNING under this worker's lease; once it runs out, the leader recovers them and
        they run again (README, Guarantees)."""
        while not finished:
            item = self.results.get()
            if item is None:
                break
            batch.append(item)
        log.error("stopping without recording the end of %d attempt(s) (PostgreSQL did not "
                  "answer within %.0fs): %s; the leader recovers them when this worker's "
                  "lease runs out", len(batch), child.FINISH_GRACE,
                  ", ".join(f"{o.job_id} attempt {o.attempt}" for o in batch[:20]))

    def _record(self, batch: list[Outcome]) -> None:
        changed = self.store.finish(batch)
        events, retries = [], []
        for outcome in batch:
            count_outcome(outcome, outcome.job_id in changed)
            self._log_end(outcome, recorded=outcome.job_id in changed)
            if outcome.job_id not in changed:
                continue
            events.append((outcome.job_id, Event(
                "state", attempt=outcome.attempt, status=outcome.status,
                exit_code=outcome.exit_code, error=outcome.error)))
            if outcome.status is JobStatus.PENDING:
                retries.append(Ready(outcome.job_id, outcome.queue, outcome.priority,
                                     outcome.run_at))
        freed = {o.queue for o in batch if o.queue in self.limited}
        child.retry_forever("acknowledging in Redis", lambda: self.queue.ack(
            self.id, [o.job_id for o in batch], events=events, retries=retries, freed=freed),
            log, self.give_up, max_delay=2.0)

    def _log_end(self, outcome: Outcome, recorded: bool) -> None:
        """The job lines of a finished attempt, once its record is committed: the failure
        for good always (only when this worker's record is what dead-lettered the job: once
        per job), the attempt's end with `[dtsd] log_jobs`."""
        failed_for_good = recorded and outcome.dead
        if not (self.log_jobs or failed_for_good):    # the common case: nothing to format
            return
        label = job_label(outcome.job_id, outcome.name, outcome.queue)
        if self.log_jobs:
            self._log_attempt_end(label, outcome, recorded)
        if failed_for_good:
            job_log.error("%s failed for good at attempt %d: %s; dead-lettered", label,
                          outcome.attempt, outcome.error)

    @staticmethod
    def _log_attempt_end(label: str, outcome: Outcome, recorded: bool) -> None:
        if outcome.status is JobStatus.CANCELLED:
            fate = "cancelled"
        elif outcome.failed:
            fate = "failed"
        elif outcome.status is JobStatus.PENDING:
            fate = str(EndReason.HANDED_BACK)
        else:
            fate = "succeeded"
        if not recorded and outcome.status is not JobStatus.CANCELLED:
            fate += ", not recorded: the job was cancelled or recovered meanwhile"
        elif outcome.dead:
            fate += ", dead-lettered"
        elif outcome.failed and outcome.run_at:
            wait = (outcome.run_at - datetime.now(timezone.utc)).total_seconds()
            fate += f", retry in {max(0.0, wait):.1f}s"
        # A failure's error says why (`exit code 3`, `timeout after 5s`, `killed by ...`).
        detail = outcome.error if outcome.failed else (
            "no exit code" if outcome.exit_code is None else f"exit code {outcome.exit_code}")
        job_log.info("%s: attempt %d ended after %.3fs: %s; %s", label, outcome.attempt,
                     outcome.duration, fate, detail)

    # --- heartbeats and cancels -----------------------------------------------------------

    def _register(self) -> None:
        sent = time.monotonic()
        self.store.register_worker(self.id, self.cfg.node_id, self.ttl)
        self.lease_ok_at = sent

    def _renew(self) -> None:
        sent = time.monotonic()
        try:
            held = self.store.renew_lease(self.id, self.ttl)
        except Exception as exc:
            if backing.health.note(exc) is None:
                log.warning("lease renewal failed: %s", exc)
            return
        if not held:
            self._lease_gone()
            return
        self.lease_ok_at = sent
        if self.lease_lapsed:
            log.warning("lease renewed again; taking jobs again")
            self.lease_lapsed = False

    def _lease_kill_by(self) -> float | None:
        """While the lease is in doubt: by when (monotonic) the jobs must be dead, ahead of
        the moment the lease may run out (measured from when the last renewal was sent)."""
        if not self.lease_lapsed:
            return None
        return self.lease_ok_at + self.ttl - max(1.0, self.ttl / 5)

    def _guard_lease(self) -> None:
        """Hand running jobs back, by this worker's own clock, before its lease can run out."""
        while not self.done.wait(min(0.2, self.ttl / 10)):
            if self.lease_lapsed or time.monotonic() < self.lease_ok_at + self.ttl / 2:
                continue
            self.lease_lapsed = True
            kill_by = self._lease_kill_by()
            with self.lock:
                executions = [execution for execution, _ in self.running.values()]
            log.error("no lease renewal for %.1fs (heartbeat_ttl %.0fs): handing back %d "
                      "running job(s), killed within %.1fs", time.monotonic() - self.lease_ok_at,
                      self.ttl, len(executions), max(0.0, kill_by - time.monotonic()))
            for execution in executions:
                execution.stop(EndReason.HANDED_BACK, kill_by=kill_by)

    def _lease_gone(self) -> None:
        """The leader deleted this worker's lease: it declared the worker dead and recovered
        its jobs, which may run elsewhere already. Kill them now and stop."""
        log.error("this worker's lease is gone (the leader declared it dead): killing its "
                  "running jobs and stopping")
        self.exit_code = 1
        self.lease_lapsed = True
        self.stopping.set()
        self.hand_back_now.set()
        with self.lock:
            executions = [execution for execution, _ in self.running.values()]
        for execution in executions:
            execution.stop(EndReason.HANDED_BACK, kill_by=time.monotonic())

    def _beat(self) -> None:
        info = {"node": self.cfg.node_id, "pid": os.getpid(), "index": self.index,
                "queues": self.queues, "concurrency": self.concurrency,
                "running": len(self.running), "started": self.started, "seen": time.time()}
        self.queue.heartbeat(self.id, info, self.settings.heartbeat_ttl)

    def _heartbeats(self) -> None:
        interval = min(1.0, self.ttl / 3)
        while not self.done.wait(interval):
            self._renew()
            try:
                self._beat()    # for `dtsctl status`; the lease in PostgreSQL is what counts
            except Exception as exc:
                if backing.health.note(exc) is None:
                    log.warning("heartbeat to Redis failed: %s", exc)
            self.parent.alive()

    def _listen_for_cancels(self) -> None:
        while not self.done.is_set():
            try:
                pubsub = self.queue.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.queue.keys.cancel)
                while not self.done.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["type"] == "message":
                        self._on_cancel_message(message["data"])
            except Exception as exc:
                if backing.health.note(exc) is None:
                    log.warning("cancel channel lost: %s", exc)
                self.done.wait(1.0)

    def _on_cancel_message(self, data: bytes) -> None:
        """A cancel message names a job and attempt; PostgreSQL says whether it holds.
        Whoever can publish on Redis could send one: only a job the API cancelled is killed."""
        try:
            job_id, _, attempt_text = data.decode().partition(" ")
            attempt = int(attempt_text or 0)
        except (UnicodeDecodeError, ValueError):
            log.warning("ignored a malformed cancel message: %r", data[:100])
            return
        with self.lock:
            here = job_id in self.running or self.starting > 0
        if not here:
            return
        try:
            cancelled = self.store.cancelled(job_id, attempt)
        except Exception as exc:
            log.warning("cancel of %r not checked (PostgreSQL: %s); the next look at the job "
                        "ends it if it was cancelled", job_id, exc)
            return
        if not cancelled:
            log.warning("ignored a cancel message for job %r attempt %d: it was not cancelled",
                        job_id, attempt)
            return
        self._cancel(job_id, attempt)

    def _cancel(self, job_id: str, attempt: int) -> None:
        """Kill the attempt if it runs here; remember it briefly in case it is starting."""
        with self.lock:
            now = time.monotonic()
            self.recent_cancels[(job_id, attempt)] = now
            for key, when in list(self.recent_cancels.items()):
                if now - when > CANCEL_MEMORY:
                    del self.recent_cancels[key]
            execution, running_attempt = self.running.get(job_id, (None, 0))
        if execution and running_attempt == attempt:
            log.info("cancelling job %s attempt %d", job_id, attempt)
            execution.stop(EndReason.CANCELLED)


def count_outcome(outcome: Outcome, changed: bool) -> None:
    """dtsd_jobs_finished_total and dead letters, once the attempt is recorded. An attempt
    whose job row did not change was cancelled meanwhile (counted here as cancelled) or
    recovered by the leader as lost (counted there)."""
    queue = metrics.queue_label(outcome.queue)
    if outcome.status is JobStatus.CANCELLED:
        name = "cancelled"
    elif not changed:
        return
    elif outcome.status is JobStatus.SUCCEEDED:
        name = "succeeded"
    elif outcome.status is JobStatus.PENDING:
        name = "retried" if outcome.failed else "handed_back"
    else:
        name = "failed"
    metrics.JOBS_FINISHED.labels(queue, name).inc()
    if outcome.dead and changed:
        metrics.JOBS_DEAD_LETTERED.labels(queue).inc()


def main(argv: list[str] | None = None) -> int:
    cfg, index, parent = child.boot("worker", argv)
    try:
        box = JobBox.from_config(cfg)
        launcher = box.start_launcher(cfg.get("dtsd", "runtime_dir"), cfg.worker.concurrency)
    except (ConfigError, LauncherError) as exc:
        log.error("%s", exc)
        return child.EXIT_CONFIG
    # From here on the worker holds nothing: its launcher keeps what switching users takes.
    launchermod.keep_only(())
    return Worker(cfg, index, parent, box, launcher).run()


if __name__ == "__main__":
    sys.exit(main())
