"""The job pipeline end to end: a real dtsd (master, servers, workers, coordinator) over a
private PostgreSQL and Redis, driven through its gRPC API."""

from __future__ import annotations

import os
import time
from concurrent import futures
from datetime import datetime, timedelta, timezone

import grpc
import psycopg
import pytest

from dtsd.dtsdpb import pb, pb_grpc, seed_pb, seed_pb_grpc
from tests.helpers import wait_for

FAST = {"worker": {"retry_backoff": "50ms", "retry_backoff_max": "200ms", "kill_grace": "1s"},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}

FINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


def merged(*dicts):
    out: dict = {}
    for d in dicts:
        for section, values in d.items():
            out.setdefault(section, {}).update(values)
    return out


@pytest.fixture
def dtsd(dtsd_factory):
    return dtsd_factory(FAST)


@pytest.fixture
def api(dtsd):
    channel = grpc.insecure_channel(dtsd.address)
    yield pb_grpc.SchedulerStub(channel)
    channel.close()


def submit(api, command, **spec):
    return api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command=command, **spec))).id


def wait_final(api, job_id, timeout=30):
    def final():
        job = api.GetJob(pb.GetJobRequest(id=job_id, include_attempts=True))
        return job if job.status in FINAL else None
    return wait_for(final, timeout=timeout, message=f"job {job_id} to finish")


def test_a_job_runs_and_its_output_is_kept_byte_exact(api):
    job = wait_final(api, submit(api, "echo hello; printf '\\377\\376' >&2; exit 0"))
    assert job.status == pb.SUCCEEDED
    assert job.exit_code == 0
    assert job.output == b"hello\n\xff\xfe"
    assert job.attempts == 1
    assert [a.number for a in job.attempt_history] == [1]
    assert job.attempt_history[0].output == b"hello\n\xff\xfe"
    assert job.started_at.seconds and job.finished_at.seconds


def test_a_job_gets_a_clean_environment_its_own_env_and_cwd(api, tmp_path):
    job = wait_final(api, submit(api, 'echo "$FOO $DTSD_JOB_ID $DTSD_ATTEMPT $(pwd)"; env | wc -l',
                                 env={"FOO": "bar"}, cwd=str(tmp_path)))
    first, count = job.output.decode().splitlines()
    assert first == f"bar {job.id} 1 {tmp_path}"
    assert int(count) < 12, job.output  # PATH, HOME, LANG, PWD, SHLVL, FOO, DTSD_*: no leaks


def test_a_batch_of_1000_runs_each_job_exactly_once(api, dtsd):
    specs = [pb.JobSpec(command=f"echo {i}", name=f"batch-{i}") for i in range(1000)]
    reply = api.SubmitJobs(pb.SubmitJobsRequest(jobs=specs))
    ids = [item.id for item in reply.jobs]
    assert len(set(ids)) == 1000 and all(item.created for item in reply.jobs)
    dsn = dtsd.sections["postgres"]["dsn"]

    def all_done():
        with psycopg.connect(dsn) as conn:
            return conn.execute("SELECT count(*) FROM jobs WHERE status = 'SUCCEEDED'"
                                ).fetchone()[0] == 1000
    wait_for(all_done, timeout=120, message="1000 jobs to succeed")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT name, convert_from(output, 'UTF8'), attempts FROM jobs").fetchall()
        attempts = conn.execute("SELECT count(*) FROM job_attempts").fetchone()[0]
    assert attempts == 1000
    assert all(output == f"{name.split('-')[1]}\n" and tries == 1 for name, output, tries in rows)


def test_a_job_failing_four_times_is_dead_lettered_and_requeue_runs_it_again(api, tmp_path):
    mark = tmp_path / "mark"
    job_id = submit(api, f"test -f {mark} || exit 7")
    job = wait_final(api, job_id)
    assert job.status == pb.FAILED
    assert job.exit_code == 7
    assert job.attempts == 4
    assert [a.exit_code for a in job.attempt_history] == [7, 7, 7, 7]
    assert job.dead_lettered
    dead = api.ListDeadLetters(pb.ListDeadLettersRequest())
    assert [j.id for j in dead.jobs] == [job_id]

    mark.touch()
    requeued = api.RequeueDeadLetters(pb.RequeueDeadLettersRequest(ids=[job_id]))
    assert list(requeued.ids) == [job_id]
    job = wait_final(api, job_id)
    assert job.status == pb.SUCCEEDED
    assert job.attempts == 5
    assert not job.dead_lettered
    assert not api.ListDeadLetters(pb.ListDeadLettersRequest()).jobs


