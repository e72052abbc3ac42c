"""Submit jobs to one peer, one message per job, from one client thread.

    python submit.py SYSTEM JOBS [--rate JOBS_PER_S]

Imports and connects first, prints "ready" and waits for a line on stdin, so that the
orchestrator's clock and CPU count start at the first submit and not at Celery's import.
Then it sends job ids 0..JOBS-1, each with its own send time as the argument, as fast as
it can or one every 1/rate s, and prints "first <wall time of the first send>".
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sender(system: str) -> Callable[[int, float], None]:
    """A function that sends job `job_id` with its send time, for `system`."""
    if system == "redis-loop":
        import redis

        from peer_systems import job, redis_loop
        broker = redis.Redis.from_url(os.environ[job.BROKER_URL_ENV])
        broker.ping()
        return lambda job_id, now: broker.lpush(redis_loop.QUEUE, f"{job_id} {now!r}")
    if system == "dramatiq":
        from peer_systems import dramatiq_tasks
        dramatiq_tasks.run_job.broker.client.ping()
        return lambda job_id, now: dramatiq_tasks.run_job.send(job_id, now)
    if system == "celery":
        from peer_systems import celery_tasks
        with celery_tasks.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=3)
        return lambda job_id, now: celery_tasks.run_job.delay(job_id, now)
    raise SystemExit(f"submit.py: unknown system {system!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("system", choices=["redis-loop", "dramatiq", "celery"])
    parser.add_argument("jobs", type=int)
    parser.add_argument("--rate", type=float, default=0, help="jobs/s; 0: as fast as it can")
    args = parser.parse_args()

    send = sender(args.system)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("submit.py: the orchestrator went away")
    first = time.time()
    next_at = time.monotonic()
    for job_id in range(args.jobs):
        if args.rate:
            next_at += 1.0 / args.rate
            time.sleep(max(0.0, next_at - time.monotonic()))
        send(job_id, time.time())
    print(f"first {first!r}", flush=True)


if __name__ == "__main__":
    main()
