"""Who a local caller is, against real dtsd masters: the kernel decides, not the network.

Each test makes throwaway OS users and groups (`dtsdt-...`, removed at teardown) and runs
dtsctl as them with `runuser`, without any server flag: dtsctl finds the host's dtsd through
its runtime directory, asks the master's broker who it is, and calls the local sockets.
Also here: TCP needs a token unless `[server] anonymous_role`, env values only for the
owner and admins, cancel/retry of someone else's job needs admin, idempotency keys per
submitter, and the tokens file `dtsd token add` creates.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from dtsd.dtsdpb import pb, pb_grpc
from tests.helpers import REPO_ROOT, clean_env, run_dtsctl, wait_for

FAST = {"worker": {"processes": 1, "retry_backoff": "50ms", "retry_backoff_max": "200ms",
                   "kill_grace": "1s"},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}


# --- throwaway users ------------------------------------------------------------------------

def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)


class Accounts:
    """Users and groups made for one test, all named dtsdt-<word>-<random>, removed after."""

    def __init__(self) -> None:
        self.suffix = secrets.token_hex(3)
        self.users: list[str] = []
        self.groups: list[str] = []

    def group(self, word: str) -> str:
        name = f"dtsdt-{word}-{self.suffix}"
        _run("groupadd", "--system", name)
        self.groups.append(name)
        return name

    def user(self, word: str, *groups: str) -> str:
        name = f"dtsdt-{word}-{self.suffix}"
        extra = ["-G", ",".join(groups)] if groups else []
        _run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             *extra, name)
        self.users.append(name)
        return name

    def cleanup(self) -> None:
        for name in self.users:
            subprocess.run(["userdel", name], capture_output=True, timeout=60)
            subprocess.run(["groupdel", name], capture_output=True, timeout=60)  # its own group
        for name in self.groups:
            subprocess.run(["groupdel", name], capture_output=True, timeout=60)


@pytest.fixture
def accounts():
    made = Accounts()
    try:
        yield made
    finally:
        made.cleanup()


def open_to_local_users(master) -> None:
    """What the package arranges: local users may traverse to the runtime directory and read
    (here) the test's config file, which names that directory."""
    path = master.workdir / "run"
    for directory in (path, *path.parents):
        if directory == Path("/tmp"):
            break
        directory.chmod(directory.stat().st_mode | 0o011)
    master.ini_path.chmod(0o644)


def dtsctl_as(user: str | None, master, *args: str, env: dict | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """dtsctl with no server flag, as `user` (None: root), finding the master through `-c`."""
    prefix = ["runuser", "-u", user, "--"] if user else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "dtsd.cli", "-c", str(master.ini_path), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
        env=clean_env({"PYTHONPATH": str(REPO_ROOT), **(env or {})}), stdin=subprocess.DEVNULL)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def refused(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 4, (result.returncode, result.stdout, result.stderr)
    for word in words:
        assert word in result.stderr, result.stderr


def dtsd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dtsd", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60, stdin=subprocess.DEVNULL,
                          env=clean_env({"PYTHONPATH": str(REPO_ROOT)}))


def add_token(master, name: str, role: str) -> str:
    """`dtsd token add`, and wait until the server knows it (it looks once a second)."""
    secret = ok(dtsd_cli("token", "add", name, "--role", role, "-c", str(master.ini_path))).strip()
    wait_for(lambda: master.dtsctl("list", "--limit", "1", token=secret).returncode == 0,
             timeout=10)
    return secret


def token_file(tmp_path: Path, secret: str, name: str) -> str:
    path = tmp_path / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def host(dtsd_factory, accounts, tmp_path):
    """A dtsd as packaged: no anonymous role, tokens file (empty), local roles for root,
    an admin group and a submit group."""
    admins = accounts.group("adm")
    submitters = accounts.group("sub")
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    tokens.chmod(0o600)
    master = dtsd_factory(FAST, server={
        "processes": 1, "tokens_file": str(tokens), "anonymous_role": "",
        "local_roles": f"root:admin %{admins}:admin %{submitters}:submit"})
    open_to_local_users(master)
    master.admins, master.submitters = admins, submitters
    return master


