"""What dtsd writes to its log: one line per record whatever the text it names (control
characters escaped), syslog priorities under journald, a log file kept from other users, and
the lines about single jobs (failed for good, lost with a worker, `[dtsd] log_jobs`)."""

from __future__ import annotations

import logging
import os
import re
import signal
import stat
import sys

import grpc
import pytest

from dtsd import child
from dtsd.dtsdpb import pb, pb_grpc
from tests.helpers import clean_env, REPO_ROOT, wait_for
from tests.test_master import FAST, counts_are


def record(message: str, *args, level: int = logging.INFO, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("dtsd.test", level, __file__, 1, message, args, exc_info)


def test_the_formatter_escapes_control_characters_in_the_message():
    formatter = child.LogFormatter("master", journal=False)
    name = "ghost\n2026-01-01 00:00:00,000 INFO [server-0 1] dtsd.audit: forged\x1b[2J\r\x9b\u2028"
    line = formatter.format(record("worker %s is gone", name))
    assert "\n" not in line and "\x1b" not in line and "\r" not in line
    assert "\x9b" not in line and "\u2028" not in line
    assert line.endswith("worker ghost\\n2026-01-01 00:00:00,000 INFO [server-0 1] dtsd.audit: "
                         "forged\\x1b[2J\\r\\x9b\\u2028 is gone")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO \[master \d+\] dtsd.test: ", line)
    # Printable text, tabs aside, is left alone.
    assert formatter.format(record("caf\u00e9 \\n 100%")).endswith("caf\u00e9 \\n 100%")
    assert formatter.format(record("a\tb")).endswith("a\\tb")


def test_a_traceback_keeps_its_lines_but_not_the_escape_sequences():
    formatter = child.LogFormatter("worker-0", journal=False)
    try:
        raise ValueError("bad\x1b]52;c;AAAA\x07 value")
    except ValueError:
        text = formatter.format(record("failed", level=logging.ERROR, exc_info=sys.exc_info()))
    lines = text.split("\n")
    assert lines[0].endswith("ERROR [worker-0 %d] dtsd.test: failed" % os.getpid())
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: bad\\x1b]52;c;AAAA\\x07 value"


def test_under_journald_every_line_carries_its_priority_and_no_time_stamp():
    formatter = child.LogFormatter("server-1", journal=True)
    pid = os.getpid()
    assert formatter.format(record("hello")) == f"<6>INFO [server-1 {pid}] dtsd.test: hello"
    assert formatter.format(record("x", level=logging.WARNING)).startswith("<4>WARNING ")
    assert formatter.format(record("x", level=logging.ERROR)).startswith("<3>ERROR ")
    assert formatter.format(record("x", level=logging.CRITICAL)).startswith("<2>CRITICAL ")
    assert formatter.format(record("x", level=logging.DEBUG)).startswith("<7>DEBUG ")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        text = formatter.format(record("failed", level=logging.ERROR, exc_info=sys.exc_info()))
    assert all(line.startswith("<3>") for line in text.split("\n")), text


