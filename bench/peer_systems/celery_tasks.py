"""Celery with its Redis broker and no result backend: `celery -A peer_systems.celery_tasks worker`.

Everything else is Celery's default (prefork, prefetch multiplier 4, ack before the task).
"""

from __future__ import annotations

import os

from celery import Celery

from peer_systems import job

app = Celery("peers", broker=os.environ[job.BROKER_URL_ENV])
app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)


@app.task(name="peers.run_job")
def run_job(job_id: int, submitted: float) -> None:
    job.run_job(job_id, submitted)
