"""dtsctl without a dtsd: argument checks, parsing, rendering, server choice, exit codes.

Nothing here needs a server. Where a command gets as far as the network, it is pointed at
a loopback port where nothing listens, so "exit 3" proves the arguments were accepted and
"exit 2" proves they were rejected before any call was made.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
from datetime import datetime, timedelta, timezone

import click
import grpc
import pytest
from click.testing import CliRunner

from dtsd import cli as dtsctl
from dtsd import config
from dtsd.client import Client, parse_servers, unreachable_store
from dtsd.v1 import dtsd_pb2

SERVER_VARIABLES = ("DTSD_SERVERS", "SERVERS", "SUBMIT_SERVER", "STATUS_SERVERS", "DTSD_CONFIG",
                    "DTSD_TOKEN")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def nowhere() -> str:
    """A loopback address where nothing listens."""
    return f"127.0.0.1:{free_port()}"


def run(*args: str, env: dict[str, str] | None = None, input: str | None = None):
    """Invoke dtsctl in-process with stdout and stderr apart (click 8.1 and 8.2+ alike)."""
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:   # click >= 8.2 always keeps them apart
        runner = CliRunner()
    environment: dict[str, str | None] = {name: None for name in SERVER_VARIABLES}
    environment.update(env or {})
    return runner.invoke(dtsctl.cli, list(args), env=environment, input=input,
                         catch_exceptions=False)


# --- usage errors -------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["no-such-verb"], "No such command"),
    (["submit"], "no command"),
    (["submit", "--priority", "12", "--", "true"], "--priority"),
    (["submit", "--max-retries", "-1", "--", "true"], "--max-retries"),
    (["submit", "--timeout", "5 parsecs", "--", "true"], "not a duration"),
    (["submit", "--queue", "Not A Queue", "--", "true"], "--queue: bad queue name"),
    (["submit", "--cwd", "relative/dir", "--", "true"], "--cwd: must be an absolute path"),
    (["submit", "--id", "bad id!", "--", "true"], "--id: malformed job id"),
    (["submit", "--", ""], "CMD: must not be empty"),
    (["submit", "--follow", "-o", "json", "--", "true"], "--follow"),
    (["submit", "--concurrent", "--", "true"], "--concurrent only goes with --file"),
    (["list", "--status", "bogus"], "bogus"),
    (["list", "--limit", "0"], "--limit"),
    (["logs"], "JOB_ID"),
    (["logs", "-f", "-o", "json", "some-id"], "-f"),
    (["cancel"], "JOB_ID"),
    (["dlq", "requeue"], "give job ids, --all or a selection"),
    (["dlq", "requeue", "--all", "some-id"], "give job ids, --all or a selection"),
    (["dlq", "requeue", "--queue", "q", "some-id"], "job ids or a selection (--selector"),
    (["dlq", "requeue", "--all", "-l", "a=b"], "--all takes every dead letter"),
    (["cancel", "--selector", "team=data"], "give --yes"),           # stdin is no terminal
    (["cancel", "--dry-run", "some-id"], "go with a selection, not ids"),
    (["retry", "--selector", "a in (b"], "unbalanced parentheses"),
    (["retry", "--status", "pending", "-l", "a=b", "--yes"], "'pending' is not one of"),
    (["submit", "--label", "team", "--", "true"], "expected KEY=VALUE"),
    (["queue", "pause", "Bad Name"], "NAME: bad queue name"),
    (["dlq", "purge"], "give --all (or --yes)"),             # stdin is no terminal here
    (["dlq", "purge", "--queue", "q"], "of queue 'q' give --all"),
    (["dlq", "purge", "--all", "some-id"], "job ids or --all"),
    (["--timeout", "soon", "status"], "not a duration"),
    (["-o", "yaml", "status"], "yaml"),
])
def test_usage_errors_exit_2_before_any_call(nowhere, args, message):
    result = run("--servers", nowhere, *args)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "cannot reach" not in result.stderr


@pytest.mark.parametrize("args, nearest", [
    (["stauts"], "status"),
    (["lsit"], "list"),
    (["dlq", "purj"], "purge"),
    (["cron", "lst"], "list"),
])
def test_a_mistyped_verb_names_the_nearest(args, nearest):
    result = run(*args)
    assert result.exit_code == 2
    assert f"No such command {args[-1]!r}. Did you mean {nearest!r}?" in result.stderr


def test_an_unlike_verb_gets_no_suggestion():
    result = run("xyzzy")
    assert result.exit_code == 2 and "Did you mean" not in result.stderr


@pytest.mark.parametrize("args", [
    ["list", "--servers", "{nowhere}", "--timeout", "2"],
    ["list", "--token", "X", "--servers", "{nowhere}", "--timeout", "2"],
    ["--servers", "127.0.0.1:1", "status", "--servers", "{nowhere}", "--timeout", "2"],
    ["dlq", "list", "--status-servers", "{nowhere}", "--timeout", "2"],
    ["submit", "--submit-server", "{nowhere}", "--timeout", "5", "--", "true"],
])
def test_global_options_after_the_verb(nowhere, args):
    """`dtsctl list --token X` once said "Did you mean --page-token?"; after the verb a
    global option counts as before it (the later one wins)."""
    result = run(*(arg.format(nowhere=nowhere) for arg in args))
    assert result.exit_code == 3, result.stderr
    assert f"tried {nowhere})" in result.stderr


def test_timeout_after_submit_is_the_job_s_timeout(nowhere):
    """--timeout after `submit` stays the job's: `5 parsecs` is refused as its duration."""
    result = run("--servers", nowhere, "submit", "--timeout", "5 parsecs", "--", "true")
    assert result.exit_code == 2 and "not a duration" in result.stderr


