"""Tokens and roles against a real dtsd, the method table, and the exposure rule."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import pytest

from dtsd import auth
from dtsd.dtsdpb import pb, seed_pb, seed_pb_grpc
from dtsd.health import health_pb2
from dtsd.reflection import reflection_pb2
from tests.helpers import (REPO_ROOT, clean_env, free_port, health_status, wait_for,
                           write_ini)

SERVING = health_pb2.HealthCheckResponse.SERVING


def dtsd_cli(*args: str, config: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dtsd", *args, "-c", config],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                          env=clean_env({"PYTHONPATH": str(REPO_ROOT)}),
                          stdin=subprocess.DEVNULL)


def add_token(master, name: str, role: str, wait: bool = True) -> str:
    """`dtsd token add`; with `wait`, until the server accepts it (it looks once a second)."""
    result = dtsd_cli("token", "add", name, "--role", role, config=str(master.ini_path))
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    if wait:
        wait_for(lambda: master.dtsctl("list", "--limit", "1", token=secret).returncode == 0,
                 timeout=5)
    return secret


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def refused(result: subprocess.CompletedProcess, code: str) -> None:
    assert result.returncode == 4, (result.returncode, result.stdout, result.stderr)
    assert code in result.stderr, result.stderr


# --- the table ------------------------------------------------------------------------------

def test_every_method_of_every_service_has_an_entry():
    services = [*pb.DESCRIPTOR.services_by_name.values(),
                *seed_pb.DESCRIPTOR.services_by_name.values(),
                *health_pb2.DESCRIPTOR.services_by_name.values(),
                *reflection_pb2.DESCRIPTOR.services_by_name.values()]
    methods = {f"/{service.full_name}/{method.name}"
               for service in services for method in service.methods}
    assert len(methods) >= 25
    assert methods - set(auth.METHODS) == set()
    assert set(auth.METHODS) - methods == set()   # no stale entries either


def test_roles_include_the_lower_ones():
    assert auth.Role.ADMIN.allows(auth.Role.SUBMIT) and auth.Role.ADMIN.allows(auth.Role.READ)
    assert auth.Role.SUBMIT.allows(auth.Role.READ) and not auth.Role.SUBMIT.allows(auth.Role.ADMIN)
    assert not auth.Role.READ.allows(auth.Role.SUBMIT)


def test_tokens_file_format(tmp_path):
    path = str(tmp_path / "tokens")
    secret = auth.add_token(path, "ci", "submit", lock_dir=str(tmp_path))
    assert secret.startswith("dtsd_") and len(secret) > 40
    assert (tmp_path / "tokens").stat().st_mode & 0o777 == 0o640
    assert secret not in (tmp_path / "tokens").read_text()
    with pytest.raises(auth.TokenError, match="exists already"):
        auth.add_token(path, "ci", "read", lock_dir=str(tmp_path))
    with pytest.raises(auth.TokenError, match="bad token name"):
        auth.add_token(path, "Bad Name", "read", lock_dir=str(tmp_path))
    with pytest.raises(auth.TokenError, match="unknown role"):
        auth.add_token(path, "x", "root", lock_dir=str(tmp_path))
    tokens = auth.TokenFile(path)
    assert tokens.lookup(secret).name == "ci"
    assert tokens.lookup(secret + "x") is None
    auth.remove_token(path, "ci", lock_dir=str(tmp_path))
    with pytest.raises(auth.TokenError, match="no token named"):
        auth.remove_token(path, "ci", lock_dir=str(tmp_path))
    with pytest.raises(auth.TokenError, match="expected NAME ROLE SHA256HEX"):
        auth.parse_tokens("a read\n")


@pytest.mark.parametrize("host,exposed", [
    ("127.0.0.1", False), ("127.3.4.5", False), ("::1", False), ("localhost", False),
    ("0.0.0.0", True), ("::", True), ("10.1.2.3", True), ("example.org", True)])
def test_loopback(host, exposed):
    assert auth.is_loopback(host) is not exposed


def test_exposure_rule():
    def check(host, **kw):
        settings = dict(tokens_file="", tls_cert="", tls_key="", insecure=False)
        return auth.exposure(host, 50051, **{**settings, **kw})
    assert check("127.0.0.1") == (None, None)
    error, warning = check("0.0.0.0")
    assert "[server] listen = 0.0.0.0:50051" in error and warning is None
    assert check("0.0.0.0", tokens_file="t")[0] is not None
    assert check("0.0.0.0", tls_cert="c", tls_key="k")[0] is not None
    assert check("0.0.0.0", tokens_file="t", tls_cert="c", tls_key="k") == (None, None)
    error, warning = check("::", insecure=True)
    assert error is None and "INSECURE" in warning
    assert "go together" in check("127.0.0.1", tls_cert="c")[0]


# --- a real server with tokens ----------------------------------------------------------------

@pytest.fixture
def secured(dtsd_factory, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# no tokens yet\n")
    return dtsd_factory({"server": {"tokens_file": str(tokens), "processes": 1},
                         "worker": {"processes": 1}})


def test_roles_against_a_real_server(secured):
    reader = add_token(secured, "reader", "read")
    submitter = add_token(secured, "ci-bot", "submit")
    admin = add_token(secured, "root.ops", "admin")
    listed = ok(dtsd_cli("token", "list", config=str(secured.ini_path)))
    assert "reader\tread" in listed and "ci-bot\tsubmit" in listed and "dtsd_" not in listed

    refused(secured.dtsctl("list"), "UNAUTHENTICATED")
    refused(secured.dtsctl("list", token="dtsd_not-a-token"), "UNAUTHENTICATED")
    refused(secured.dtsctl("submit", "--", "true"), "UNAUTHENTICATED")

    ok(secured.dtsctl("list", token=reader))
    ok(secured.dtsctl("status", token=reader))
    denied = secured.dtsctl("submit", "--", "true", token=reader)
    refused(denied, "PERMISSION_DENIED")
    assert "submit" in denied.stderr

    job_id = ok(secured.dtsctl("submit", "--", "echo", "hi", token=submitter)).strip()
    shown = json.loads(ok(secured.dtsctl("-o", "json", "status", job_id, token=reader)))
    job = shown["jobs"][0] if "jobs" in shown else shown
    assert job["submitted_by"].startswith("token:ci-bot@"), job["submitted_by"]

    refused(secured.dtsctl("dlq", "purge", "--yes", token=submitter), "PERMISSION_DENIED")
    assert json.loads(ok(secured.dtsctl("-o", "json", "dlq", "purge", "--yes",
                                        token=admin)))["purged"] == 0

    assert health_status(secured.address) == SERVING     # no token needed

    wait_for(lambda: "dead-letter purge by token:root.ops@" in secured.log(), timeout=10)
    audit = [line for line in secured.log().splitlines() if "dtsd.audit:" in line]
    assert any("submit by token:ci-bot@" in line and job_id in line for line in audit), audit


def test_added_token_works_and_removed_one_stops_without_a_restart(secured):
    assert secured.dtsctl("list", token="dtsd_nothing").returncode == 4
    late = add_token(secured, "late", "read", wait=False)
    wait_for(lambda: secured.dtsctl("list", token=late).returncode == 0, timeout=5)
    ok(dtsd_cli("token", "rm", "late", config=str(secured.ini_path)))
    started = time.monotonic()
    wait_for(lambda: secured.dtsctl("list", token=late).returncode == 4, timeout=5)
    assert time.monotonic() - started < 4
    pid_before = secured.pid
    assert secured.running() and secured.pid == pid_before


def test_seed_surface_needs_a_token_too(secured):
    submitter = add_token(secured, "seed-client", "submit")
    with grpc.insecure_channel(secured.address) as channel:
        jobs = seed_pb_grpc.JobServiceStub(channel)
        tasks = seed_pb_grpc.TaskSchedulerStub(channel)
        for call, request in ((jobs.SubmitJob, seed_pb.Job(command="true")),
                              (tasks.SubmitTask, seed_pb.Task(name="t", command="true")),
                              (jobs.GetJobStatus, seed_pb.JobId(id="x"))):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {submitter}"),)
        reply = jobs.SubmitJob(seed_pb.Job(command="true"), timeout=5, metadata=metadata)
        assert reply.success
        status = jobs.GetJobStatus(seed_pb.JobId(id=reply.job_id), timeout=5, metadata=metadata)
        assert status.id == reply.job_id


def test_watch_stream_is_checked_too(secured):
    reader = add_token(secured, "watcher", "read")
    submitter = add_token(secured, "sub", "submit")
    job_id = ok(secured.dtsctl("submit", "--", "echo", "streamed", token=submitter)).strip()
    refused(secured.dtsctl("logs", "-f", job_id), "UNAUTHENTICATED")
    assert "streamed" in ok(secured.dtsctl("logs", "-f", job_id, token=reader))


# --- exposure at startup ----------------------------------------------------------------------

def test_refuses_to_listen_on_all_addresses_without_auth_and_tls(dtsd_factory):
    master = dtsd_factory({"server": {"listen": f"0.0.0.0:{free_port()}"}}, start=False)
    write_ini(master.ini_path, master.sections)
    result = subprocess.run([sys.executable, "-m", "dtsd", "-c", str(master.ini_path)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                            env=clean_env({"PYTHONPATH": str(REPO_ROOT)}),
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 78, result.stderr
    assert "[server] listen = 0.0.0.0:" in result.stderr and "refusing to start" in result.stderr


def test_starts_with_insecure_true_and_warns(dtsd_factory):
    master = dtsd_factory({"server": {"listen": f"0.0.0.0:{free_port()}", "insecure": "true",
                                      "processes": 1}, "worker": {"processes": 1}})
    log = master.log()
    assert "WARNING" in log and "INSECURE" in log
    record = master.workdir / "run" / "node.json"
    wait_for(lambda: record.exists() and "INSECURE" in json.loads(record.read_text())["status"],
             timeout=15)
