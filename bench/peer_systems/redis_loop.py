"""The ceiling for a Redis queue: a bare redis-py BLMOVE loop, no features.

    PEERS_BROKER_URL=... PEERS_RECORD_URL=... python redis_loop.py

One process: take a message to a processing list of its own (BLMOVE), run the job, LREM it,
record the finish. Start several for several executors. The submitter LPUSHes
"<job id> <submitted>".
"""

from __future__ import annotations

import os
import sys
import time

import redis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peer_systems import job  # noqa: E402

QUEUE = "loop:queue"


def work() -> None:
    broker = redis.Redis.from_url(os.environ[job.BROKER_URL_ENV])
    processing = f"loop:processing:{os.getpid()}"
    while True:
        message = broker.blmove(QUEUE, processing, 1, "RIGHT", "LEFT")
        if message is None:
            continue
        job_id, submitted = message.split()
        started = time.time()
        job.run_true()
        broker.lrem(processing, 1, message)
        job.record(int(job_id), float(submitted), started)


if __name__ == "__main__":
    work()