def test_token_and_token_file_are_refused_together_on_either_side(nowhere, tmp_path):
    token = tmp_path / "token"
    token.write_text("t\n")
    result = run("--servers", nowhere, "--token-file", str(token), "list", "--token", "X")
    assert result.exit_code == 2 and "not both" in result.stderr


def test_bad_server_address_is_a_usage_error():
    result = run("--servers", "no-port-here", "status")
    assert result.exit_code == 2
    assert "no-port-here" in result.stderr


def test_bad_server_variable_is_a_usage_error():
    result = run("status", env={"DTSD_SERVERS": "host:notaport"})
    assert result.exit_code == 2
    assert "$DTSD_SERVERS" in result.stderr


def test_every_command_has_help():
    def walk(command: click.Command, path: list[str]):
        yield path
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, path + [name])

    for path in walk(dtsctl.cli, []):
        result = run(*path, "--help")
        assert result.exit_code == 0, path
        assert "Usage: dtsctl" in result.stdout


# --- times ----------------------------------------------------------------------------------

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("text, expected", [
    ("+5m", NOW + timedelta(minutes=5)),
    ("+30", NOW + timedelta(seconds=30)),
    ("+1h", NOW + timedelta(hours=1)),
    ("-2d", NOW - timedelta(days=2)),
    ("2024-06-01T08:30:00Z", datetime(2024, 6, 1, 8, 30, tzinfo=timezone.utc)),
    ("2024-06-01T10:30:00+02:00", datetime(2024, 6, 1, 8, 30, tzinfo=timezone.utc)),
])
def test_parse_when(text, expected):
    assert dtsctl.parse_when(text, now=NOW) == expected


def test_parse_when_takes_a_time_without_zone_as_local():
    naive = datetime(2024, 6, 1, 8, 30)
    assert dtsctl.parse_when("2024-06-01T08:30:00", now=NOW) == naive.astimezone(timezone.utc)


@pytest.mark.parametrize("text", ["", "tomorrow", "+", "+5x", "5m", "2024-13-01T00:00:00"])
def test_parse_when_rejects(text):
    with pytest.raises(ValueError):
        dtsctl.parse_when(text, now=NOW)


def test_at_relative_is_accepted(nowhere):
    result = run("--servers", nowhere, "--timeout", "2", "submit", "--at", "+5m", "--", "true")
    assert result.exit_code == 3, result.stderr    # parsed; failed only at the network


def test_at_bad_value_is_a_usage_error(nowhere):
    result = run("--servers", nowhere, "submit", "--at", "+5 fortnights", "--", "true")
    assert result.exit_code == 2
    assert "--at" in result.stderr


def test_timestamp_round_trip():
    moment = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    stamp = dtsctl.to_timestamp(moment)
    assert (stamp.seconds, stamp.nanos) == (1714564800, 123456000)
    spec = dtsd_pb2.JobSpec(command="true")
    spec.run_at.CopyFrom(stamp)
    assert dtsctl.spec_dict(spec)["run_at"] == "2024-05-01T12:00:00.123456Z"


# --- environment ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("A=b", ("A", "b")),
    ("A=", ("A", "")),
    ("PATH_2=x=y", ("PATH_2", "x=y")),
])
def test_parse_env(text, expected):
    assert dtsctl.parse_env(text) == expected


