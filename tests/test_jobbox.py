"""The job's box: user, capabilities, no_new_privs and resource limits, on a real dtsd.

The suite runs as root, so the master holds every capability: these tests show what its
children and their jobs are left with. The same checks run under the packaged systemd
unit (a dtsd user with four ambient capabilities) in `make test-deb`.
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

def test_a_job_runs_as_the_job_user_with_no_capability_and_no_new_privs(api, master):
    job = run(api, "cat /proc/self/status")
    assert job.status == pb.SUCCEEDED, job.error
    fields = status_fields(job.output.decode())
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[name], 16) == 0, (name, fields[name])
    assert fields["NoNewPrivs"] == "1"
    assert fields["Uid"].split() == [str(NOBODY.pw_uid)] * 4
    assert fields["Gid"].split() == [str(NOBODY.pw_gid)] * 4
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


def test_servers_and_the_coordinator_keep_no_capability_workers_only_four(master):
    roles = wait_for(lambda: (c := children_of(master.pid)) and len(c) == 3 and c,
                     timeout=10, message="the master's three roles")
    for role in ("server", "coordinator"):
        for pid in roles[role]:
            caps = jobbox.capabilities(pid)
            assert all(value == 0 for value in caps.values()), (role, caps)
            with open(f"/proc/{pid}/status") as handle:
                assert status_fields(handle.read())["NoNewPrivs"] == "1"
    wanted = sum(1 << cap for cap in (jobbox.CAP_KILL, jobbox.CAP_SETGID, jobbox.CAP_SETUID,
                                      jobbox.CAP_SETPCAP))
    for pid in roles["worker"]:
        caps = jobbox.capabilities(pid)
        assert caps["CapBnd"] == wanted and caps["CapEff"] == wanted, caps


# --- resource limits ----------------------------------------------------------------------

def test_a_bounded_fork_bomb_ends_failed_naming_the_limit_and_the_worker_survives(api, master):
    workers = children_of(master.pid)["worker"]
    job = run(api, "i=0; while [ $i -lt 300 ]; do sleep 60 & i=$((i+1)); done; wait",
              limits=pb.ResourceLimits(processes=40))
    assert job.status == pb.FAILED
    assert "process limit reached (processes=40)" in job.error, job.error
    # Nothing it started is left, and the same worker goes on running jobs.
    wait_for(lambda: not _processes_of(NOBODY.pw_uid, b"sleep"), timeout=10,
             message="the fork bomb's processes to be gone")
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

def test_the_wrapper_switches_user_drops_everything_and_sets_both_limits():
    box = jobbox.JobBox(user=NOBODY, groups=(NOBODY.pw_gid, 4242), setpriv="/usr/bin/setpriv",
                        prlimit="/usr/bin/prlimit", drop_bounding=True,
                        defaults={"processes": 10}, ceiling={"processes": 100})
    limits = box.limits_for({"processes": 500, "file_size": 1024})
    assert limits == {"processes": 100, "file_size": 1024}   # capped by this worker's ceiling
    assert box.wrapper(limits) == [
        "/usr/bin/setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}",
        f"--groups={NOBODY.pw_gid},4242", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
        "--no-new-privs", "--", "/usr/bin/prlimit", "--nproc=100:100", "--fsize=1024:1024",
        "--"]
    assert box.wrapper({"cpu_time": 5})[-2] == "--cpu=5:6"
    assert "/usr/bin/prlimit" not in box.wrapper({})   # nothing to limit: no prlimit


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
    box = jobbox.JobBox(user=None, groups=(), setpriv="", prlimit="", drop_bounding=False,
                        defaults={}, ceiling={})
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
