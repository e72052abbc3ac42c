"""Control characters never reach the admin's terminal; pipes and `--raw` keep the bytes.

A job's name, command and output are anyone's text, and a terminal obeys what it is sent:
OSC 52 writes the clipboard, CSI 2J clears the screen, `ESC [8m` conceals what follows (it
hid a real "FAILED" line), and the bidi overrides reorder what a person reads. The first
half tests the escaping itself without a server; the second runs a real dtsd and a job
that prints all of that, and reads what dtsctl wrote to a real pseudo-terminal.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import select
import subprocess
import sys
import time
import tty
import unicodedata

import click
import pytest
from click.testing import CliRunner

from dtsd import cli as dtsctl
from dtsd.v1 import dtsd_pb2
from tests.helpers import REPO_ROOT, clean_env, wait_for

# The Unicode Bidi_Control property (PropList.txt): the explicit embeddings, overrides and
# isolates, and the three marks.
BIDI_CONTROL = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}
BIDI_CLASSES = {"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"}

CONCEAL = "\x1b[8m"
OSC52 = "\x1b]52;c;aGFja2Vk\x07"           # "set the clipboard to 'hacked'"
CLEAR = "\x1b[2J"


def controls(text: str, *, layout: bool = True) -> list[str]:
    """The characters of `text` a terminal would obey (newline and tab allowed with layout)."""
    allowed = "\n\t" if layout else ""
    return [char for char in text if char not in allowed
            and (unicodedata.category(char) == "Cc" or ord(char) in BIDI_CONTROL)]


# --- the escaping, without a server -------------------------------------------------------

@pytest.mark.parametrize("raw, shown", [
    (CONCEAL + "FAILED", r"\x1b[8mFAILED"),
    (OSC52, r"\x1b]52;c;aGFja2Vk\x07"),
    (CLEAR, r"\x1b[2J"),
    ("\x00\x01\x08\x1f", r"\x00\x01\x08\x1f"),           # C0: NUL, SOH, backspace, US
    ("ok\rFAILED", r"ok\rFAILED"),                       # CR would overwrite the line
    ("\x7f", r"\x7f"),                                   # DEL
    ("\x80\x85\x9b2J\x9f", r"\u0080\u0085\u009b2J\u009f"),   # C1, 0x9B is an 8-bit CSI
    ("\u202egnp.exe", r"\u202egnp.exe"),                  # RLO: shows as "exe.png"
    ("\u202a\u202b\u202c\u202d", r"\u202a\u202b\u202c\u202d"),
    ("\u2066\u2067\u2068\u2069", r"\u2066\u2067\u2068\u2069"),
    ("\u200e\u200f\u061c", r"\u200e\u200f\u061c"),
    ("a\tb\nc", r"a\tb\nc"),                             # a cell stays on its line
    ("naïve 日本 ✓ \\x1b", "naïve 日本 ✓ \\x1b"),          # printable text and backslashes stay
])
def test_escape_spells_out_every_control_character(raw, shown):
    assert dtsctl.escape(raw) == shown
    assert dtsctl.escape(shown) == shown                 # idempotent
    assert dtsctl.cell(raw) == shown


def test_escape_with_layout_keeps_newline_and_tab_only():
    text = "line 1\tcol\n" + CONCEAL + "FAILED\r\n"
    assert dtsctl.escape(text, layout=True) == "line 1\tcol\n\\x1b[8mFAILED\\r\n"


def test_escape_covers_every_code_point_of_each_class():
    """Checked against the Unicode database: Cc and the bidi classes, and nothing else."""
    every = "".join(chr(code) for code in range(0x110000) if not 0xD800 <= code <= 0xDFFF)
    escaped = dtsctl.escape(every)
    assert controls(escaped, layout=False) == []
    assert not [c for c in escaped if unicodedata.bidirectional(c) in BIDI_CLASSES]
    untouched = "".join(char for char in every
                        if unicodedata.category(char) != "Cc" and ord(char) not in BIDI_CONTROL)
    assert dtsctl.escape(untouched) == untouched


@pytest.mark.parametrize("data, shown", [
    (b"ok\n" + CONCEAL.encode() + b"FAILED\n", "ok\n\\x1b[8mFAILED\n"),
    (b"\xff\xfe bytes", r"\xff\xfe bytes"),               # not UTF-8
    (b"\x9b2J", r"\x9b2J"),                               # a stray C1 byte
    (b"\xc2\x9b2J", r"\u009b2J"),                         # U+009B, valid UTF-8
    (b"\xc0\x9b", r"\xc0\x9b"),                           # an overlong ESC-like form
    (b"\xed\xa0\x80", r"\xed\xa0\x80"),                   # a UTF-8 surrogate
    (b"\xe2\x80\xaetxt", r"\u202etxt"),
    ("naïve 日本\n".encode(), "naïve 日本\n"),
])
def test_output_text_shows_bytes_that_are_not_utf8_as_xNN(data, shown):
    assert dtsctl.output_text(data) == shown


def test_output_writer_escapes_a_live_stream_split_anywhere():
    data = "é日".encode() + b"\x1b[2J\xff\xe2\x80"       # ends inside a character
    out = io.BytesIO()
    writer = dtsctl.OutputWriter(out, exact=False)
    for byte in data:
        writer.write(bytes([byte]))
    assert out.getvalue() == "é日\\x1b[2J\\xff".encode()   # the unfinished char is held
    writer.end()
    assert out.getvalue() == "é日\\x1b[2J\\xff\\xe2\\x80".encode()
    exact = io.BytesIO()
    writer = dtsctl.OutputWriter(exact, exact=True)
    for byte in data:
        writer.write(bytes([byte]))
    writer.end()
    assert exact.getvalue() == data


def test_output_follower_ends_an_attempt_before_the_next(capsys):
    out = io.BytesIO()
    follower = dtsctl.OutputFollower(dtsctl.OutputWriter(out, exact=False))
    follower.chunk(1, 0, b"one \xe2\x80")                 # attempt 1 dies mid-character
    follower.chunk(2, 0, b"two\x1b[8m")
    follower.finish(dtsd_pb2.Job(attempts=2, output=b"two\x1b[8m\n"))
    assert out.getvalue() == b"one \\xe2\\x80two\\x1b[8m\n"
    assert capsys.readouterr().err == "--- attempt 2 ---\n"


def hostile_job():
    name = "nightly" + OSC52 + CLEAR + "\n\u202egnp.exe"
    spec = dtsd_pb2.JobSpec(id="job-1", name=name, command="printf '\\033[2J'" + CLEAR,
                            queue="default", env={"K": "v" + CONCEAL})
    job = dtsd_pb2.Job(id="job-1", spec=spec, status=dtsd_pb2.FAILED, attempts=1, exit_code=3,
                       output=b"deploy " + CONCEAL.encode() + b"FAILED\n\xc2\x9b\xff\n",
                       error="exit code 3" + CLEAR, worker="w\x1b]0;title\x07")
    job.attempt_history.add(number=1, worker="w\nforged row", error="x\u202ey")
    return job


def test_tables_escape_every_field_and_keep_each_value_on_its_line():
    data = dtsctl.job_dict(hostile_job())
    listed = dtsctl.jobs_table({"jobs": [data]})
    assert controls(listed) == []
    header, row = listed.split("\n")
    assert "nightly\\x1b]52;c;aGFja2Vk\\x07\\x1b[2J\\n\\u202egnp.exe" in row
    shown = dtsctl.job_table(data)
    assert controls(shown) == []
    assert "Name:" in shown and "Worker:" in shown and "Env:" in shown
    assert "\n  1  w\\nforged row" in shown                  # one row in the attempt table
    assert shown.endswith("Output:\ndeploy \\x1b[8mFAILED\n\\u009b\\xff")
    status = dtsd_pb2.ClusterStatusResponse(cluster="c\x1b[2J", leader="n\x07",
                                            server_node="n\u202e")
    node = status.nodes.add(node_id="n\x1b[8m", state="running\r")
    node.children.add(role="worker\x9b", state="RUNNING")
    status.workers.add(id="w\n", queues=["q\x1b"])
    status.queues.add(queue="q\t")
    assert controls(dtsctl.cluster_table(dtsctl.cluster_dict(status))) == []


def test_render_text_and_json_never_carry_a_control_character(capsys):
    data = dtsctl.job_dict(hostile_job())
    dtsctl.render("table", data, dtsctl.job_table)
    dtsctl.render("table", data, lambda job: f"{job['spec']['name']} {job['error']}")
    assert controls(capsys.readouterr().out) == []
    dtsctl.render("json", {"jobs": [data]}, dtsctl.jobs_table)
    document = capsys.readouterr().out
    assert controls(document) == []                       # C1 and bidi too, not only C0
    assert json.loads(document) == {"jobs": [data]}       # the exact values, once decoded


def test_error_messages_are_escaped():
    error = dtsctl.CliError("NOT_FOUND: job " + CLEAR + "\u202e gone")

    @click.command()
    def fail():
        dtsctl.warn("warned " + CONCEAL)
        raise error

    result = CliRunner().invoke(fail)
    assert result.exit_code == 1
    shown = result.output       # stdout and stderr together, on click 8.1 and 8.2+ alike
    assert controls(shown) == []
    assert "warned \\x1b[8m" in shown and "job \\x1b[2J\\u202e gone" in shown


@pytest.mark.parametrize("args, message", [
    (["-o", "json", "logs", "--raw", "x"], "--raw writes the output bytes: not with -o json"),
    (["submit", "--raw", "--", "true"], "--raw goes with --wait or --follow"),
    (["-o", "json", "submit", "--wait", "--raw", "--", "true"], "without -o json"),
    (["submit", "--file", "-", "--raw"], "--raw cannot be used with --file"),
])
def test_raw_usage_errors(args, message):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:   # click >= 8.2 keeps them apart
        runner = CliRunner()
    result = runner.invoke(dtsctl.cli, ["--servers", "127.0.0.1:1", *args], input="{}")
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_job_output_to_a_terminal_is_escaped_and_exact_elsewhere(monkeypatch):
    """`render` with bytes, through a real pseudo-terminal and through a pipe."""
    data = b"ok " + CONCEAL.encode() + b"FAILED\n\xff"
    for raw, want_on_tty in ((False, b"ok \\x1b[8mFAILED\n\\xff"), (True, data)):
        master, slave = os.openpty()
        tty.setraw(slave)
        with open(slave, "w", closefd=True) as terminal:
            monkeypatch.setattr(sys, "stdout", terminal)
            dtsctl.render("table", None, lambda _: data, raw=raw)
        assert read_all(master) == want_on_tty
    reader, writer = os.pipe()
    with open(writer, "w", closefd=True) as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        dtsctl.render("table", None, lambda _: data)
    with open(reader, "rb") as pipe:
        assert pipe.read() == data


def read_all(master: int, timeout: float = 60) -> bytes:
    """Everything written to a pseudo-terminal until every writer has closed it."""
    written = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"the terminal was not closed within {timeout}s")
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:       # EIO: the last writer has closed its side
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            written += chunk
    finally:
        os.close(master)
    return bytes(written)


# --- a real dtsd, a real terminal ---------------------------------------------------------

FAST = {"worker": {"retry_backoff": "50ms", "retry_backoff_max": "200ms", "kill_grace": "1s"},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}

EVIL_NAME = "nightly" + OSC52 + CLEAR + "\u009b31m\n\u202egnp.exe"
EVIL_NAME_SHOWN = r"nightly\x1b]52;c;aGFja2Vk\x07\x1b[2J\u009b31m\n\u202egnp.exe"
# What the job prints (dash's printf: octal escapes), exactly, and as a terminal gets it.
EVIL_COMMAND = (r"printf 'deploy \033[8mFAILED\033[0m\n\033]52;c;aGFja2Vk\007\033[2J"
                r"\302\23331m\342\200\256txt\tend\377\n'; exit 3")
EXACT = (b"deploy \x1b[8mFAILED\x1b[0m\n\x1b]52;c;aGFja2Vk\x07\x1b[2J\xc2\x9b31m"
         b"\xe2\x80\xaetxt\tend\xff\n")
ESCAPED = (b"deploy \\x1b[8mFAILED\\x1b[0m\n\\x1b]52;c;aGFja2Vk\\x07\\x1b[2J\\u009b31m"
           b"\\u202etxt\tend\\xff\n")


def on_terminal(dtsd, *args: str, stream: str = "stdout") -> tuple[int, bytes, str]:
    """Run dtsctl with a pseudo-terminal as standard output (or as `stream="stderr"`),
    as from an admin's shell, and a pipe as the other.

    Returns the exit code, every byte dtsctl wrote to the terminal (raw mode: no newline
    translation, so these are the bytes it wrote), and what went to the pipe.
    """
    master, slave = os.openpty()
    tty.setraw(slave)
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, stream: slave}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dtsd.cli", "--servers", dtsd.address, *args],
            stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
            env=clean_env({"PYTHONPATH": str(REPO_ROOT)}), **streams)
    finally:
        os.close(slave)
    pipe = proc.stderr if stream == "stdout" else proc.stdout
    try:
        written = read_all(master)
        return proc.wait(30), written, pipe.read().decode("utf-8")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pipe.close()


def piped(dtsd, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "dtsd.cli", "--servers", dtsd.address, *args],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                          cwd=REPO_ROOT, env=clean_env({"PYTHONPATH": str(REPO_ROOT)}))


def shown_text(written: bytes) -> str:
    """What dtsctl wrote to the terminal, which must be UTF-8 with nothing to obey."""
    text = written.decode("utf-8")
    assert controls(text) == [], f"raw control characters reached the terminal: {written!r}"
    return text


@pytest.fixture
def dtsd(dtsd_factory):
    return dtsd_factory(FAST)


@pytest.fixture
def hostile_job_id(dtsd) -> str:
    """A dead-lettered job whose name and output carry OSC 52, CSI 2J, a conceal, C1 and
    bidi controls."""
    result = piped(dtsd, "submit", "--wait", "--name", EVIL_NAME, "--max-retries", "0",
                   "--", EVIL_COMMAND)
    assert (result.returncode, result.stdout) == (3, EXACT), result.stderr
    job_id = result.stderr.decode().split()[1]
    listed: list[subprocess.CompletedProcess[bytes]] = []

    def dead_lettered() -> bool:
        listed[:] = [piped(dtsd, "-o", "json", "dlq", "list")]
        return job_id in listed[0].stdout.decode()

    def seen() -> str:
        """What the last `dlq list` and the job's record said, should it never be listed."""
        shown = piped(dtsd, "-o", "json", "status", job_id)
        last = listed[0] if listed else None
        said = last and (last.returncode, last.stdout, last.stderr)
        return (f"{job_id} in dlq list; last dlq list: {said}; "
                f"status: {(shown.returncode, shown.stdout, shown.stderr)}")

    wait_for(dead_lettered, message=seen)
    return job_id


