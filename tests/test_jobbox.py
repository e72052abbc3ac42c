"""The job's box: user, capabilities, no_new_privs and resource limits, on a real dtsd.

The suite runs as root, so the master holds every capability: these tests show what its
children, their launchers and their jobs are left with. The same checks run under the
packaged systemd unit (a dtsd user with three ambient capabilities) in `make test-deb`.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import grpc
import pytest

from dtsd import config as configmod
from dtsd import jobbox
from dtsd.dtsdpb import pb, pb_grpc
from tests.helpers import TEST_JOB_USER, wait_for

FAST = {"worker": {"retry_backoff": "50ms", "retry_backoff_max": "200ms", "kill_grace": "1s",
                   "processes": 1},
        "dtsd": {"housekeeping_interval": "200ms"}}
FINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
NOBODY = pwd.getpwnam(TEST_JOB_USER)


@pytest.fixture
def master(dtsd_factory):
    return dtsd_factory(FAST)


@pytest.fixture
def api(master):
    channel = grpc.insecure_channel(master.address)
    yield pb_grpc.SchedulerStub(channel)
    channel.close()


def run(api, command: str, **spec) -> pb.Job:
    spec.setdefault("max_retries", 0)
    job_id = api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command=command, **spec))).id

    def final():
        job = api.GetJob(pb.GetJobRequest(id=job_id))
        return job if job.status in FINAL else None
    return wait_for(final, timeout=30, message=f"job {job_id} to finish")


def status_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name] = value.strip()
    return fields


def children_of(pid: int) -> dict[str, list[int]]:
    """The master's children by role, from /proc (server, worker, coordinator)."""
    found: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as handle:
                ppid = int(status_fields(handle.read())["PPid"])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except (OSError, KeyError, ValueError):
            continue
        if ppid == pid and b"-m" in argv:
            module = argv[argv.index(b"-m") + 1].decode()
            found.setdefault(module.rpartition(".")[2], []).append(int(entry))
    return found


def open_the_way(path: Path) -> None:
    """Let others traverse to `path`, so that only its own mode keeps a job out."""
    for parent in path.parents:
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)


# --- the box, as a job sees it ------------------------------------------------------------

def slot_uids(master) -> range:
    first, last = configmod.load(str(master.ini_path)).get("worker", "job_uids")
    return range(first, last + 1)


def test_a_job_runs_as_a_slot_user_with_no_capability_and_no_new_privs(api, master):
    job = run(api, "cat /proc/self/status")
    assert job.status == pb.SUCCEEDED, job.error
    fields = status_fields(job.output.decode())
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[name], 16) == 0, (name, fields[name])
    assert fields["NoNewPrivs"] == "1"
    uid = int(fields["Uid"].split()[0])
    assert uid in slot_uids(master), uid
    assert fields["Uid"].split() == [str(uid)] * 4
    assert fields["Gid"].split() == [str(uid)] * 4          # a group of its own, same number
    assert fields["Groups"].split() == [str(NOBODY.pw_gid)]  # and job_user's groups
    assert "0" not in fields["Groups"].split(), "the job kept root's group"


def test_a_job_cannot_read_the_ini_or_the_tokens_file(dtsd_factory, tmp_path):
    tokens = tmp_path / "secret" / "tokens"
    tokens.parent.mkdir()
    tokens.write_text("")
    tokens.chmod(0o600)
    master = dtsd_factory(FAST, start=False)
    master.sections["server"]["tokens_file"] = str(tokens)
    master.start()
    master.ini_path.chmod(0o640)
    open_the_way(master.ini_path)
    open_the_way(tokens)
    from tests.test_auth import add_token
    secret = add_token(master, "box", "admin", wait=False)
    channel = grpc.insecure_channel(master.address)
    api = pb_grpc.SchedulerStub(channel)
    metadata = (("authorization", f"Bearer {secret}"),)
    reply = wait_for(lambda: _try_submit(api, metadata, f"cat {master.ini_path}; echo ini=$?; "
                                                        f"cat {tokens}; echo tokens=$?"),
                     timeout=10, message="the token to be accepted")

    def final():
        job = api.GetJob(pb.GetJobRequest(id=reply.id), metadata=metadata)
        return job if job.status in FINAL else None
    job = wait_for(final, timeout=30)
    out = job.output.decode()
    assert "Permission denied" in out and "ini=1" in out and "tokens=1" in out, out
    assert "[server]" not in out and "admin" not in out
    channel.close()


def _try_submit(api, metadata, command):
    try:
        return api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command=command, max_retries=0)),
                             metadata=metadata)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            return None
        raise


