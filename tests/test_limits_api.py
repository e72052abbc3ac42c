"""Limits on what one client may push at a real dtsd: [server] max_pending per queue, and
[server] max_message_size per request. Both are answered RESOURCE_EXHAUSTED, store nothing,
and name the limit."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import grpc
import psycopg
import pytest

from dtsd.dtsdpb import pb, pb_grpc, seed_pb, seed_pb_grpc
from tests.helpers import wait_for

FAST = {"dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}


def stored(master) -> int:
    with psycopg.connect(master.sections["postgres"]["dsn"]) as conn:
        return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]


def exhausted(call, request) -> str:
    """Call, expect RESOURCE_EXHAUSTED, return its message."""
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    return err.value.details()


def specs(count: int, **fields) -> list[pb.JobSpec]:
    return [pb.JobSpec(command="true", **fields) for _ in range(count)]


def test_max_pending_refuses_the_sixth_job_and_a_batch_whole_until_jobs_run(dtsd_factory):
    master = dtsd_factory(FAST, server={"max_pending": 5, "processes": 1},
                          worker={"processes": 0})
    channel = grpc.insecure_channel(master.address)
    api = pb_grpc.SchedulerStub(channel)

    # Three ready and two delayed far in the future: delayed ones count (a flood of
    # jobs for next year must not get past the limit).
    api.SubmitJobs(pb.SubmitJobsRequest(jobs=specs(3)), timeout=10)
    later = datetime.now(timezone.utc) + timedelta(days=365)
    for _ in range(2):
        job = pb.JobSpec(command="true")
        job.run_at.FromDatetime(later)
        api.SubmitJob(pb.SubmitJobRequest(job=job), timeout=10)
    assert stored(master) == 5

    message = exhausted(api.SubmitJob, pb.SubmitJobRequest(job=pb.JobSpec(command="true")))
    assert message == "queue 'default' holds 5 pending jobs ([server] max_pending = 5)"
    # The seed's surfaces share the path.
    exhausted(seed_pb_grpc.JobServiceStub(channel).SubmitJob, seed_pb.Job(command="true"))
    exhausted(seed_pb_grpc.TaskSchedulerStub(channel).SubmitTask,
              seed_pb.Task(name="t", command="true"))
    assert stored(master) == 5

    # Another queue has its own count; a batch that would take it past the limit is
    # refused whole, even its jobs for a queue with room.
    api.SubmitJobs(pb.SubmitJobsRequest(jobs=specs(4, queue="other")), timeout=10)
    message = exhausted(api.SubmitJobs, pb.SubmitJobsRequest(
        jobs=[*specs(1, queue="third"), *specs(2, queue="other")]))
    assert message == ("queue 'other' holds 4 pending jobs; 2 more would pass "
                       "[server] max_pending = 5")
    assert stored(master) == 9
    api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true", queue="other")), timeout=10)
    assert stored(master) == 10

    # A second node with a worker runs the ready jobs of "default"; the two delayed ones
    # still count, so three places are free again.
    dtsd_factory(FAST, server={"processes": 1}, worker={"processes": 1})
    wait_for(lambda: api.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
             .job_counts["SUCCEEDED"] == 3, timeout=30, message="the 3 ready jobs to run")
    reply = api.SubmitJobs(pb.SubmitJobsRequest(jobs=specs(3)), timeout=10)
    assert len(reply.jobs) == 3
    wait_for(lambda: api.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
             .job_counts["SUCCEEDED"] == 6, timeout=30, message="the next 3 jobs to run")
    channel.close()


def test_max_pending_zero_is_no_limit(dtsd_factory):
    master = dtsd_factory(server={"max_pending": 0, "processes": 1}, worker={"processes": 0})
    with grpc.insecure_channel(master.address) as channel:
        api = pb_grpc.SchedulerStub(channel)
        for _ in range(3):
            api.SubmitJobs(pb.SubmitJobsRequest(jobs=specs(500)), timeout=30)
    assert stored(master) == 1500


def test_a_request_larger_than_max_message_size_is_refused(dtsd_factory):
    master = dtsd_factory(server={"max_message_size": "64KB", "processes": 1},
                          worker={"processes": 0})
    with grpc.insecure_channel(master.address) as channel:
        api = pb_grpc.SchedulerStub(channel)
        api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="x" * 60_000)), timeout=10)
        exhausted(api.SubmitJob, pb.SubmitJobRequest(job=pb.JobSpec(command="x" * 70_000)))
        exhausted(api.SubmitJobs, pb.SubmitJobsRequest(
            jobs=[pb.JobSpec(command="x" * 1000) for _ in range(100)]))
        exhausted(seed_pb_grpc.JobServiceStub(channel).SubmitJob,
                  seed_pb.Job(command="x" * 70_000))
        # The server is fine afterwards.
        api.GetJob(pb.GetJobRequest(id=api.SubmitJob(
            pb.SubmitJobRequest(job=pb.JobSpec(command="true")), timeout=10).id), timeout=10)
    assert stored(master) == 2