def test_list_status_and_dlq_on_a_terminal_escape_the_name_and_output(dtsd, hostile_job_id):
    code, written, _ = on_terminal(dtsd, "list")
    assert code == 0
    header, row = shown_text(written).rstrip("\n").split("\n")   # the name kept its row
    assert row.startswith(hostile_job_id) and EVIL_NAME_SHOWN in row and "FAILED" in row

    code, written, _ = on_terminal(dtsd, "status", hostile_job_id)
    assert code == 0
    text = shown_text(written)
    assert re.search(rf"^Name:\s+{re.escape(EVIL_NAME_SHOWN)}$", text, re.M)
    assert text.endswith("Output:\n" + ESCAPED.decode().rstrip("\n") + "\n")
    assert "\\x1b[8mFAILED" in text          # the concealed line is there to be read

    code, written, _ = on_terminal(dtsd, "dlq", "list")
    assert code == 0 and EVIL_NAME_SHOWN in shown_text(written)

    code, written, _ = on_terminal(dtsd, "-o", "json", "status", hostile_job_id)
    assert code == 0
    job = json.loads(shown_text(written))["jobs"][0]
    assert job["spec"]["name"] == EVIL_NAME
    assert job["output_base64"] and json.loads(shown_text(written)) == {"jobs": [job],
                                                                        "errors": []}

    # Text is escaped to a pipe as well: only a job's output bytes go out exact.
    listed = piped(dtsd, "list")
    assert listed.returncode == 0 and EVIL_NAME_SHOWN in shown_text(listed.stdout)


