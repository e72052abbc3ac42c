"""The job every peer runs, and the record each run leaves.

A record is one RPUSH per run to `DONE_KEY` in the record Redis (`PEERS_RECORD_URL`), never
the broker's: "<job id> <submitted> <started> <finished>", wall-clock seconds. `submitted`
is the submitter's clock just before it sent the message (the task's argument), `started`
the task body's first line, `finished` the worker's clock after the job. Throughput and
submit->start latency are computed from these alone, the same way for every peer.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import NamedTuple

import redis

DONE_KEY = "peers:done"
BROKER_URL_ENV = "PEERS_BROKER_URL"
RECORD_URL_ENV = "PEERS_RECORD_URL"

_clients: dict[int, redis.Redis] = {}


class Record(NamedTuple):
    job_id: int
    submitted: float
    started: float
    finished: float


def run_true() -> None:
    """The workload: what dtsd's worker does for `true`, minus its bookkeeping."""
    subprocess.run(["/bin/sh", "-c", "true"], capture_output=True, check=True)


def record(job_id: int, submitted: float, started: float) -> None:
    """Record one finished run. The client is per process: Celery's prefork pool forks
    after the app is imported, and a socket must not be shared across a fork."""
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = redis.Redis.from_url(os.environ[RECORD_URL_ENV])
    client.rpush(DONE_KEY, f"{job_id} {submitted!r} {started!r} {time.time()!r}")


def run_job(job_id: int, submitted: float) -> None:
    """The task body of Dramatiq and Celery. A failing `sh` raises before the record, so
    the orchestrator sees a job missing instead of a job done."""
    started = time.time()
    run_true()
    record(job_id, submitted, started)


def parse(raw: bytes) -> Record:
    job_id, submitted, started, finished = raw.split()
    return Record(int(job_id), float(submitted), float(started), float(finished))