def test_only_the_launchers_keep_a_privilege_and_only_two(master):
    """Servers, the coordinator and the workers hold nothing (the workers gave up theirs
    once their launcher ran); each worker's launcher holds CAP_SETUID and CAP_SETGID, in no
    set but the effective and permitted ones, with an empty bounding set."""
    roles = wait_for(lambda: (c := children_of(master.pid)) and len(c) == 3 and c,
                     timeout=10, message="the master's three roles")
    # A worker drops its capabilities once its launcher is up; a job proves it got there.
    run(pb_grpc.SchedulerStub(grpc.insecure_channel(master.address)), "true")
    for role in ("server", "coordinator", "worker"):
        for pid in roles[role]:
            caps = jobbox.capabilities(pid)
            assert all(value == 0 for value in caps.values()), (role, caps)
            with open(f"/proc/{pid}/status") as handle:
                assert status_fields(handle.read())["NoNewPrivs"] == "1"
    wanted = (1 << jobbox.CAP_SETGID) | (1 << jobbox.CAP_SETUID)
    launchers = [pid for worker in roles["worker"] for pid in children_pids(worker)]
    assert len(launchers) == len(roles["worker"])
    for pid in launchers:
        caps = jobbox.capabilities(pid)
        assert caps == {"CapInh": 0, "CapPrm": wanted, "CapEff": wanted, "CapBnd": 0,
                        "CapAmb": 0}, caps
        with open(f"/proc/{pid}/status") as handle:
            assert status_fields(handle.read())["NoNewPrivs"] == "1"


def children_pids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(p) for p in handle.read().split()]


# --- resource limits ----------------------------------------------------------------------

def test_a_bounded_fork_bomb_ends_failed_naming_the_limit_and_the_worker_survives(api, master):
    workers = children_of(master.pid)["worker"]
    job = run(api, "i=0; while [ $i -lt 300 ]; do sleep 60 & i=$((i+1)); done; wait",
              limits=pb.ResourceLimits(processes=40))
    assert job.status == pb.FAILED
    assert "process limit reached (processes=40)" in job.error, job.error
    # Nothing it started is left, and the same worker goes on running jobs.
    wait_for(lambda: not [p for uid in slot_uids(master) for p in _processes_of(uid, b"sleep")],
             timeout=10, message="the fork bomb's processes to be gone")
    assert run(api, "echo still here").output == b"still here\n"
    assert children_of(master.pid)["worker"] == workers


def test_yes_into_a_file_stops_at_the_file_size_limit(api, tmp_path):
    target = tmp_path / "big"
    job = run(api, f"yes > {target}", limits=pb.ResourceLimits(file_size_bytes=1 << 20))
    assert job.status == pb.FAILED
    assert job.exit_code == 128 + 25     # the shell reports yes's SIGXFSZ
    assert "file size limit exceeded (file_size=1MiB)" in job.error, job.error
    assert target.stat().st_size == 1 << 20


def test_a_cpu_bound_job_ends_at_its_cpu_time(api):
    job = run(api, "while :; do :; done", limits=pb.ResourceLimits(cpu_seconds=1),
              timeout_seconds=30)
    assert job.status == pb.FAILED
    assert "CPU time limit" in job.error, job.error