def job_json(master, job_id: str, user: str | None = None) -> dict:
    return json.loads(ok(dtsctl_as(user, master, "-o", "json", "status", job_id)))["jobs"][0]


# --- finding 6: local identity --------------------------------------------------------------

def test_the_packaged_default_gives_tcp_callers_and_unlisted_users_nothing(dtsd_factory,
                                                                           accounts):
    """No tokens file, no anonymous role, default local_roles: as the package installs it."""
    master = dtsd_factory(FAST, server={"processes": 1, "tokens_file": ""})
    open_to_local_users(master)
    stranger = accounts.user("eve")
    over_tcp = subprocess.run(
        ["runuser", "-u", stranger, "--", sys.executable, "-m", "dtsd.cli", "--servers",
         master.address, "submit", "--", "true"], capture_output=True, text=True, timeout=60,
        cwd=REPO_ROOT, env=clean_env({"PYTHONPATH": str(REPO_ROOT)}), stdin=subprocess.DEVNULL)
    refused(over_tcp, "UNAUTHENTICATED", "needs a token")
    refused(run_dtsctl("--servers", master.address, "dlq", "purge", "--yes"), "UNAUTHENTICATED")
    refused(dtsctl_as(stranger, master, "dlq", "purge", "--yes"), f"user {stranger}",
            "has no role")
    assert json.loads(ok(dtsctl_as(None, master, "-o", "json", "dlq", "purge", "--yes"))) \
        == {"purged": 0}                                    # root: admin, by default


def test_root_and_the_admin_group_are_admin_and_an_unlisted_user_gets_nothing(host, accounts):
    admin = accounts.user("ann", host.admins)
    stranger = accounts.user("bob")

    assert json.loads(ok(dtsctl_as(None, host, "-o", "json", "dlq", "purge", "--yes"))) \
        == {"purged": 0}
    assert json.loads(ok(dtsctl_as(admin, host, "-o", "json", "dlq", "purge", "--yes"))) \
        == {"purged": 0}

    for verb in (("list",), ("status",), ("submit", "--", "true")):
        result = dtsctl_as(stranger, host, *verb)
        refused(result, f"user {stranger}", "has no role", "local_roles")
    assert "Traceback" not in result.stderr


def test_a_submit_group_member_submits_is_recorded_and_cannot_purge(host, accounts):
    member = accounts.user("carl", host.submitters)
    result = dtsctl_as(member, host, "submit", "--wait", "--", "echo", "from carl")
    assert result.returncode == 0, result.stderr
    job_id = result.stderr.split()[1]
    assert result.stdout == "from carl\n"
    job = job_json(host, job_id, member)
    assert job["submitted_by"] == f"user:{member}"

    refused(dtsctl_as(member, host, "dlq", "purge", "--yes"), "PERMISSION_DENIED",
            "needs role admin", f"user:{member} has role submit")
    wait_for(lambda: f"submit by user:{member}: 1 job: {job_id}" in host.log(), timeout=10)


def test_api_sockets_and_key_have_the_modes_local_users_need(host):
    run = host.workdir / "run"
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in run.iterdir()
             if path.name.endswith((".sock", ".key"))}
    sockets = [name for name in modes if name.startswith("api-")]
    assert len(sockets) == 1, modes
    assert modes == {"ident.sock": 0o666, "local.key": 0o600, sockets[0]: 0o666}
    host.stop()
    left = sorted(path.name for path in run.iterdir())
    assert not [name for name in left if name.endswith((".sock", ".key"))], left


