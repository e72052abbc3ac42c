"""dtsctl against a real dtsd: the commands a user types, with their output and exit codes."""

from __future__ import annotations

import json
import pwd
import re
import subprocess
import sys
import time

import pytest

from dtsd import config as configmod
from tests.helpers import (REPO_ROOT, TEST_JOB_USER, clean_env, free_port, run_dtsctl,
                           wait_for)

FAST = {"worker": {"retry_backoff": "50ms", "retry_backoff_max": "200ms", "kill_grace": "1s"},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}


@pytest.fixture
def dtsd(dtsd_factory):
    return dtsd_factory(FAST)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def test_submit_prints_an_id_and_status_shows_the_result(dtsd):
    job_id = ok(dtsd.dtsctl("submit", "--", "echo", "hello")).strip()
    assert len(job_id) == 36
    shown = wait_for(lambda: (r := dtsd.dtsctl("-o", "json", "status", job_id)).returncode == 0
                     and json.loads(r.stdout)["jobs"][0]["status"] == "SUCCEEDED" and r)
    job = json.loads(shown.stdout)["jobs"][0]
    assert job["output"] == "hello\n"
    assert job["exit_code"] == 0
    assert job["attempts"] == 1
    assert job["attempt_history"][0]["worker"]
    table = ok(dtsd.dtsctl("status", job_id))
    assert "SUCCEEDED" in table and "hello" in table


def test_submit_wait_exits_with_the_job_s_exit_code(dtsd):
    result = dtsd.dtsctl("submit", "--wait", "--max-retries", "0", "--", "sh", "-c", "exit 3")
    assert result.returncode == 3, (result.stdout, result.stderr)
    result = dtsd.dtsctl("submit", "--wait", "--", 'echo "$USER $(id -u) $(id -G)"')
    assert result.returncode == 0
    user, uid, *groups = result.stdout.split()
    # Jobs run as a slot uid of their own (the suite's have no name: USER is job_user's),
    # with job_user's groups.
    first, last = configmod.load(str(dtsd.ini_path)).get("worker", "job_uids")
    assert user == TEST_JOB_USER and first <= int(uid) <= last
    assert groups == [uid, str(pwd.getpwnam(TEST_JOB_USER).pw_gid)]


def test_submit_file_in_the_seed_format(dtsd, tmp_path):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"jobs": [
        {"name": "first", "command": "echo one", "description": "d1"},
        {"name": "second", "command": "echo two", "description": "d2"}]}))
    result = dtsd.dtsctl("submit", "--file", str(jobs), "--wait")
    out = ok(result)
    assert "first" in out and "second" in out
    assert "one" in out and "two" in out
    assert out.count("SUCCEEDED") == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"jobs": [{"name": "x"}]}))
    result = dtsd.dtsctl("submit", "--file", str(bad))
    assert result.returncode == 2 and "command" in result.stderr


def test_list_by_status(dtsd):
    failed = ok(dtsd.dtsctl("submit", "--max-retries", "0", "--", "false")).strip()
    good = ok(dtsd.dtsctl("submit", "--", "true")).strip()
    wait_for(lambda: failed in dtsd.dtsctl("list", "--status", "FAILED").stdout)
    listed = ok(dtsd.dtsctl("-o", "json", "list", "--status", "failed"))
    assert [j["id"] for j in json.loads(listed)["jobs"]] == [failed]
    assert good not in listed


def test_logs_follow_streams_live_output(dtsd):
    job_id = ok(dtsd.dtsctl("submit", "--", "for i in 1 2 3; do echo tick $i; sleep 0.3; done")).strip()
    proc = subprocess.Popen([sys.executable, "-m", "dtsd.cli", "--servers", dtsd.address, "logs", "-f",
                             job_id], stdout=subprocess.PIPE, cwd=REPO_ROOT,
                            env=clean_env({"PYTHONPATH": str(REPO_ROOT)}))
    first = proc.stdout.readline()
    seen_at = time.monotonic()
    rest = proc.stdout.read()
    assert proc.wait(30) == 0
    assert first == b"tick 1\n" and rest == b"tick 2\ntick 3\n"
    assert time.monotonic() - seen_at > 0.3  # the first line came while the job still ran


def test_cancel_kills_a_running_job(dtsd):
    job_id = ok(dtsd.dtsctl("submit", "--", "sleep 300")).strip()
    wait_for(lambda: "RUNNING" in dtsd.dtsctl("status", job_id).stdout)
    out = ok(dtsd.dtsctl("cancel", job_id))
    assert "RUNNING" in out and "CANCELLED" in out
    wait_for(lambda: "CANCELLED" in dtsd.dtsctl("status", job_id).stdout, timeout=5)