def test_purge_empties_the_dead_letter_queue_but_keeps_the_record(api):
    job_id = submit(api, "exit 1", max_retries=0)
    assert wait_final(api, job_id).dead_lettered
    assert api.PurgeDeadLetters(pb.PurgeDeadLettersRequest()).purged == 1
    job = api.GetJob(pb.GetJobRequest(id=job_id))
    assert job.status == pb.FAILED and not job.dead_lettered


def test_retry_runs_a_failed_job_with_a_fresh_budget(api):
    job_id = submit(api, "exit 2", max_retries=0)
    assert wait_final(api, job_id).status == pb.FAILED
    assert api.RetryJob(pb.RetryJobRequest(id=job_id)).job.status in (pb.PENDING, pb.RUNNING, pb.FAILED)
    wait_for(lambda: api.GetJob(pb.GetJobRequest(id=job_id)).attempts == 2)
    with pytest.raises(grpc.RpcError) as err:
        api.RetryJob(pb.RetryJobRequest(id=submit(api, "sleep 5")))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_timeout_kills_the_whole_process_group(api, tmp_path):
    pidfile = tmp_path / "pid"
    job = wait_final(api, submit(api, f"sleep 300 & echo $! > {pidfile}; wait",
                                 timeout_seconds=0.5, max_retries=0))
    assert job.status == pb.FAILED
    assert "timeout" in job.error
    pid = int(pidfile.read_text())
    wait_for(lambda: not _alive(pid), timeout=5, message="the grandchild to be killed")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_cancel_reaches_a_running_job_within_a_second(api, tmp_path):
    pidfile = tmp_path / "pid"
    job_id = submit(api, f"sleep 300 & echo $! > {pidfile}; wait")
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), message="the job to start")
    pid = int(pidfile.read_text())
    started = time.monotonic()
    reply = api.CancelJob(pb.CancelJobRequest(id=job_id))
    assert (reply.previous_status, reply.status) == (pb.RUNNING, pb.CANCELLED)
    wait_for(lambda: not _alive(pid), timeout=1.0, message="the job's process group to die")
    assert time.monotonic() - started < 1.0
    job = wait_for(lambda: (j := api.GetJob(pb.GetJobRequest(id=job_id, include_attempts=True)))
                   .attempt_history[0].finished_at.seconds and j)
    assert job.status == pb.CANCELLED
    assert job.attempts == 1  # a cancel is never retried


def test_a_job_cancelled_while_running_can_be_retried(api, tmp_path):
    mark = tmp_path / "mark"
    job_id = submit(api, f"if test -f {mark}; then echo again; else touch {mark}; sleep 300; fi")
    wait_for(lambda: mark.exists())
    api.CancelJob(pb.CancelJobRequest(id=job_id))
    wait_for(lambda: api.GetJob(pb.GetJobRequest(id=job_id, include_attempts=True))
             .attempt_history[0].finished_at.seconds)
    api.RetryJob(pb.RetryJobRequest(id=job_id))
    job = wait_final(api, job_id)
    assert (job.status, job.output, job.attempts) == (pb.SUCCEEDED, b"again\n", 2)


