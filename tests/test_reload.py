"""A reload runs every check a start runs, and tells the truth about its outcome.

`dtsd reload` (the unit's ExecReload=) signals a real master and waits for its verdict in
<runtime_dir>/reload.json: 0 once the new configuration runs, 1 with the reason when the
master refused the file and kept the running configuration.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import time

import grpc

from dtsd.dtsdpb import pb, pb_grpc
from dtsd.health import health_pb2
from tests.helpers import REPO_ROOT, clean_env, free_port, health_status, wait_for
from tests.test_master import FAST, children, counts_are, node, rewrite


def reload_command(master, *args: str, stderr_path=None, journal: bool = False,
                   timeout: float = 120) -> subprocess.CompletedProcess:
    """`dtsd reload --pid PID -c INI`, as the unit's ExecReload= runs it. With `journal`,
    standard error is a file that JOURNAL_STREAM names, as journald's stream would be."""
    argv = [sys.executable, "-m", "dtsd", "reload", "--pid", str(master.pid),
            "-c", str(master.ini_path), *args]
    env = clean_env({"PYTHONPATH": str(REPO_ROOT)})
    if not journal:
        return subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    with open(stderr_path, "w+") as err:
        info = os.fstat(err.fileno())
        env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        result = subprocess.run(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        err.seek(0)
        result.stderr = err.read()
    return result


def pids(master) -> list[int]:
    return sorted(c["pid"] for c in children(master))


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def serving(master) -> bool:
    return health_status(master.address) == health_pb2.HealthCheckResponse.SERVING


def refusals(master) -> int:
    return master.log().count("reload refused, keeping the running configuration")


def test_a_reload_to_an_exposed_address_is_refused_and_the_old_one_keeps_serving(
        dtsd_factory, tmp_path):
    master = dtsd_factory(FAST)
    wait_for(lambda: counts_are(master, server=2, worker=2, coordinator=1))
    before = pids(master)
    exposed = free_port()
    rewrite(master, server={"listen": f"0.0.0.0:{exposed}"})   # no tokens, no TLS

    # A plain HUP (what `kill -HUP` and the old ExecReload= sent) is refused too.
    master.signal(signal.SIGHUP)
    wait_for(lambda: refusals(master) == 1, message="the refusal of the HUP in the log")
    line = next(l for l in master.log().splitlines() if "reload refused" in l)
    assert " ERROR " in line and f"[server] listen = 0.0.0.0:{exposed}" in line, line

    # The reload command reports the refusal: non-zero, the reason at error priority.
    result = reload_command(master, stderr_path=tmp_path / "stderr", journal=True)
    assert result.returncode == 1, result
    assert result.stderr.startswith("<3>dtsd reload: refused: "), result.stderr
    assert f"[server] listen = 0.0.0.0:{exposed} is not a loopback address" in result.stderr
    assert refusals(master) == 2
    # Nothing changed: the same children serve on the old address, none on the new one.
    assert pids(master) == before
    assert serving(master) and not listening(exposed)
    assert node(master)["state"] == "running"
    job = pb_grpc.SchedulerStub(grpc.insecure_channel(master.address)).SubmitJob(
        pb.SubmitJobRequest(job=pb.JobSpec(command="true")), timeout=10)
    assert job.id


def test_the_reload_command_waits_until_a_lowered_worker_count_is_done(dtsd_factory):
    master = dtsd_factory(FAST, worker={"processes": 2, "concurrency": 1})
    wait_for(lambda: counts_are(master, server=2, worker=2, coordinator=1))
    # One running job on each worker: the worker that is scaled away drains its own.
    ids = [master.dtsctl("submit", "--", "sleep", "3").stdout.strip() for _ in range(2)]
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))

    def statuses() -> list[str]:
        return [pb.JobStatus.Name(api.GetJob(pb.GetJobRequest(id=i), timeout=10).status)
                for i in ids]
    wait_for(lambda: statuses() == ["RUNNING", "RUNNING"], timeout=30,
             message="both jobs running")
    rewrite(master, worker={"processes": 1})
    started = time.monotonic()
    result = reload_command(master)
    took = time.monotonic() - started
    assert result.returncode == 0, result
    assert "dtsd reload: done (reload complete)" in result.stdout
    # It returned only once the reload was done: the retired worker drained and exited.
    record = node(master)
    assert record["state"] == "running", record
    assert [c["state"] for c in record["children"] if c["role"] == "worker"] == ["RUNNING"]
    assert all(c["state"] == "RUNNING" for c in record["children"]), record
    assert took > 1.0, f"returned after {took:.2f}s, while a job of 3 s was draining"
    wait_for(lambda: statuses() == ["SUCCEEDED", "SUCCEEDED"], timeout=30,
             message="both jobs to succeed")