def test_dlq_list_requeue_and_purge(dtsd, tmp_path):
    mark = tmp_path / "mark"
    job_id = ok(dtsd.dtsctl("submit", "--max-retries", "1", "--", f"test -f {mark}")).strip()
    wait_for(lambda: job_id in dtsd.dtsctl("dlq", "list").stdout)
    mark.touch()
    out = ok(dtsd.dtsctl("-o", "json", "dlq", "requeue", job_id))
    assert json.loads(out)["ids"] == [job_id]
    wait_for(lambda: "SUCCEEDED" in dtsd.dtsctl("status", job_id).stdout)
    other = ok(dtsd.dtsctl("submit", "--max-retries", "0", "--", "false")).strip()
    wait_for(lambda: other in dtsd.dtsctl("dlq", "list").stdout)
    assert json.loads(ok(dtsd.dtsctl("-o", "json", "dlq", "purge", "--yes")))["purged"] == 1
    assert other not in ok(dtsd.dtsctl("dlq", "list"))


def test_cluster_status_shows_the_node_and_its_children(dtsd):
    def shown():
        data = json.loads(ok(dtsd.dtsctl("-o", "json", "status")))
        children = data["nodes"][0]["children"] if data["nodes"] else []
        return data if len(children) == 5 and all(c["state"] == "RUNNING" for c in children) \
            else None
    data = wait_for(shown, message="the node record to show every child RUNNING")
    assert data["single_node"] is True
    node = data["nodes"][0]
    assert node["node_id"] == dtsd.node_id and node["leader"] is True
    roles = sorted((c["role"], c["index"]) for c in node["children"])
    assert roles == [("coordinator", 0), ("server", 0), ("server", 1), ("worker", 0), ("worker", 1)]
    assert all(c["pid"] > 0 for c in node["children"])
    assert len(data["workers"]) == 2
    assert set(data["job_counts"]) == {"PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"}


def test_fail_over_to_the_next_server_and_exit_3_when_none_answers(dtsd):
    dead = f"127.0.0.1:{free_port()}"
    result = run_dtsctl("--servers", f"{dead},{dtsd.address}", "submit", "--", "true")
    assert result.returncode == 0, result.stderr
    result = run_dtsctl("--servers", dead, "--timeout", "3", "status")
    assert result.returncode == 3
    assert dead in result.stderr


def test_seed_environment_variables_pick_the_servers(dtsd):
    result = run_dtsctl("submit", "--", "true", env={"SERVERS": dtsd.address})
    assert result.returncode == 0, result.stderr


def test_bad_input_is_a_clear_error(dtsd):
    result = dtsd.dtsctl("submit", "--priority", "12", "--", "true")
    assert result.returncode == 2 and "priority" in result.stderr
    result = dtsd.dtsctl("status", "no-such-job")
    assert result.returncode == 1 and "not found" in result.stderr


def test_a_death_by_signal_reads_killed_by_sigterm_everywhere(dtsd):
    """It read `Exit code: -15` in status and 143 with --wait; and an exit code was said
    twice: `FAILED, exit code 7 (exit code 7)`."""
    waited = dtsd.dtsctl("submit", "--wait", "--max-retries", "0", "--", "kill -TERM $$")
    assert waited.returncode == 143, (waited.stdout, waited.stderr)
    line = waited.stderr.splitlines()[-1]
    assert line.endswith(": FAILED, killed by SIGTERM"), waited.stderr
    job_id = line.split(":")[0]
    shown = ok(dtsd.dtsctl("status", job_id))
    assert re.search(r"^Exit code:\s+killed by SIGTERM$", shown, re.M), shown
    assert "-15" not in shown and "signal 15" not in shown
    assert "SIGTERM" in ok(dtsd.dtsctl("list")).splitlines()[1].split()
    assert json.loads(ok(dtsd.dtsctl("-o", "json", "status", job_id)))["jobs"][0][
        "exit_code"] == -15
    seven = dtsd.dtsctl("submit", "--wait", "--max-retries", "0", "--", "exit 7")
    assert seven.returncode == 7
    assert seven.stderr.splitlines()[-1].endswith(": FAILED, exit code 7"), seven.stderr


def test_logs_follow_ends_with_the_final_status_line(dtsd):
    job_id = ok(dtsd.dtsctl("submit", "--max-retries", "0", "--", "echo out; exit 4")).strip()
    followed = dtsd.dtsctl("logs", "-f", job_id)
    assert followed.returncode == 4
    assert followed.stdout == "out\n"
    assert followed.stderr.splitlines()[-1] == f"{job_id}: FAILED, exit code 4"


