"""Queue controls and label selection against real servers: pause and resume a queue with
several workers, a pause that outlives a restart and a flushed Redis; labels on jobs and
schedules, `list --selector`, and the bulk cancel, retry and dead-letter requeue."""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest

from dtsd.dtsdpb import pb, pb_grpc
from dtsd.queue import Queue, Ready, connect
from tests.helpers import wait_for
from tests.test_pipeline import api, submit  # noqa: F401 (api: a fixture, over `dtsd` below)

FAST = {"worker": {"retry_backoff": "50ms", "retry_backoff_max": "200ms", "kill_grace": "1s",
                   "processes": 2, "concurrency": 2, "queues": "default,batch"},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def as_json(result: subprocess.CompletedProcess):
    return json.loads(ok(result))


@pytest.fixture
def dtsd(dtsd_factory):
    return dtsd_factory(FAST)


def status_of(api, job_id):
    return api.GetJob(pb.GetJobRequest(id=job_id)).status


def wait_status(api, job_id, wanted, timeout=30):
    wait_for(lambda: status_of(api, job_id) == wanted, timeout=timeout,
             message=lambda: f"job {job_id} to be {pb.JobStatus.Name(wanted)}, it is "
                             f"{pb.JobStatus.Name(status_of(api, job_id))}")


def queue_row(dtsd, name):
    rows = as_json(dtsd.dtsctl("-o", "json", "status"))["queues"]
    return next((row for row in rows if row["queue"] == name), None)


# --- the fetch, on a real Redis ---------------------------------------------------------------

def test_the_fetch_takes_nothing_from_a_paused_queue_and_resume_wakes_workers(redis):
    queue = Queue(connect(redis.url), "dtsd:t:")
    queue.push([Ready("a1", "a", 0), Ready("a2", "a", 9), Ready("b1", "b", 0)])
    queue.pause("a")
    assert queue.paused() == {"a"}
    assert [t.id for t in queue.fetch("w1", ["a", "b"], 10)] == ["b1"]
    assert queue.fetch("w1", ["a", "b"], 10) == []
    # The wake tokens of a's ids are gone (an idle worker took them and found a paused).
    queue.redis.delete(queue.keys.wake("a"))
    queue.resume("a")
    assert queue.paused() == set()
    assert queue.wait_for_work(["a"], timeout=0.1)      # resume left a token per ready id
    assert [(t.id, t.priority) for t in queue.fetch("w1", ["a", "b"], 10)] == [("a2", 9), ("a1", 0)]
    queue.set_paused(["x", "y"])
    assert queue.paused() == {"x", "y"}
    queue.set_paused([])
    assert queue.paused() == set()


# --- pause and resume against a real dtsd -----------------------------------------------------

def test_a_paused_queue_takes_no_new_job_while_others_run_and_resume_runs_them(dtsd, api):
    # A job the workers took before the pause runs on to its end.
    early = submit(api, "sleep 2; echo early", queue="batch")
    wait_status(api, early, pb.RUNNING)
    paused = as_json(dtsd.dtsctl("-o", "json", "queue", "pause", "batch"))
    assert paused["name"] == "batch" and paused["paused"] and paused["paused_at"]
    waiting = [submit(api, f"echo b{i}", queue="batch") for i in range(4)]
    others = [submit(api, f"echo d{i}", queue="default") for i in range(6)]
    for job_id in [early, *others]:
        wait_status(api, job_id, pb.SUCCEEDED)
    # Every worker slot was free again and the default queue drained: a batch job that
    # could have started has had its chance. One more round through the default queue.
    wait_status(api, submit(api, "echo later"), pb.SUCCEEDED)
    assert [status_of(api, job_id) for job_id in waiting] == [pb.PENDING] * 4

    assert queue_row(dtsd, "batch")["paused"] is True
    assert queue_row(dtsd, "batch")["pending"] == 4
    table = ok(dtsd.dtsctl("status"))
    assert any(line.split()[:2] == ["batch", "paused"] for line in table.splitlines()), table
    depths = {q.queue: q for q in api.ClusterStatus(pb.ClusterStatusRequest()).queues}
    assert depths["batch"].paused and not any(q.paused for q in depths.values() if q.queue != "batch")
    listed = as_json(dtsd.dtsctl("-o", "json", "queue", "list"))["queues"]
    assert {q["name"]: q["paused"] for q in listed} == {"batch": True, "default": False}

    resumed = as_json(dtsd.dtsctl("-o", "json", "queue", "resume", "batch"))
    assert resumed == {"name": "batch", "paused": False, "paused_by": None, "paused_at": None,
                       "max_running": None}
    for job_id in waiting:
        wait_status(api, job_id, pb.SUCCEEDED, timeout=10)
    assert queue_row(dtsd, "batch") is None or queue_row(dtsd, "batch")["paused"] is False


def test_a_pause_outlives_a_restart_and_a_flushed_redis(dtsd, api, redis):
    ok(dtsd.dtsctl("queue", "pause", "batch"))
    dtsd.stop()
    dtsd.start()
    waiting = submit(api, "echo waited", queue="batch")
    wait_status(api, submit(api, "echo runs"), pb.SUCCEEDED)
    assert status_of(api, waiting) == pb.PENDING

    # Redis loses everything: the leader rebuilds the paused set from PostgreSQL before it
    # pushes the lost PENDING job again, so the job comes back to Redis and still waits.
    client = redis.client()
    client.flushall()
    prefix = "dtsd:default:"
    wait_for(lambda: client.sismember(prefix + "paused", "batch"), timeout=10,
             message="the leader to restore the paused set")
    wait_for(lambda: client.sismember(prefix + "queued", waiting), timeout=10,
             message="the reconciler to push the PENDING job again")
    wait_status(api, submit(api, "echo runs too"), pb.SUCCEEDED)
    assert status_of(api, waiting) == pb.PENDING

    ok(dtsd.dtsctl("queue", "resume", "batch"))
    wait_status(api, waiting, pb.SUCCEEDED, timeout=10)


def test_queue_names_are_checked(dtsd, api):
    bad = dtsd.dtsctl("queue", "pause", "Not A Queue")
    assert bad.returncode == 2 and "NAME" in bad.stderr, bad.stderr
    with pytest.raises(grpc.RpcError) as caught:
        api.PauseQueue(pb.QueueRef(name="Bad/Name"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("name:")


def test_pausing_a_queue_needs_role_admin(dtsd_factory):
    submitter = dtsd_factory(FAST, server={"anonymous_role": "submit"},
                             worker={"processes": 1})
    denied = submitter.dtsctl("queue", "pause", "batch")
    assert denied.returncode == 4 and "PERMISSION_DENIED" in denied.stderr + denied.stdout, denied
    assert "admin" in denied.stderr
    assert as_json(submitter.dtsctl("-o", "json", "queue", "list"))["queues"] is not None


# --- max_running across the cluster -------------------------------------------------------------

def most_at_once(api, ids):
    """The most attempts of `ids` that ran at the same time, by their recorded times."""
    edges = []
    for job_id in ids:
        for attempt in api.GetJob(pb.GetJobRequest(id=job_id, include_attempts=True)
                                  ).attempt_history:
            start = attempt.started_at.ToNanoseconds()
            end = attempt.finished_at.ToNanoseconds()
            edges += [(start, 1), (end, -1)]
    running = most = 0
    for _, step in sorted(edges):       # an end at the same instant as a start goes first
        running += step
        most = max(most, running)
    return most


def test_max_running_holds_across_nodes_and_workers(dtsd_factory, etcd):
    cluster = {**FAST, "etcd": {"endpoints": etcd.endpoints, "lease_ttl": "2s"},
               "worker": {**FAST["worker"], "concurrency": 3}}
    nodes = [dtsd_factory(cluster) for _ in range(2)]      # 4 workers, 12 job slots
    channel = grpc.insecure_channel(nodes[1].address)
    api = pb_grpc.SchedulerStub(channel)
    limited = as_json(nodes[0].dtsctl("-o", "json", "queue", "limit", "batch", "2"))
    assert limited["max_running"] == 2
    shown = as_json(nodes[1].dtsctl("-o", "json", "queue", "list"))["queues"]
    assert {q["name"]: q["max_running"] for q in shown}["batch"] == 2
    ids = [submit(api, "sleep 0.4", queue="batch") for _ in range(10)]
    others = [submit(api, "sleep 0.4") for _ in range(8)]
    for job_id in ids + others:
        wait_status(api, job_id, pb.SUCCEEDED, timeout=60)
    assert most_at_once(api, ids) == 2
    assert most_at_once(api, others) > 2        # the default queue is not held back
    assert queue_row(nodes[0], "batch")["max_running"] == 2

    # Lifted: the queue fills the free slots again.
    ok(nodes[0].dtsctl("queue", "limit", "batch", "0"))
    ids = [submit(api, "sleep 0.4", queue="batch") for _ in range(8)]
    for job_id in ids:
        wait_status(api, job_id, pb.SUCCEEDED, timeout=60)
    assert most_at_once(api, ids) > 2
    bad = api.SetQueueLimit
    with pytest.raises(grpc.RpcError) as caught:
        bad(pb.QueueLimit(name="batch", max_running=-1))
    assert caught.value.details().startswith("max_running:")
    channel.close()


def test_a_limit_holds_while_redis_has_lost_its_mirror(dtsd, api, redis):
    """The plain claim takes no job of a limited queue: with the mirror gone (a flushed
    Redis, before the leader rebuilds it) the ids still go through the limited claim."""
    ok(dtsd.dtsctl("queue", "limit", "batch", "1"))
    client = redis.client()
    client.hdel("dtsd:default:limits", "batch")
    ids = [submit(api, "sleep 0.3", queue="batch") for _ in range(5)]
    for job_id in ids:
        wait_status(api, job_id, pb.SUCCEEDED, timeout=60)
    assert most_at_once(api, ids) == 1