@pytest.mark.parametrize("text", ["A", "=x", "1A=x", "A-B=x", "A B=x"])
def test_parse_env_rejects(text):
    with pytest.raises(ValueError):
        dtsctl.parse_env(text)


@pytest.mark.parametrize("value, message", [
    ("FOO", "expected KEY=VALUE"),
    ("9LIVES=yes", "bad variable name"),
    ("DTSD_JOB_ID=x", "set by dtsd itself"),
])
def test_env_errors_exit_2(nowhere, value, message):
    result = run("--servers", nowhere, "submit", "--env", value, "--", "true")
    assert result.exit_code == 2
    assert message in result.stderr


# --- the jobs file ----------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[]", 'no "jobs" list'),
    ('{"job": []}', 'no "jobs" list'),
    ('{"jobs": {"name": "a"}}', '"jobs" must be a list'),
    ('{"jobs": []}', '"jobs" is empty'),
    ('{"jobs": [{"name": "build"}]}', "job 1 ('build'): missing \"command\""),
    ('{"jobs": [{"command": "true"}, "echo"]}', "job 2: must be an object"),
    ('{"jobs": [{"command": 5}]}', "'command' has the wrong type"),
    ('{"jobs": [{"command": "true", "comand": "x"}]}', "unknown field 'comand'"),
    ('{"jobs": [{"command": "true", "priority": true}]}', "'priority' has the wrong type"),
    ('{"jobs": [{"command": "true", "env": {"A": 1}}]}', "'env' must be a string"),
    ('{"jobs": [{"command": "true", "timeout": "5 eons"}]}', "timeout: not a duration"),
    ('{"jobs": [{"command": ""}]}', "job 1: command: must not be empty"),
    ('{"jobs": [{"command": "true"}, {"command": "true", "priority": 42}]}',
     "job 2: priority: must be 0 to 9"),
    ('{"jobs": [{"command": "true", "env": {"1X": "y"}}]}', "job 1: env: bad variable name"),
])
def test_malformed_jobs_file_exits_2_naming_the_problem(tmp_path, nowhere, content, message):
    path = tmp_path / "jobs.json"
    path.write_text(content)
    result = run("--servers", nowhere, "submit", "--file", str(path))
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert str(path) in result.stderr


def test_missing_jobs_file_exits_2(tmp_path, nowhere):
    result = run("--servers", nowhere, "submit", "--file", str(tmp_path / "absent.json"))
    assert result.exit_code == 2


@pytest.mark.parametrize("extra", [["--", "true"], ["--name", "x"], ["--id", "x"],
                                   ["--idempotency-key", "k"], ["--follow"]])
def test_jobs_file_excludes_a_command_and_per_job_options(tmp_path, nowhere, extra):
    path = tmp_path / "jobs.json"
    path.write_text('{"jobs": [{"name": "a", "command": "true"}]}')
    result = run("--servers", nowhere, "submit", "--file", str(path), *extra)
    assert result.exit_code == 2, result.stderr


def test_valid_jobs_file_gets_as_far_as_the_network(tmp_path, nowhere):
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps({"jobs": [
        {"name": "one", "command": "echo one", "description": "the seed's format"},
        {"name": "two", "command": "echo two", "env": {"A": "1"}, "timeout": "5m"}]}))
    result = run("--servers", nowhere, "--timeout", "2", "submit", "--file", str(path))
    assert result.exit_code == 3, result.stderr


# --- rendering --------------------------------------------------------------------------------

JOB_KEYS = {"id", "status", "attempts", "exit_code", "output", "output_base64",
            "output_truncated", "error", "dead_lettered", "worker", "submitted_by",
            "created_at", "updated_at", "started_at", "finished_at", "schedule_id",
            "fire_time", "env_hidden", "spec", "attempt_history"}
SPEC_KEYS = {"id", "name", "command", "env", "cwd", "queue", "priority", "max_retries",
             "timeout_seconds", "run_at", "idempotency_key", "limits", "notify", "notify_on",
             "labels"}
ATTEMPT_KEYS = {"number", "worker", "started_at", "finished_at", "exit_code", "output",
                "output_base64", "output_truncated", "error"}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def stamp(text: str):
    return dtsctl.to_timestamp(datetime.fromisoformat(text))