def test_dlq_purge_without_ids_off_a_terminal_needs_all_or_yes(dtsd):
    job_id = ok(dtsd.dtsctl("submit", "--max-retries", "0", "--", "false")).strip()
    wait_for(lambda: job_id in dtsd.dtsctl("dlq", "list").stdout)
    refused = dtsd.dtsctl("dlq", "purge")          # stdin is /dev/null: a script
    assert refused.returncode == 2 and "give --all (or --yes)" in refused.stderr
    assert job_id in ok(dtsd.dtsctl("dlq", "list"))
    assert ok(dtsd.dtsctl("dlq", "purge", "--all")).strip() == "purged 1"
    assert job_id not in ok(dtsd.dtsctl("dlq", "list"))


def test_a_job_for_a_queue_no_worker_serves_is_warned_about(dtsd, tmp_path):
    """It was accepted silently and waited forever: the submit warns, status names it."""
    wait_for(lambda: json.loads(ok(dtsd.dtsctl("-o", "json", "status")))["workers"],
             message="the workers' heartbeats")
    served = dtsd.dtsctl("submit", "--", "true")
    assert ok(served) and "no live worker" not in served.stderr
    lonely = dtsd.dtsctl("submit", "--queue", "gpu", "--", "true")
    assert lonely.returncode == 0
    assert "warning: no live worker serves queue 'gpu'" in lonely.stderr
    reply = json.loads(ok(dtsd.dtsctl("-o", "json", "submit", "--queue", "gpu", "--", "true")))
    assert reply["queue_unserved"] is True
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"jobs": [{"command": "true", "queue": "gpu"},
                                         {"command": "true", "queue": "gpu"},
                                         {"command": "true"}]}))
    batch = dtsd.dtsctl("submit", "--file", str(jobs))
    assert ok(batch) and batch.stderr.count("no live worker serves queue 'gpu'") == 1
    status = json.loads(ok(dtsd.dtsctl("-o", "json", "status")))
    assert status["unserved_queues"] == ["gpu"]
    assert "No live worker serves 'gpu'" in ok(dtsd.dtsctl("status"))


def complete(dtsd, line: str) -> list[str]:
    """What bash completion offers for the last word of `line` (click's protocol, which
    packaging/completion/dtsctl speaks), asking the real dtsd."""
    words = line.split(" ")
    result = subprocess.run(
        [sys.executable, "-m", "dtsd.cli"], capture_output=True, text=True, timeout=30,
        cwd=REPO_ROOT, env=clean_env({"PYTHONPATH": str(REPO_ROOT), "COMP_WORDS": line,
                                      "COMP_CWORD": str(len(words) - 1),
                                      "_DTSCTL_COMPLETE": "bash_complete"}))
    assert result.returncode == 0, result.stderr
    return [item.split(",", 1)[1] for item in result.stdout.splitlines() if item]


def test_completion_of_job_ids_schedule_names_and_zones(dtsd):
    running = ok(dtsd.dtsctl("submit", "--", "sleep 300")).strip()
    failed = ok(dtsd.dtsctl("submit", "--max-retries", "0", "--", "false")).strip()
    wait_for(lambda: failed in dtsd.dtsctl("dlq", "list").stdout)
    ok(dtsd.dtsctl("cron", "add", "nightly", "0 3 * * *", "--", "true"))
    at = f"--servers {dtsd.address} --timeout 20"       # a loaded CI machine can be slow
    assert {running, failed} <= set(complete(dtsd, f"dtsctl {at} status "))
    assert complete(dtsd, f"dtsctl {at} cancel ") == [running]
    assert complete(dtsd, f"dtsctl {at} retry ") == [failed]
    assert complete(dtsd, f"dtsctl {at} dlq requeue ") == [failed]
    assert complete(dtsd, f"dtsctl {at} logs {failed[:8]}") == [failed]
    assert running in complete(dtsd, f"dtsctl status {at} ")   # options after the verb count
    assert complete(dtsd, f"dtsctl {at} cron pause nig") == ["nightly"]
    assert complete(dtsd, f"dtsctl {at} cron next ") == ["nightly"]
    assert complete(dtsd, "dtsctl cron add x y --tz America/New_Y") == ["America/New_York"]
    nowhere = f"127.0.0.1:{free_port()}"
    assert complete(dtsd, f"dtsctl --servers {nowhere} status ") == []   # no server: nothing
    assert complete(dtsd, f"dtsctl {at} cron pause zzz") == []
    ok(dtsd.dtsctl("cancel", running))