def test_a_cancelled_running_job_keeps_the_output_it_wrote(dtsd, api, tmp_path):
    """As a job killed by its timeout does: the output of every ended attempt is kept
    (it was `Output: (none)` after a cancel)."""
    mark = tmp_path / "mark"
    job_id = submit(api, f"echo before the cancel; touch {mark}; sleep 300")
    wait_for(mark.exists, message="the job to write its output")
    api.CancelJob(pb.CancelJobRequest(id=job_id))
    job = wait_for(lambda: (j := api.GetJob(pb.GetJobRequest(id=job_id, include_attempts=True)))
                   .attempt_history[0].finished_at.seconds and j,
                   message="the cancelled attempt to be recorded")
    assert job.status == pb.CANCELLED and "cancel" in job.error
    assert job.output == b"before the cancel\n"
    assert job.attempt_history[0].output == job.output
    logs = dtsd.dtsctl("logs", job_id)
    assert (logs.returncode, logs.stdout) == (0, "before the cancel\n"), logs
    # A watch of it sends that output, then the final state.
    events = list(api.WatchJob(pb.WatchJobRequest(id=job_id), timeout=10))
    assert [(e.kind, e.output, e.status) for e in events] == [
        (pb.JobEvent.OUTPUT, b"before the cancel\n", 0),
        (pb.JobEvent.STATE, b"", pb.CANCELLED)]


def test_a_job_killed_by_a_signal_records_minus_the_signal(api):
    job = wait_final(api, submit(api, "kill -9 $$", max_retries=0))
    assert (job.status, job.exit_code) == (pb.FAILED, -9)
    assert "SIGKILL" in job.error


def test_cancel_of_a_pending_job_means_it_never_runs(dtsd_factory):
    master = dtsd_factory(FAST, worker={"processes": 0})
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))
    job_id = submit(api, "echo should-not-run")
    reply = api.CancelJob(pb.CancelJobRequest(id=job_id))
    assert (reply.previous_status, reply.status) == (pb.PENDING, pb.CANCELLED)
    again = api.CancelJob(pb.CancelJobRequest(id=job_id))
    assert again.status == pb.CANCELLED


def test_output_is_capped_and_flagged(dtsd_factory):
    master = dtsd_factory(FAST, worker={"max_output_bytes": "1KB"})
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))
    job = wait_final(api, submit(api, "head -c 200000 /dev/zero"))
    assert job.status == pb.SUCCEEDED
    assert job.output == b"\0" * 1024
    assert job.output_truncated


def test_delayed_jobs_start_no_earlier_than_run_at(api):
    run_at = datetime.now(timezone.utc) + timedelta(seconds=2)
    spec = pb.JobSpec(command="date +%s.%N")
    spec.run_at.FromDatetime(run_at.replace(tzinfo=None))
    job_id = api.SubmitJob(pb.SubmitJobRequest(job=spec)).id
    assert api.GetJob(pb.GetJobRequest(id=job_id)).status == pb.PENDING
    job = wait_final(api, job_id)
    assert float(job.output) >= run_at.timestamp()


def test_higher_priority_runs_first(dtsd_factory, tmp_path):
    master = dtsd_factory(FAST, worker={"processes": 1, "concurrency": 1})
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))
    gate = tmp_path / "gate"
    log = tmp_path / "order"
    blocker = submit(api, f"while ! test -f {gate}; do sleep 0.02; done")
    wait_for(lambda: api.GetJob(pb.GetJobRequest(id=blocker)).status == pb.RUNNING)
    specs = [pb.JobSpec(command=f"echo low{i} >> {log}", priority=0) for i in range(3)]
    specs += [pb.JobSpec(command=f"echo high{i} >> {log}", priority=9) for i in range(3)]
    ids = [j.id for j in api.SubmitJobs(pb.SubmitJobsRequest(jobs=specs)).jobs]
    gate.touch()
    for job_id in ids:
        wait_final(api, job_id)
    assert log.read_text().split() == ["high0", "high1", "high2", "low0", "low1", "low2"]


def test_idempotency_key_returns_the_same_job_and_refuses_a_different_spec(api):
    first = api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true", idempotency_key="k1")))
    again = api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true", idempotency_key="k1")))
    assert first.created and not again.created and again.id == first.id
    with pytest.raises(grpc.RpcError) as err:
        api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="false", idempotency_key="k1")))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "k1" in err.value.details()


