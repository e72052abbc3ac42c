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


def test_max_pending_total_bounds_all_queues_together(dtsd_factory):
    """Finding: every new queue name got a fresh max_pending, and queues no worker serves
    were accepted, so what Redis held had no bound (one server grew from 84 to 194 MB)."""
    master = dtsd_factory(FAST, server={"max_pending": 100, "max_pending_total": 5,
                                        "processes": 1}, worker={"processes": 0})
    with grpc.insecure_channel(master.address) as channel:
        api = pb_grpc.SchedulerStub(channel)
        api.SubmitJobs(pb.SubmitJobsRequest(jobs=specs(3, queue="a")), timeout=10)
        api.SubmitJobs(pb.SubmitJobsRequest(jobs=specs(1, queue="b")), timeout=10)
        # A fresh queue name brings no fresh budget; a batch that would pass is refused whole.
        message = exhausted(api.SubmitJobs, pb.SubmitJobsRequest(jobs=specs(2, queue="c")))
        assert message == ("the queues hold 4 pending jobs together; 2 more would pass "
                           "[server] max_pending_total = 5")
        api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true", queue="nobody-serves")),
                      timeout=10)
        message = exhausted(api.SubmitJob,
                            pb.SubmitJobRequest(job=pb.JobSpec(command="true", queue="d")))
        assert message == ("the queues hold 5 pending jobs together "
                           "([server] max_pending_total = 5)")
        exhausted(seed_pb_grpc.JobServiceStub(channel).SubmitJob, seed_pb.Job(command="true"))
    assert stored(master) == 5


def test_cancelling_a_pending_job_takes_it_out_of_the_count(dtsd_factory, redis):
    """Finding: cancelled ids stayed in Redis and counted (4 real PENDING counted as 5)."""
    master = dtsd_factory(FAST, server={"max_pending": 5, "processes": 1},
                          worker={"processes": 0})
    with grpc.insecure_channel(master.address) as channel:
        api = pb_grpc.SchedulerStub(channel)
        ready = [job.id for job in api.SubmitJobs(
            pb.SubmitJobsRequest(jobs=specs(4)), timeout=10).jobs]
        later = pb.JobSpec(command="true")
        later.run_at.FromDatetime(datetime.now(timezone.utc) + timedelta(days=365))
        delayed = api.SubmitJob(pb.SubmitJobRequest(job=later), timeout=10).id
        exhausted(api.SubmitJob, pb.SubmitJobRequest(job=pb.JobSpec(command="true")))

        for job_id in (ready[1], delayed):
            api.CancelJob(pb.CancelJobRequest(id=job_id), timeout=10)
        client = redis.client()
        held = {i.decode() for i in client.smembers("dtsd:default:queued")}
        assert held == {ready[0], ready[2], ready[3]}
        assert [i.decode() for i in client.lrange("dtsd:default:queue:default:0", 0, -1)] == \
            [ready[0], ready[2], ready[3]]
        assert client.zcard("dtsd:default:delayed") == 0
        # Three PENDING: two places are free, and the third submit is refused again.
        api.SubmitJobs(pb.SubmitJobsRequest(jobs=specs(2)), timeout=10)
        message = exhausted(api.SubmitJob, pb.SubmitJobRequest(job=pb.JobSpec(command="true")))
        assert message == "queue 'default' holds 5 pending jobs ([server] max_pending = 5)"
    assert stored(master) == 7
