"""Prometheus metrics of one node: every process counts its own, the web child adds them up.

prometheus_client's multiprocess mode: each process of the node (the master and every
child) writes its samples to memory-mapped files in `<runtime_dir>/metrics` (mode 0700,
the daemon's user only: jobs run as other uids and cannot forge them), named by its pid.
The master empties the directory when it starts and tells its children where it is
(PROMETHEUS_MULTIPROC_DIR, which prometheus_client reads when it is imported). The web
child's `/metrics` reads them all and sums them:

- counters and histograms of a child that died stay in its files, so the node's sums never
  go backwards when a child is replaced; they restart from 0 only when the master does
  (Prometheus's `rate()` reads that as one counter reset);
- gauges are `livemax`: the master deletes a dead child's gauge file when it reaps it.

What only the stores know (queue depths, jobs by status, dead letters, whether each store
answers) is read when Prometheus scrapes, by the web child (`web.Scrape`).

Labels are bounded: no job ids, and queue names (chosen by whoever submits) are labels for
the first `MAX_QUEUE_LABELS` queues a process sees, then `_other`.
"""

from __future__ import annotations

import glob
import os
import shutil
import threading

from prometheus_client import Counter, Gauge, Histogram, values

ENV = "PROMETHEUS_MULTIPROC_DIR"
DIRECTORY = "metrics"            # under [dtsd] runtime_dir
MAX_QUEUE_LABELS = 100
OTHER = "_other"

# Seconds: most jobs take milliseconds to minutes; waits in a healthy queue are short.
RUN_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 3600)


def prepare(directory: str) -> None:
    """The master, at start: an empty directory only the daemon's user can open, named in
    the environment its children inherit, and used by the master's own metrics."""
    if os.path.isdir(directory) and not os.path.islink(directory):
        shutil.rmtree(directory)
    elif os.path.lexists(directory):
        os.unlink(directory)
    os.mkdir(directory, 0o700)
    os.chmod(directory, 0o700)
    os.environ[ENV] = directory
    # Values made from now on live in the files (the master's metrics all have labels,
    # so their values are made at first use, after this).
    values.ValueClass = values.MultiProcessValue()


def forget(pid: int) -> None:
    """A child is gone: its gauges go (its counters and histograms stay, see above)."""
    directory = os.environ.get(ENV)
    if not directory:
        return
    for path in glob.glob(os.path.join(directory, f"gauge_live*_{pid}.db")):
        try:
            os.unlink(path)
        except OSError:
            pass


_queues: set[str] = set()
_queues_lock = threading.Lock()


def queue_label(queue: str) -> str:
    """`queue` as a label value, or `_other` once this process has seen MAX_QUEUE_LABELS."""
    if queue in _queues:
        return queue
    with _queues_lock:
        if len(_queues) < MAX_QUEUE_LABELS:
            _queues.add(queue)
            return queue
    return OTHER


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    return Counter(name, doc, labels, registry=None)


def _histogram(name: str, doc: str, buckets, labels: tuple[str, ...] = ()) -> Histogram:
    return Histogram(name, doc, labels, buckets=buckets, registry=None)


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    return Gauge(name, doc, labels, registry=None, multiprocess_mode="livemax")


# Counter names are given without `_total`: prometheus_client adds it.
# --- jobs (servers and workers) ------------------------------------------------------------
JOBS_SUBMITTED = _counter("dtsd_jobs_submitted", "Jobs accepted by the API.", ("queue",))
JOBS_STARTED = _counter("dtsd_jobs_started", "Attempts started by workers.", ("queue",))
JOBS_FINISHED = _counter(
    "dtsd_jobs_finished",
    "Attempts ended, by outcome: succeeded, failed (for good: dead-lettered), retried "
    "(failed, will run again), cancelled, handed_back (the worker stopped; it runs again).",
    ("queue", "outcome"))
JOBS_DEAD_LETTERED = _counter(
    "dtsd_jobs_dead_lettered", "Jobs that failed for good and were dead-lettered.", ("queue",))
JOBS_LOST = _counter(
    "dtsd_jobs_lost", "Attempts lost with a dead worker, recovered by the leader.", ("queue",))
