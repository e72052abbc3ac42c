"""Dramatiq with its Redis broker and default middleware: `dramatiq peer_systems.dramatiq_tasks`.

No retries: one message is one run, so a failed job shows as missing, not as done twice.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from peer_systems import job

dramatiq.set_broker(RedisBroker(url=os.environ[job.BROKER_URL_ENV]))


@dramatiq.actor(max_retries=0)
def run_job(job_id: int, submitted: float) -> None:
    job.run_job(job_id, submitted)