def sample_job():
    spec = dtsd_pb2.JobSpec(id="job-1", name="build", command="make -j4", env={"B": "2", "A": "1"},
                            queue="default", priority=5, max_retries=2, timeout_seconds=300.0)
    job = dtsd_pb2.Job(id="job-1", spec=spec, status=dtsd_pb2.FAILED, attempts=2,
                       exit_code=3, output=b"made\n\xff\xfe bytes\n", error="", worker="w-1",
                       dead_lettered=True, submitted_by="alice",
                       created_at=stamp("2024-05-01T12:00:00.250000+00:00"),
                       started_at=stamp("2024-05-01T12:00:01+00:00"),
                       finished_at=stamp("2024-05-01T12:00:09+00:00"))
    job.attempt_history.add(number=1, worker="w-1", exit_code=3, output=b"first\n", error="",
                            started_at=stamp("2024-05-01T12:00:01+00:00"),
                            finished_at=stamp("2024-05-01T12:00:02+00:00"))
    job.attempt_history.add(number=2, worker="w-2", error="timeout",
                            started_at=stamp("2024-05-01T12:00:04+00:00"))
    return job


def test_job_json_fields():
    data = dtsctl.job_dict(sample_job())
    assert set(data) == JOB_KEYS
    assert set(data["spec"]) == SPEC_KEYS
    assert all(set(attempt) == ATTEMPT_KEYS for attempt in data["attempt_history"])
    assert data["status"] == "FAILED"
    assert data["exit_code"] == 3
    assert data["output"] == "made\n\ufffd\ufffd bytes\n"
    assert base64.b64decode(data["output_base64"]) == b"made\n\xff\xfe bytes\n"
    assert data["created_at"] == "2024-05-01T12:00:00.250000Z"
    assert ISO_UTC.match(data["finished_at"])
    assert data["updated_at"] is None and data["fire_time"] is None
    assert data["spec"]["env"] == {"A": "1", "B": "2"}
    assert data["spec"]["max_retries"] == 2
    second = data["attempt_history"][1]
    assert second["exit_code"] is None and second["finished_at"] is None
    assert second["error"] == "timeout"
    json.dumps(data)   # serialisable as is


def test_unset_optionals_are_null_not_zero():
    data = dtsctl.job_dict(dtsd_pb2.Job(id="x", spec=dtsd_pb2.JobSpec(command="true")))
    assert data["exit_code"] is None
    assert data["spec"]["max_retries"] is None
    assert data["status"] == "JOB_STATUS_UNSPECIFIED"


def test_documented_fields_match_the_json():
    """The module docstring is the JSON reference; every key must be in it."""
    doc = dtsctl.__doc__
    for key in JOB_KEYS | SPEC_KEYS | ATTEMPT_KEYS:
        assert re.search(rf"\b{key}\b", doc), key
    cluster = dtsctl.cluster_dict(sample_cluster())
    keys = set(cluster) | set(cluster["nodes"][0]) | set(cluster["nodes"][0]["children"][0])
    keys |= set(cluster["workers"][0]) | set(cluster["queues"][0])
    for key in keys:
        assert re.search(rf"\b{key}\b", doc), key


def test_render_json(capsys):
    data = dtsctl.job_dict(sample_job())
    dtsctl.render("json", {"jobs": [data], "errors": []}, dtsctl.jobs_table)
    assert json.loads(capsys.readouterr().out) == {"jobs": [data], "errors": []}


def test_render_table_of_one_job(capsys):
    dtsctl.render("table", dtsctl.job_dict(sample_job()), dtsctl.job_table)
    text = capsys.readouterr().out
    created = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc).astimezone()
    assert re.search(r"^Status:\s+FAILED \(dead-lettered\)$", text, re.M)
    assert re.search(r"^Exit code:\s+3$", text, re.M)
    assert re.search(r"^Attempts:\s+2 \(max retries 2\)$", text, re.M)
    assert re.search(r"^Env:\s+A=1 B=2$", text, re.M)
    # Exact times are local with their offset, without microseconds, and say how long ago.
    assert re.search(rf"^Created:\s+{re.escape(created.isoformat())} \(\d+ d ago\)$", text,
                     re.M), text
    assert ".250000" not in text and "Z\n" not in text
    assert re.search(r"^Duration:\s+8s$", text, re.M)
    assert re.search(r"^\s+1\s+w-1\s+\d+ d ago\s+1s\s+3\s+-$", text, re.M)
    assert re.search(r"^\s+2\s+w-2\s+\d+ d ago\s+-\s+-\s+timeout$", text, re.M)
    assert text.endswith("Output:\nmade\n\\xff\\xfe bytes\n")   # bytes that are not UTF-8


def killed_job(error: str) -> dict:
    job = dtsctl.job_dict(sample_job())
    job["exit_code"], job["error"] = -15, error
    return job