def test_concurrent_submits_are_each_answered_as_if_alone(api, dtsd):
    """A server child serves SubmitJob calls that arrive together in one transaction
    (dtsd.combine); a call whose id or key conflicts must fail alone, with its own message,
    and every other call must be stored, answered and run."""
    taken = submit(api, "true", id="taken-id")
    keyed = api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true",
                                                             idempotency_key="shared")))
    specs = [pb.JobSpec(command=f"echo {n}") for n in range(60)]
    specs[7] = pb.JobSpec(command="true", id="taken-id")                       # conflicts
    specs[21] = pb.JobSpec(command="false", idempotency_key="shared")          # conflicts
    specs[33] = pb.JobSpec(command="true", idempotency_key="shared")           # a repeat
    specs[45] = pb.JobSpec(command="echo 45", id="chosen-id")                  # new, chosen
    answers: dict[int, object] = {}

    def one(n):
        try:
            answers[n] = api.SubmitJob(pb.SubmitJobRequest(job=specs[n]))
        except grpc.RpcError as exc:
            answers[n] = exc

    with futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(len(specs))))
    assert answers[7].code() == grpc.StatusCode.ALREADY_EXISTS
    assert "taken-id" in answers[7].details() and "jobs[" not in answers[7].details()
    assert answers[21].code() == grpc.StatusCode.ALREADY_EXISTS
    assert "shared" in answers[21].details()
    assert answers[33].id == keyed.id and not answers[33].created
    assert answers[45].id == "chosen-id" and answers[45].created
    fresh = [n for n in range(len(specs)) if n not in (7, 21, 33)]
    assert all(answers[n].created for n in fresh)
    assert len({answers[n].id for n in fresh}) == len(fresh)
    for n in fresh:
        job = wait_final(api, answers[n].id)
        assert job.status == pb.SUCCEEDED and job.output == f"{n}\n".encode()
        assert job.attempts == 1
    assert wait_final(api, taken).status == pb.SUCCEEDED
    with psycopg.connect(dtsd.sections["postgres"]["dsn"]) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == len(fresh) + 2


BAD_SPECS = [
    (dict(command=""), "command"),
    (dict(command="   "), "command"),
    (dict(command="echo a\0b"), "command"),
    (dict(command="x" * (64 * 1024 + 1)), "command"),
    (dict(command="true", env={"BAD-KEY": "1"}), "env"),
    (dict(command="true", env={"K": "v\0"}), "env[K]"),
    (dict(command="true", env={f"K{i}": "v" for i in range(300)}), "env"),
    (dict(command="true", priority=10), "priority"),
    (dict(command="true", priority=-1), "priority"),
    (dict(command="true", timeout_seconds=-1), "timeout_seconds"),
    (dict(command="true", queue="Bad Queue!"), "queue"),
    (dict(command="true", id="not a valid id"), "id"),
    (dict(command="true", cwd="relative/dir"), "cwd"),
    (dict(command="true", max_retries=-1), "max_retries"),
]


