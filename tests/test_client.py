"""The Python client `dtsd.client` against a real dtsd: what a program using it sees.

Also runs every Python example of docs/client.md as written, against a real dtsd, so
that the page cannot drift from the code.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import grpc
import pytest

from dtsd import client as client_module
from dtsd.client import (Attempt, Client, EventKind, FailedPrecondition,
                         InvalidArgument, Job, JobStatus, NotFound, PermissionDenied,
                         Unauthenticated, Unavailable, WaitTimeout)
from dtsd.v1 import dtsd_pb2
from tests.conftest import DtsdFactory
from tests.helpers import (REPO_ROOT, PostgresServer, clean_env, free_port, wait_for,
                           write_ini)
from tests.test_auth import add_token

FAST = {"worker": {"retry_backoff": "50ms", "retry_backoff_max": "200ms", "kill_grace": "1s"},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}


@pytest.fixture
def dtsd(dtsd_factory):
    return dtsd_factory(FAST)


@pytest.fixture
def client(dtsd):
    with Client([dtsd.address], timeout=10) as made:
        yield made


def running(client: Client, job_id: str) -> Job:
    return wait_for(lambda: (job := client.get(job_id)).status is JobStatus.RUNNING and job,
                    timeout=30)


# --- jobs ---------------------------------------------------------------------------------------

def test_submit_and_wait_give_the_output_exit_code_and_attempts(client):
    good = client.submit("printf 'hello\\n'", name="greet", labels={"team": "a"})
    assert good.created and len(good.id) == 36
    job = client.wait(good.id, timeout=60)
    assert isinstance(job, Job)
    assert (job.status, job.exit_code, job.output) == (JobStatus.SUCCEEDED, 0, b"hello\n")
    assert job.name == "greet" and job.labels == {"team": "a"} and job.final
    assert [type(a) for a in job.attempt_history] == [Attempt]
    assert job.attempt_history[0].output == b"hello\n"
    assert job.created_at is not None and job.created_at.tzinfo is not None
    assert job.raw.id == good.id                      # the message it came from

    bad = client.submit("echo no; exit 7", max_retries=0, timeout_seconds=30,
                        limits={"open_files": 64}, env={"A": "b"})
    failed = client.wait(bad.id, timeout=60)
    assert (failed.status, failed.exit_code, failed.output) == (JobStatus.FAILED, 7, b"no\n")
    assert failed.dead_lettered and failed.attempts == 1
    assert failed.spec.max_retries == 0 and failed.spec.limits == {"open_files": 64}
    assert failed.spec.env == {"A": "b"}


def test_an_idempotent_repeat_and_a_ready_spec(client):
    spec = dtsd_pb2.JobSpec(command="true", name="from-spec", priority=5)
    first = client.submit(spec=spec, idempotency_key="k-1")
    again = client.submit(spec=spec, idempotency_key="k-1")
    assert first.created and not again.created and again.id == first.id
    job = client.get(first.id)
    assert (job.name, job.spec.priority, job.spec.idempotency_key) == ("from-spec", 5, "k-1")
    # the keyword arguments are laid over the spec, which is copied, not changed
    other = client.get(client.submit(spec=spec, name="renamed").id)
    assert other.name == "renamed" and spec.name == "from-spec"


def test_submit_many_stores_all_or_none(client):
    results = client.submit_many([{"command": "echo one", "name": "b1"},
                                  dtsd_pb2.JobSpec(command="echo two", name="b2")])
    outputs = [client.wait(result.id, timeout=60).output for result in results]
    assert outputs == [b"one\n", b"two\n"]
    before = len(list(client.list()))
    with pytest.raises(InvalidArgument) as caught:
        client.submit_many([{"command": "true"}, {"command": "true", "priority": 42}])
    assert caught.value.field == "jobs[1].priority"
    assert len(list(client.list())) == before        # the good one was not stored either


def test_list_walks_the_pages_and_filters(client):
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    ids = [client.submit("true", name=f"p{i}", labels={"team": "a" if i % 2 else "b"}).id
           for i in range(5)]
    for job_id in ids:
        client.wait(job_id, timeout=60)
    failed = client.submit("false", name="odd", max_retries=0).id
    client.wait(failed, timeout=60)

    page = client.list_page(page_size=2)
    assert len(page.jobs) == 2 and page.next_page_token
    assert [job.id for job in client.list(page_size=2)] == [failed, *reversed(ids)]
    assert {job.id for job in client.list(selector="team=a", page_size=1)} == {ids[1], ids[3]}
    assert [job.id for job in client.list(statuses=[JobStatus.FAILED])] == [failed]
    assert [job.id for job in client.list(statuses=["failed"], name="odd")] == [failed]
    assert len(list(client.list(since=since))) == 6
    assert list(client.list(until=since)) == []
    assert list(client.list(queue="elsewhere")) == []


def test_watch_gets_the_output_while_the_job_runs(client, tmp_path):
    mark = tmp_path / "go-on"
    # waits for the mark at most 10 s: output that came only at the end would leave it
    job_id = client.submit(f"echo first; for i in $(seq 200); do [ -e {mark} ] && break; "
                           "sleep 0.05; done; echo second").id
    seen: list[bytes] = []
    states = []
    for event in client.watch(job_id):
        if event.kind is EventKind.OUTPUT:
            seen.append(event.output)
            if b"first" in event.output and not mark.exists():
                # the job waits for the mark: this chunk came while it ran
                assert client.get(job_id).status is JobStatus.RUNNING
                mark.touch()
        else:
            states.append(event.status)
    assert b"".join(seen) == b"first\nsecond\n"
    assert mark.exists() and states[-1] is JobStatus.SUCCEEDED


def test_wait_follows_the_output_and_gives_up_at_its_timeout(client, tmp_path):
    chunks: list[tuple[int, int, bytes]] = []
    job_id = client.submit("echo a; echo b").id
    job = client.wait(job_id, timeout=60, on_output=lambda *chunk: chunks.append(chunk))
    assert job.output == b"a\nb\n"
    assert b"".join(chunk for _, _, chunk in chunks) == b"a\nb\n"
    assert {attempt for attempt, _, _ in chunks} == {1}

    slow = client.submit("sleep 60").id
    started = datetime.now(timezone.utc)
    with pytest.raises(WaitTimeout) as caught:
        client.wait(slow, timeout=1.0)
    assert datetime.now(timezone.utc) - started < timedelta(seconds=5)
    assert caught.value.job is not None and not caught.value.job.final
    assert isinstance(caught.value, TimeoutError)
    client.cancel(slow)


def test_cancel_and_retry(client):
    job_id = client.submit("sleep 60", max_retries=0).id
    running(client, job_id)
    cancelled = client.cancel(job_id)
    assert (cancelled.previous_status, cancelled.status) == (JobStatus.RUNNING,
                                                             JobStatus.CANCELLED)
    assert client.wait(job_id, timeout=30).status is JobStatus.CANCELLED
    repeated = client.cancel(job_id)              # a final job stays as it is
    assert (repeated.previous_status, repeated.status) == (JobStatus.CANCELLED,
                                                           JobStatus.CANCELLED)
    again = client.retry(job_id)
    assert again.status in (JobStatus.PENDING, JobStatus.RUNNING)
    with pytest.raises(FailedPrecondition):
        client.retry(job_id)                      # not FAILED or CANCELLED now
    client.cancel(job_id)


def test_selections_cancel_and_retry_many(client):
    ids = [client.submit("sleep 60", labels={"run": "bulk"}).id for _ in range(3)]
    other = client.submit("sleep 60").id
    counted = client.cancel_many(selector="run=bulk", dry_run=True)
    assert (counted.matched, counted.changed) == (3, 0)
    done = client.cancel_many(selector="run=bulk")
    assert done.changed == 3 and not done.more
    assert all(client.wait(job_id, timeout=30).status is JobStatus.CANCELLED for job_id in ids)
    assert client.get(other).status in (JobStatus.PENDING, JobStatus.RUNNING)
    assert client.retry_many(selector="run=bulk", statuses=[JobStatus.CANCELLED],
                             limit=2).changed == 2
    client.cancel_many(selector="run=bulk")
    client.cancel(other)


def test_dead_letters_requeue_and_purge(client):
    first = client.submit("false", max_retries=0).id
    second = client.submit("false", max_retries=0).id
    for job_id in (first, second):
        client.wait(job_id, timeout=60)
    assert {job.id for job in client.dead_letters()} == {first, second}
    assert client.requeue_dead_letters([first]) == [first]
    wait_for(lambda: client.get(first).attempts == 2 and client.get(first).final, timeout=30)
    assert client.purge_dead_letters([second]) == 1
    assert client.get(second).status is JobStatus.FAILED     # its record stays
    assert second not in {job.id for job in client.dead_letters()}


def test_schedules(client):
    made = client.create_schedule("nightly", "30 2 * * *", "echo cron", timezone="UTC",
                                  labels={"team": "a"}, overlap="forbid")
    assert made.name == "nightly" and made.job.command == "echo cron"
    assert made.overlap is client_module.Overlap.FORBID and made.job.labels == {"team": "a"}
    assert made.next_fire_time is not None and made.next_fire_time.hour == 2
    assert [slot.at.minute for slot in client.preview_schedule("nightly", count=3)] == [30] * 3
    assert len(client.preview_schedule(expression="*/5 * * * *", count=4)) == 4
    assert client.pause_schedule("nightly").paused
    assert not client.resume_schedule("nightly").paused
    fired = client.trigger_schedule("nightly")
    assert client.wait(fired.id, timeout=60).output == b"cron\n"
    assert [job.id for job in client.list(schedule="nightly")] == [fired.id]
    assert [s.name for s in client.schedules()] == ["nightly"]
    with pytest.raises(client_module.AlreadyExists):
        client.create_schedule("nightly", "@hourly", "true")
    client.delete_schedule("nightly")
    with pytest.raises(NotFound):
        client.pause_schedule("nightly")


def test_cluster_status_and_queues(client):
    client.wait(client.submit("true").id, timeout=60)
    status = client.cluster_status()
    assert status.single_node and status.nodes[0].node_id == "test-1"
    assert status.workers and status.job_counts[JobStatus.SUCCEEDED] >= 1
    paused = client.pause_queue("batch")
    assert paused.paused and paused.name == "batch"
    assert client.limit_queue("batch", 3).max_running == 3
    assert {q.name: q.paused for q in client.queues()}["batch"] is True
    assert not client.resume_queue("batch").paused


# --- errors -------------------------------------------------------------------------------------

def test_errors_map_to_exceptions_with_the_server_s_message(client, dtsd):
    with pytest.raises(InvalidArgument) as caught:
        client.submit("true", priority=42)
    assert caught.value.field == "priority"
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "priority" in caught.value.details and caught.value.server == dtsd.address
    with pytest.raises(InvalidArgument) as caught:
        client.submit("true", labels={"team": "bad value!"})
    assert caught.value.field == "labels[team]"
    with pytest.raises(InvalidArgument) as caught:
        list(client.list(selector="team in (a"))
    assert caught.value.field == "selector"
    with pytest.raises(NotFound) as missing:
        client.get("no-such-job")
    assert "no-such-job" in missing.value.details
    with pytest.raises(NotFound):
        list(client.watch("no-such-job"))
    with pytest.raises(NotFound):
        client.wait("no-such-job", timeout=5)
    with pytest.raises(TypeError):
        client.submit("true", no_such_field=1)       # a field the proto does not have


def test_no_server_is_unavailable_naming_what_was_tried():
    servers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with Client(servers, timeout=2) as nowhere:
        with pytest.raises(Unavailable) as caught:
            nowhere.get("x")
    assert sorted(caught.value.tried) == sorted(servers)
    assert caught.value.store is None and isinstance(caught.value, ConnectionError)


def test_spec_fields_pass_through_as_given():
    """New JobSpec fields (added by others to the proto) need no code in the client: a
    ready spec keeps every field, and a keyword names any field of the message."""
    run_at = datetime(2030, 1, 2, 3, 4, 5, 600000, tzinfo=timezone.utc)
    spec = client_module.build_spec("true", spec=dtsd_pb2.JobSpec(name="n", cwd="/tmp"),
                                    run_at=run_at, limits={"memory": 1 << 30},
                                    notify_on=["failed"], timeout_seconds=timedelta(minutes=2),
                                    **{"idempotency_key": "k"})
    assert (spec.name, spec.cwd, spec.command, spec.idempotency_key) == ("n", "/tmp", "true", "k")
    assert spec.limits.memory_bytes == 1 << 30 and list(spec.notify_on) == ["failed"]
    assert spec.timeout_seconds == 120.0
    assert client_module.JobSpec.from_proto(spec).run_at == run_at
    assert not spec.HasField("max_retries")               # unset stays unset
    with pytest.raises(ValueError):
        client_module.build_spec("true", run_at=datetime(2030, 1, 1))   # no time zone
    with pytest.raises(InvalidArgument) as caught:
        client_module.build_spec("true", limits={"bogus": 1})
    assert caught.value.field == "limits"


def test_a_store_down_is_unavailable_naming_it(request, redis):
    """The server answers that it cannot reach PostgreSQL: that is what the client says,
    not "no connection"."""
    own = PostgresServer()
    try:
        own.start()
        factory = DtsdFactory(request, own.create_database(f"t_{secrets.token_hex(6)}"), redis)
        try:
            master = factory(FAST)
            with Client([master.address], timeout=10) as connected:
                assert connected.submit("true").created
                own.stop()
                with pytest.raises(Unavailable) as caught:
                    connected.submit("true")
        finally:
            factory.stop_all()
    finally:
        own.cleanup()
    assert caught.value.store == "postgres", caught.value.details
    assert caught.value.details.startswith("PostgreSQL")
    assert caught.value.server == master.address


def test_a_status_this_client_does_not_know_is_none_not_a_crash():
    """A newer server may send a status added after this client: the job still reads."""
    job = Job.from_proto(dtsd_pb2.Job(id="x", status=99))
    assert (job.status, job.raw_status, job.final) == (None, "99", False)
    known = Job.from_proto(dtsd_pb2.Job(id="y", status=dtsd_pb2.SUCCEEDED))
    assert (known.status, known.raw_status, known.final) == (JobStatus.SUCCEEDED, "SUCCEEDED",
                                                             True)
    event = client_module.JobEvent.from_proto(dtsd_pb2.JobEvent(kind=dtsd_pb2.JobEvent.STATE,
                                                                status=99))
    assert event.status is None and not event.final


# --- credentials, as dtsctl reads them ------------------------------------------------------------

@pytest.fixture
def secured(dtsd_factory, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# no tokens yet\n")
    return dtsd_factory({"server": {"tokens_file": str(tokens), "processes": 1},
                         "worker": {"processes": 1}})


def test_from_config_reads_servers_and_token_file_like_dtsctl(secured, tmp_path, monkeypatch):
    submitter = add_token(secured, "ci-bot", "submit")
    reader = add_token(secured, "reader", "read")
    token_file = tmp_path / "token"
    token_file.write_text(f"\n{submitter}\n")
    ini = tmp_path / "client.ini"
    write_ini(ini, {"client": {"servers": secured.address, "token_file": str(token_file),
                               "timeout": "7s"}})
    for name in ("DTSD_SERVERS", "SERVERS", "DTSD_TOKEN", "DTSD_TOKEN_FILE", "DTSD_CONFIG",
                 "SUBMIT_SERVER", "STATUS_SERVERS"):
        monkeypatch.delenv(name, raising=False)

    with Client.from_config(str(ini)) as configured:
        assert configured.servers == [secured.address] and configured.timeout == 7.0
        job = configured.wait(configured.submit("echo via config").id, timeout=60)
        assert job.output == b"via config\n" and job.submitted_by.startswith("token:ci-bot@")
    # $DTSD_CONFIG, as dtsctl reads it; Client() with no servers does the same
    monkeypatch.setenv("DTSD_CONFIG", str(ini))
    with Client() as implicit:
        assert implicit.get(job.id).id == job.id
    # the environment beats the file, an argument beats the environment
    monkeypatch.setenv("DTSD_TOKEN", reader)
    with Client.from_config() as as_reader:
        assert as_reader.get(job.id).id == job.id
        with pytest.raises(PermissionDenied) as denied:
            as_reader.submit("true")
        assert denied.value.code is grpc.StatusCode.PERMISSION_DENIED
        assert not isinstance(denied.value, Unauthenticated)
    with Client.from_config(token=submitter) as chosen:
        assert chosen.submit("true").created
    with Client.from_config(token="dtsd_not-a-token") as stranger:
        with pytest.raises(Unauthenticated):
            stranger.list_page()
    # and dtsctl, given the same file, agrees
    shown = subprocess.run([sys.executable, "-m", "dtsd.cli", "-c", str(ini), "-o", "json",
                            "status", job.id], capture_output=True, text=True, cwd=REPO_ROOT,
                           env=clean_env({"PYTHONPATH": str(REPO_ROOT)}), timeout=60)
    assert shown.returncode == 0 and job.id in shown.stdout, shown.stderr


def test_a_bad_token_file_is_a_configuration_error(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(client_module.ConfigurationError) as caught:
        Client.from_config(servers=["127.0.0.1:1"], token_file=str(empty), env={})
    assert "is empty" in str(caught.value) and caught.value.reason == "usage"
    with pytest.raises(client_module.ConfigurationError):
        Client.from_config(servers=["127.0.0.1:1"], env={"DTSD_SERVERS": "nocolon"},
                           config_path=str(tmp_path / "absent.ini"))


# --- the examples of docs/client.md ------------------------------------------------------------

PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def doc_examples() -> list[str]:
    return PYTHON_BLOCK.findall((REPO_ROOT / "docs" / "client.md").read_text())


def test_the_page_has_the_examples_it_promises():
    text = "\n".join(doc_examples())
    for call in ("submit(", "wait(", "submit_many(", "watch(", "selector=", "create_schedule(",
                 "except InvalidArgument", "from_config("):
        assert call in text


def test_docs_examples_run(dtsd):
    """Each block in its own interpreter, in the page's order, against one dtsd."""
    for number, code in enumerate(doc_examples(), 1):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                cwd=REPO_ROOT, timeout=120,
                                env=clean_env({"PYTHONPATH": str(REPO_ROOT),
                                               "DTSD_SERVERS": dtsd.address}))
        assert result.returncode == 0, (f"docs/client.md, python block {number}:\n{code}\n"
                                        f"{result.stdout}{result.stderr}")
        assert "Traceback" not in result.stderr