def test_a_broken_file_and_other_failed_checks_are_refused_the_same_way(dtsd_factory,
                                                                        tmp_path):
    master = dtsd_factory(FAST, server={"processes": 1}, worker={"processes": 1})
    wait_for(lambda: counts_are(master, server=1, worker=1, coordinator=1))
    before = pids(master)
    runtime_dir = master.sections["dtsd"]["runtime_dir"]

    def refused(**sections) -> str:
        rewrite(master, **sections)
        result = reload_command(master)
        assert result.returncode == 1, result
        assert result.stderr.startswith("dtsd reload: refused: "), result.stderr
        assert pids(master) == before and serving(master)
        return result.stderr

    assert "[worker] processes: not a whole number: 'many'" in refused(
        worker={"processes": "many"})
    # A key the servers could not read: as root the children hold no capability, so a
    # file only its owner (nobody) may read is out of their reach.
    key = tmp_path / "server.key"
    key.write_text("not really a key\n")
    nobody = pwd.getpwnam("nobody")
    os.chown(key, nobody.pw_uid, nobody.pw_gid)
    key.chmod(0o600)
    assert f"[server] tls_key {key} cannot be read by " in refused(
        worker={"processes": 1}, server={"tls_cert": str(key), "tls_key": str(key)})
    # A Redis URL redis-py would not take, checked in a subprocess (the master loads no
    # client library).
    assert "[redis] url: " in refused(
        server={"tls_cert": "", "tls_key": ""},
        redis={"url": master.sections["redis"]["url"] + "?no_such_setting=1"})
    # A new listen address that something else holds.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{taken}" in refused(
            redis={"url": master.sections["redis"]["url"].partition("?")[0]},
            server={"listen": f"127.0.0.1:{taken}"})
    # A change the running master cannot make. The command looks for the verdict where
    # the new file says, finds none, and says why without signalling; a plain HUP is
    # refused by the master.
    rewrite(master, server={"listen": master.address},
            dtsd={"runtime_dir": str(tmp_path / "elsewhere")})
    result = reload_command(master)
    assert result.returncode == 1 and "a change of runtime_dir takes a restart" in result.stderr
    master.signal(signal.SIGHUP)
    wait_for(lambda: "[dtsd] runtime_dir changed" in master.log(), message="the refusal")
    assert pids(master) == before and serving(master)

    # Fixed, the same command applies it: a new worker setting replaces the worker.
    rewrite(master, dtsd={"runtime_dir": runtime_dir},
            worker={"max_output_bytes": "2MB"})
    result = reload_command(master)
    assert result.returncode == 0, result
    workers = children(master, "worker")
    assert len(workers) == 1 and workers[0]["pid"] not in before
    assert workers[0]["state"] == "RUNNING"


def test_a_start_with_an_unreadable_key_is_refused_with_exit_code_78(dtsd_factory, tmp_path):
    key = tmp_path / "server.key"
    key.write_text("not really a key\n")
    nobody = pwd.getpwnam("nobody")
    os.chown(key, nobody.pw_uid, nobody.pw_gid)
    key.chmod(0o600)
    master = dtsd_factory(FAST, server={"tls_cert": str(key), "tls_key": str(key)},
                          start=False)
    from tests.helpers import write_ini
    write_ini(master.ini_path, master.sections)
    result = subprocess.run([sys.executable, "-m", "dtsd", "-c", str(master.ini_path)],
                            cwd=REPO_ROOT, env=clean_env({"PYTHONPATH": str(REPO_ROOT)}),
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 78, result
    assert f"dtsd: refusing to start: [server] tls_key {key} cannot be read by root " \
           "(without capabilities, as dtsd's children run): Permission denied" in result.stderr


def test_reload_without_a_running_master_says_so(tmp_path):
    ini = tmp_path / "dtsd.ini"
    ini.write_text(f"[dtsd]\nruntime_dir = {tmp_path}\n")
    result = subprocess.run([sys.executable, "-m", "dtsd", "reload", "-c", str(ini)],
                            cwd=REPO_ROOT, env=clean_env({"PYTHONPATH": str(REPO_ROOT)}),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"no master keeps its reload verdict in {tmp_path}" in result.stderr


def test_a_reload_that_cannot_complete_fails_after_the_timeout(dtsd_factory):
    master = dtsd_factory(FAST, server={"processes": 1}, worker={"processes": 1})
    wait_for(lambda: counts_are(master, server=1, worker=1, coordinator=1))
    # Every check passes, but the new children cannot reach this database: they retry,
    # never ready, so the reload is never done.
    rewrite(master, postgres={"dsn": f"postgresql://postgres@127.0.0.1:{free_port()}/none"})
    result = reload_command(master, "--timeout", "3")
    assert result.returncode == 1, result
    assert "dtsd reload: not complete after 3s (reloading: applying: restarting" \
        in result.stderr, result.stderr
    assert serving(master)