@pytest.mark.parametrize("error, line", [
    ("killed by signal 15 (SIGTERM)", "job-1: FAILED, killed by SIGTERM"),
    ("timeout after 5s", "job-1: FAILED, killed by SIGTERM (timeout after 5s)"),
    ("", "job-1: FAILED, killed by SIGTERM"),
])
def test_a_death_by_signal_is_said_in_words(error, line):
    job = killed_job(error)
    assert dtsctl._final_line(job) == line
    table = dtsctl.job_table(job)
    assert re.search(r"^Exit code:\s+killed by SIGTERM$", table, re.M)
    assert "-15" not in table and "signal 15" not in table
    assert ("Error:" in table) == (error == "timeout after 5s")
    assert "Exit Code: killed by SIGTERM" in dtsctl._job_block({"name": "x"}, job)
    row = dtsctl.jobs_table({"jobs": [job]}).splitlines()[1]
    assert row.split()[5] == "SIGTERM"


def test_an_exit_code_is_not_repeated_by_its_error():
    job = dtsctl.job_dict(sample_job())
    job["error"] = "exit code 3"
    assert dtsctl._final_line(job) == "job-1: FAILED, exit code 3"
    assert "Error:" not in dtsctl.job_table(job)
    job["error"] = "exit code 3 and more"
    assert dtsctl._final_line(job) == "job-1: FAILED, exit code 3 (exit code 3 and more)"


def test_render_table_bytes_go_out_unchanged():
    @click.command()
    def show():
        dtsctl.render("table", {"ignored": True}, lambda _: b"\xff\x00raw")

    assert CliRunner().invoke(show).stdout_bytes == b"\xff\x00raw"


def test_jobs_table_columns():
    text = dtsctl.jobs_table({"jobs": [dtsctl.job_dict(sample_job())]})
    header, row = text.splitlines()
    assert header.split() == ["ID", "NAME", "STATUS", "QUEUE", "ATTEMPTS", "EXIT", "CREATED",
                              "DURATION"]
    assert row.split()[:6] == ["job-1", "build", "FAILED", "default", "2", "3"]
    assert re.search(r"\s\d+ d ago\s+8s$", row)


NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("iso, shown", [
    ("2024-05-01T12:00:00Z", "0 s ago"),
    ("2024-05-01T11:59:48.500000Z", "11 s ago"),
    ("2024-05-01T11:57:00Z", "3 min ago"),
    ("2024-05-01T10:00:00Z", "2 h ago"),
    ("2024-04-28T12:00:00Z", "3 d ago"),
    ("2024-05-01T12:05:00Z", "in 5 min"),
    (None, "-"),
])
def test_ago(iso, shown):
    assert dtsctl.ago(iso, NOW) == shown


def test_duration_runs_to_now_while_there_is_no_end():
    assert dtsctl.duration("2024-05-01T11:58:55Z", "2024-05-01T11:59:00Z") == "5s"
    assert dtsctl.duration("2024-05-01T10:58:00Z", None, NOW) == "1h02m"
    assert dtsctl.duration(None, None, NOW) is None


def test_exact_time_carries_its_offset():
    assert dtsctl.exact_time("2024-05-01T12:00:00.250000Z", timezone.utc) == \
        "2024-05-01T12:00:00+00:00"
    local = dtsctl.exact_time("2024-05-01T12:00:00Z")
    assert datetime.fromisoformat(local) == NOW          # aware: the offset is there


def test_cron_list_shows_next_in_the_schedule_s_own_zone():
    schedule = dtsd_pb2.Schedule(name="backup", expression="0 2 * * *",
                                 timezone="Europe/Berlin", job=dtsd_pb2.JobSpec(command="true"),
                                 next_fire_time=stamp("2024-05-02T00:00:00+00:00"))
    utc = dtsd_pb2.Schedule(name="utc", expression="0 2 * * *", timezone="",
                            job=dtsd_pb2.JobSpec(command="true"),
                            next_fire_time=stamp("2024-05-02T02:00:00+00:00"))
    text = dtsctl.schedules_table({"schedules": [dtsctl.schedule_dict(schedule),
                                                 dtsctl.schedule_dict(utc)]})
    assert re.search(r"^backup .* 2024-05-02T02:00:00\+02:00 ", text, re.M), text
    assert re.search(r"^utc .* 2024-05-02T02:00:00\+00:00 ", text, re.M), text


