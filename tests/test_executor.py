"""The executor against real shells: exit codes, output, deadlines, cancels and leftovers.

Every test runs real processes. Waiting is done by polling a condition with a deadline; the
only sleeps are inside the jobs themselves.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from dtsd.executor import Execution, Result, build_env
from dtsd.models import EndReason

pytestmark = pytest.mark.timeout(60)

PATH = "/usr/local/bin:/usr/bin:/bin"
ENV = {"PATH": PATH, "LANG": "C.UTF-8"}
SOON = 5.0          # an honest upper bound for "promptly" on a loaded 2-core VM


def run(command: str, **kwargs) -> Result:
    kwargs.setdefault("env", ENV)
    kwargs.setdefault("cwd", "/")
    return Execution(command, **kwargs).run()


def wait_for(condition, timeout: float = SOON, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for init to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def read_pid(path) -> int:
    text = wait_for(lambda: path.exists() and path.read_text().strip(), what=f"a pid in {path}")
    return int(text)


def assert_gone(pid: int) -> None:
    wait_for(lambda: not alive(pid), what=f"pid {pid} to die")


class Background:
    """run() in its own thread, as the worker does, so the test can act while it runs."""

    def __init__(self, execution: Execution):
        self.execution = execution
        self.result: Result | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.result = self.execution.run()

    def join(self, timeout: float = SOON) -> Result:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"run() still running after {timeout}s"
        return self.result


# --- exit status --------------------------------------------------------------------------

def test_exit_zero():
    result = run("true")
    assert (result.exit_code, result.signal, result.reason, result.error) == (0, None, None, "")
    assert result.ok
    assert 0 <= result.duration < SOON


def test_exit_three_is_a_normal_exit():
    result = run("exit 3")
    assert (result.exit_code, result.signal, result.reason, result.error) == (3, None, None, "")
    assert not result.ok


def test_death_by_foreign_signal_is_named():
    result = run("kill -KILL $$")
    assert (result.exit_code, result.signal, result.reason) == (None, 9, None)
    assert result.error == "killed by signal 9 (SIGKILL)"


# --- output -------------------------------------------------------------------------------

def test_stdout_and_stderr_interleave_in_order():
    result = run("echo one; echo two >&2; echo three; echo four >&2")
    assert result.output == b"one\ntwo\nthree\nfour\n"
    assert not result.truncated


def test_non_utf8_output_is_byte_exact():
    result = run(r"printf '\377\376\000abc\200\n'")
    assert result.output == b"\xff\xfe\x00abc\x80\n"


def test_output_is_capped_and_the_job_still_finishes_quickly():
    result = run("head -c 5000000 /dev/zero; echo done >&2; exit 7", max_output=100_000)
    assert result.exit_code == 7
    assert result.output == b"\0" * 100_000
    assert result.truncated
    assert result.duration < SOON


def test_output_exactly_at_the_cap_is_not_truncated():
    result = run("head -c 1000 /dev/zero", max_output=1000)
    assert len(result.output) == 1000
    assert not result.truncated


def test_on_output_chunks_reassemble_with_offsets():
    chunks = []
    command = "for i in 1 2 3 4 5; do echo line$i; sleep 0.03; done; head -c 300000 /dev/zero"
    result = run(command, on_output=lambda chunk, offset: chunks.append((chunk, offset)))
    assert result.exit_code == 0
    assert len(result.output) == 300_000 + 5 * 6
    expected_offset = 0
    for chunk, offset in chunks:
        assert chunk and offset == expected_offset
        expected_offset += len(chunk)
    assert b"".join(chunk for chunk, _ in chunks) == result.output
    assert len(chunks) < 20, "on_output must be coalesced, not called per read"


def test_on_output_sees_only_kept_output():
    chunks = []
    result = run("head -c 1000000 /dev/zero", max_output=70_000,
                 on_output=lambda chunk, offset: chunks.append((chunk, offset)))
    assert result.truncated
    assert b"".join(chunk for chunk, _ in chunks) == result.output == b"\0" * 70_000


def test_many_tiny_writes_are_coalesced():
    chunks = []
    result = run("i=0; while [ $i -lt 500 ]; do echo x; i=$((i+1)); done",
                 on_output=lambda chunk, offset: chunks.append(chunk))
    assert result.output == b"x\n" * 500
    assert len(chunks) <= 5


def test_a_failing_on_output_does_not_break_the_run():
    def broken(chunk, offset):
        raise RuntimeError("stream gone")

    result = run("echo hello", on_output=broken)
    assert (result.exit_code, result.output) == (0, b"hello\n")


# --- timeouts and stops -------------------------------------------------------------------

def test_timeout_kills_the_shell_and_its_grandchildren(tmp_path):
    pidfile = tmp_path / "bg.pid"
    started = time.monotonic()
    result = run(f"sleep 100 & echo $! > {pidfile}; sleep 100; echo never",
                 timeout=0.5, kill_grace=5)
    assert result.reason is EndReason.TIMEOUT
    assert result.error == "timeout after 0.5s"
    assert result.exit_code is None and result.signal == 15
    assert b"never" not in result.output
    assert 0.5 <= time.monotonic() - started < 0.5 + SOON
    assert_gone(read_pid(pidfile))


def test_a_job_ignoring_term_is_killed_after_the_grace(tmp_path):
    pidfile = tmp_path / "child.pid"
    result = run(f"trap '' TERM; sleep 100 & echo $! > {pidfile}; wait",
                 timeout=0.3, kill_grace=0.5)
    assert result.reason is EndReason.TIMEOUT
    assert result.signal == 9 and result.exit_code is None
    assert 0.8 <= result.duration < 0.8 + SOON
    assert_gone(read_pid(pidfile))


def test_stop_from_another_thread_is_prompt(tmp_path):
    marker = tmp_path / "started"
    execution = Execution(f"touch {marker}; sleep 100", env=ENV, cwd="/", kill_grace=5)
    job = Background(execution)
    wait_for(marker.exists, what="the job to start")
    assert execution.pid is not None
    asked = time.monotonic()
    execution.stop(EndReason.CANCELLED)
    result = job.join()
    assert time.monotonic() - asked < 1.0
    assert result.reason is EndReason.CANCELLED
    assert result.error == "cancelled"
    assert result.signal == 15
    assert execution.pid is None


def test_first_stop_reason_wins(tmp_path):
    marker = tmp_path / "started"
    execution = Execution(f"touch {marker}; sleep 100", env=ENV, cwd="/")
    job = Background(execution)
    wait_for(marker.exists, what="the job to start")
    execution.stop(EndReason.HANDED_BACK)
    execution.stop(EndReason.CANCELLED)
    result = job.join()
    assert result.reason is EndReason.HANDED_BACK
    assert result.error == "handed back"


def test_stop_before_run_never_starts_the_job(tmp_path):
    marker = tmp_path / "ran"
    execution = Execution(f"touch {marker}", env=ENV, cwd="/")
    execution.stop(EndReason.CANCELLED)
    result = execution.run()
    assert result.reason is EndReason.CANCELLED
    assert result.exit_code is None and result.output == b""
    assert not marker.exists()
    assert execution.pid is None


def test_stop_after_run_changes_nothing():
    execution = Execution("echo hi", env=ENV, cwd="/")
    result = execution.run()
    execution.stop(EndReason.CANCELLED)
    assert (result.exit_code, result.reason, result.output) == (0, None, b"hi\n")


def test_run_twice_is_refused():
    execution = Execution("true", env=ENV, cwd="/")
    execution.run()
    with pytest.raises(RuntimeError):
        execution.run()


def test_timeout_is_honoured_after_the_job_closes_its_output():
    result = run("exec >/dev/null 2>&1; sleep 100", timeout=0.3, kill_grace=5)
    assert result.reason is EndReason.TIMEOUT
    assert result.duration < 0.3 + SOON


def test_exit_code_is_awaited_after_the_job_closes_its_output():
    result = run("echo before; exec >/dev/null 2>&1; sleep 0.2; exit 4")
    assert (result.exit_code, result.reason, result.output) == (4, None, b"before\n")
    assert result.duration >= 0.2


# --- environment, cwd, stdin, spawn failures ----------------------------------------------

def test_build_env_is_clean_and_dtsd_variables_win():
    env = build_env({"FOO": "bar", "DTSD_JOB_ID": "forged", "PATH": "/opt/bin"},
                    path=PATH, job_id="job-1", attempt=2)
    assert env == {"PATH": "/opt/bin", "HOME": "/", "LANG": "C.UTF-8", "FOO": "bar",
                   "DTSD_JOB_ID": "job-1", "DTSD_ATTEMPT": "2"}


def test_the_job_sees_its_env_and_not_the_workers(monkeypatch):
    monkeypatch.setenv("DTSD_TEST_SECRET", "leaked")
    env = build_env({"GREETING": "hello world"}, path=PATH, job_id="job-7", attempt=3,
                    home="/tmp")
    result = run("env", env=env)
    lines = set(result.output.decode().splitlines())
    assert {"GREETING=hello world", "DTSD_JOB_ID=job-7", "DTSD_ATTEMPT=3", "HOME=/tmp",
            "LANG=C.UTF-8", f"PATH={PATH}"} <= lines
    assert not any(line.startswith("DTSD_TEST_SECRET=") for line in lines)
    assert "leaked" not in result.output.decode()


def test_cwd_is_honoured(tmp_path):
    result = run("pwd -P", cwd=str(tmp_path))
    assert result.output.decode().strip() == os.path.realpath(tmp_path)


def test_missing_cwd_is_a_spawn_failure(tmp_path):
    missing = tmp_path / "nope"
    result = run("true", cwd=str(missing))
    assert result.reason is EndReason.SPAWN_FAILED
    assert result.exit_code is None and result.signal is None
    assert result.error.startswith("cannot start: ")
    assert str(missing) in result.error


def test_missing_shell_is_a_spawn_failure():
    result = run("true", shell="/no/such/shell")
    assert result.reason is EndReason.SPAWN_FAILED
    assert "/no/such/shell" in result.error


def test_stdin_is_dev_null():
    result = run("cat; echo eof", timeout=SOON)
    assert (result.reason, result.exit_code, result.output) == (None, 0, b"eof\n")


def test_wrapper_execs_the_shell():
    result = run("echo $0", wrapper=["/usr/bin/env", "-i"])
    assert (result.exit_code, result.output) == (0, b"/bin/sh\n")


# --- process group hygiene ----------------------------------------------------------------

def test_a_background_leftover_holding_the_pipe_does_not_hold_the_job(tmp_path):
    pidfile = tmp_path / "bg.pid"
    result = run(f"sleep 100 & echo $! > {pidfile}; echo done; exit 0")
    assert (result.exit_code, result.reason, result.output) == (0, None, b"done\n")
    assert result.duration < 1.0
    assert_gone(read_pid(pidfile))


def test_a_detached_leftover_is_killed_too(tmp_path):
    pidfile = tmp_path / "bg.pid"
    result = run(f"sleep 100 >/dev/null 2>&1 & echo $! > {pidfile}")
    assert (result.exit_code, result.reason) == (0, None)
    assert_gone(read_pid(pidfile))


def test_concurrent_runs_do_not_mix(tmp_path):
    results = {}

    def one(i):
        results[i] = run(f"echo job{i}; exit {i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SOON)
    assert {i: (r.exit_code, r.output) for i, r in results.items()} == \
        {i: (i, f"job{i}\n".encode()) for i in range(8)}