def test_the_master_removes_a_killed_servers_socket_and_dtsctl_fails_over(dtsd_factory):
    master = dtsd_factory(FAST, server={"processes": 2, "anonymous_role": ""})
    run = master.workdir / "run"

    def sockets() -> set[str]:
        return {path.name for path in run.glob("api-*.sock")}
    wait_for(lambda: len(sockets()) == 2, timeout=15)
    first = sorted(sockets())[0]
    pid = int(first[len("api-"):-len(".sock")])
    os.kill(pid, 9)
    wait_for(lambda: first not in sockets(), timeout=10,
             message=f"the master to remove {first} of the killed server")
    import socket
    stale = run / "api-1.sock"          # what a KILLed master would leave: nobody listens
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    for _ in range(4):   # round-robin over what is there: every call answered
        ok(dtsctl_as(None, master, "list", "--limit", "1"))


def test_a_flood_of_callers_at_the_broker_does_not_stall_the_master(host):
    """Local callers hammering the broker, some never reading: the master answers each (a
    bounded number per loop turn, never waiting on a caller) and goes on supervising and
    serving everyone else."""
    import socket
    import threading
    path = str(host.workdir / "run" / "ident.sock")
    answers: list[bytes] = []
    silent: list[socket.socket] = []
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)      # blocking: waits while the backlog (64) is full
            if len(silent) < 200:
                silent.append(sock)  # connects, never reads, never closes
                continue
            with sock:
                sock.settimeout(30)
                answers.append(sock.recv(4096))

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        wait_for(lambda: len(answers) >= 100, timeout=10)
        started = time.monotonic()
        ok(dtsctl_as(None, host, "status"))
        assert time.monotonic() - started < 15
        assert flooder.is_alive(), "the flood ended before dtsctl ran"
    finally:
        stop.set()
        flooder.join(30)
        for sock in silent:
            sock.close()
    assert all(answer.startswith(b"OK dtsdl_") for answer in answers), answers[:3]
    assert host.running()