def sample_cluster():
    reply = dtsd_pb2.ClusterStatusResponse(cluster="prod", single_node=False, leader="node-b",
                                           server_node="node-a", dead_lettered=4)
    node = reply.nodes.add(node_id="node-b", version="1.0", leader=True, state="running")
    node.children.add(role="worker", index=1, pid=4242, state="BACKOFF",
                      uptime_seconds=3725.0, restarts=3)
    reply.workers.add(id="node-b/1", node_id="node-b", pid=4242, queues=["default", "io"],
                      concurrency=4, running=2)
    reply.queues.add(queue="default", pending=7, delayed=1, running=2)
    reply.job_counts["PENDING"] = 7
    return reply


def test_cluster_json_and_table():
    data = dtsctl.cluster_dict(sample_cluster())
    assert data["job_counts"] == {"PENDING": 7, "RUNNING": 0, "SUCCEEDED": 0, "FAILED": 0,
                                  "CANCELLED": 0}
    assert data["nodes"][0]["children"][0] == {"role": "worker", "index": 1, "pid": 4242,
                                               "state": "BACKOFF", "uptime_seconds": 3725.0,
                                               "restarts": 3}
    text = dtsctl.cluster_table(data)
    assert "prod (leader node-b)" in text
    assert re.search(r"^node-b\s+worker\s+1\s+4242\s+BACKOFF\s+1h02m\s+3$", text, re.M)
    assert re.search(r"^node-b/1\s+node-b\s+4242\s+default,io\s+2/4", text, re.M)
    assert re.search(r"^default\s+active\s+7\s+1\s+2\s+1$", text, re.M)  # WORKERS: 1 serves it
    assert data["unserved_queues"] == [] and "No live worker" not in text
    assert re.search(r"^Dead-lettered:\s+4$", text, re.M)


def test_status_shows_a_paused_queue():
    reply = sample_cluster()
    reply.queues.add(queue="io", pending=2, paused=True)
    data = dtsctl.cluster_dict(reply)
    assert [(q["queue"], q["paused"]) for q in data["queues"]] == [("default", False), ("io", True)]
    assert re.search(r"^io\s+paused\s+2\s+0\s+0\s+1$", dtsctl.cluster_table(data), re.M)


def test_status_names_the_queues_no_live_worker_serves():
    reply = sample_cluster()
    reply.queues.add(queue="gpu", pending=3)
    reply.queues.add(queue="later", delayed=1)
    reply.queues.add(queue="drained")
    data = dtsctl.cluster_dict(reply)
    assert data["unserved_queues"] == ["gpu", "later"]
    text = dtsctl.cluster_table(data)
    assert re.search(r"^gpu\s+active\s+3\s+0\s+0\s+0$", text, re.M)
    assert "No live worker serves 'gpu', 'later': their jobs wait" in text


@pytest.mark.parametrize("status, code, expected", [
    ("SUCCEEDED", 0, 0),
    ("FAILED", 3, 3),
    ("FAILED", None, 1),
    ("FAILED", 0, 1),
    ("FAILED", -9, 137),
    ("FAILED", 300, 1),
    ("CANCELLED", None, 1),
    ("CANCELLED", -15, 1),
])
def test_job_exit_code(status, code, expected):
    assert dtsctl.job_exit_code(status, code) == expected


def test_output_follower_writes_each_byte_once():
    out = io.BytesIO()
    follower = dtsctl.OutputFollower(dtsctl.OutputWriter(out, exact=True))
    follower.chunk(1, 0, b"abc")
    follower.chunk(1, 0, b"abc")       # a replay after a reconnect
    follower.chunk(1, 2, b"cde")       # overlaps by one byte
    follower.chunk(1, 5, b"f")
    follower.chunk(2, 0, b"xy")        # a retry starts its own output
    follower.finish(dtsd_pb2.Job(attempts=2, output=b"xyz"))  # the stored output has more
    assert out.getvalue() == b"abcdefxyz"


# --- which servers ----------------------------------------------------------------------------