def test_journal_stream_must_name_standard_error_itself(tmp_path, monkeypatch):
    with open(tmp_path / "err", "w") as err:
        saved = os.dup(2)
        try:
            os.dup2(err.fileno(), 2)
            info = os.fstat(err.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
            assert child.stderr_is_journal()
            assert child.journal_line("a\nb") == "<3>a\n<3>b"
            monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino + 1}")
            assert not child.stderr_is_journal()       # stderr was redirected elsewhere
            assert child.journal_line("a") == "a"
            monkeypatch.delenv("JOURNAL_STREAM")
            assert not child.stderr_is_journal()
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def test_a_master_under_journald_logs_priorities_from_every_process(dtsd_factory):
    master = dtsd_factory(FAST, start=False)
    master.log_path.touch()
    info = os.stat(master.log_path)
    master.env = lambda: clean_env({"PYTHONPATH": str(REPO_ROOT),
                                    "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
    master.start()
    wait_for(lambda: counts_are(master, server=2, worker=2, coordinator=1))
    lines = master.log().splitlines()
    assert lines and all(re.match(r"<[2-7]>[A-Z]+ \[", line) for line in lines), lines[:5]
    for role in ("master", "server-0", "worker-0", "coordinator-0"):
        assert any(line.startswith(f"<6>INFO [{role} ") for line in lines), role
    # The fixture's Redis takes no password: the start checks warn, at warning priority.
    assert any(line.startswith("<4>WARNING [master ") and "takes no password" in line
               for line in lines)


def test_a_worker_name_read_from_redis_cannot_forge_a_log_line(dtsd_factory, redis):
    """Finding: a name added to the workers set with a newline wrote a forged
    `dtsd.audit` line when the leader logged it as gone."""
    master = dtsd_factory(FAST)
    wait_for(lambda: counts_are(master, server=2, worker=2, coordinator=1))
    forged = "2026-01-01 00:00:00,000 INFO [server-0 1] dtsd.audit: cancel by admin: all"
    name = f"ghost\n{forged}\x1b[2J"
    redis.client().sadd("dtsd:default:workers", name)
    wait_for(lambda: "worker ghost" in master.log(), timeout=30,
             message="the leader to log the ghost worker")
    log = master.log()
    assert not any(line.startswith(forged[:23]) for line in log.splitlines())
    assert f"worker ghost\\n{forged}\\x1b[2J is gone" in log
    assert "\x1b" not in log


def test_the_log_file_is_created_0640_whatever_the_umask(dtsd_factory, tmp_path):
    log_file = tmp_path / "logs" / "dtsd.log"
    log_file.parent.mkdir()
    old = os.umask(0o022)
    try:
        master = dtsd_factory(FAST, dtsd={"log_file": str(log_file)})
    finally:
        os.umask(old)
    wait_for(lambda: counts_are(master, server=2, worker=2, coordinator=1))
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o640
    assert "master starting" in log_file.read_text()
    # Rotated away and reopened (USR1): the new file is 0640 too.
    log_file.rename(tmp_path / "logs" / "dtsd.log.1")
    master.signal(signal.SIGUSR1)
    wait_for(lambda: log_file.exists() and "reopened" in log_file.read_text(),
             message="the master to log into a new file")
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o640


# --- the job lines (logger dtsd.jobs) ------------------------------------------------------

JOB_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) \[(?P<process>[a-z]+)-\d+ \d+\] dtsd\.jobs: "
                      r"(?P<text>.*)$")


def job_lines(master, job_id: str) -> list[tuple[str, str, str]]:
    """(level, process role, text) of each dtsd.jobs line naming the job, in order."""
    found = []
    for line in master.log().splitlines():
        match = JOB_LINE.match(line)
        if match and f"job {job_id} " in match["text"]:
            found.append((match["level"], match["process"], match["text"]))
    return found


def scheduler(master):
    return pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))


def submit(api, command: str, **spec) -> str:
    return api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command=command, **spec))).id


def wait_status(api, job_id: str, status, timeout: float = 30):
    return wait_for(lambda: (job := api.GetJob(pb.GetJobRequest(id=job_id))).status == status
                    and job, timeout=timeout, message=f"job {job_id} to be {status}")


def test_a_job_that_fails_for_good_is_logged_once_and_nothing_else_by_default(dtsd_factory):
    master = dtsd_factory(FAST)
    api = scheduler(master)
    quiet = submit(api, "echo fine", name="quiet")
    wait_status(api, quiet, pb.SUCCEEDED)
    failing = submit(api, "exit 3", name="backup-db", max_retries=1)
    wait_status(api, failing, pb.FAILED)
    lines = wait_for(lambda: job_lines(master, failing), timeout=10,
                     message="the failure line")
    assert lines == [("ERROR", "worker", f"job {failing} (backup-db) on queue default failed "
                                         "for good at attempt 2: exit code 3; dead-lettered")]
    # log_jobs is off: neither the first failed attempt nor the job that succeeded is logged.
    assert job_lines(master, quiet) == []
    assert " INFO " not in "".join(line for line in master.log().splitlines()
                                   if "dtsd.jobs:" in line)