def test_a_local_token_is_refused_over_tcp(host):
    from dtsd import identity
    token = identity.fetch_local_token(str(host.workdir / "run"))
    metadata = (("authorization", f"Bearer {token}"),)
    local = next((host.workdir / "run").glob("api-*.sock"))
    with grpc.insecure_channel(f"unix:{local}") as channel:
        reply = pb_grpc.SchedulerStub(channel).ListJobs(pb.ListJobsRequest(), timeout=10,
                                                        metadata=metadata)
        assert list(reply.jobs) == []                       # on the local socket: fine
    with grpc.insecure_channel(host.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.SchedulerStub(channel).ListJobs(pb.ListJobsRequest(), timeout=10,
                                                    metadata=metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "never over TCP" in info.value.details()


def _local_call(master, token: str) -> grpc.RpcError | None:
    local = next((master.workdir / "run").glob("api-*.sock"))
    with grpc.insecure_channel(f"unix:{local}") as channel:
        try:
            pb_grpc.SchedulerStub(channel).PurgeDeadLetters(
                pb.PurgeDeadLettersRequest(), timeout=10,
                metadata=(("authorization", f"Bearer {token}"),))
        except grpc.RpcError as exc:
            return exc
    return None


def test_forged_tampered_expired_and_foreign_local_tokens_are_refused(host, accounts):
    from dtsd import identity
    run = str(host.workdir / "run")
    key = (host.workdir / "run" / "local.key").read_bytes()
    now = int(time.time())
    member = accounts.user("dora", host.submitters)

    def claim(**changes) -> identity.LocalClaim:
        fields = dict(user=member, uid=1, role=identity.Role.ADMIN, node=host.node_id,
                      expires=now + 60)
        fields.update(changes)
        return identity.LocalClaim(**fields)

    assert _local_call(host, identity.sign(key, claim())) is None      # the control
    cases = {
        "forged": (identity.sign(os.urandom(32), claim()), "not signed by this node"),
        "expired": (identity.sign(key, claim(expires=now - 1)), "expired"),
        "other node": (identity.sign(key, claim(node="elsewhere")), "node 'elsewhere'"),
        "too long": (identity.sign(key, claim(expires=now + 86400)), "longer than"),
    }
    # A real submit token of the member, its role raised to admin in the payload.
    real = json.loads(ok(dtsctl_as(member, host, "-o", "json", "list")))   # a role works
    assert real["jobs"] == []
    genuine = identity.fetch_local_token(run)    # root's; rewrite it as the member's admin
    payload, _, mac = genuine[len("dtsdl_"):].partition(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data.update(user=member, role="admin")
    tampered = base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    cases["tampered"] = (f"dtsdl_{tampered}.{mac}", "not signed by this node")
    for what, (token, message) in cases.items():
        error = _local_call(host, token)
        assert error is not None, what
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (what, error)
        assert message in error.details(), (what, error.details())


def test_a_token_file_works_on_tcp_and_on_the_local_socket(host, tmp_path):
    secret = add_token(host, "ci-bot", "submit")
    path = token_file(tmp_path, secret, "ci-bot.token")
    over_tcp = host.dtsctl("--token-file", path, "submit", "--", "true")
    job_id = ok(over_tcp).strip()
    assert job_json(host, job_id)["submitted_by"].startswith("token:ci-bot@ipv4:127.0.0.1:")
    local = ok(dtsctl_as(None, host, "submit", "--", "true", env={"DTSD_TOKEN_FILE": path}))
    assert job_json(host, local.strip())["submitted_by"] == "token:ci-bot@unix:"
    warned = host.dtsctl("list", token=secret)
    assert warned.returncode == 0 and "--token shows the token to every user" in warned.stderr
    quiet = host.dtsctl("list", env={"DTSD_TOKEN": secret})
    assert quiet.returncode == 0 and "warning" not in quiet.stderr
    missing = host.dtsctl("--token-file", str(tmp_path / "nope"), "list")
    assert missing.returncode == 2 and "cannot read the token file" in missing.stderr


def test_tcp_without_a_token_is_refused_by_default(host):
    result = run_dtsctl("--servers", host.address, "list")
    refused(result, "UNAUTHENTICATED", "needs a token", "--token-file", "local socket")
    with grpc.insecure_channel(host.address) as channel:     # health stays public
        from dtsd.health import health_pb2, health_pb2_grpc
        assert health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_anonymous_role_admits_calls_without_a_token_up_to_that_role(dtsd_factory):
    master = dtsd_factory(FAST, server={"processes": 1, "anonymous_role": "submit"})
    job_id = ok(master.dtsctl("submit", "--", "true")).strip()
    shown = json.loads(ok(master.dtsctl("-o", "json", "status", job_id)))["jobs"][0]
    assert shown["submitted_by"].startswith("anonymous@ipv4:127.0.0.1:")
    refused(master.dtsctl("dlq", "purge", "--yes"), "PERMISSION_DENIED", "needs role admin",
            "anonymous has role submit")


def test_an_anonymous_role_off_loopback_is_refused_like_no_tokens(tmp_path):
    from dtsd import config
    error, _ = config.exposure("0.0.0.0", 50051, tokens_file="t", tls_cert="c", tls_key="k",
                               insecure=False, anonymous_role="read")
    assert error and "anonymous_role = read" in error and "not a loopback address" in error
    assert config.exposure("0.0.0.0", 50051, tokens_file="t", tls_cert="c", tls_key="k",
                           insecure=False) == (None, None)
    _, warning = config.exposure("0.0.0.0", 50051, tokens_file="t", tls_cert="c",
                                 tls_key="k", insecure=True, anonymous_role="read")
    assert "INSECURE" in warning and "anonymous_role = read" in warning
    ini = tmp_path / "dtsd.ini"
    ini.write_text("[server]\nlisten = 0.0.0.0:50051\nanonymous_role = admin\n"
                   "[worker]\njob_user = nobody\n")
    checked = dtsd_cli("--check-config", "-c", str(ini))
    assert checked.returncode == 1 and "anonymous_role = admin" in checked.stderr


def test_local_roles_are_validated_naming_the_key():
    from dtsd import config
    for text, problem in (("alice", "bad entry 'alice'"), ("alice:root", "unknown role 'root'"),
                          ("%:admin", "bad entry '%:admin'"), ("a b:c", "bad entry 'a'")):
        with pytest.raises(config.ConfigError) as info:
            config.parse(f"[server]\nlocal_roles = {text}\n", "/etc/dtsd/dtsd.ini", env={})
        assert str(info.value).startswith("/etc/dtsd/dtsd.ini: [server] local_roles: "), info.value
        assert problem in str(info.value)
    with pytest.raises(config.ConfigError, match=r"\[server\] anonymous_role: unknown role"):
        config.parse("[server]\nanonymous_role = root\n", "f", env={})
    cfg = config.parse("[server]\nlocal_roles = root:read root:admin, %wheel:submit\n", "f", env={})
    assert [str(rule) for rule in cfg.get("server", "local_roles")] == \
        ["root:read", "root:admin", "%wheel:submit"]


def test_the_master_s_hmac_is_hmac_sha256():
    import hashlib
    import hmac
    from dtsd import identity
    for size in (0, 1, 32, 64, 65, 200):
        key, message = os.urandom(size), os.urandom(size * 3)
        assert identity.hmac_sha256(key, message) == hmac.new(key, message, hashlib.sha256).digest()


# --- finding 7: secrets and ownership ---------------------------------------------------------

@pytest.fixture
def tokens_host(dtsd_factory, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    tokens.chmod(0o600)
    master = dtsd_factory(FAST, server={"processes": 1, "tokens_file": str(tokens)})
    master.secrets = {name: add_token(master, name, role) for name, role in
                      (("alice", "submit"), ("bob", "submit"), ("reader", "read"),
                       ("ops", "admin"))}
    return master


def _api(master, name: str):
    channel = grpc.insecure_channel(master.address)
    stub = pb_grpc.SchedulerStub(channel)
    metadata = (("authorization", f"Bearer {master.secrets[name]}"),)

    def call(method: str, request):
        return getattr(stub, method)(request, timeout=10, metadata=metadata)
    return call


def test_env_values_go_only_to_the_submitter_and_admins(tokens_host):
    alice, reader, bob, ops = (_api(tokens_host, n) for n in ("alice", "reader", "bob", "ops"))
    job_id = alice("SubmitJob", pb.SubmitJobRequest(job=pb.JobSpec(
        command="true", env={"API_KEY": "s3cret", "MODE": "fast"}))).id

    for who in (reader, bob):
        job = who("GetJob", pb.GetJobRequest(id=job_id))
        assert dict(job.spec.env) == {"API_KEY": "", "MODE": ""}
        assert job.env_hidden
        listed = [j for j in who("ListJobs", pb.ListJobsRequest()).jobs if j.id == job_id]
        assert dict(listed[0].spec.env) == {"API_KEY": "", "MODE": ""} and listed[0].env_hidden
    for who in (alice, ops):
        job = who("GetJob", pb.GetJobRequest(id=job_id))
        assert dict(job.spec.env) == {"API_KEY": "s3cret", "MODE": "fast"}
        assert not job.env_hidden

    shown = tokens_host.dtsctl("status", job_id, token=tokens_host.secrets["reader"])
    assert "API_KEY=(hidden) MODE=(hidden)" in ok(shown) and "s3cret" not in shown.stdout
    data = json.loads(ok(tokens_host.dtsctl("-o", "json", "status", job_id,
                                            token=tokens_host.secrets["reader"])))
    assert data["jobs"][0]["env_hidden"] is True
    assert data["jobs"][0]["spec"]["env"] == {"API_KEY": "", "MODE": ""}


def test_a_schedule_s_env_values_go_only_to_admins(tokens_host):
    ops, reader = _api(tokens_host, "ops"), _api(tokens_host, "reader")
    ops("CreateSchedule", pb.CreateScheduleRequest(schedule=pb.Schedule(
        name="nightly", expression="0 3 * * *",
        job=pb.JobSpec(command="backup", env={"DB_PASSWORD": "hunter2"}))))
    seen = reader("ListSchedules", pb.ListSchedulesRequest()).schedules[0]
    assert dict(seen.job.env) == {"DB_PASSWORD": ""} and seen.env_hidden
    seen = ops("ListSchedules", pb.ListSchedulesRequest()).schedules[0]
    assert dict(seen.job.env) == {"DB_PASSWORD": "hunter2"} and not seen.env_hidden


def test_cancel_and_retry_of_another_s_job_need_admin(tokens_host):
    alice, bob, ops = (_api(tokens_host, n) for n in ("alice", "bob", "ops"))
    job_id = alice("SubmitJob", pb.SubmitJobRequest(job=pb.JobSpec(command="sleep 300"))).id
    for method, request in (("CancelJob", pb.CancelJobRequest(id=job_id)),
                            ("RetryJob", pb.RetryJobRequest(id=job_id))):
        with pytest.raises(grpc.RpcError) as info:
            bob(method, request)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, (method, info.value)
        assert "belongs to token:alice" in info.value.details()
        assert "needs role admin" in info.value.details()
    assert alice("GetJob", pb.GetJobRequest(id=job_id)).status in (pb.PENDING, pb.RUNNING)
    refused(tokens_host.dtsctl("cancel", job_id, token=tokens_host.secrets["bob"]),
            "PERMISSION_DENIED", "belongs to token:alice")

    assert alice("CancelJob", pb.CancelJobRequest(id=job_id)).status == pb.CANCELLED
    with pytest.raises(grpc.RpcError) as info:
        bob("RetryJob", pb.RetryJobRequest(id=job_id))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ops("RetryJob", pb.RetryJobRequest(id=job_id)).job.status == pb.PENDING
    assert ops("CancelJob", pb.CancelJobRequest(id=job_id)).status == pb.CANCELLED


# --- idempotency keys per submitter -----------------------------------------------------------

def test_idempotency_keys_belong_to_their_submitter(tokens_host):
    alice, bob = _api(tokens_host, "alice"), _api(tokens_host, "bob")
    spec = pb.JobSpec(command="true", idempotency_key="deploy-42")
    first = alice("SubmitJob", pb.SubmitJobRequest(job=spec))
    other = bob("SubmitJob", pb.SubmitJobRequest(job=spec))
    assert first.created and other.created
    assert first.id != other.id
    again = alice("SubmitJob", pb.SubmitJobRequest(job=spec))
    assert (again.id, again.created) == (first.id, False)
    with pytest.raises(grpc.RpcError) as info:          # bob's own key, another spec
        bob("SubmitJob", pb.SubmitJobRequest(job=pb.JobSpec(command="false",
                                                            idempotency_key="deploy-42")))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.id not in info.value.details()


# --- the tokens file ----------------------------------------------------------------------------

def test_token_add_gives_a_new_tokens_file_the_config_file_s_group(accounts, tmp_path):
    daemon_group = accounts.group("grp")
    daemon = accounts.user("daemon", daemon_group)
    etc = tmp_path / "etc"
    etc.mkdir()
    etc.chmod(0o755)
    run = tmp_path / "run"
    tokens = etc / "tokens"
    ini = etc / "dtsd.ini"
    ini.write_text(f"[dtsd]\nruntime_dir = {run}\n[server]\ntokens_file = {tokens}\n"
                   "[worker]\njob_user = nobody\n")
    os.chown(ini, 0, _gid(daemon_group))
    ini.chmod(0o640)

    ok(dtsd_cli("token", "add", "ci", "--role", "read", "-c", str(ini)))
    info = tokens.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == \
        (0, _gid(daemon_group), 0o640)
    assert sorted(p.name for p in etc.iterdir()) == ["dtsd.ini", "tokens"]   # no lock beside
    assert (run / "tokens.lock").exists()
    as_daemon = subprocess.run(["runuser", "-u", daemon, "--", "cat", str(tokens)],
                               capture_output=True, text=True, timeout=30)
    assert as_daemon.returncode == 0 and as_daemon.stdout.startswith("ci read "), as_daemon

    ok(dtsd_cli("token", "add", "second", "--role", "admin", "-c", str(ini)))
    ok(dtsd_cli("token", "rm", "ci", "-c", str(ini)))
    info = tokens.stat()
    assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (_gid(daemon_group), 0o640)
    assert tokens.read_text().startswith("second admin ")


def _gid(group: str) -> int:
    import grp
    return grp.getgrnam(group).gr_gid


# --- dtsctl: where and with what, without a server ----------------------------------------------

def _socket_file(path: Path) -> None:
    """A unix socket file nobody listens on (what a KILLed master leaves)."""
    import socket
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


def test_dtsctl_prefers_named_servers_then_the_local_sockets_then_the_config(tmp_path):
    from dtsd import cli
    run = tmp_path / "run"
    run.mkdir()
    ini = tmp_path / "dtsd.ini"
    ini.write_text(f"[dtsd]\nruntime_dir = {run}\n[client]\nservers = cfg:1\n"
                   f"token_file = {tmp_path / 'token'}\n")
    targets = cli.resolve_servers(config_path=str(ini), env={})
    assert targets.write == ["cfg:1"] and not targets.local_dir      # no dtsd here

    _socket_file(run / "ident.sock")
    with pytest.raises(cli.CliError) as info:                      # dtsd, but no API yet
        cli.resolve_servers(config_path=str(ini), env={})
    assert info.value.exit_code == 3 and "serves no local API socket" in info.value.message

    _socket_file(run / "api-20.sock")
    _socket_file(run / "api-10.sock")
    targets = cli.resolve_servers(config_path=str(ini), env={})
    assert targets.write == targets.read == [f"unix:{run}/api-10.sock", f"unix:{run}/api-20.sock"]
    assert targets.local_dir == str(run) and targets.token_file == str(tmp_path / "token")
    for named in ({"DTSD_SERVERS": "env:1"}, {"SERVERS": "seed:1"}):
        assert not cli.resolve_servers(config_path=str(ini), env=named).local_dir
    assert cli.resolve_servers(["flag:1"], config_path=str(ini), env={}).write == ["flag:1"]

    # The broker is gone (a KILLed master): exit 3, saying so; nothing else is tried.
    ini.write_text(f"[dtsd]\nruntime_dir = {run}\n[client]\nservers = cfg:1\n")
    result = run_dtsctl("-c", str(ini), "list")
    assert result.returncode == 3, result.stderr
    assert "cannot reach this host's dtsd" in result.stderr and "ident.sock" in result.stderr


def test_dtsctl_takes_the_first_credential_flags_then_environment_then_config(tmp_path):
    from dtsd import cli
    files = {}
    for name in ("flag", "env", "config"):
        files[name] = tmp_path / name
        files[name].write_text(f"\n  secret-{name}  \nsecond line\n")
    targets = cli.Targets(write=["a:1"], read=["a:1"], write_source="", read_source="",
                          token_file=str(files["config"]))

    def chosen(environ: dict, **flags) -> str | None:
        return cli.Settings(**flags).credential(targets, env=environ)

    assert chosen({"DTSD_TOKEN": "e", "DTSD_TOKEN_FILE": str(files["env"])},
                  token="t", token_file=str(files["flag"])) == "t"
    assert chosen({"DTSD_TOKEN": "e"}, token_file=str(files["flag"])) == "secret-flag"
    assert chosen({"DTSD_TOKEN": "e", "DTSD_TOKEN_FILE": str(files["env"])}) == "e"
    assert chosen({"DTSD_TOKEN_FILE": str(files["env"])}) == "secret-env"
    assert chosen({}) == "secret-config"
    empty = tmp_path / "empty"
    empty.write_text("\n\n")
    with pytest.raises(cli.CliError, match="is empty") as info:
        chosen({"DTSD_TOKEN_FILE": str(empty)})
    assert info.value.exit_code == 2 and "$DTSD_TOKEN_FILE" in info.value.message