@pytest.fixture
def no_default_config(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.ini"))


@pytest.fixture
def client_ini(tmp_path):
    path = tmp_path / "dtsd.ini"
    path.write_text("[client]\nservers = cfg:1, cfg:2\ntimeout = 3s\n")
    return str(path)


def test_servers_flag_beats_everything(no_default_config, client_ini):
    env = {"DTSD_SERVERS": "env:1", "SERVERS": "seed:1", "SUBMIT_SERVER": "sub:1",
           "STATUS_SERVERS": "stat:1"}
    targets = dtsctl.resolve_servers(["flag:1"], env=env, config_path=client_ini)
    assert targets.write == targets.read == ["flag:1"]
    assert targets.write_source == "--servers"


def test_role_flags_beat_servers_flag(no_default_config):
    targets = dtsctl.resolve_servers(["all:1"], ["sub:1"], ["stat:1", "stat:2"], env={})
    assert targets.write == ["sub:1"]
    assert targets.read == ["stat:1", "stat:2"]


def test_dtsd_servers_beats_seed_servers(no_default_config, client_ini):
    targets = dtsctl.resolve_servers(env={"DTSD_SERVERS": "env:1,env:2", "SERVERS": "seed:1"})
    assert targets.write == targets.read == ["env:1", "env:2"]
    assert targets.read_source == "$DTSD_SERVERS"


def test_seed_servers_beat_the_config_file(client_ini):
    targets = dtsctl.resolve_servers(env={"SERVERS": "seed:1", "DTSD_CONFIG": client_ini})
    assert targets.write == ["seed:1"]
    assert targets.timeout == 3.0     # a named config file still gives its timeout


def test_role_variables_beat_general_ones(no_default_config):
    env = {"SUBMIT_SERVER": "sub:1", "STATUS_SERVERS": "stat:1", "DTSD_SERVERS": "env:1"}
    targets = dtsctl.resolve_servers(env=env)
    assert (targets.write, targets.read) == (["sub:1"], ["stat:1"])
    only_submit = dtsctl.resolve_servers(env={"SUBMIT_SERVER": "sub:1", "SERVERS": "seed:1"})
    assert (only_submit.write, only_submit.read) == (["sub:1"], ["seed:1"])


def test_config_file_beats_the_default(client_ini):
    targets = dtsctl.resolve_servers(env={}, config_path=client_ini)
    assert targets.write == targets.read == ["cfg:1", "cfg:2"]
    assert targets.timeout == 3.0
    assert client_ini in targets.write_source


def test_default_config_path_is_read_when_readable(monkeypatch, client_ini):
    monkeypatch.setattr(config, "DEFAULT_PATH", client_ini)
    assert dtsctl.resolve_servers(env={}).read == ["cfg:1", "cfg:2"]


def test_default_when_nothing_is_given(no_default_config):
    targets = dtsctl.resolve_servers(env={})
    assert targets.write == targets.read == ["127.0.0.1:50051"]
    assert targets.timeout == 10.0


def test_timeout_flag_beats_config(client_ini):
    assert dtsctl.resolve_servers(env={}, config_path=client_ini, timeout=1.5).timeout == 1.5


def test_named_config_file_must_exist(tmp_path):
    with pytest.raises(dtsctl.CliError) as caught:
        dtsctl.resolve_servers(env={}, config_path=str(tmp_path / "absent.ini"))
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("text, message", [
    ("[client]\nservers = nope\n", "[client] servers"),
    # beside an error elsewhere, which alone would only be warned about
    ("[worker]\nconcurrency = many\n[client]\ntimeout = soon\n", "[client] timeout"),
])
def test_bad_config_file_is_a_usage_error(tmp_path, text, message):
    path = tmp_path / "bad.ini"
    path.write_text(text)
    result = run("-c", str(path), "status")
    assert result.exit_code == 2
    assert message in result.stderr


@pytest.mark.parametrize("broken", [
    "[worker]\nconcurrency = many\n",          # a bad value
    "[server]\nlistn = :1\n",                  # an unknown key
    "[nonsense]\nx = 1\n",                     # an unknown section
])
def test_an_error_outside_client_is_only_a_warning(tmp_path, nowhere, broken):
    """dtsctl refused to run while the server's sections of dtsd.ini had an error."""
    path = tmp_path / "dtsd.ini"
    path.write_text(f"[client]\nservers = {nowhere}\ntimeout = 2s\n{broken}")
    result = run("-c", str(path), "status")
    assert result.exit_code == 3, result.stderr          # it went as far as the network
    assert f"tried {nowhere}" in result.stderr
    assert "dtsctl: warning:" in result.stderr and str(path) in result.stderr
    assert "dtsctl reads only [client] and [dtsd] runtime_dir" in result.stderr


# --- the client -----------------------------------------------------------------------------

def test_parse_servers():
    assert parse_servers("a:1, b:2,,a:1") == ["a:1", "b:2"]
    assert parse_servers(":50051") == ["127.0.0.1:50051"]
    assert parse_servers("[::1]:50051") == ["[::1]:50051"]


@pytest.mark.parametrize("text", ["", " , ", "nocolon", "host:port", "host:70000"])
def test_parse_servers_rejects(text):
    with pytest.raises(ValueError):
        parse_servers(text)


def test_round_robin_starts_one_further_each_call():
    client = Client(["a:1", "b:2", "c:3"])
    first = client._rotation()
    assert sorted(first) == ["a:1", "b:2", "c:3"]
    assert client._rotation() == first[1:] + first[:1]
    assert client._rotation() == first[2:] + first[:2]
    assert client._rotation() == first


def test_round_robin_starts_at_a_random_server():
    """Short dtsctl runs each make one client: they must not all start at the first server
    (the chance that 60 random starts all pick one of three is 3 * 3**-60)."""
    starts = {Client(["a:1", "b:2", "c:3"])._rotation()[0] for _ in range(60)}
    assert starts == {"a:1", "b:2", "c:3"}


class Answer(grpc.RpcError):
    """An RPC error as grpc raises it, with the parts unreachable_store reads."""

    def __init__(self, code, details, metadata=()):
        self._code, self._details, self._metadata = code, details, metadata

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._metadata


@pytest.mark.parametrize("code, details, metadata, store", [
    (grpc.StatusCode.UNAVAILABLE, "retry later", (("dtsd-store", "redis"),), "redis"),
    (grpc.StatusCode.UNAVAILABLE, "Redis is unreachable from this server: Error 111; retry "
                                  "later", (), "redis"),
    (grpc.StatusCode.UNAVAILABLE, "PostgreSQL failed the call: gone; retry later", (),
     "postgres"),
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: "
                                  "UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed", (), None),
    (grpc.StatusCode.INTERNAL, "Redis is unreachable from this server", (), None),
])
def test_unreachable_store_from_metadata_or_the_server_s_words(code, details, metadata, store):
    assert unreachable_store(Answer(code, details, metadata)) == store