def test_log_jobs_logs_each_attempt_s_start_and_end(dtsd_factory):
    master = dtsd_factory(FAST, dtsd={"log_jobs": "true"})
    api = scheduler(master)
    ok = submit(api, "sleep 0.2", name="nightly")
    job = wait_status(api, ok, pb.SUCCEEDED)
    lines = wait_for(lambda: len(job_lines(master, ok)) >= 2 and job_lines(master, ok),
                     timeout=10, message="the end line")
    label = f"job {ok} (nightly) on queue default"
    assert lines[0] == ("INFO", "worker", f"{label}: attempt 1 started on worker {job.worker}")
    assert lines[1][:2] == ("INFO", "worker")
    ended = re.fullmatch(rf"{re.escape(label)}: attempt 1 ended after (\d+\.\d{{3}})s: "
                         r"succeeded; exit code 0", lines[1][2])
    assert ended, lines[1]
    assert 0.2 <= float(ended[1]) < 10
    assert len(lines) == 2

    failing = submit(api, "exit 3", max_retries=1)     # no name: no parentheses
    wait_status(api, failing, pb.FAILED)
    wait_for(lambda: any("failed for good" in text for _, _, text in job_lines(master, failing)),
             timeout=10, message="the failure line")
    texts = [(level, text) for level, _, text in job_lines(master, failing)]
    label = f"job {failing} on queue default"
    assert [level for level, _ in texts] == ["INFO", "INFO", "INFO", "INFO", "ERROR"], texts
    assert texts[0][1].startswith(f"{label}: attempt 1 started on worker ")
    assert re.fullmatch(rf"{re.escape(label)}: attempt 1 ended after \d+\.\d{{3}}s: failed, "
                        r"retry in \d+\.\ds; exit code 3", texts[1][1]), texts[1]
    assert texts[2][1].startswith(f"{label}: attempt 2 started on worker ")
    assert re.fullmatch(rf"{re.escape(label)}: attempt 2 ended after \d+\.\d{{3}}s: failed, "
                        r"dead-lettered; exit code 3", texts[3][1]), texts[3]
    assert texts[4][1] == f"{label} failed for good at attempt 2: exit code 3; dead-lettered"


def test_a_job_name_cannot_forge_a_log_line_or_an_escape_sequence(dtsd_factory):
    master = dtsd_factory(FAST, dtsd={"log_jobs": "true"})
    api = scheduler(master)
    forged = "2026-01-01 00:00:00,000 INFO [worker-0 1] dtsd.jobs: job x succeeded"
    name = f"evil\n{forged}\x1b[31m"
    failing = submit(api, "exit 4", name=name, max_retries=0)
    wait_status(api, failing, pb.FAILED)
    escaped = f"evil\\n{forged}\\x1b[31m"
    lines = wait_for(lambda: [t for level, _, t in job_lines(master, failing) if level == "ERROR"],
                     timeout=10, message="the failure line")
    assert lines == [f"job {failing} ({escaped}) on queue default failed for good at attempt "
                     "1: exit code 4; dead-lettered"]
    log = master.log()
    assert "\x1b" not in log
    assert not any(line.startswith(forged[:23]) for line in log.splitlines())
    # The start and end lines (log_jobs) name it escaped too.
    assert sum(f"({escaped})" in line for line in log.splitlines()) == 3


def test_a_job_lost_with_its_worker_is_logged_by_the_leader(dtsd_factory, tmp_path):
    master = dtsd_factory(FAST, worker={"processes": 1, "heartbeat_ttl": "2s"})
    api = scheduler(master)
    mark = tmp_path / "mark"
    once = submit(api, "sleep 300", name="once", max_retries=0)
    again = submit(api, f"test -f {mark} || {{ touch {mark}; sleep 300; }}", name="again",
                   max_retries=2)
    running = [wait_status(api, job_id, pb.RUNNING) for job_id in (once, again)]
    wait_for(mark.exists, message="the second job to start")
    worker = running[0].worker
    assert running[1].worker == worker
    os.kill(int(worker.rsplit("-", 1)[1]), signal.SIGKILL)
    wait_status(api, once, pb.FAILED, timeout=30)
    wait_status(api, again, pb.SUCCEEDED, timeout=30)
    lost = wait_for(lambda: job_lines(master, again), timeout=10, message="the lost line")
    assert lost == [("WARNING", "coordinator",
                     f"job {again} (again) on queue default lost at attempt 1 with its worker "
                     f"{worker}; requeued for retry 1 of 2 in "
                     + lost[0][2].rpartition(" in ")[2])]
    assert re.fullmatch(r"\d+\.\ds", lost[0][2].rpartition(" in ")[2])
    assert job_lines(master, once) == [
        ("ERROR", "coordinator", f"job {once} (once) on queue default failed for good at "
                                 f"attempt 1: lost with its worker {worker}, no retries left; "
                                 "dead-lettered")]
    assert (f"worker {worker} is dead (lease run out): 1 job(s) requeued, 1 dead-lettered"
            in master.log())