def test_logs_on_a_terminal_are_escaped_and_raw_or_a_pipe_keeps_the_bytes(dtsd, hostile_job_id):
    assert on_terminal(dtsd, "logs", hostile_job_id)[:2] == (0, ESCAPED)
    assert on_terminal(dtsd, "logs", "-f", hostile_job_id)[:2] == (3, ESCAPED)
    assert on_terminal(dtsd, "logs", "--raw", hostile_job_id)[:2] == (0, EXACT)
    assert on_terminal(dtsd, "logs", "-f", "--raw", hostile_job_id)[:2] == (3, EXACT)
    result = piped(dtsd, "logs", hostile_job_id)
    assert (result.returncode, result.stdout) == (0, EXACT)
    result = piped(dtsd, "logs", "-f", hostile_job_id)
    assert (result.returncode, result.stdout) == (3, EXACT)


def test_submit_follow_and_wait_follow_the_same_rule(dtsd):
    for mode in ("--wait", "--follow"):
        code, written, stderr = on_terminal(dtsd, "submit", mode, "--name", EVIL_NAME,
                                            "--max-retries", "0", "--", EVIL_COMMAND)
        assert (code, written) == (3, ESCAPED), (mode, stderr)
        shown_text(stderr.encode())
    code, written, _ = on_terminal(dtsd, "submit", "--follow", "--raw", "--max-retries", "0",
                                   "--", EVIL_COMMAND)
    assert (code, written) == (3, EXACT)
    code, written, _ = on_terminal(dtsd, "submit", "--wait", "--raw", "--max-retries", "0",
                                   "--", EVIL_COMMAND)
    assert (code, written) == (3, EXACT)
    for mode in ("--wait", "--follow"):
        result = piped(dtsd, "submit", mode, "--max-retries", "0", "--", EVIL_COMMAND)
        assert (result.returncode, result.stdout) == (3, EXACT), mode