def test_defaults_apply_and_a_job_may_ask_within_the_ceiling(dtsd_factory):
    master = dtsd_factory(FAST, worker={"limits": "processes=300 open_files=200 memory=512MB",
                                        "limits_max": "open_files=4096"})
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))
    assert proc_limits(run(api, "cat /proc/self/limits")) == {
        "Max processes": ("300", "300"), "Max open files": ("200", "200"),
        "Max address space": (str(512 << 20), str(512 << 20))}
    asked = run(api, "cat /proc/self/limits",
                limits=pb.ResourceLimits(open_files=4096, memory_bytes=1 << 28))
    assert proc_limits(asked) == {
        "Max processes": ("300", "300"), "Max open files": ("4096", "4096"),
        "Max address space": (str(1 << 28), str(1 << 28))}

    # Above the ceiling: refused at the edge, naming the field, and nothing is stored.
    for limits, field in ((pb.ResourceLimits(open_files=4097), "limits.open_files"),
                          (pb.ResourceLimits(processes=301), "limits.processes")):
        with pytest.raises(grpc.RpcError) as refused:
            api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true", id="too-much",
                                                             limits=limits)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in refused.value.details() and "ceiling" in refused.value.details()
        with pytest.raises(grpc.RpcError) as missing:
            api.GetJob(pb.GetJobRequest(id="too-much"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_job_s_limits_are_kept_in_its_record(api):
    job = run(api, "true", limits=pb.ResourceLimits(processes=50, cpu_seconds=5))
    assert job.spec.limits.processes == 50 and job.spec.limits.cpu_seconds == 5
    assert job.spec.limits.open_files == 0   # not asked: the worker's default applied


def proc_limits(job: pb.Job) -> dict[str, tuple[str, str]]:
    """(soft, hard) of the limits under test, from the job's /proc/self/limits."""
    found = {}
    for line in job.output.decode().splitlines():
        for name in ("Max processes", "Max open files", "Max address space"):
            if line.startswith(name):
                found[name] = tuple(line[len(name):].split()[:2])
    return found


def _processes_of(uid: int, name: bytes) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid != uid:
                    continue
                with open(f"/proc/{entry}/comm", "rb") as handle:
                    if handle.read().strip() == name:
                        found.append(int(entry))
            except OSError:
                continue
    return found


# --- a root worker never runs jobs as root ------------------------------------------------

@pytest.mark.parametrize("job_user, message", [
    ("", "[worker] job_user is empty and the workers run as root"),
    ("no-such-user-dtsd", "[worker] job_user: no user 'no-such-user-dtsd'"),
    ("root", "[worker] job_user: jobs must not run as root"),
])
def test_a_root_worker_refuses_to_run_jobs_as_root_or_nobody_known(dtsd_factory, job_user,
                                                                    message):
    master = dtsd_factory(FAST, start=False, worker={"job_user": job_user})
    try:
        master.start(timeout=30)   # the servers may serve before the worker's refusal lands
    except AssertionError:
        pass
    # The worker exits 78 (configuration) before the node was ever ready: the master stops.
    wait_for(lambda: not master.running(), timeout=30, message="the master to give up")
    assert master.proc.returncode != 0
    assert message in master.log()


# --- the pure parts -----------------------------------------------------------------------

def test_limits_are_capped_at_the_ceiling_and_set_soft_equals_hard():
    import resource
    box = jobbox.JobBox(user=NOBODY, groups=(NOBODY.pw_gid, 4242), uids=(70000, 70999),
                        umask=0o027, defaults={"processes": 10}, ceiling={"processes": 100})
    limits = box.limits_for({"processes": 500, "file_size": 1024})
    assert limits == {"processes": 100, "file_size": 1024}   # capped by this worker's ceiling
    assert box.rlimits(limits) == [(resource.RLIMIT_NPROC, 100, 100),
                                   (resource.RLIMIT_FSIZE, 1024, 1024)]
    assert box.rlimits({"cpu_time": 5}) == [(resource.RLIMIT_CPU, 5, 6)]   # SIGXCPU, then KILL
    assert box.rlimits({}) == []


def test_limit_lists_in_the_ini_are_checked():
    parsed = configmod.parse("[worker]\nlimits = processes=64 file_size=1MB cpu_time=1m\n")
    assert parsed.worker.limits == {"processes": 64, "file_size": 1 << 20, "cpu_time": 60}
    for text, problem in (("procs=5", "unknown limit 'procs'"), ("processes", "not name=value"),
                          ("memory=lots", "not a size")):
        with pytest.raises(configmod.ConfigError, match=problem):
            configmod.parse(f"[worker]\nlimits = {text}\n")
    with pytest.raises(configmod.ConfigError, match="above"):
        configmod.parse("[worker]\nlimits = processes=100\nlimits_max = processes=50\n")


def test_explain_names_the_limit_only_when_it_was_set():
    box = jobbox.JobBox(user=None, groups=(), uids=None, umask=0o027, defaults={}, ceiling={})
    assert box.explain({"file_size": 1 << 20}, 153, None, b"") == \
        "file size limit exceeded (file_size=1MiB)"
    assert box.explain({}, 153, None, b"") == ""
    assert "process limit" in box.explain({"processes": 5}, 2, None, b"sh: 1: Cannot fork\n")
    assert box.explain({"processes": 5}, 2, None, b"no such file\n") == ""


def test_check_config_names_a_missing_job_user(tmp_path):
    from tests.test_backing_security import run_dtsd
    ini = tmp_path / "dtsd.ini"
    ini.write_text("[worker]\njob_user = no-such-user-dtsd\n")
    result = run_dtsd("--check-config", "-c", str(ini))
    assert result.returncode == 1
    assert "[worker] job_user: no user 'no-such-user-dtsd' on this host" in result.stderr
    ini.write_text(f"[worker]\njob_user = {TEST_JOB_USER}\n")
    assert run_dtsd("--check-config", "-c", str(ini)).returncode == 0