def test_a_store_outage_is_named_not_called_unreachable_servers():
    client = Client(["a:1"])
    client.last_tried, client.last_server = ["a:1"], "a:1"
    error = dtsctl.rpc_failure(Answer(grpc.StatusCode.UNAVAILABLE, "Redis is unreachable from "
                                      "this server: Error 111; retry later"), client)
    assert error.exit_code == 3
    assert error.message.startswith("a:1: Redis is unreachable")
    assert "cannot reach any server" not in error.message


def test_token_becomes_bearer_metadata():
    assert Client(["a:1"], token="s3cret").metadata == (("authorization", "Bearer s3cret"),)
    assert Client(["a:1"]).metadata is None


def test_client_fails_over_and_raises_the_last_unavailable():
    servers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with Client(servers, timeout=2) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.call("GetJob", dtsd_pb2.GetJobRequest(id="x"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        tried = client.last_tried
        assert sorted(tried) == sorted(servers)
        with pytest.raises(grpc.RpcError):
            list(client.stream("WatchJob", dtsd_pb2.WatchJobRequest(id="x")))
        assert client.last_tried == tried[1:] + tried[:1]


# --- cannot reach ---------------------------------------------------------------------------

def test_exit_3_when_no_server_listens():
    servers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    result = run("--servers", ",".join(servers), "--timeout", "2", "status")
    assert result.exit_code == 3
    assert "cannot reach any server" in result.stderr
    assert all(server in result.stderr for server in servers)


@pytest.mark.parametrize("args", [
    ["list", "-o", "json", "--status", "failed"],     # -o after the verb, status in any case
    ["status", "some-job"],
    ["logs", "some-job"],
    ["cancel", "a", "b"],
    ["dlq", "purge", "--yes"],
    ["dlq", "purge", "--all"],
    ["dlq", "purge", "some-id"],
    ["submit", "--env", "A=1", "--", "echo", "hi there"],
])
def test_exit_3_from_each_verb(nowhere, args):
    result = run("--servers", nowhere, "--timeout", "2", *args)
    assert result.exit_code == 3, result.stderr
    assert nowhere in result.stderr


def test_role_servers_are_used(nowhere):
    other = f"127.0.0.1:{free_port()}"
    result = run("--submit-server", nowhere, "--status-servers", other, "--timeout", "2",
                 "status")
    assert result.exit_code == 3
    assert other in result.stderr and nowhere not in result.stderr


@pytest.mark.parametrize("url", ["http://example.com:8080", "https://10.0.0.5:8080",
                                 "file:///etc/passwd", "http://127.0.0.1.example.com"])
def test_web_login_sends_its_local_token_to_this_host_only(url, tmp_path):
    """The local token proves who runs dtsctl: it goes to a loopback address or nowhere
    (the web UI refuses it from anywhere else anyway), before any token is fetched."""
    result = run("web-login", "--url", url, env={"DTSD_CONFIG": str(tmp_path / "none.ini")})
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "loopback" in result.stderr