JOB_RUN = _histogram("dtsd_job_run_seconds", "Run time of ended attempts.", RUN_BUCKETS,
                     ("queue",))
JOB_WAIT = _histogram(
    "dtsd_job_queue_wait_seconds",
    "From when an attempt could run (submitted, its run_at, or its retry back-off over) "
    "to its start.", WAIT_BUCKETS, ("queue",))

# --- the leader (coordinator) ---------------------------------------------------------------
CRON_FIRED = _counter("dtsd_cron_slots_fired", "Cron slots fired by the leader.")
CRON_MISSED = _counter(
    "dtsd_cron_slots_missed",
    "Cron slots the leader did not fire: dropped by the schedule's misfire or overlap policy.")
CRON_LATENESS = _histogram("dtsd_cron_slot_lateness_seconds",
                           "How late each fired cron slot was fired.", LATENESS_BUCKETS)
LEADER = _gauge("dtsd_leader", "1 while this node's coordinator is the cluster's leader.")
FENCING_TOKEN = _gauge("dtsd_fencing_token",
                       "The fencing token of this node's leadership (0 when not leader).")
# Internal, not served: when the coordinator last heard from etcd (unix time), for the web
# child's readiness and its dtsd_store_up{store="etcd"}.
ETCD_POLLED = _gauge("dtsd_etcd_polled", "Unix time of the coordinator's last etcd poll.")

NOTIFICATIONS = _counter(
    "dtsd_notifications",
    "Webhook POSTs by target and result: delivered (2xx), failed (will be tried again), "
    "gave_up (max_attempts reached, the target is gone from [notify] targets, or the job "
    "is). Targets are the administrator's names, a bounded set.", ("target", "result"))

# --- the master ----------------------------------------------------------------------------
CHILDREN = _gauge("dtsd_children", "Children of this node by role and supervisor state.",
                  ("role", "state"))
CHILD_RESTARTS = _counter("dtsd_child_restarts",
                          "Children started again after they exited or were killed.", ("role",))

# --- the API (servers) ---------------------------------------------------------------------
GRPC_REQUESTS = _counter("dtsd_grpc_requests", "gRPC calls answered, by method and status code.",
                         ("method", "code"))
GRPC_DURATION = _histogram("dtsd_grpc_request_duration_seconds",
                           "Time to answer a unary gRPC call (streams are not timed).",
                           RPC_BUCKETS, ("method",))

# --- every process that talks to a store ------------------------------------------------------
STORE_ERRORS = _counter("dtsd_store_errors",
                        "Failed calls to a backing store, by store: postgres, redis, etcd.",
                        ("store",))

# The families served, name -> type (docs/monitoring.md lists them; the
# examples' tests check their rules and dashboard against this).
FAMILIES: dict[str, str] = {
    "dtsd_jobs_submitted_total": "counter",
    "dtsd_jobs_started_total": "counter",
    "dtsd_jobs_finished_total": "counter",
    "dtsd_jobs_dead_lettered_total": "counter",
    "dtsd_jobs_lost_total": "counter",
    "dtsd_job_run_seconds": "histogram",
    "dtsd_job_queue_wait_seconds": "histogram",
    "dtsd_cron_slots_fired_total": "counter",
    "dtsd_cron_slots_missed_total": "counter",
    "dtsd_cron_slot_lateness_seconds": "histogram",
    "dtsd_notifications_total": "counter",
    "dtsd_leader": "gauge",
    "dtsd_fencing_token": "gauge",
    "dtsd_children": "gauge",
    "dtsd_child_restarts_total": "counter",
    "dtsd_grpc_requests_total": "counter",
    "dtsd_grpc_request_duration_seconds": "histogram",
    "dtsd_store_errors_total": "counter",
    # read from the stores at scrape time (dtsd/web.py)
    "dtsd_queue_depth": "gauge",
    "dtsd_queue_delayed": "gauge",
    "dtsd_jobs": "gauge",
    "dtsd_dead_letters": "gauge",
    "dtsd_store_up": "gauge",
    "dtsd_build_info": "gauge",
}
