"""Webhook notifications end to end: real dtsd processes POST to real HTTP receivers on
loopback ports, which record what they were sent (docs/notifications.md)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import psycopg
import pytest

from dtsd import checks, config
from dtsd.dtsdpb import pb, pb_grpc
from dtsd.models import InvalidField, NewJob, new_job_id, resolve_notify, validate_spec
from dtsd.notify import sign
from dtsd.store import Fence, Store
from tests.helpers import free_port, wait_for

SECRET = b"s3cret key"
FAST = {"worker": {"retry_backoff": "50ms", "retry_backoff_max": "200ms", "kill_grace": "1s",
                   "queues": "default reports"},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}
FINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
MAX_ATTEMPTS = 5


class Receiver:
    """An HTTP server on 127.0.0.1 that records every request and answers `status`
    (with a Location header when `location` is set). `start()` again after `stop()`
    listens on the same port."""

    def __init__(self, status: int = 200, location: str = ""):
        self.port = free_port()
        self.status, self.location = status, location
        self.requests: list[dict] = []
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "body": body})
                self.send_response(receiver.status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def deliveries(self) -> list[str]:
        return [r["headers"]["X-Dtsd-Delivery"] for r in self.requests]


@pytest.fixture
def hooks():
    """Receivers, each a target of the node: ok (200), err (500), elsewhere (200, where
    moved points), moved (302 to elsewhere) and down (not listening until a test starts it)."""
    made = {"ok": Receiver().start(), "err": Receiver(500).start(),
            "elsewhere": Receiver().start()}
    made["moved"] = Receiver(302, location=made["elsewhere"].url).start()
    made["down"] = Receiver()
    yield made
    for receiver in made.values():
        receiver.stop()


def node_settings(hooks, tmp_path: Path, **notify) -> dict:
    secret = tmp_path / "notify.key"
    secret.write_bytes(SECRET + b"\n")
    secret.chmod(0o600)
    return {**FAST, "notify": {
        "targets": " ".join(f"{name}={hook.url}" for name, hook in hooks.items()),
        "secret_file": str(secret), "timeout": "2s", "max_attempts": str(MAX_ATTEMPTS),
        "retry_backoff": "200ms", "retry_backoff_max": "400ms", **notify}}


@pytest.fixture
def node(dtsd_factory, hooks, tmp_path):
    return dtsd_factory(node_settings(hooks, tmp_path))


@pytest.fixture
def api(node):
    channel = grpc.insecure_channel(node.address)
    yield pb_grpc.SchedulerStub(channel)
    channel.close()


def submit(api, command, **spec) -> str:
    spec.setdefault("max_retries", 0)
    return api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command=command, **spec))).id


def wait_final(api, job_id, timeout=30):
    def final():
        job = api.GetJob(pb.GetJobRequest(id=job_id))
        return job if job.status in FINAL else None
    return wait_for(final, timeout=timeout, message=f"job {job_id} to finish")


def outbox(node) -> list[tuple]:
    with psycopg.connect(node.sections["postgres"]["dsn"]) as conn:
        return conn.execute("SELECT job_id, target, event, attempts, last_error "
                            "FROM notifications ORDER BY id").fetchall()


def posts(receiver: Receiver, count: int, timeout: float = 10) -> list[dict]:
    return wait_for(lambda: receiver.requests if len(receiver.requests) >= count else None,
                    timeout=timeout, message=f"{count} POST(s) to {receiver.url}")


def settle(node, seconds: float = 1.0) -> None:
    """Time for a delivery that should not happen to happen: the outbox is empty and
    stays so this long (the leader looks every 200 ms)."""
    wait_for(lambda: not outbox(node), timeout=10, message="the outbox to empty")
    time.sleep(seconds)


def test_a_job_that_failed_for_good_is_posted_once_with_a_signature(api, node, hooks):
    job_id = submit(api, "echo starting; echo boom >&2; exit 3", name="nightly",
                    queue="reports", notify=["ok"])
    job = wait_final(api, job_id)
    assert job.status == pb.FAILED and job.dead_lettered
    [request] = posts(hooks["ok"], 1)
    settle(node)
    assert len(hooks["ok"].requests) == 1
    headers, body = request["headers"], request["body"]
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Dtsd-Event"] == "failed"
    stamp = headers["X-Dtsd-Timestamp"]
    assert abs(int(stamp) - time.time()) < 60
    expected = "sha256=" + hmac.new(SECRET, stamp.encode() + b"." + body,
                                    hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Dtsd-Signature"], expected)
    document = json.loads(body)
    assert document["delivery_id"] == headers["X-Dtsd-Delivery"]
    assert {key: document[key] for key in ("event", "target", "job_id", "name", "queue",
                                           "status", "dead_lettered", "exit_code",
                                           "attempts", "output_tail", "output_truncated")} == {
        "event": "failed", "target": "ok", "job_id": job_id, "name": "nightly",
        "queue": "reports", "status": "FAILED", "dead_lettered": True, "exit_code": 3,
        "attempts": 1, "output_tail": "starting\nboom\n", "output_truncated": False}
    assert document["submitted_by"]
    for key in ("created_at", "started_at", "finished_at"):
        assert document[key].endswith("Z"), document[key]
        datetime.fromisoformat(document[key].replace("Z", "+00:00"))
    assert document["started_at"] <= document["finished_at"]


def test_a_success_is_posted_only_when_asked_for(api, node, hooks):
    quiet = submit(api, "true", notify=["ok"])
    loud = submit(api, "echo fine", notify=["ok"], notify_on=["succeeded"])
    assert wait_final(api, quiet).status == pb.SUCCEEDED
    assert wait_final(api, loud).status == pb.SUCCEEDED
    [request] = posts(hooks["ok"], 1)
    settle(node)
    assert len(hooks["ok"].requests) == 1
    document = json.loads(request["body"])
    assert (document["job_id"], document["event"], document["status"]) == (
        loud, "succeeded", "SUCCEEDED")
    job = api.GetJob(pb.GetJobRequest(id=loud))
    assert (list(job.spec.notify), list(job.spec.notify_on)) == (["ok"], ["succeeded"])
    # A job that names no targets, on a node with no [notify] default: nothing, not even
    # on failure.
    none = submit(api, "exit 1")
    assert wait_final(api, none).status == pb.FAILED
    settle(node, 0.5)
    assert len(hooks["ok"].requests) == 1


def test_the_ini_defaults_apply_to_jobs_that_name_nothing(dtsd_factory, hooks, tmp_path):
    node = dtsd_factory(node_settings(hooks, tmp_path, default="ok", on="failed,succeeded"))
    with grpc.insecure_channel(node.address) as channel:
        api = pb_grpc.SchedulerStub(channel)
        good, bad = submit(api, "true"), submit(api, "exit 4")
        # Its own events replace [notify] on; its own targets [notify] default.
        only_failed = submit(api, "true", notify_on=["failed"])
        elsewhere = submit(api, "exit 5", notify=["elsewhere"])
        for job_id in (good, bad, only_failed, elsewhere):
            wait_final(api, job_id)
        posts(hooks["ok"], 2)
        posts(hooks["elsewhere"], 1)
        settle(node)
        got = sorted((json.loads(r["body"])["job_id"], r["headers"]["X-Dtsd-Event"])
                     for r in hooks["ok"].requests)
        assert got == sorted([(good, "succeeded"), (bad, "failed")])
        assert [json.loads(r["body"])["job_id"] for r in hooks["elsewhere"].requests] == [
            elsewhere]
        job = api.GetJob(pb.GetJobRequest(id=good))
        assert (list(job.spec.notify), list(job.spec.notify_on)) == (
            ["ok"], ["failed", "succeeded"])


def test_a_receiver_that_was_down_gets_it_once_it_is_up(api, node, hooks):
    job_id = submit(api, "exit 1", notify=["down"])
    wait_final(api, job_id)
    [row] = wait_for(lambda: [r for r in outbox(node) if r[3] >= 2] or None, timeout=10,
                     message="two failed POSTs to the receiver that is down")
    assert row[:3] == (job_id, "down", "failed") and row[4], row
    hooks["down"].start()
    [request] = posts(hooks["down"], 1)
    settle(node)
    assert len(hooks["down"].requests) == 1
    assert json.loads(request["body"])["job_id"] == job_id


def test_a_receiver_answering_500_is_retried_then_given_up_with_one_error_line(api, node,
                                                                                hooks):
    job_id = submit(api, "exit 1", name="flaky", notify=["err"])
    wait_final(api, job_id)
    posts(hooks["err"], MAX_ATTEMPTS)
    wait_for(lambda: "gave up notifying" in node.log(), timeout=10,
             message="the give-up line in the log")
    settle(node)
    assert len(hooks["err"].requests) == MAX_ATTEMPTS
    assert len(set(hooks["err"].deliveries())) == 1       # the same delivery each time
    lines = [line for line in node.log().splitlines() if "gave up notifying" in line]
    assert len(lines) == 1, lines
    assert "ERROR" in lines[0] and job_id in lines[0] and "err" in lines[0]
    assert "HTTP 500" in lines[0] and f"after {MAX_ATTEMPTS} attempt" in lines[0]


def test_a_redirect_is_not_followed(api, node, hooks):
    job_id = submit(api, "exit 1", notify=["moved"])
    wait_final(api, job_id)
    posts(hooks["moved"], MAX_ATTEMPTS)
    wait_for(lambda: "gave up notifying" in node.log(), timeout=10,
             message="the give-up line in the log")
    assert hooks["elsewhere"].requests == []
    assert "redirects are not followed" in node.log()


def test_output_with_control_characters_and_bad_utf8_arrives_as_valid_json(api, node, hooks):
    job_id = submit(api, r"printf 'a\033[31mred\001\377\376b\000c\n'; exit 2", notify=["ok"])
    wait_final(api, job_id)
    [request] = posts(hooks["ok"], 1)
    document = json.loads(request["body"].decode("utf-8", errors="strict"))
    assert document["output_tail"] == "a\x1b[31mred\x01\ufffd\ufffdb\x00c\n"
    assert all(byte < 0x80 for byte in request["body"])    # every control character escaped


def test_only_the_last_4_kib_of_the_output_are_sent(api, node, hooks):
    job_id = submit(api, "head -c 10000 /dev/zero | tr '\\0' x; echo END; exit 1",
                    notify=["ok"])
    wait_final(api, job_id)
    [request] = posts(hooks["ok"], 1)
    document = json.loads(request["body"])
    assert len(document["output_tail"]) == 4096 and document["output_tail"].endswith("xEND\n")
    assert document["output_truncated"] is True


def test_unknown_targets_urls_and_events_are_refused_at_submit(api, hooks):
    for spec, named in ((dict(notify=["nope"]), "nope"),
                        (dict(notify=["http://169.254.169.254/"]), "http://169.254.169.254/"),
                        (dict(notify=["ok"], notify_on=["started"]), "started")):
        with pytest.raises(grpc.RpcError) as caught:
            submit(api, "true", **spec)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert named in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        api.SubmitJobs(pb.SubmitJobsRequest(jobs=[pb.JobSpec(command="true"),
                                                  pb.JobSpec(command="true", notify=["x"])]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "jobs[1].notify" in caught.value.details()


def test_a_schedule_notifies_for_its_runs(api, node, hooks):
    schedule = api.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(
        name="nightly", expression="0 3 * * *",
        job=pb.JobSpec(command="exit 6", max_retries=0, notify=["ok"]))))
    assert list(schedule.job.notify) == ["ok"]
    with pytest.raises(grpc.RpcError) as caught:
        api.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(
            name="other", expression="0 3 * * *",
            job=pb.JobSpec(command="true", notify=["missing"]))))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    job_id = api.TriggerSchedule(pb.ScheduleRef(name="nightly")).id
    wait_final(api, job_id)
    [request] = posts(hooks["ok"], 1)
    assert json.loads(request["body"])["job_id"] == job_id


def test_dtsctl_submit_takes_notify_and_notify_on(node, hooks):
    result = node.dtsctl("-o", "json", "submit", "--notify", "ok",
                         "--notify-on", "failed,succeeded", "--wait", "--", "true")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)["job"]
    assert (job["spec"]["notify"], job["spec"]["notify_on"]) == (["ok"],
                                                                  ["failed", "succeeded"])
    posts(hooks["ok"], 1)
    shown = node.dtsctl("status", job["id"])
    assert shown.returncode == 0, shown.stderr
    assert "Notify" in shown.stdout and "ok on failed, succeeded" in shown.stdout
    refused = node.dtsctl("submit", "--notify", "nope", "--", "true")
    assert refused.returncode == 1 and "unknown target 'nope'" in refused.stderr
    bad = node.dtsctl("submit", "--notify-on", "started", "--", "true")
    assert bad.returncode == 2 and "started" in bad.stderr


# --- the store: the leader's recovery notifies as the worker's finish does ------------------

@pytest.fixture
def store(pg_dsn: str):
    store = Store(pg_dsn).open()
    try:
        store.migrate()
        yield store
    finally:
        store.close()


def test_a_job_lost_with_no_retries_left_is_notified_in_the_recovery(store: Store, pg_dsn):
    store.register_worker("w1", "node", 60)
    jobs = [NewJob(id=new_job_id(), command="true", max_retries=0, notify=("a", "b"),
                   notify_on=("failed",)),
            NewJob(id=new_job_id(), command="true", max_retries=1, notify=("a",),
                   notify_on=("failed",)),
            NewJob(id=new_job_id(), command="true", max_retries=0)]
    store.insert_jobs(jobs)
    assert len(store.claim([job.id for job in jobs], "w1")) == 3
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE workers SET lease_until = now() - interval '1 s'")
    lost = store.recover_lost(Fence("default", 1, "n"), "w1", backoff=1, backoff_max=1)
    assert sorted(job.dead for job in lost) == [False, True, True]
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT job_id, target, event FROM notifications "
                            "ORDER BY target").fetchall()
    assert rows == [(jobs[0].id, "a", "failed"), (jobs[0].id, "b", "failed")]
    claimed = store.claim_notifications(Fence("default", 1, "n"), 10, 30)
    assert [(r["target"], r["attempts"], r["status"], r["dead_lettered"]) for r in claimed] == [
        ("a", 1, "FAILED", True), ("b", 1, "FAILED", True)]
    assert store.claim_notifications(Fence("default", 1, "n"), 10, 30) == []   # held


# --- configuration and validation -----------------------------------------------------------

def test_targets_are_checked_when_the_ini_is_read():
    good = config.parse("[notify]\ntargets = ops=https://hooks.example.com/dtsd "
                        "team=http://127.0.0.1:9000/hook\ndefault = ops\non = failed,succeeded\n")
    assert good.get("notify", "targets") == {"ops": "https://hooks.example.com/dtsd",
                                             "team": "http://127.0.0.1:9000/hook"}
    assert good.get("notify", "on") == ("failed", "succeeded")
    for text, problem in (("targets = ops=ftp://x/y", "not an http:// or https://"),
                          ("targets = ops=http:///path", "names no host"),
                          ("targets = Ops!=http://x/", "bad target name"),
                          ("targets = http://x/", "not NAME=URL"),
                          ("targets = ops=http://u:p@x/", "no user or password"),
                          ("targets = a=http://x/ a=http://y/", "named twice"),
                          ("targets = a=http://x/\ndefault = b", "not in [notify] targets"),
                          ("on = started", "unknown event")):
        with pytest.raises(config.ConfigError, match=problem.replace("[", r"\[")):
            config.parse(f"[notify]\n{text}\n")


def test_a_secret_file_readable_by_everyone_is_refused(tmp_path):
    secret = tmp_path / "key"
    secret.write_text("k")
    secret.chmod(0o644)
    cfg = config.parse(f"[notify]\nsecret_file = {secret}\n")
    error, _ = config.secrets_exposure(cfg)
    assert error and "[notify] secret_file" in error
    secret.chmod(0o640)
    assert config.secrets_exposure(cfg) == (None, None)
    # `dtsd --check-config` checks that dtsd's user can read it.
    assert ("[notify] secret_file", str(secret)) in checks.files_read(cfg)


def test_resolution_and_validation_of_a_jobs_notify_fields():
    job = validate_spec(command="true", notify=["ops", "ops"], targets={"ops"})
    assert job.notify == ("ops",)
    with pytest.raises(InvalidField, match="unknown target 'x'"):
        validate_spec(command="true", notify=["x"], targets={"ops"})
    assert resolve_notify(validate_spec(command="true"), ("ops",), ("failed",)).notify == ("ops",)
    bare = resolve_notify(validate_spec(command="true", notify_on=["succeeded"]), (), ("failed",))
    assert (bare.notify, bare.notify_on) == ((), ())
    # Fingerprints of jobs that name no targets are what they were before notifications.
    assert validate_spec(command="true").fingerprint() == NewJob(
        id="x", command="true").fingerprint()


def test_the_signature_is_over_the_timestamp_and_the_body():
    body = b'{"a":1}'
    assert sign(b"k", "1700000000", body) == "sha256=" + hmac.new(
        b"k", b"1700000000." + body, hashlib.sha256).hexdigest()


def test_a_reload_brings_new_targets_to_the_servers_and_the_leader(dtsd_factory, hooks,
                                                                   tmp_path):
    from tests.helpers import write_ini
    from tests.test_reload import reload_command
    first = {name: hook for name, hook in hooks.items() if name != "elsewhere"}
    node = dtsd_factory(node_settings(first, tmp_path))
    with grpc.insecure_channel(node.address) as channel:
        api = pb_grpc.SchedulerStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            submit(api, "exit 1", notify=["elsewhere"])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        node.sections["notify"] = node_settings(hooks, tmp_path)["notify"]
        write_ini(node.ini_path, node.sections)
        result = reload_command(node)
        assert result.returncode == 0, result
        job_id = submit(api, "exit 1", notify=["elsewhere"])
        wait_final(api, job_id)
        [request] = posts(hooks["elsewhere"], 1)
        assert json.loads(request["body"])["job_id"] == job_id