@pytest.mark.parametrize("spec,field", BAD_SPECS, ids=[f for _, f in BAD_SPECS])
def test_bad_input_is_refused_naming_the_field_and_nothing_is_stored(api, dtsd, spec, field):
    with pytest.raises(grpc.RpcError) as err:
        api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(**spec)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()
    # In a batch, one bad job refuses the whole batch.
    with pytest.raises(grpc.RpcError) as err:
        api.SubmitJobs(pb.SubmitJobsRequest(jobs=[pb.JobSpec(command="true"), pb.JobSpec(**spec)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"jobs[1].{field}:"), err.value.details()
    assert not api.ListJobs(pb.ListJobsRequest()).jobs


def test_malformed_ids_and_unknown_jobs(api):
    for call, request in ((api.GetJob, pb.GetJobRequest(id="bad id")),
                          (api.CancelJob, pb.CancelJobRequest(id="")),
                          (api.ListJobs, pb.ListJobsRequest(page_token="garbage!")),
                          (api.ListJobs, pb.ListJobsRequest(page_size=5000))):
        with pytest.raises(grpc.RpcError) as err:
            call(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        api.GetJob(pb.GetJobRequest(id="no-such-job"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="x" * (5 * 1024 * 1024))))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_list_filters_and_pages(api):
    ids = [submit(api, "true", name="alpha") for _ in range(5)]
    failed = submit(api, "exit 1", name="beta", max_retries=0)
    waiting = submit(api, "true", queue="other")       # no worker serves queue "other"
    for job_id in ids + [failed]:
        wait_final(api, job_id)
    by_name = api.ListJobs(pb.ListJobsRequest(name="alpha"))
    assert sorted(j.id for j in by_name.jobs) == sorted(ids)
    assert [j.id for j in api.ListJobs(pb.ListJobsRequest(statuses=[pb.FAILED])).jobs] == [failed]
    assert [j.id for j in api.ListJobs(pb.ListJobsRequest(queue="other")).jobs] == [waiting]
    pending = api.ListJobs(pb.ListJobsRequest(statuses=[pb.PENDING, pb.RUNNING]))
    assert [j.id for j in pending.jobs] == [waiting]
    seen, token = [], ""
    while True:
        page = api.ListJobs(pb.ListJobsRequest(page_size=2, page_token=token))
        seen += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(ids + [failed, waiting])
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    request = pb.ListJobsRequest()
    request.created_after.FromDatetime(later.replace(tzinfo=None))
    assert not api.ListJobs(request).jobs


def test_watch_streams_live_output_then_the_final_state(api):
    job_id = submit(api, "for i in 1 2 3; do echo line$i; sleep 0.3; done; exit 4", max_retries=0)
    output, states, first_output_at, finished_at = b"", [], None, None
    for event in api.WatchJob(pb.WatchJobRequest(id=job_id), timeout=30):
        if event.kind == pb.JobEvent.OUTPUT:
            assert event.offset == len(output)
            output += event.output
            first_output_at = first_output_at or time.monotonic()
        else:
            states.append(event.status)
            finished_at = time.monotonic()
    assert output == b"line1\nline2\nline3\n"
    assert states[-1] == pb.FAILED
    assert finished_at - first_output_at > 0.4  # the first line arrived while it still ran


def test_watch_of_a_finished_job_sends_its_output_and_state(api):
    job_id = submit(api, "echo done")
    wait_final(api, job_id)
    events = list(api.WatchJob(pb.WatchJobRequest(id=job_id), timeout=10))
    assert [e.kind for e in events] == [pb.JobEvent.OUTPUT, pb.JobEvent.STATE]
    assert events[0].output == b"done\n" and events[1].status == pb.SUCCEEDED


def test_watch_of_a_running_job_sends_its_state_first_and_the_final_state_last(api, tmp_path):
    """What the proto and docs/api.md (gRPC and HTTP) say of WatchJob, for both kinds of job."""
    mark = tmp_path / "mark"
    job_id = submit(api, f"touch {mark}; sleep 0.5; echo late; exit 3", max_retries=0)
    wait_for(mark.exists, message="the job to run")
    events = list(api.WatchJob(pb.WatchJobRequest(id=job_id), timeout=30))
    assert (events[0].kind, events[0].status) == (pb.JobEvent.STATE, pb.RUNNING), events[0]
    assert (events[-1].kind, events[-1].status, events[-1].exit_code) == (
        pb.JobEvent.STATE, pb.FAILED, 3), events[-1]
    assert b"".join(e.output for e in events if e.kind == pb.JobEvent.OUTPUT) == b"late\n"
    # Once final: the output, then the final state, and nothing after it.
    again = list(api.WatchJob(pb.WatchJobRequest(id=job_id), timeout=10))
    assert [(e.kind, e.status) for e in again] == [(pb.JobEvent.OUTPUT, 0),
                                                  (pb.JobEvent.STATE, pb.FAILED)]


def test_the_seed_surface_answers_on_the_same_port(dtsd):
    channel = grpc.insecure_channel(dtsd.address)
    jobs = seed_pb_grpc.JobServiceStub(channel)
    tasks = seed_pb_grpc.TaskSchedulerStub(channel)
    reply = jobs.SubmitJob(seed_pb.Job(command="printf 'ok \\377'"))
    assert reply.success and reply.job_id
    status = wait_for(lambda: (s := jobs.GetJobStatus(seed_pb.JobId(id=reply.job_id)))
                      .status == "SUCCEEDED" and s)
    assert status.output == "ok \ufffd"
    assert status.created_at > 1_700_000_000
    with pytest.raises(grpc.RpcError) as err:
        jobs.SubmitJob(seed_pb.Job(command="  "))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        jobs.GetJobStatus(seed_pb.JobId(id="missing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    start = int(time.time()) + 2
    task = tasks.SubmitTask(seed_pb.Task(name="later", command="date +%s", schedule_time=start))
    assert task.success
    done = wait_for(lambda: (s := tasks.GetTaskStatus(seed_pb.TaskId(id=task.task_id)))
                    .status == "COMPLETED" and s, timeout=30)
    assert int(done.result) >= start


def test_health_and_reflection_are_served(dtsd):
    from dtsd.health import health_pb2, health_pb2_grpc
    from dtsd.reflection import reflection_pb2, reflection_pb2_grpc
    channel = grpc.insecure_channel(dtsd.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "dtsd.v1.Scheduler", "scheduler.JobService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflection.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"dtsd.v1.Scheduler", "scheduler.JobService", "scheduler.TaskScheduler",
            "grpc.health.v1.Health"} <= names


def test_a_redis_restart_with_jobs_pending_loses_none(dtsd_factory, redis):
    master = dtsd_factory(FAST, worker={"processes": 1, "concurrency": 2})
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))
    reply = api.SubmitJobs(pb.SubmitJobsRequest(
        jobs=[pb.JobSpec(command=f"sleep 0.02; echo {i}") for i in range(200)]))
    ids = [j.id for j in reply.jobs]
    wait_for(lambda: any(api.GetJob(pb.GetJobRequest(id=i)).status == pb.SUCCEEDED for i in ids))
    redis.stop()
    redis.start()          # empty: every queued id is gone
    dsn = master.sections["postgres"]["dsn"]

    def all_done():
        with psycopg.connect(dsn) as conn:
            return conn.execute("SELECT count(*) FROM jobs WHERE status = 'SUCCEEDED'"
                                ).fetchone()[0] == 200
    wait_for(all_done, timeout=90, message="every job to succeed after the Redis restart")
    with psycopg.connect(dsn) as conn:
        successes = conn.execute("""SELECT job_id, count(*) FROM job_attempts
                                    WHERE exit_code = 0 GROUP BY job_id""").fetchall()
    assert len(successes) == 200


def test_a_job_committed_but_never_pushed_is_recovered(dtsd, api):
    """The crash window between the PostgreSQL commit and the Redis push."""
    dsn = dtsd.sections["postgres"]["dsn"]
    with psycopg.connect(dsn) as conn:
        conn.execute("""INSERT INTO jobs (id, command, updated_at)
                        VALUES ('orphan-1', 'echo recovered', now() - interval '1 minute')""")
    job = wait_final(api, "orphan-1", timeout=30)
    assert job.status == pb.SUCCEEDED and job.output == b"recovered\n"


def test_a_killed_worker_s_job_is_recovered_and_run_again(dtsd_factory, tmp_path):
    master = dtsd_factory(FAST, worker={"processes": 1, "heartbeat_ttl": "2s"})
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))
    first, pidfile = tmp_path / "first", tmp_path / "pid"
    job_id = submit(api, f"if test -f {first}; then echo second; else touch {first}; "
                         f"sleep 300 & echo $! > {pidfile}; wait; fi")
    job = wait_for(lambda: (j := api.GetJob(pb.GetJobRequest(id=job_id))).status == pb.RUNNING and j)
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip())
    worker_pid = int(job.worker.rsplit("-", 1)[1])
    os.kill(worker_pid, 9)
    # The first run must not go on beside the second: the master kills what the worker left.
    wait_for(lambda: not _alive(int(pidfile.read_text())), timeout=5,
             message="the dead worker's job to be killed")
    job = wait_final(api, job_id, timeout=60)
    assert job.status == pb.SUCCEEDED
    assert job.output == b"second\n"
    assert "lost" in api.GetJob(pb.GetJobRequest(id=job_id, include_attempts=True)).attempt_history[0].error