def test_cron_list_on_a_terminal_escapes_the_command(dtsd):
    command = "echo " + CLEAR + "\u202e"
    result = piped(dtsd, "cron", "add", "hourly", "@hourly", "--", command)
    assert result.returncode == 0, result.stderr
    code, written, _ = on_terminal(dtsd, "cron", "list")
    assert code == 0
    assert "echo \\x1b[2J\\u202e" in shown_text(written)


def test_submit_file_wait_counts_the_ended_jobs_on_a_terminal_only(dtsd, tmp_path):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"jobs": [
        {"name": "one", "command": "true"}, {"name": "two", "command": "sleep 0.3"},
        {"name": "bad", "command": "exit 2", "max_retries": 0}]}))
    code, err, out = on_terminal(dtsd, "submit", "--file", str(jobs), "--wait", stream="stderr")
    assert code == 1 and out.count("Job ID:") == 3
    clear = "\r\x1b[K"      # back to the line's start, erase it: before each block on stdout
    assert err.decode() == (f"{clear}waiting: 0 of 3 jobs ended{clear}"
                            f"{clear}waiting: 1 of 3 jobs ended{clear}"
                            f"{clear}waiting: 2 of 3 jobs ended{clear}"
                            f"{clear}Error: 1 of 3 jobs did not succeed\n")   # a raw tty
    piped_run = piped(dtsd, "submit", "--file", str(jobs), "--wait")
    assert piped_run.returncode == 1
    assert b"waiting:" not in piped_run.stderr and b"\x1b" not in piped_run.stderr
