r"""dtsctl: the command-line client of dtsd.

    dtsctl [GLOBAL OPTIONS] VERB [OPTIONS] [ARGS]      (`dtsctl VERB --help` for each verb)

Verbs: submit, status, list, logs, cancel, retry, dlq list|requeue|purge,
cron add|list|pause|resume|rm|run|next, queue list|pause|resume|limit, web-login.

Which servers (first match wins; `--submit-server`/`SUBMIT_SERVER` pick the servers for
writes: submit, cancel, retry, dlq requeue/purge, queue pause/resume/limit; `--status-servers`/`STATUS_SERVERS` for
reads: status, list, logs, dlq list, waiting):
  1. the role's own flag, then `--servers`;
  2. the role's own variable, then `DTSD_SERVERS`, then the seed's `SERVERS`;
  3. when no flag or variable names a server and this host runs dtsd
     (`<runtime_dir>/ident.sock` exists; `[dtsd] runtime_dir` of a readable config file,
     else /run/dtsd): its local API sockets `<runtime_dir>/api-*.sock`;
  4. `[client] servers` of the config file: `-c FILE`, else `$DTSD_CONFIG`, else
     `/etc/dtsd/dtsd.ini` when it is readable;
  5. `127.0.0.1:50051`.
Which credential (first match wins): `--token TOKEN` (warned about: every user sees the
command line in /proc), `--token-file FILE`, `$DTSD_TOKEN`, `$DTSD_TOKEN_FILE`, `[client]
token_file` of the config file; else, on the local sockets, a local token from this host's
master, which knows from the kernel which user runs dtsctl (its role: the server's
`[server] local_roles`), renewed as needed; else none (a server then refuses calls over TCP
unless its `[server] anonymous_role` says otherwise).
TLS: `--tls-ca FILE` (else `[client] tls_ca`) turns it on; `--tls-cert`/`--tls-key` add a
client certificate for servers that require mTLS. A TLS mismatch shows as exit code 3,
with what is wrong: plaintext to a TLS port or TLS to a plaintext one, no client
certificate for an mTLS server, a server certificate the CA does not vouch for.
The local sockets never use TLS (they do not leave the host).
Any flag beats any environment variable. Calls go round-robin over the servers, starting
at a random one, and move on to the next one when a server answers UNAVAILABLE. The deadline of each call is `--timeout`,
else `[client] timeout` of a config file that was read, else 10 s.

Exit codes:
  0  success
  1  the job or the operation failed (not found, wrong state, rejected input, ...);
     the server's message is printed on standard error
  2  usage error: bad option or argument, malformed jobs file, bad [client] section (or
     [dtsd] runtime_dir) of the config file (an error elsewhere in it is only warned about)
  3  cannot reach any server (every server UNAVAILABLE, or no connection within the deadline);
     a server that answered that it cannot reach PostgreSQL or Redis is quoted instead
  4  not authorised (UNAUTHENTICATED, PERMISSION_DENIED, or this host's master gives
     the local user no role)
`submit --wait`, `submit --follow` and `logs -f` exit with the job's own result instead:
0 when it SUCCEEDED, its exit code when it FAILED with one (-N for signal N becomes 128+N),
else 1 (FAILED without exit code, CANCELLED).

Control characters (job names, commands, errors and output are anyone's text, and a
terminal obeys what it is sent: OSC 52 sets the clipboard, CSI 2J clears the screen,
`ESC [8m` hides the lines that follow):
  - What counts: every Unicode control character, general category Cc (C0 U+0000-U+001F,
    DEL U+007F, C1 U+0080-U+009F; so ESC, BEL, CR and backspace), and the Bidi_Control
    characters, which reorder what is read (U+061C, U+200E-U+200F, U+202A-U+202E,
    U+2066-U+2069). In a job's output, bytes that are not UTF-8 count too.
  - How they are shown: as Python spells them: \t \n \r, \xNN for the other C0 and DEL
    (`\x1b`), \uNNNN for C1 and bidi (`\u009b`, `\u202e`), and \xNN for each byte that
    is not UTF-8 (`\xff`; a raw 0x9B byte is `\x9b`). Backslashes stay as they are, so a
    literal `\x1b` reads the same as an escaped ESC.
  - Text dtsctl composes is always escaped, on a terminal or not (its exact values are
    in `-o json`): the tables and fields of status, list, dlq list, cron, submit --file,
    and every message on standard error. A one-line value (a table cell, a field such as
    Name: or Error:) has newline and tab escaped too, so it keeps its line and column; a
    multi-line body (the Output: of `status JOB_ID`) keeps its newlines and tabs.
  - A job's output from `logs`, `logs -f`, `submit --wait` and `submit --follow` is
    written as its exact bytes when standard output is not a terminal (a pipe, a file),
    and escaped, newlines and tabs kept, when it is one; `--raw` writes the exact bytes
    to a terminal too.
  - `-o json` is escaped by JSON itself: C0 as \u00NN by the encoder, and DEL, C1 and the
    bidi controls as \uNNNN as well, so the document holds no raw control character and
    decodes to the exact values.

JSON output (`-o json`, before or after the verb): one document on standard output, keys in
snake_case named as in `proto/dtsd/v1/dtsd.proto`, times as ISO 8601 UTC strings with
microseconds (`2024-05-01T12:00:00.000000Z`) or null when unset, statuses as enum names.

A job object has:
  id, status, attempts, exit_code (null: none), output (UTF-8, undecodable bytes replaced),
  output_base64 (the exact bytes), output_truncated, error, dead_lettered, worker,
  submitted_by, created_at, updated_at, started_at, finished_at, schedule_id (0: not a
  cron run), fire_time, env_hidden (true: spec.env has the names only, values "": the job
  is another principal's and the caller is no admin),
  spec: {id, name, command, env {name: value}, cwd, queue, priority,
         max_retries (null: server default), timeout_seconds, run_at, idempotency_key,
         limits {name: value, only those set: processes, open_files, file_size, memory,
         cpu_time}, notify [target names], notify_on [events: failed, succeeded],
         labels {key: value}},
  attempt_history: [{number, worker, started_at, finished_at, exit_code, output,
                     output_base64, output_truncated, error}]  (filled by `status JOB_ID`)
List and dlq list leave output empty (the server omits it there).

Per verb:
  submit                  {id, created, queue_unserved (true: no live worker serves its
                           queue: it waits until one does; also warned on stderr)};
                           with --wait also job: <job>
  submit --file           {jobs: [{id, created, queue_unserved, name}]}; with --wait each
                           also job: <job>
  status                  {cluster, single_node, leader, server_node, dead_lettered,
                           job_counts {STATUS: n},
                           nodes: [{node_id, version, leader, state, started_at, seen_at,
                                    children: [{role, index, pid, state, uptime_seconds,
                                                restarts}],
                                    unreachable: [{store, since, seconds}]}],
                           workers: [{id, node_id, pid, queues, concurrency, running,
                                      seen_at}],
                           queues: [{queue, pending, delayed, running, paused,
                                     max_running (null: no limit)}],
                           unserved_queues: [queues with jobs waiting that no live
                                             worker serves]}
  status JOB_ID...        {jobs: [<job>], errors: [{id, code, message}]}
  list, dlq list          {jobs: [<job>], next_page_token}
  logs JOB_ID             {id, attempt, output, output_base64, output_truncated}
  cancel                  {jobs: [{id, previous_status, status}], errors: [...]}
  retry                   {jobs: [<job>], errors: [...]}
  cancel, retry, dlq requeue with a selection (--selector, --status, ...)
                          {matched (jobs changed; with --dry-run: jobs that would be),
                           changed (0 with --dry-run), more (--limit stopped it), dry_run}
  dlq requeue             {ids: [...]}
  dlq purge               {purged}
  cron add|pause|resume   <schedule>: {id, name, expression, timezone, overlap, misfire,
                           catchup_window_seconds, job: <spec>, env_hidden (not an admin:
                           job.env has the names only), paused, next_fire_time,
                           last_fire_time, last_job_id, created_at, updated_at}
  cron list               {schedules: [<schedule>]}
  cron rm                 {name, deleted}
  cron run                {id, created}
  cron next               {times: [{at, local, note}]}
  queue pause|resume|limit
                          <queue>: {name, paused, paused_by, paused_at, max_running
                           (null: no limit)}
  queue list              {queues: [<queue>]}
"""

from __future__ import annotations

import base64
import codecs
import difflib
import enum
import json
import os
import shlex
import signal
import sys
import threading
import zoneinfo
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Sequence, TypeVar

import click
import grpc

from dtsd import config, models, shown
from dtsd import client as client_module
from dtsd.client import (DEFAULT_SERVER, DEFAULT_TIMEOUT, CLIENT_KEYS, Client,  # noqa: F401
                         ConfigurationError, DtsdError, Role, Targets, Tls, parse_servers,
                         tls_mismatch, unreachable_store)
from dtsd.shown import ESCAPES, ending, escape, signal_name
from dtsd.v1 import dtsd_pb2

HIDDEN = "(hidden)"           # shown for env values the caller may not see
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
STATUS_NAMES = tuple(status.value for status in models.JobStatus)
T = TypeVar("T")


class Exit(enum.IntEnum):
    """dtsctl's exit codes (the module docstring says when each is used)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    UNAUTHORISED = 4


class CliError(click.ClickException):
    """The one error dtsctl raises: a message for standard error and an exit code.

    `grpc_code` is set when the error came from the server, so a verb working through
    several ids can tell "this one was not found" from "no server answers".
    """

    def __init__(self, message: str, code: int = Exit.FAILED,
                 grpc_code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.exit_code = int(code)
        self.grpc_code = grpc_code

    def format_message(self) -> str:
        """What standard error shows: the message with what it quotes escaped."""
        return escape(self.message, layout=True)


def rpc_failure(error: grpc.RpcError, client: Client) -> CliError:
    """The one place that turns a gRPC error into dtsctl's message and exit code."""
    code = error.code()
    details = error.details() or code.name
    tried = ", ".join(client.last_tried or client.servers)
    if code == grpc.StatusCode.UNAVAILABLE:
        if unreachable_store(error):      # a server answered: it cannot reach a store
            return CliError(f"{client.store_told_by or client.last_server}: {details} "
                            f"(tried {tried})", Exit.UNREACHABLE, code)
        return CliError(tls_diagnosis(client, details) or
                        f"cannot reach any server (tried {tried}): {details}",
                        Exit.UNREACHABLE, code)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        if not client.connected():
            return CliError(f"cannot reach any server (tried {tried}): no connection "
                            f"within {client.timeout:g}s", Exit.UNREACHABLE, code)
        return CliError(f"{client.last_server} did not answer within {client.timeout:g}s "
                        "(raise --timeout?)", Exit.FAILED, code)
    if code == grpc.StatusCode.UNKNOWN and client.last_tried:   # a TLS handshake that failed
        found = tls_diagnosis(client, details)
        if found:
            return CliError(found, Exit.UNREACHABLE, code)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return CliError(f"not authorised ({code.name}): {details}", Exit.UNAUTHORISED, code)
    return CliError(f"{code.name}: {details}", Exit.FAILED, code)


def failure(error: DtsdError, client: Client) -> CliError:
    """A DtsdError of the high-level client as dtsctl's message and exit code."""
    if error.rpc_error is not None:
        return rpc_failure(error.rpc_error, client)
    return config_failure(error)


def tls_diagnosis(client: Client, details: str) -> str | None:
    """When TLS is why no server would talk: what is wrong and what to give, for each
    server tried, with gRPC's own words after it."""
    found = [text for server in dict.fromkeys(client.last_tried)
             if (text := tls_mismatch(server, client.tls, details))]
    return "; ".join(found) + f" (gRPC: {details})" if found else None


# --- where the servers are: dtsd.client finds them, as the library does -------------------

def config_failure(error: DtsdError) -> CliError:
    """A ConfigurationError of dtsd.client as dtsctl's message and exit code."""
    reason = getattr(error, "reason", "usage")
    code = {"unreachable": Exit.UNREACHABLE, "unauthorised": Exit.UNAUTHORISED}.get(
        reason, Exit.USAGE)
    return CliError(str(error), code)


def _warn_config(error: config.ConfigError) -> None:
    warn(f"dtsctl: warning: {error} (dtsctl reads only [client] and [dtsd] runtime_dir of "
         "it, which are fine)")


def read_client_config(config_path: str | None, env: Mapping[str, str]) -> config.Config | None:
    """dtsd.client.read_client_config, its warning and errors in dtsctl's words."""
    try:
        return client_module.read_client_config(config_path, env, on_warning=_warn_config)
    except ConfigurationError as exc:
        raise config_failure(exc) from None


def resolve_servers(servers: Sequence[str] | None = None,
                    submit_server: Sequence[str] | None = None,
                    status_servers: Sequence[str] | None = None, *,
                    timeout: float | None = None,
                    config_path: str | None = None,
                    env: Mapping[str, str] | None = None) -> Targets:
    """Apply the precedence of the module docstring (dtsd.client.resolve_servers)."""
    try:
        return client_module.resolve_servers(servers, submit_server, status_servers,
                                             timeout=timeout, config_path=config_path,
                                             env=env, on_warning=_warn_config)
    except ConfigurationError as exc:
        raise config_failure(exc) from None


@dataclass
class Settings:
    """Global options, resolved lazily so that `VERB --help` never reads a config file."""

    servers: Sequence[str] | None = None
    submit_server: Sequence[str] | None = None
    status_servers: Sequence[str] | None = None
    config_path: str | None = None
    token: str | None = None
    token_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    output: str = "table"
    timeout: float | None = None
    _targets: Targets | None = field(default=None, repr=False)
    _clients: dict[tuple[str, ...], Client] = field(default_factory=dict, repr=False)
    _credential: Any = field(default=None, repr=False)

    @property
    def json(self) -> bool:
        return self.output == "json"

    def set_option(self, name: str, value: Any) -> None:
        """A global option, before the verb or after it (the later one wins)."""
        setattr(self, name, value)
        if self.token and self.token_file:
            raise click.UsageError("give --token or --token-file, not both")
        if name == "token":
            warn("dtsctl: warning: --token shows the token to every user of this host "
                 "(/proc/PID/cmdline); use --token-file FILE or $DTSD_TOKEN_FILE")

    def targets(self) -> Targets:
        if self._targets is None:
            self._targets = resolve_servers(self.servers, self.submit_server, self.status_servers,
                                            timeout=self.timeout, config_path=self.config_path)
        return self._targets

    def client(self, role: Role) -> Client:
        targets = self.targets()
        servers = tuple(targets.write if role is Role.WRITE else targets.read)
        if servers not in self._clients:
            token = self.credential(targets)
            try:
                tls = None if targets.local_dir else self.tls(targets)
                self._clients[servers] = Client(servers, targets.timeout, token=token, tls=tls)
            except OSError as exc:
                raise CliError(f"cannot read a TLS file: {exc}", Exit.USAGE) from None
        return self._clients[servers]

    def credential(self, targets: Targets,
                   env: Mapping[str, str] | None = None) -> str | LocalToken | None:
        """The token to send, by the precedence of the module docstring (flags, then the
        environment, then the config file, then who the local user is); None: none."""
        if self._credential is None:
            try:
                found = client_module.resolve_credential(
                    targets, token=self.token, token_file=self.token_file, env=env,
                    local_token=LocalToken)
            except ConfigurationError as exc:
                raise config_failure(exc) from None
            self._credential = found or ""
        return self._credential or None

    def tls(self, targets: Targets) -> Tls | None:
        """TLS when a CA is given (flag, else [client] tls_ca); flags beat the config file."""
        try:
            return client_module.resolve_tls(targets, ca=self.tls_ca, cert=self.tls_cert,
                                             key=self.tls_key, server_name=self.tls_server_name)
        except ConfigurationError as exc:
            raise config_failure(exc) from None

    def call(self, role: Role, method: str, request: Any) -> Any:
        """One RPC by name with protobufs (the verbs dtsd.client does not wrap)."""
        client = self.client(role)
        try:
            return client.call(method, request)
        except grpc.RpcError as exc:
            raise rpc_failure(exc, client) from None

    def ask(self, role: Role, action: Callable[[Client], T]) -> T:
        """`action(client)` with the high-level client; its DtsdError as dtsctl's message
        and exit code."""
        client = self.client(role)
        try:
            return action(client)
        except DtsdError as exc:
            raise failure(exc, client) from None

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


pass_settings = click.make_pass_decorator(Settings)


class LocalToken(client_module.LocalToken):
    """dtsd.client.LocalToken, its refusal as exit code 4 and no answer as exit code 3."""

    def __call__(self) -> str:
        try:
            return super().__call__()
        except ConfigurationError as exc:
            raise config_failure(exc) from None


# --- values on the command line -----------------------------------------------------------

def parse_when(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (no zone: local time), `+DUR` from now or `-DUR` ago -> an aware UTC datetime."""
    text = text.strip()
    now = now or datetime.now(timezone.utc)
    if text[:1] in ("+", "-"):
        try:
            delta = timedelta(seconds=config.duration(text[1:]))
        except ValueError:
            raise ValueError(f"not a relative time: {text!r} (use +30s, +5m, +1h or -2d)") from None
        return now + delta if text[0] == "+" else now - delta
    iso = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use ISO 8601 like 2024-05-01T12:00:00Z, "
                         "+5m from now or -1h ago)") from None
    return moment.astimezone(timezone.utc)   # a naive time is taken as local time


def parse_env(text: str) -> tuple[str, str]:
    """`KEY=VALUE` -> (KEY, VALUE); the value may be empty or contain '='."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    if not models.ENV_KEY.match(key):
        raise ValueError(f"bad variable name {key!r} (letters, digits and '_', "
                         "not starting with a digit)")
    return key, value


def parse_label(text: str) -> tuple[str, str]:
    """`KEY=VALUE` -> (KEY, VALUE), both in the label syntax (models.check_labels)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return models.check_label_key(key), models.check_label_value(value)
    except models.InvalidField as exc:
        raise ValueError(exc.problem) from None


def parse_selector(text: str) -> str:
    """A label selector, checked as the server will (models.parse_selector)."""
    try:
        models.parse_selector(text)
    except models.InvalidField as exc:
        raise ValueError(exc.problem) from None
    return text


def _param_type(name: str, convert: Callable[[str], Any]) -> click.ParamType:
    class _Type(click.ParamType):
        def convert(self, value: Any, param: click.Parameter | None,
                    ctx: click.Context | None) -> Any:
            if not isinstance(value, str):
                return value
            try:
                return convert(value)
            except ValueError as exc:
                self.fail(str(exc), param, ctx)
    _Type.name = name
    return _Type()


DURATION = _param_type("duration", config.duration)
WHEN = _param_type("when", parse_when)
ENV = _param_type("key=value", parse_env)
LIMIT = _param_type("name=value", config.limit_list)
LABEL = _param_type("key=value", parse_label)
SELECTOR = _param_type("selector", parse_selector)
LABEL_HELP = ("A label for selection (repeatable): KEY=VALUE as Kubernetes' (KEY: "
              "[prefix/]name; name and VALUE at most 63 of letters, digits, '.', '_', '-'); "
              f"at most {models.MAX_LABELS}.")
SELECTOR_HELP = ("Label selector: k=v, k!=v, 'k in (a,b)', 'k notin (a,b)', k (has k), "
                 "!k (has no k), joined by ',' (all must hold).")
LIMIT_HELP = ("A resource limit for the job (repeatable): processes=N, open_files=N, "
              "file_size=SIZE, memory=SIZE, cpu_time=DUR; at most the server's "
              "[worker] limits_max.")
SERVERS = _param_type("servers", parse_servers)
TARGETS = _param_type("names", config.target_names)
EVENTS = _param_type("events", config.notify_events)
NOTIFY_HELP = ("Webhook targets to notify when the job ends, by name from the server's "
               "[notify] targets, comma-separated or repeated (default: [notify] default).")
NOTIFY_ON_HELP = ("Events to notify: failed (failed for good: dead-lettered), succeeded; "
                  "comma-separated or repeated (default: [notify] on).")


def _names(given: tuple[tuple[str, ...], ...]) -> list[str]:
    """Repeated --notify or --notify-on options, in order, each name once."""
    return list(dict.fromkeys(name for names in given for name in names))


# --- terminal safety (the rule is dtsd/shown.py's) ----------------------------------------

# json.dumps escapes C0 itself; these are the rest, in JSON's own \uNNNN (the same value).
_JSON_ESCAPES = {code: f"\\u{code:04x}" for code in ESCAPES if code >= 0x7F}


def output_text(data: bytes) -> str:
    r"""A job's output bytes as safe text: each byte that is not UTF-8 as `\xNN`, control
    characters escaped, newlines and tabs kept."""
    return escape(data.decode("utf-8", errors="backslashreplace"), layout=True)


def cell(value: Any) -> str:
    """One value of a table or a field: on one line, every control character escaped."""
    return escape(str(value))


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False


def exact_output(raw: bool) -> bool:
    """The rule for a job's output: its exact bytes with --raw or when standard output is
    not a terminal (a pipe, a file); escaped on a terminal."""
    return raw or not is_terminal(sys.stdout)


def warn(text: str) -> None:
    """A message for standard error; whatever it quotes is escaped (its own lines kept)."""
    click.echo(escape(text, layout=True), err=True)


class OutputWriter:
    """A job's output on its way to a binary stream: the exact bytes, or escaped text.

    Escaping decodes incrementally, so a UTF-8 character split between two chunks of a
    live stream is still shown as that character, not as two stray bytes.
    """

    def __init__(self, out: BinaryIO, *, exact: bool):
        self.out = out
        self.exact = exact
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")

    def write(self, data: bytes, *, final: bool = False) -> None:
        if not self.exact:
            data = escape(self._decoder.decode(data, final), layout=True).encode("utf-8")
        if data:
            self.out.write(data)
            self.out.flush()

    def end(self) -> None:
        """The output ends here: show the bytes of a character it left unfinished."""
        self.write(b"", final=True)


# --- rendering ----------------------------------------------------------------------------

def iso_utc(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _moment(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def exact_time(iso: str | None, zone: tzinfo | None = None) -> str:
    """An ISO UTC string from the JSON form -> ISO time in `zone` (default: local) with
    its offset and without microseconds: `2024-05-01T14:00:00+02:00`."""
    if not iso:
        return "-"
    return _moment(iso).astimezone(zone).replace(microsecond=0).isoformat()


def ago(iso: str | None, now: datetime | None = None) -> str:
    """How long before `now` that was, for a table: `12 s ago`, `3 min ago`, `in 5 min`."""
    if not iso:
        return "-"
    seconds = ((now or datetime.now(timezone.utc)) - _moment(iso)).total_seconds()
    amount = abs(seconds)
    for unit, size, below in (("s", 1, 90), ("min", 60, 90 * 60), ("h", 3600, 36 * 3600),
                              ("d", 86400, float("inf"))):
        if amount < below:
            text = f"{int(amount // size)} {unit}"
            break
    return f"in {text}" if seconds < -1 else f"{text} ago"


def duration(start: str | None, end: str | None, now: datetime | None = None) -> str | None:
    """How long from `start` to `end` (to `now` while there is no end): `8s`, `1h02m`."""
    if not start:
        return None
    until = _moment(end) if end else (now or datetime.now(timezone.utc))
    return seconds_text(max(0.0, (until - _moment(start)).total_seconds()))


def schedule_zone(name: str) -> tzinfo | None:
    """The schedule's IANA zone (empty: UTC); None (local time) when this host has no
    such zone in its tz database."""
    try:
        return zoneinfo.ZoneInfo(name or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return None


def to_timestamp(moment: datetime) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp
    delta = moment - EPOCH
    return Timestamp(seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000)


def _time(message: Any, name: str) -> str | None:
    if not message.HasField(name):
        return None
    stamp = getattr(message, name)
    return iso_utc(EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000))


def _optional(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def status_name(value: int) -> str:
    try:
        return dtsd_pb2.JobStatus.Name(value)
    except ValueError:
        return str(value)


def is_final(name: str) -> bool:
    return name in STATUS_NAMES and models.JobStatus(name).final


def output_fields(data: bytes) -> dict[str, str]:
    return {"output": data.decode("utf-8", errors="replace"),
            "output_base64": base64.b64encode(data).decode("ascii")}


def spec_dict(spec: Any) -> dict[str, Any]:
    return {
        "id": spec.id,
        "name": spec.name,
        "command": spec.command,
        "env": dict(sorted(spec.env.items())),
        "cwd": spec.cwd,
        "queue": spec.queue,
        "priority": spec.priority,
        "max_retries": _optional(spec, "max_retries"),
        "timeout_seconds": spec.timeout_seconds,
        "run_at": _time(spec, "run_at"),
        "idempotency_key": spec.idempotency_key,
        "limits": {name: getattr(spec.limits, field)
                   for name, field in models.LIMIT_PROTO_FIELDS.items()
                   if getattr(spec.limits, field)},
        "notify": list(spec.notify),
        "notify_on": list(spec.notify_on),
        "labels": dict(sorted(spec.labels.items())),
    }


def attempt_dict(attempt: Any) -> dict[str, Any]:
    return {
        "number": attempt.number,
        "worker": attempt.worker,
        "started_at": _time(attempt, "started_at"),
        "finished_at": _time(attempt, "finished_at"),
        "exit_code": _optional(attempt, "exit_code"),
        **output_fields(attempt.output),
        "output_truncated": attempt.output_truncated,
        "error": attempt.error,
    }


def job_dict(job: Any) -> dict[str, Any]:
    """A `dtsd.v1.Job` as the JSON object documented in the module docstring."""
    return {
        "id": job.id,
        "status": status_name(job.status),
        "attempts": job.attempts,
        "exit_code": _optional(job, "exit_code"),
        **output_fields(job.output),
        "output_truncated": job.output_truncated,
        "error": job.error,
        "dead_lettered": job.dead_lettered,
        "worker": job.worker,
        "submitted_by": job.submitted_by,
        "created_at": _time(job, "created_at"),
        "updated_at": _time(job, "updated_at"),
        "started_at": _time(job, "started_at"),
        "finished_at": _time(job, "finished_at"),
        "schedule_id": job.schedule_id,
        "fire_time": _time(job, "fire_time"),
        "env_hidden": job.env_hidden,
        "spec": spec_dict(job.spec),
        "attempt_history": [attempt_dict(attempt) for attempt in job.attempt_history],
    }


def _outage_seconds(node: Any, outage: Any) -> float:
    """How long the store had been unreachable when the node's record was taken: both
    times are the node's clock, so this one's does not matter."""
    seen = node.seen_at.seconds + node.seen_at.nanos / 1e9
    since = outage.since.seconds + outage.since.nanos / 1e9
    return round(max(0.0, seen - since), 1)


def cluster_dict(status: Any) -> dict[str, Any]:
    counts = {name: 0 for name in STATUS_NAMES}
    counts.update(sorted(status.job_counts.items()))
    return {
        "cluster": status.cluster,
        "single_node": status.single_node,
        "leader": status.leader,
        "server_node": status.server_node,
        "dead_lettered": status.dead_lettered,
        "job_counts": counts,
        "nodes": [{
            "node_id": node.node_id,
            "version": node.version,
            "leader": node.leader,
            "state": node.state,
            "started_at": _time(node, "started_at"),
            "seen_at": _time(node, "seen_at"),
            "children": [{
                "role": child.role,
                "index": child.index,
                "pid": child.pid,
                "state": child.state,
                "uptime_seconds": child.uptime_seconds,
                "restarts": child.restarts,
            } for child in node.children],
            "unreachable": [{
                "store": outage.store,
                "since": _time(outage, "since"),
                "seconds": _outage_seconds(node, outage),
            } for outage in node.unreachable],
        } for node in status.nodes],
        "workers": [{
            "id": worker.id,
            "node_id": worker.node_id,
            "pid": worker.pid,
            "queues": list(worker.queues),
            "concurrency": worker.concurrency,
            "running": worker.running,
            "seen_at": _time(worker, "seen_at"),
        } for worker in status.workers],
        "queues": [{"queue": depth.queue, "pending": depth.pending,
                    "delayed": depth.delayed, "running": depth.running,
                    "paused": depth.paused, "max_running": depth.max_running or None}
                   for depth in status.queues],
        "unserved_queues": unserved_queues(status),
    }


def unserved_queues(status: Any) -> list[str]:
    """The queues with jobs waiting that no live worker serves: they wait forever unless
    a worker that names them in [worker] queues starts."""
    served = {queue for worker in status.workers for queue in worker.queues}
    return [depth.queue for depth in status.queues
            if depth.pending + depth.delayed and depth.queue not in served]


def format_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], indent: str = "") -> str:
    cells = [[str(column) for column in columns]]
    cells += [["-" if value is None or value == "" else cell(value) for value in row]
              for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(indent + "  ".join(value.ljust(width) for value, width in zip(row, widths))
                     .rstrip() for row in cells)


def format_fields(pairs: Iterable[tuple[str, Any]]) -> str:
    pairs = [(label, value) for label, value in pairs if value not in (None, "", [], {})]
    width = max((len(label) for label, _ in pairs), default=0) + 2
    return "\n".join(f"{label + ':':<{width}}{cell(value)}" for label, value in pairs)


def seconds_text(seconds: float) -> str:
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{seconds:.0f}s" if seconds >= 1 or seconds == 0 else f"{seconds:.1f}s"


def _exit_text(code: int | None) -> str:
    """The EXIT cell: the exit code, or the signal that ended the job (stored as -N)."""
    if code is None:
        return "-"
    return signal_name(-code) if code < 0 else str(code)


def exit_field(code: int | None) -> str | None:
    """The value of an `Exit code:` field: `7`, or `killed by SIGTERM`."""
    if code is None:
        return None
    return ending(code) if code < 0 else str(code)


def error_text(job: Mapping[str, Any]) -> str | None:
    """The job's error, unless it only repeats how the command ended."""
    return shown.error_text(job["exit_code"], job["error"])


def env_text(env: Mapping[str, str], hidden: bool) -> str:
    """`A=1 B='x y'`; values the server withheld show as (hidden), never as empty."""
    return " ".join(f"{key}={HIDDEN if hidden else shlex.quote(value)}"
                    for key, value in env.items())


def job_table(job: dict[str, Any]) -> str:
    spec = job["spec"]
    retries = "default" if spec["max_retries"] is None else spec["max_retries"]
    lines = [format_fields([
        ("ID", job["id"]),
        ("Name", spec["name"]),
        ("Status", job["status"] + (" (dead-lettered)" if job["dead_lettered"] else "")),
        ("Exit code", exit_field(job["exit_code"])),
        ("Error", error_text(job)),
        ("Command", spec["command"]),
        ("Queue", spec["queue"]),
        ("Priority", spec["priority"]),
        ("Attempts", f"{job['attempts']} (max retries {retries})"),
        ("Timeout", seconds_text(spec["timeout_seconds"]) if spec["timeout_seconds"] else None),
        ("Env", env_text(spec["env"], job["env_hidden"])),
        ("Cwd", spec["cwd"]),
        ("Labels", ",".join(f"{k}={v}" for k, v in spec["labels"].items()) or None),
        ("Worker", job["worker"]),
        ("Submitted by", job["submitted_by"]),
        ("Idempotency key", spec["idempotency_key"]),
        ("Notify", spec["notify"] and f"{', '.join(spec['notify'])} on "
                                      f"{', '.join(spec['notify_on']) or 'nothing'}"),
        ("Schedule", job["schedule_id"] or None),
        ("Fire time", job["fire_time"] and exact_time(job["fire_time"])),
        ("Run at", spec["run_at"] and f"{exact_time(spec['run_at'])} ({ago(spec['run_at'])})"),
        ("Created", f"{exact_time(job['created_at'])} ({ago(job['created_at'])})"),
        ("Started", job["started_at"] and exact_time(job["started_at"])),
        ("Finished", job["finished_at"] and exact_time(job["finished_at"])),
        ("Duration", _job_duration(job)),
    ])]
    if job["attempt_history"]:
        lines.append("Attempt history:")
        lines.append(format_table(
            ("#", "WORKER", "STARTED", "DURATION", "EXIT", "ERROR"),
            [(a["number"], a["worker"], ago(a["started_at"]),
              duration(a["started_at"], a["finished_at"]) if a["finished_at"] else "-",
              _exit_text(a["exit_code"]), error_text(a)) for a in job["attempt_history"]],
            indent="  "))
    lines.append("Output:" + ("" if job["output"] else " (none)"))
    if job["output"]:
        lines.append(output_text(base64.b64decode(job["output_base64"])).rstrip("\n"))
    if job["output_truncated"]:
        lines.append("(output truncated)")
    return "\n".join(lines)


def jobs_table(data: dict[str, Any]) -> str:
    return format_table(
        ("ID", "NAME", "STATUS", "QUEUE", "ATTEMPTS", "EXIT", "CREATED", "DURATION"),
        [(job["id"], job["spec"]["name"], job["status"], job["spec"]["queue"], job["attempts"],
          _exit_text(job["exit_code"]), ago(job["created_at"]), _job_duration(job))
         for job in data["jobs"]])


def _job_duration(job: Mapping[str, Any]) -> str | None:
    """Its run time when it ran: finished, or running until now."""
    running = job["status"] == models.JobStatus.RUNNING.value
    if job["finished_at"] or running:
        return duration(job["started_at"], job["finished_at"] if not running else None)
    return None


def cluster_table(data: dict[str, Any]) -> str:
    mode = "single-node" if data["single_node"] else f"leader {data['leader'] or '(none)'}"
    parts = [format_fields([("Cluster", f"{data['cluster']} ({mode})"),
                            ("Answered by", data["server_node"])])]
    parts.append(format_table(
        ("NODE", "LEADER", "STATE", "VERSION", "STARTED", "SEEN"),
        [(node["node_id"], "*" if node["leader"] else "", node["state"], node["version"],
          ago(node["started_at"]), ago(node["seen_at"])) for node in data["nodes"]]))
    outages = [f"{node['node_id']}: {outage['store']} unreachable for "
               f"{seconds_text(outage['seconds'])}"
               for node in data["nodes"] for outage in node.get("unreachable", ())]
    if outages:
        parts.append("\n".join(["Unreachable stores:", *("  " + line for line in outages)]))
    parts.append(format_table(
        ("NODE", "ROLE", "INDEX", "PID", "STATE", "UPTIME", "RESTARTS"),
        [(node["node_id"], child["role"], child["index"], child["pid"] or "", child["state"],
          seconds_text(child["uptime_seconds"]), child["restarts"])
         for node in data["nodes"] for child in node["children"]]))
    parts.append(format_table(
        ("WORKER", "NODE", "PID", "QUEUES", "RUNNING", "SEEN"),
        [(worker["id"], worker["node_id"], worker["pid"], ",".join(worker["queues"]),
          f"{worker['running']}/{worker['concurrency']}", ago(worker["seen_at"]))
         for worker in data["workers"]]))
    parts.append(format_table(
        ("QUEUE", "STATE", "PENDING", "DELAYED", "RUNNING", "WORKERS"),
        [(q["queue"], "paused" if q["paused"] else "active", q["pending"], q["delayed"],
          q["running"], sum(q["queue"] in worker["queues"] for worker in data["workers"]))
         for q in data["queues"]]))
    if data["unserved_queues"]:
        parts.append(f"No live worker serves {', '.join(map(repr, data['unserved_queues']))}: "
                     "their jobs wait until a worker whose [worker] queues names them runs.")
    counts = "  ".join(f"{name} {count}" for name, count in data["job_counts"].items())
    parts.append(format_fields([("Jobs", counts), ("Dead-lettered", str(data["dead_lettered"]))]))
    return "\n\n".join(parts)


def render(output: str, data: Any, table: Callable[[Any], str | bytes | None], *,
           raw: bool = False) -> None:
    """The one renderer: `data` as JSON with `-o json`, else whatever `table(data)` makes
    of it: text, or a job's output as bytes.

    What reaches the terminal is decided here (the module docstring has the rule): JSON
    spells out the control characters it would otherwise leave raw (DEL, C1, bidi); text
    is escaped, line breaks kept (tables escape each cell on its own, so `cell` keeps a
    value on its line); bytes go out exact when `exact_output(raw)`, else escaped.
    """
    if output == "json":
        click.echo(json.dumps(data, indent=2, ensure_ascii=False).translate(_JSON_ESCAPES))
        return
    text = table(data)
    if isinstance(text, bytes):
        writer = OutputWriter(binary_stdout(), exact=exact_output(raw))
        writer.write(text, final=True)
    elif text:
        click.echo(escape(text, layout=True))


def binary_stdout() -> BinaryIO:
    """Standard output for bytes (a job's output need not be text)."""
    sys.stdout.flush()
    return sys.stdout.buffer


def job_exit_code(status: str, exit_code: int | None) -> int:
    """What `--wait` and `logs -f` exit with: the job's own result."""
    if status == models.JobStatus.SUCCEEDED.value:
        return 0
    if status == models.JobStatus.FAILED.value and exit_code is not None:
        if 0 < exit_code <= 255:
            return exit_code
        if exit_code < 0:
            return min(128 - exit_code, 255)
    return Exit.FAILED


def _final_line(job: dict[str, Any]) -> str:
    """`ID: FAILED, exit code 7`, `ID: FAILED, killed by SIGTERM (timeout after 5s)`."""
    text = f"{job['id']}: {job['status']}"
    if job["exit_code"] is not None:
        text += f", {ending(job['exit_code'])}"
    error = error_text(job)
    if error:
        text += f" ({cell(error)})"
    return text


# --- waiting and following ----------------------------------------------------------------

class OutputFollower:
    """Writes streamed output exactly once: per attempt, only bytes beyond those written."""

    def __init__(self, out: OutputWriter):
        self.out = out
        self.written: dict[int, int] = {}
        self.attempt = 0

    def chunk(self, attempt: int, offset: int, data: bytes) -> None:
        if attempt != self.attempt:
            if self.written.get(self.attempt) and attempt > self.attempt:
                self.out.end()
                warn(f"--- attempt {attempt} ---")
            self.attempt = max(self.attempt, attempt)
        have = self.written.get(attempt, 0)
        end = offset + len(data)
        if end <= have:
            return
        self.out.write(data[max(0, have - offset):])
        self.written[attempt] = end

    def finish(self, job: Any) -> None:
        """Write what the stored output of the last attempt has that the stream missed."""
        if job.attempts:
            self.chunk(job.attempts, 0, job.output)
        self.out.end()


def wait_for_job(settings: Settings, job_id: str, *, follow: OutputWriter | None = None) -> Any:
    """Block until the job is final and return it (a `dtsd.v1.Job`, with attempts).

    `Client.wait`: watches the job, polls GetJob every 0.5 s if the stream breaks. With
    `follow`, output chunks go to that writer as they come, each byte once; the watch is
    re-opened after a break so the output stays live.
    """
    follower = OutputFollower(follow) if follow is not None else None
    job = settings.ask(Role.READ, lambda client: client.wait(
        job_id, on_output=follower.chunk if follower else None)).raw
    if follower:
        follower.finish(job)
    return job


# --- the jobs file ------------------------------------------------------------------------

_FILE_FIELDS = {"name": str, "command": str, "description": str, "id": str, "env": dict,
                "cwd": str, "queue": str, "priority": int, "max_retries": int,
                "timeout": (int, float, str), "idempotency_key": str, "notify": list,
                "notify_on": list, "labels": dict}


def load_jobs_file(path: str) -> list[dict[str, Any]]:
    """Read the seed's `{"jobs": [{"name", "command", "description"}]}` format.

    Each job may also set id, env, cwd, queue, priority, max_retries, timeout (seconds or
    a duration like "5m"), idempotency_key, notify and notify_on (lists of names), and
    labels (an object of strings, added to --label's).
    Raises click.UsageError naming the problem.
    """
    def bad(problem: str) -> click.UsageError:
        return click.UsageError(f"jobs file {path}: {problem}")

    try:
        if path == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as handle:
                raw = handle.read()
    except OSError as exc:
        raise bad(exc.strerror or str(exc)) from None
    try:
        document = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise bad(f"not UTF-8: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise bad(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    example = '{"jobs": [{"name": "...", "command": "..."}]}'
    if not isinstance(document, dict) or "jobs" not in document:
        raise bad(f'no "jobs" list at the top (expected {example})')
    jobs = document["jobs"]
    if not isinstance(jobs, list):
        raise bad(f'"jobs" must be a list (expected {example})')
    if not jobs:
        raise bad('"jobs" is empty')
    for number, job in enumerate(jobs, 1):
        where = f"job {number}"
        if not isinstance(job, dict):
            raise bad(f"{where}: must be an object with a \"command\", not {json.dumps(job)[:60]}")
        if isinstance(job.get("name"), str) and job["name"]:
            where += f" ({job['name']!r})"
        unknown = sorted(set(job) - set(_FILE_FIELDS))
        if unknown:
            raise bad(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(_FILE_FIELDS)})")
        if "command" not in job:
            raise bad(f'{where}: missing "command"')
        for key, kind in _FILE_FIELDS.items():
            if key in job and (not isinstance(job[key], kind) or isinstance(job[key], bool)):
                raise bad(f"{where}: {key!r} has the wrong type ({type(job[key]).__name__})")
        for key in ("env", "labels"):
            if any(not isinstance(value, str) for value in job.get(key, {}).values()):
                raise bad(f"{where}: every value in {key!r} must be a string")
        for key in ("notify", "notify_on"):
            if any(not isinstance(value, str) for value in job.get(key, ())):
                raise bad(f"{where}: every item of {key!r} must be a string")
        if isinstance(job.get("timeout"), str):
            try:
                job["timeout"] = config.duration(job["timeout"])
            except ValueError as exc:
                raise bad(f"{where}: timeout: {exc}") from None
    return jobs


# --- building requests --------------------------------------------------------------------

_OPTION_OF_FIELD = {"command": "CMD", "name": "--name", "env": "--env", "cwd": "--cwd",
                    "queue": "--queue", "priority": "--priority",
                    "max_retries": "--max-retries", "timeout_seconds": "--timeout",
                    "id": "--id", "idempotency_key": "--idempotency-key", "limits": "--limit",
                    "notify": "--notify", "notify_on": "--notify-on", "labels": "--label"}


def job_spec(*, command: str, name: str = "", env: Mapping[str, str] | None = None,
             cwd: str = "", queue: str = "", priority: int = 0, max_retries: int | None = None,
             timeout: float | None = None, run_at: datetime | None = None, id: str = "",
             idempotency_key: str = "", limits: Mapping[str, int] | None = None,
             notify: Sequence[str] = (), notify_on: Sequence[str] = (),
             labels: Mapping[str, str] | None = None, where: str | None = None) -> Any:
    """Check the fields as the server will (models.validate_spec) and build a JobSpec.

    A bad field is a usage error (exit 2), raised before anything is sent. `where` names
    the job in a jobs file; without it the message names the command-line option.
    """
    try:
        models.validate_spec(id=id, command=command, name=name, env=dict(env or {}), cwd=cwd,
                             queue=queue, priority=priority, max_retries=max_retries,
                             timeout=timeout or 0.0, run_at=run_at,
                             idempotency_key=idempotency_key, limits=dict(limits or {}),
                             notify=list(notify), notify_on=list(notify_on),
                             labels=dict(labels or {}))
    except models.InvalidField as exc:
        if where is not None:
            raise click.UsageError(f"{where}: {exc.field}: {exc.problem}") from None
        option = _OPTION_OF_FIELD.get(exc.field.split("[")[0].split(".")[0], exc.field)
        raise click.UsageError(f"{option}: {exc.problem}") from None
    spec = dtsd_pb2.JobSpec(id=id, name=name, command=command, env=dict(env or {}), cwd=cwd,
                            queue=queue, priority=priority,
                            timeout_seconds=timeout or 0.0, idempotency_key=idempotency_key,
                            notify=list(notify), notify_on=list(notify_on),
                            labels=dict(labels or {}))
    for name, value in (limits or {}).items():
        setattr(spec.limits, models.LIMIT_PROTO_FIELDS[name], value)
    if max_retries is not None:
        spec.max_retries = max_retries
    if run_at is not None:
        spec.run_at.CopyFrom(to_timestamp(run_at))
    return spec


# --- shell completion ---------------------------------------------------------------------
# Each <TAB> runs dtsctl (packaging/completion); these ask the cluster, with the global
# options typed so far and a short deadline (unless --timeout is typed): a completion that
# cannot ask offers nothing.

COMPLETION_TIMEOUT = 2.0
COMPLETION_JOBS = 100


def _completion_settings(ctx: click.Context) -> Settings:
    """Settings from the global options on the line so far (no callback has run)."""
    given: dict[str, Any] = dict(ctx.meta.get(_LATE_KEY, {}))
    while ctx is not None:
        given = {**{k: v for k, v in ctx.params.items() if v is not None}, **given}
        ctx = ctx.parent
    names = {name for name in Settings.__dataclass_fields__ if not name.startswith("_")}
    settings = Settings(**{k: v for k, v in given.items() if k in names and k != "output"})
    settings.timeout = settings.timeout or COMPLETION_TIMEOUT     # --timeout on the line wins
    return settings


def _ask(ctx: click.Context, incomplete: str,
         values: Callable[[Settings], Iterable[str]]) -> list[str]:
    settings = _completion_settings(ctx)
    try:
        return [value for value in values(settings) if value.startswith(incomplete)]
    except (click.ClickException, grpc.RpcError, OSError, ValueError):
        return []
    finally:
        settings.close()


def _job_ids(*statuses: models.JobStatus, dead: bool = False) -> Callable[..., list[str]]:
    """Complete the ids of the newest jobs (in these statuses; dead-lettered ones)."""
    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
        def ids(settings: Settings) -> list[str]:
            page = settings.ask(Role.READ, lambda client: (
                client.dead_letters_page(page_size=COMPLETION_JOBS) if dead
                else client.list_page(statuses=statuses, page_size=COMPLETION_JOBS)))
            return [job.id for job in page.jobs]
        return _ask(ctx, incomplete, ids)
    return complete


def complete_schedules(ctx: click.Context, param: click.Parameter,
                       incomplete: str) -> list[str]:
    return _ask(ctx, incomplete, lambda settings: [schedule.name for schedule in settings.ask(
        Role.READ, lambda client: client.schedules())])


def complete_zones(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """IANA zones of this host's tz database (what the server takes may differ little)."""
    return sorted(zone for zone in zoneinfo.available_timezones() if zone.startswith(incomplete))


# --- the command line ---------------------------------------------------------------------

_OUTPUT_KEY = "dtsctl.output"


def _remember_output(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    settings = ctx.find_object(Settings)
    if settings is not None:
        settings.output = value
    else:
        ctx.meta[_OUTPUT_KEY] = value


option_output = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default=None, expose_value=False,
    callback=_remember_output,
    help="table (default) for people, json for programs (fields: `python3 -m pydoc dtsd.cli`).")

RAW_HELP = ("the job's output as its exact bytes on a terminal too (without it, control "
            "characters are escaped there: \\x1b, \\u202e). A pipe or a file always gets "
            "the exact bytes.")
option_raw = click.option("--raw", is_flag=True, help="Write " + RAW_HELP)

_EPILOG = """\b
Exit codes: 0 success; 1 the job or operation failed; 2 usage error;
3 cannot reach any server; 4 not authorised. `submit --wait/--follow` and
`logs -f` exit with the job's own exit code instead.
\b
Servers, first match wins: --submit-server/--status-servers, --servers,
$SUBMIT_SERVER/$STATUS_SERVERS, $DTSD_SERVERS, $SERVERS, this host's dtsd
(its local sockets in [dtsd] runtime_dir, /run/dtsd), [client] servers of the
config file, 127.0.0.1:50051.
\b
Global options may stand before or after the verb (`dtsctl list --servers
H:P`); after `submit` and `cron add`, --timeout is the job's timeout.
\b
Credentials, first match wins: --token, --token-file, $DTSD_TOKEN,
$DTSD_TOKEN_FILE, [client] token_file; on this host's local sockets, who you
are (the role [server] local_roles gives your user or group)."""


def _version() -> str:
    import dtsd
    return getattr(dtsd, "__version__", "unknown")


class Verbs(click.Group):
    """A group of verbs that, for a mistyped verb, names the nearest one."""

    group_class = type          # `dlq` and `cron` are Verbs too

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            near = difflib.get_close_matches(args[0] if args else "", self.list_commands(ctx),
                                             n=1, cutoff=0.6)
            if near and not args[0].startswith("-"):
                exc.message = f"{exc.message.rstrip('.')}. Did you mean {near[0]!r}?"
            raise


# The global options, declared once: on `dtsctl` itself (before the verb) and, hidden, on
# every verb (after it), except where a verb has an option of the same name: `--timeout`
# of `submit` and `cron add` is the job's timeout.
_GLOBAL_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--servers",), dict(type=SERVERS, metavar="HOST:PORT[,...]",
     help="Servers for every call, tried round-robin with fail-over "
          "(env DTSD_SERVERS, then SERVERS).")),
    (("--submit-server",), dict(type=SERVERS, metavar="HOST:PORT[,...]",
     help="Servers for writes: submit, cancel, retry, dlq requeue/purge (env SUBMIT_SERVER).")),
    (("--status-servers",), dict(type=SERVERS, metavar="HOST:PORT[,...]",
     help="Servers for reads: status, list, logs, dlq list, waiting (env STATUS_SERVERS).")),
    (("-c", "--config", "config_path"), dict(type=click.Path(dir_okay=False), metavar="FILE",
     help="Read [client] (servers, timeout, token_file, TLS) and [dtsd] runtime_dir (this "
          f"host's dtsd) from FILE (env DTSD_CONFIG; default {config.DEFAULT_PATH} if "
          "readable and no server is given).")),
    (("--token",), dict(metavar="TOKEN",
     help="Sent as 'authorization: Bearer TOKEN' (env DTSD_TOKEN). Every user of this host "
          "can read a command line: prefer --token-file.")),
    (("--token-file",), dict(type=click.Path(dir_okay=False), metavar="FILE",
     help="Read the token from FILE, its first line (env DTSD_TOKEN_FILE; default: [client] "
          "token_file; keep it 0600).")),
    (("--tls-ca",), dict(type=click.Path(dir_okay=False), metavar="FILE",
     help="Use TLS, trusting the servers' certificates signed by this PEM CA (default: "
          "[client] tls_ca).")),
    (("--tls-cert",), dict(type=click.Path(dir_okay=False), metavar="FILE",
     help="Client certificate (PEM) for servers that require mTLS ([client] tls_cert).")),
    (("--tls-key",), dict(type=click.Path(dir_okay=False), metavar="FILE",
     help="Private key (PEM) of --tls-cert ([client] tls_key).")),
    (("--tls-server-name",), dict(metavar="NAME",
     help="Name to check the servers' certificates against (default: their host).")),
    (("--timeout",), dict(type=DURATION, metavar="SECONDS",
     help="Deadline of each call: 10, 2.5, 30s, 1m (default: [client] timeout of the config "
          "file, else 10).")),
)


def global_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for decls, settings in reversed(_GLOBAL_OPTIONS):
        function = click.option(*decls, **settings)(function)
    return function


_LATE_KEY = "dtsctl.late"


def _late_global(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A global option given after the verb: it counts as if given before it. (While
    completing, no Settings exist: it is kept for _completion_settings.)"""
    if value is None or param.name is None:
        return
    settings = ctx.find_object(Settings)
    if settings is None:
        ctx.meta.setdefault(_LATE_KEY, {})[param.name] = value
    else:
        settings.set_option(param.name, value)


def accept_global_options_after_verbs(group: click.Group) -> None:
    """Give every verb below `group` the global options it has no option of its own for."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            accept_global_options_after_verbs(command)
            continue
        taken = {name for param in command.params for name in getattr(param, "opts", ())}
        for decls, settings in _GLOBAL_OPTIONS:
            if not taken.intersection(decls):
                command.params.append(click.Option(
                    decls, hidden=True, expose_value=False, callback=_late_global, **settings))


@click.group("dtsctl", cls=Verbs, epilog=_EPILOG,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@global_options
@option_output
@click.version_option(_version(), "-V", "--version", prog_name="dtsctl")
@click.pass_context
def cli(ctx: click.Context, servers: list[str] | None, submit_server: list[str] | None,
        status_servers: list[str] | None, config_path: str | None, token: str | None,
        token_file: str | None, tls_ca: str | None, tls_cert: str | None, tls_key: str | None,
        tls_server_name: str | None, timeout: float | None) -> None:
    """dtsctl: submit, watch and manage jobs of a dtsd cluster.

    On a host that runs dtsd, dtsctl needs no option: it talks to the local sockets, and
    the master knows from the kernel which user you are.
    """
    ctx.obj = Settings(servers=servers, submit_server=submit_server,
                       status_servers=status_servers, config_path=config_path,
                       tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                       tls_server_name=tls_server_name,
                       output=ctx.meta.get(_OUTPUT_KEY, "table"), timeout=timeout)
    for name, value in (("token", token), ("token_file", token_file)):
        if value is not None:
            ctx.obj.set_option(name, value)
    ctx.call_on_close(ctx.obj.close)


@cli.command(context_settings={"allow_interspersed_args": False})
@click.option("--name", default="", help="A label for people and for `list --name`.")
@click.option("--env", "env", type=ENV, multiple=True, metavar="KEY=VALUE",
              help="Add a variable to the job's clean environment (repeatable).")
@click.option("--cwd", default="", help="Working directory, absolute (default: [worker] cwd).")
@click.option("--queue", default="", help="Queue to run in (default: default).")
@click.option("--priority", type=click.IntRange(0, models.MAX_PRIORITY), default=0,
              help=f"0 to {models.MAX_PRIORITY}; higher runs first within a queue (default 0).")
@click.option("--max-retries", type=click.IntRange(0, models.MAX_RETRIES_LIMIT), default=None,
              help=f"Runs again after a failed attempt up to N times (server default "
                   f"{models.DEFAULT_MAX_RETRIES}; 0: never).")
@click.option("--timeout", "job_timeout", type=DURATION, default=None, metavar="DUR",
              help="Kill the job after DUR: 30, 30s, 5m, 1h (default: [worker] default_timeout). "
                   "Not the call deadline: that is `dtsctl --timeout`.")
@click.option("--at", "run_at", type=WHEN, metavar="WHEN",
              help="Start no earlier than WHEN: ISO 8601 (2024-05-01T12:00:00Z; without a "
                   "zone: local time) or +DUR from now (+30s, +5m, +1h).")
@click.option("--limit", "limits", type=LIMIT, multiple=True, metavar="NAME=VALUE",
              help=LIMIT_HELP)
@click.option("--notify", "notify", type=TARGETS, multiple=True, metavar="NAME[,NAME]",
              help=NOTIFY_HELP)
@click.option("--notify-on", "notify_on", type=EVENTS, multiple=True, metavar="EVENT[,EVENT]",
              help=NOTIFY_ON_HELP)
@click.option("--label", "labels", type=LABEL, multiple=True, metavar="KEY=VALUE",
              help=LABEL_HELP)
@click.option("--id", "job_id", default="", help="Choose the job id ([A-Za-z0-9._:-], <= 128).")
@click.option("--idempotency-key", default="",
              help="Submitting the same key again returns the existing job (created: false).")
@click.option("--wait", is_flag=True,
              help="Wait until the job is final and exit with its result (see exit codes).")
@click.option("--follow", is_flag=True,
              help="Like --wait, and write the job's output to stdout as it runs "
                   "(the job id goes to stderr).")
@click.option("--file", "jobs_file", type=click.Path(dir_okay=False, allow_dash=True),
              metavar="JOBS.JSON",
              help='Submit every job of the seed\'s {"jobs": [{"name", "command", '
                   '"description"}]} file in one call ("-": stdin). A job may also set id, '
                   "env, cwd, queue, priority, max_retries, timeout, idempotency_key, notify, "
                   "notify_on; --env/--cwd/--queue/--priority/--max-retries/--timeout/--at/"
                   "--limit/--notify/--notify-on give defaults.")
@click.option("--concurrent", is_flag=True,
              help="With --file --wait: print each job's block as soon as it ends, "
                   "instead of in file order. (On a terminal, a line on stderr counts "
                   "the jobs that ended.)")
@click.option("--raw", is_flag=True, help="With --wait or --follow: write " + RAW_HELP)
@option_output
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[--] CMD...")
@pass_settings
def submit(settings: Settings, command: tuple[str, ...], name: str, env: tuple[tuple[str, str], ...],
           cwd: str, queue: str, priority: int, max_retries: int | None,
           job_timeout: float | None, run_at: datetime | None, job_id: str,
           limits: tuple[dict[str, int], ...], notify: tuple[tuple[str, ...], ...],
           notify_on: tuple[tuple[str, ...], ...], idempotency_key: str, wait: bool,
           follow: bool, jobs_file: str | None, concurrent: bool, raw: bool,
           labels: tuple[tuple[str, str], ...] = ()) -> None:
    """Submit a job: dtsctl submit [OPTIONS] -- CMD...

    CMD runs under /bin/sh -c. Several words are quoted and joined (shlex.join); one
    word is used as is, so `dtsctl submit -- 'echo hi | wc -c'` runs a pipeline.
    Options must come before CMD: everything from the first word on is the command.

    Prints the job id (JSON: {id, created, queue_unserved}). With --wait or --follow
    the id goes to standard error, the job's output to standard output (at the end, or
    live), and a final status line to standard error (JSON: {id, created,
    queue_unserved, job: <job object>}). The output is written as its exact bytes to a
    pipe or a file, and with control characters escaped to a terminal unless --raw is
    given. A job sent to a queue no live worker serves is accepted, with a warning on
    standard error: it waits until such a worker runs.
    With --file: one line `<id>  <name>` per job (JSON: {jobs: [{id, created,
    queue_unserved, name}]}); with --wait a block per job and exit 1 if any job did not
    succeed.
    """
    if jobs_file is not None:
        if command:
            raise click.UsageError("give either --file or a command, not both")
        for given, option in ((name, "--name"), (job_id, "--id"),
                              (idempotency_key, "--idempotency-key"), (follow, "--follow"),
                              (raw, "--raw")):
            if given:
                raise click.UsageError(f"{option} cannot be used with --file")
        defaults = dict(env=dict(env), cwd=cwd, queue=queue, priority=priority,
                        max_retries=max_retries, timeout=job_timeout, run_at=run_at,
                        limits=_merge(limits), notify=_names(notify),
                        notify_on=_names(notify_on), labels=dict(labels))
        _submit_file(settings, jobs_file, defaults, wait=wait, concurrent=concurrent)
        return
    if concurrent:
        raise click.UsageError("--concurrent only goes with --file")
    if not command:
        raise click.UsageError("no command: dtsctl submit [OPTIONS] -- CMD...")
    if follow and settings.json:
        raise click.UsageError("--follow writes the live output; use --wait with -o json")
    if raw and (settings.json or not (wait or follow)):
        raise click.UsageError("--raw goes with --wait or --follow, without -o json")
    text = command[0] if len(command) == 1 else shlex.join(command)
    spec = job_spec(command=text, name=name, env=dict(env), cwd=cwd, queue=queue,
                    priority=priority, max_retries=max_retries, timeout=job_timeout,
                    run_at=run_at, id=job_id, idempotency_key=idempotency_key,
                    limits=_merge(limits), notify=_names(notify), notify_on=_names(notify_on),
                    labels=dict(labels))
    reply = settings.ask(Role.WRITE, lambda client: client.submit(spec=spec))
    result: dict[str, Any] = {"id": reply.id, "created": reply.created,
                              "queue_unserved": reply.queue_unserved}
    if not reply.created and not settings.json:
        warn(f"{reply.id}: already submitted with this idempotency key")
    if reply.queue_unserved:
        warn_unserved([spec.queue])
    if not (wait or follow):
        render(settings.output, result, lambda data: data["id"])
        return
    if not settings.json:
        warn(f"job {reply.id}")
    live = OutputWriter(binary_stdout(), exact=exact_output(raw)) if follow else None
    finished = wait_for_job(settings, reply.id, follow=live)
    job = job_dict(finished)
    if settings.json:
        render(settings.output, {**result, "job": job}, lambda data: None)
    else:
        if not follow:       # --wait: the output once the job is done
            render(settings.output, None, lambda _: bytes(finished.output), raw=raw)
        warn(_final_line(job))
    click.get_current_context().exit(job_exit_code(job["status"], job["exit_code"]))


def warn_unserved(queues: Sequence[str]) -> None:
    """Say that jobs went to queues no live worker serves: they wait until one does."""
    for queue in dict.fromkeys(queue or models.DEFAULT_QUEUE for queue in queues):
        warn(f"dtsctl: warning: no live worker serves queue {queue!r}: its jobs wait until "
             "a worker whose [worker] queues names it runs (dtsctl status shows the queues "
             "each worker serves)")


def _merge(limits: tuple[dict[str, int], ...]) -> dict[str, int]:
    """Repeated --limit options, the last one winning per name."""
    return {name: value for given in limits for name, value in given.items()}


def _submit_file(settings: Settings, path: str, defaults: dict[str, Any], *, wait: bool,
                 concurrent: bool) -> None:
    entries = load_jobs_file(path)
    specs = []
    for number, entry in enumerate(entries, 1):
        fields = {**defaults, **{k: v for k, v in entry.items() if k != "description"}}
        fields["env"] = {**defaults["env"], **entry.get("env", {})}
        fields["labels"] = {**defaults["labels"], **entry.get("labels", {})}
        where = f"jobs file {path}: job {number}"
        specs.append(job_spec(where=where, **fields))
    answers = settings.ask(Role.WRITE, lambda client: client.submit_many(specs))
    results = [{"id": answer.id, "created": answer.created,
                "queue_unserved": answer.queue_unserved, "name": entry.get("name", "")}
               for answer, entry in zip(answers, entries)]
    warn_unserved([spec.queue for spec, answer in zip(specs, answers)
                   if answer.queue_unserved])
    table = lambda data: "\n".join(f"{r['id']}  {cell(r['name'])}".rstrip()  # noqa: E731
                                   for r in data["jobs"])
    if not wait:
        render(settings.output, {"jobs": results}, table)
        return
    if not settings.json:
        render(settings.output, {"jobs": results}, table)
    lock = threading.Lock()
    settings.client(Role.READ)   # made before the threads start, so they share it
    progress = Progress(len(results))

    def finish(index: int) -> dict[str, Any]:
        job = job_dict(wait_for_job(settings, results[index]["id"]))
        results[index]["job"] = job
        with lock:
            progress.clear()
            if not settings.json:
                render(settings.output, job, lambda data: _job_block(entries[index], data))
            progress.advance(job["status"] == models.JobStatus.SUCCEEDED.value)
        return job

    progress.draw()
    try:
        if concurrent:
            with ThreadPoolExecutor(max_workers=min(32, len(results))) as pool:
                finished = list(pool.map(finish, range(len(results))))
        else:
            finished = [finish(index) for index in range(len(results))]
    finally:
        progress.clear()
    if settings.json:
        render(settings.output, {"jobs": results}, lambda data: None)
    failed = [job for job in finished if job["status"] != models.JobStatus.SUCCEEDED.value]
    if failed:
        raise CliError(f"{len(failed)} of {len(finished)} jobs did not succeed")


class Progress:
    """How many of the jobs waited for have ended, on one line of standard error that is
    redrawn in place: only on a terminal, and only for more than one job. Whoever writes
    a line meanwhile clears it first."""

    def __init__(self, total: int, stream: Any = None):
        self.stream = stream or sys.stderr
        self.shown = total > 1 and is_terminal(self.stream)
        self.total = total
        self.done = 0
        self.failed = 0

    def draw(self) -> None:
        if self.shown:
            failed = f", {self.failed} did not succeed" if self.failed else ""
            self.stream.write(f"\r\x1b[Kwaiting: {self.done} of {self.total} jobs "
                              f"ended{failed}")
            self.stream.flush()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def advance(self, succeeded: bool) -> None:
        self.done += 1
        self.failed += not succeeded
        if self.done < self.total:
            self.draw()


def _job_block(entry: Mapping[str, Any], job: dict[str, Any]) -> str:
    rule = "=" * 60
    lines = [rule, f"Job: {cell(entry.get('name', ''))}"]
    if entry.get("description"):
        lines.append(f"Description: {cell(entry['description'])}")
    lines += [f"Command: {cell(job['spec']['command'])}", f"Job ID: {job['id']}",
              f"Status: {job['status']}"]
    if job["exit_code"] is not None:
        lines.append(f"Exit Code: {exit_field(job['exit_code'])}")
    if error_text(job):
        lines.append(f"Error: {cell(error_text(job))}")
    lines.append("Output:")
    if job["output"]:
        lines.append(output_text(base64.b64decode(job["output_base64"])).rstrip("\n"))
    lines.append(rule)
    return "\n".join(lines)


def _each(ids: Sequence[str], action: Callable[[str], Any]) -> tuple[list[Any], list[dict[str, str]]]:
    """Run `action` for every id; an id that fails alone (exit code 1) is reported on stderr
    and the rest go on; unreachable or unauthorised stops everything."""
    done, errors = [], []
    for job_id in ids:
        try:
            done.append(action(job_id))
        except CliError as exc:
            if exc.exit_code != Exit.FAILED:
                raise
            code = exc.grpc_code.name if exc.grpc_code else "FAILED"
            errors.append({"id": job_id, "code": code, "message": exc.message})
            warn(f"{job_id}: {exc.message}")
    return done, errors


@cli.command()
@option_output
@click.argument("job_ids", nargs=-1, metavar="[JOB_ID]...", shell_complete=_job_ids())
@pass_settings
def status(settings: Settings, job_ids: tuple[str, ...]) -> None:
    """The cluster, or the given jobs.

    Without JOB_ID: cluster name, leader (or single-node), each node and its children
    (role, index, pid, state, uptime, restarts), workers, queue depths, job counts by
    status and the dead-lettered count. JSON: the `status` object of `python3 -m pydoc dtsd.cli`.

    With JOB_IDs: each job's status, exit code, attempts, times, error and output.
    JSON: {jobs: [<job object>], errors: [{id, code, message}]}. Exits 1 if any job
    is not found.
    """
    if not job_ids:
        reply = settings.ask(Role.READ, lambda client: client.cluster_status()).raw
        render(settings.output, cluster_dict(reply), cluster_table)
        return
    jobs, errors = _each(job_ids, lambda job_id: job_dict(settings.ask(
        Role.READ, lambda client: client.get(job_id, attempts=True)).raw))
    render(settings.output, {"jobs": jobs, "errors": errors},
           lambda data: "\n\n".join(job_table(job) for job in data["jobs"]))
    if errors:
        click.get_current_context().exit(Exit.FAILED)


def _pages(settings: Settings, fetch: Callable[[Client, str], client_module.JobPage],
           page_token: str, all_pages: bool) -> dict[str, Any]:
    """`fetch(client, page_token)` from `page_token` on: one page, or with `all_pages` all."""
    jobs: list[dict[str, Any]] = []
    seen: set[str] = set()
    token = page_token
    while True:
        page = settings.ask(Role.READ, lambda client: fetch(client, token))
        jobs += [job_dict(job.raw) for job in page.jobs]
        token = page.next_page_token
        if not (all_pages and token) or token in seen:
            break
        seen.add(token)
    if all_pages:
        token = ""
    if token:
        warn(f"more: --page-token {cell(token)}")
    return {"jobs": jobs, "next_page_token": token}


option_limit = click.option("--limit", type=click.IntRange(1, 1000), default=None,
                            help="Jobs per page (server default 100, at most 1000).")
option_page_token = click.option("--page-token", default="", metavar="TOKEN",
                                 help="Continue from the token a previous page printed.")
option_all = click.option("--all", "all_pages", is_flag=True,
                          help="Fetch every page, not just the first.")


@cli.command("list")
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(STATUS_NAMES, case_sensitive=False),
              help="Only jobs in this status (repeatable, any case).")
@click.option("--queue", default="", help="Only jobs of this queue.")
@click.option("--name", default="", help="Only jobs with this name.")
@click.option("--since", type=WHEN, metavar="WHEN",
              help="Only jobs created at or after WHEN (ISO 8601, +DUR or -DUR, e.g. -1h).")
@click.option("--until", type=WHEN, metavar="WHEN", help="Only jobs created before WHEN.")
@click.option("--selector", "-l", default="", type=SELECTOR, metavar="SELECTOR",
              help=SELECTOR_HELP)
@option_limit
@option_page_token
@option_all
@option_output
@pass_settings
def list_jobs(settings: Settings, statuses: tuple[str, ...], queue: str, name: str,
              since: datetime | None, until: datetime | None, limit: int | None,
              page_token: str, all_pages: bool, selector: str) -> None:
    """Jobs, newest first: ID, NAME, STATUS, QUEUE, ATTEMPTS, EXIT (its code, or the
    signal that killed it), CREATED (how long ago), DURATION (how long it ran).

    When more pages exist (and no --all) the next page token goes to stderr.
    JSON: {jobs: [<job object>, output empty], next_page_token}.
    """
    def fetch(client: Client, token: str) -> client_module.JobPage:
        return client.list_page(statuses=[s.upper() for s in statuses], queue=queue, name=name,
                                selector=selector, since=since, until=until,
                                page_size=limit or 0, page_token=token)
    render(settings.output, _pages(settings, fetch, page_token, all_pages), jobs_table)


@cli.command()
@click.option("-f", "--follow", is_flag=True,
              help="Stream the output while the job runs; exit with the job's result.")
@click.option("--attempt", type=click.IntRange(1), default=None,
              help="The output of attempt N instead of the last finished one.")
@option_raw
@option_output
@click.argument("job_id", shell_complete=_job_ids())
@pass_settings
def logs(settings: Settings, job_id: str, follow: bool, attempt: int | None, raw: bool) -> None:
    """A job's output (stdout and stderr together).

    To a pipe or a file: the exact bytes. To a terminal: control characters escaped
    (\\x1b, \\u202e, bytes that are not UTF-8 as \\xNN), newlines and tabs kept;
    --raw writes the exact bytes there too.

    Without -f: the stored output of the last finished attempt.
    JSON: {id, attempt, output, output_base64, output_truncated}.
    With -f: output as it is written, each byte once (a retry starts its own output,
    marked on stderr), until the job is final; then the final status line on stderr
    (as `submit --follow` writes it); exits with the job's result.
    """
    if raw and settings.json:
        raise click.UsageError("--raw writes the output bytes: not with -o json")
    if follow:
        if settings.json or attempt:
            raise click.UsageError("-f writes the live output: no -o json or --attempt")
        live = OutputWriter(binary_stdout(), exact=exact_output(raw))
        job = job_dict(wait_for_job(settings, job_id, follow=live))
        warn(_final_line(job))
        click.get_current_context().exit(int(job_exit_code(job["status"], job["exit_code"])))
    job = settings.ask(Role.READ, lambda client: client.get(job_id,
                                                           attempts=bool(attempt))).raw
    number, data, truncated = job.attempts, job.output, job.output_truncated
    if attempt:
        found = [a for a in job.attempt_history if a.number == attempt]
        if not found:
            raise CliError(f"{job_id}: no attempt {attempt} (it has {job.attempts})")
        number, data, truncated = attempt, found[0].output, found[0].output_truncated
    status_text = status_name(job.status)
    if not attempt and not is_final(status_text) and not settings.json:
        warn(f"{job_id} is {status_text}: its output is stored when the attempt ends "
             "(use logs -f)")
    render(settings.output, {"id": job.id, "attempt": number, **output_fields(data),
                             "output_truncated": truncated}, lambda _: data, raw=raw)


# --- bulk actions: a selection instead of ids ----------------------------------------------

def selection_options(statuses: Sequence[models.JobStatus]) -> Callable[..., Any]:
    """The options of a bulk verb (cancel, retry, dlq requeue)."""
    names = [status.value for status in statuses]

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed([
            click.option("--selector", "-l", default="", type=SELECTOR, metavar="SELECTOR",
                         help=SELECTOR_HELP),
            *([click.option("--status", "statuses", multiple=True,
                            type=click.Choice(names, case_sensitive=False),
                            help=f"Only jobs in this status (repeatable; default: "
                                 f"{' and '.join(names)}).")] if len(names) > 1 else []),
            click.option("--queue", default="", help="Only jobs of this queue."),
            click.option("--name", default="", help="Only jobs with this name."),
            click.option("--since", type=WHEN, metavar="WHEN",
                         help="Only jobs created at or after WHEN."),
            click.option("--until", type=WHEN, metavar="WHEN",
                         help="Only jobs created before WHEN."),
            click.option("--dry-run", is_flag=True,
                         help="Count the jobs the selection takes; change nothing."),
            click.option("--yes", "-y", is_flag=True, help="Do not ask first."),
            click.option("--limit", type=click.IntRange(1, 1_000_000), default=None,
                         help="Change at most this many jobs (server default 100000)."),
        ]):
            function = option(function)
        return function
    return decorate


def job_selection(*, selector: str = "", statuses: Sequence[str] = (), queue: str = "",
                  name: str = "", since: datetime | None = None, until: datetime | None = None,
                  dead_lettered: bool = False) -> dict[str, Any] | None:
    """The selection as keyword arguments of `Client.cancel_many`/`retry_many`, or None
    when no option selects anything."""
    if not (selector or statuses or queue or name or since or until):
        return None
    selection: dict[str, Any] = dict(selector=selector, statuses=[s.upper() for s in statuses],
                                     queue=queue, name=name, since=since, until=until)
    if dead_lettered:
        selection["dead_lettered"] = True
    return selection


def run_bulk(settings: Settings, method: str, selection: dict[str, Any], *, doing: str,
             done: str, dry_run: bool, yes: bool, limit: int | None) -> None:
    """Count, confirm and run a bulk action (`method`: the Client's `cancel_many` or
    `retry_many`); print how many jobs it changed."""
    def run(dry: bool, most: int) -> client_module.BulkResult:
        return settings.ask(Role.WRITE, lambda client: getattr(client, method)(
            **selection, dry_run=dry, limit=most))

    if not (dry_run or yes):
        if not is_terminal(sys.stdin):
            raise click.UsageError(f"a selection {doing} every job it matches: give --yes "
                                   "(or --dry-run to count them)")
        counted = run(True, 0)
        if not counted.matched:
            render(settings.output, {"matched": 0, "changed": 0, "more": False,
                                     "dry_run": False}, lambda data: f"{done} 0")
            return
        click.confirm(f"{doing.capitalize()} {counted.matched} job(s)?", abort=True,
                      err=True)
    reply = run(dry_run, limit or 0)
    data = {"matched": reply.matched, "changed": reply.changed, "more": reply.more,
            "dry_run": dry_run}
    render(settings.output, data, lambda d: (f"{d['matched']} job(s) match" if dry_run
                                             else f"{done} {d['changed']}"))
    if reply.more and not settings.json:
        warn(f"--limit reached: more jobs match; run it again to {doing.split()[0]} them")


def by_selection(settings: Settings, method: str, job_ids: Sequence[str], *, doing: str,
                 done: str, selection: dict[str, Any] | None, dry_run: bool, yes: bool,
                 limit: int | None) -> bool:
    """Run a bulk verb's selection (True), or say that the verb goes by ids (False)."""
    _ids_or_selection(job_ids, selection, dry_run, yes, limit)
    if selection is None:
        return False
    run_bulk(settings, method, selection, doing=doing, done=done, dry_run=dry_run, yes=yes,
             limit=limit)
    return True


def _ids_or_selection(job_ids: Sequence[str], selection: dict[str, Any] | None, dry_run: bool,
                      yes: bool, limit: int | None) -> None:
    if job_ids and selection is not None:
        raise click.UsageError("give job ids or a selection (--selector, --status, ...), "
                               "not both")
    if not job_ids and selection is None:
        raise click.UsageError("give job ids, or a selection: --selector, --status, "
                               "--queue, --name, --since, --until")
    if job_ids and (dry_run or yes or limit):
        raise click.UsageError("--dry-run, --yes and --limit go with a selection, not ids")


@cli.command()
@selection_options([models.JobStatus.PENDING, models.JobStatus.RUNNING])
@option_output
@click.argument("job_ids", nargs=-1, metavar="[JOB_ID]...",
                shell_complete=_job_ids(models.JobStatus.PENDING, models.JobStatus.RUNNING))
@pass_settings
def cancel(settings: Settings, job_ids: tuple[str, ...], selector: str,
           statuses: tuple[str, ...], queue: str, name: str, since: datetime | None,
           until: datetime | None, dry_run: bool, yes: bool, limit: int | None) -> None:
    """Cancel jobs: pending ones never run, running ones are killed.

    Prints `<id> <previous status> -> <status>` per job.
    JSON: {jobs: [{id, previous_status, status}], errors: [{id, code, message}]}.
    Exits 1 if any job could not be cancelled (not found, already final).

    With a selection instead of JOB_IDs (--selector, --status, --queue, --name, --since,
    --until: all must hold) the server cancels every matching PENDING and RUNNING job in
    bounded batches and reports how many: `cancelled N` (JSON: {matched, changed, more,
    dry_run}; more: --limit stopped it). --dry-run only counts them. On a terminal it
    asks first, saying how many; elsewhere (a script) it needs --yes. Without role admin
    only your own jobs are taken.
    """
    if by_selection(settings, "cancel_many", job_ids, doing="cancel", done="cancelled",
                    selection=job_selection(selector=selector, statuses=statuses, queue=queue,
                                            name=name, since=since, until=until),
                    dry_run=dry_run, yes=yes, limit=limit):
        return
    def one(job_id: str) -> dict[str, str]:
        reply = settings.ask(Role.WRITE, lambda client: client.cancel(job_id))
        return {"id": job_id, "previous_status": status_name(reply.raw.previous_status),
                "status": status_name(reply.raw.status)}

    done, errors = _each(job_ids, one)
    render(settings.output, {"jobs": done, "errors": errors}, lambda data: "\n".join(
        f"{r['id']} {r['previous_status']} -> {r['status']}" for r in data["jobs"]))
    if errors:
        click.get_current_context().exit(Exit.FAILED)


@cli.command()
@selection_options([models.JobStatus.FAILED, models.JobStatus.CANCELLED])
@option_output
@click.argument("job_ids", nargs=-1, metavar="[JOB_ID]...",
                shell_complete=_job_ids(models.JobStatus.FAILED, models.JobStatus.CANCELLED))
@pass_settings
def retry(settings: Settings, job_ids: tuple[str, ...], selector: str,
          statuses: tuple[str, ...], queue: str, name: str, since: datetime | None,
          until: datetime | None, dry_run: bool, yes: bool, limit: int | None) -> None:
    """Run FAILED or CANCELLED jobs again, with a fresh retry budget.

    Prints `<id> <new status>` per job.
    JSON: {jobs: [<job object>], errors: [{id, code, message}]}. Exits 1 on any error.

    With a selection instead of JOB_IDs (--selector, --status, --queue, --name, --since,
    --until: all must hold) the server retries every matching FAILED and CANCELLED job in
    bounded batches and reports how many: `retried N` (JSON: {matched, changed, more,
    dry_run}). --dry-run only counts them. On a terminal it asks first; elsewhere it
    needs --yes. Without role admin only your own jobs are taken.
    """
    if by_selection(settings, "retry_many", job_ids, doing="retry", done="retried",
                    selection=job_selection(selector=selector, statuses=statuses, queue=queue,
                                            name=name, since=since, until=until),
                    dry_run=dry_run, yes=yes, limit=limit):
        return
    done, errors = _each(job_ids, lambda job_id: job_dict(settings.ask(
        Role.WRITE, lambda client: client.retry(job_id)).raw))
    render(settings.output, {"jobs": done, "errors": errors}, lambda data: "\n".join(
        f"{job['id']} {job['status']}" for job in data["jobs"]))
    if errors:
        click.get_current_context().exit(Exit.FAILED)


def on_this_host(url: str) -> str:
    """`url` if it is http(s) on a loopback address; else a usage error. The web UI takes
    a local token from a loopback peer only, so web-login never sends one anywhere else."""
    import ipaddress
    import urllib.parse
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback or not url.startswith(("http://", "https://")):
        raise CliError(f"--url {url}: web-login works on this host only: give an http:// or "
                       "https:// URL on a loopback address (127.0.0.1, [::1], localhost)",
                       Exit.USAGE)
    return url


@cli.command("web-login")
@click.option("--url", metavar="URL",
              help="The web UI's address, e.g. https://host.example:8080 (default: http:// "
                   "and [web] listen of the config file, else 127.0.0.1:8080).")
@pass_settings
def web_login(settings: Settings, url: str | None) -> None:
    """Print a link that logs a browser into the web UI as you, this host's Unix user.

    Your role is the one [server] local_roles gives your user, as for dtsctl's own calls.
    The link holds a one-time code, good for two minutes, and asks to confirm before it
    logs in; the session lasts an hour. Works only on the host dtsd runs on: the web UI
    takes the request from a loopback address only.
    """
    import ssl                       # here: no other verb pays for loading them
    import urllib.error
    import urllib.request
    if url is not None:
        on_this_host(url)
    cfg = read_client_config(settings.config_path, os.environ)
    runtime_dir = (cfg.get("dtsd", "runtime_dir") if cfg is not None
                   else config.default("dtsd", "runtime_dir"))
    if url is None:
        host, port = (cfg.get("web", "listen") if cfg is not None
                      else config.default("web", "listen"))
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    url = on_this_host(url.rstrip("/"))
    token = LocalToken(runtime_dir)()
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=settings.tls_ca or None)
    request = urllib.request.Request(url + "/login/local", method="POST",
                                     data=json.dumps({"token": token}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout or DEFAULT_TIMEOUT,
                                    context=context) as reply:
            answer = json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        try:
            said = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            said = exc.reason
        raise CliError(f"{url} refused the login: {said}",
                       Exit.UNAUTHORISED if exc.code in (401, 403) else Exit.FAILED) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach the web UI at {url}: {reason} (is [web] processes 0, or "
                       "does it listen elsewhere? give --url)", Exit.UNREACHABLE) from None
    click.echo(f"{url}{answer['path']}")
    warn(f"dtsctl: open the link within {answer['expires_in']} s to log in as "
         f"{answer['user']} (role {answer['role']}); it works once")


@cli.group()
def dlq() -> None:
    """The dead-letter queue: jobs that FAILED with no retries left."""


@dlq.command("list")
@click.option("--queue", default="", help="Only jobs of this queue.")
@option_limit
@option_page_token
@option_all
@option_output
@pass_settings
def dlq_list(settings: Settings, queue: str, limit: int | None, page_token: str,
             all_pages: bool) -> None:
    """Dead-lettered jobs, as `list` shows them. JSON: as `list`."""
    def fetch(client: Client, token: str) -> client_module.JobPage:
        return client.dead_letters_page(queue=queue, page_size=limit or 0, page_token=token)
    render(settings.output, _pages(settings, fetch, page_token, all_pages), jobs_table)


@dlq.command("requeue")
@click.option("--all", "all_jobs", is_flag=True, help="Every dead-lettered job (of --queue).")
@selection_options([models.JobStatus.FAILED])
@option_output
@click.argument("job_ids", nargs=-1, metavar="(JOB_ID... | --all | SELECTION)",
                shell_complete=_job_ids(dead=True))
@pass_settings
def dlq_requeue(settings: Settings, job_ids: tuple[str, ...], all_jobs: bool, queue: str,
                selector: str, name: str, since: datetime | None, until: datetime | None,
                dry_run: bool, yes: bool, limit: int | None) -> None:
    """Run dead-lettered jobs again (they leave the dead-letter queue).

    Prints each requeued id. JSON: {ids: [...]}. Exits 1 if a given id was not requeued.

    With a selection (--selector, --name, --since, --until, and --queue without --all)
    the server requeues the matching dead letters in bounded batches and reports how
    many: `requeued N` (JSON: {matched, changed, more, dry_run}). --dry-run only counts
    them. On a terminal it asks first; elsewhere it needs --yes.
    """
    selection = None
    if not all_jobs:
        selection = job_selection(selector=selector, queue=queue, name=name, since=since,
                                  until=until, dead_lettered=True)
    elif selector or name or since or until:
        raise click.UsageError("--all takes every dead letter (of --queue): no --selector, "
                               "--name, --since or --until")
    if (selection is not None or dry_run or yes or limit) and by_selection(
            settings, "retry_many", job_ids, doing="requeue", done="requeued",
            selection=selection, dry_run=dry_run, yes=yes, limit=limit):
        return
    if bool(job_ids) == all_jobs:
        raise click.UsageError("give job ids, --all or a selection (--selector, ...)")
    ids = settings.ask(Role.WRITE, lambda client: client.requeue_dead_letters(
        job_ids, all=all_jobs, queue=queue))
    render(settings.output, {"ids": ids}, lambda data: "\n".join(data["ids"]))
    missing = [job_id for job_id in job_ids if job_id not in set(ids)]
    for job_id in missing:
        warn(f"{job_id}: not requeued (not in the dead-letter queue?)")
    if missing:
        click.get_current_context().exit(Exit.FAILED)


@dlq.command("purge")
@click.option("--all", "all_jobs", is_flag=True,
              help="Every dead-lettered job (of --queue); asks first on a terminal.")
@click.option("--queue", default="", help="Only jobs of this queue.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before purging everything.")
@option_output
@click.argument("job_ids", nargs=-1, metavar="(JOB_ID... | --all)",
                shell_complete=_job_ids(dead=True))
@pass_settings
def dlq_purge(settings: Settings, job_ids: tuple[str, ...], all_jobs: bool, queue: str,
              yes: bool) -> None:
    """Remove jobs from the dead-letter queue; their FAILED record stays.

    Without JOB_IDs purges every dead-lettered job (of --queue). On a terminal that asks
    first unless --yes is given; elsewhere (a script) it needs --all or --yes, so that a
    list of ids that came out empty purges nothing. Prints the count. JSON: {purged}.
    """
    if job_ids and all_jobs:
        raise click.UsageError("give job ids or --all (not both)")
    if not job_ids and not yes:
        scope = f"of queue {queue!r}" if queue else "of every queue"
        if is_terminal(sys.stdin):
            click.confirm(f"Purge every dead-lettered job {scope}?", abort=True)
        elif not all_jobs:
            raise click.UsageError(f"no job ids: to purge every dead-lettered job {scope} "
                                   "give --all (or --yes)")
    purged = settings.ask(Role.WRITE, lambda client: client.purge_dead_letters(job_ids,
                                                                              queue=queue))
    render(settings.output, {"purged": purged}, lambda data: f"purged {data['purged']}")


# --- cron schedules -----------------------------------------------------------------------

OVERLAP_NAMES = ("allow", "forbid", "replace")
MISFIRE_NAMES = ("skip", "run_once", "run_all")


def schedule_dict(schedule: Any) -> dict[str, Any]:
    return {"id": schedule.id, "name": schedule.name, "expression": schedule.expression,
            "timezone": schedule.timezone,
            "overlap": dtsd_pb2.OverlapPolicy.Name(schedule.overlap).lower(),
            "misfire": dtsd_pb2.MisfirePolicy.Name(schedule.misfire).lower(),
            "catchup_window_seconds": schedule.catchup_window_seconds,
            "job": spec_dict(schedule.job), "env_hidden": schedule.env_hidden,
            "paused": schedule.paused,
            "next_fire_time": _time(schedule, "next_fire_time"),
            "last_fire_time": _time(schedule, "last_fire_time"),
            "last_job_id": schedule.last_job_id or None,
            "created_at": _time(schedule, "created_at"), "updated_at": _time(schedule, "updated_at")}


def schedules_table(data: dict[str, Any]) -> str:
    return format_table(
        ("NAME", "EXPRESSION", "ZONE", "OVERLAP", "MISFIRE", "STATE", "NEXT", "LAST JOB", "COMMAND"),
        [(s["name"], s["expression"], s["timezone"], s["overlap"], s["misfire"],
          "paused" if s["paused"] else "active",
          exact_time(s["next_fire_time"], schedule_zone(s["timezone"])),
          s["last_job_id"] or "-", s["job"]["command"]) for s in data["schedules"]])


@cli.group()
def cron() -> None:
    """Cron schedules: each slot submits one job, fired by the cluster's leader.

    \b
    Expressions: 5 fields (minute hour day-of-month month day-of-week), or 6 with a
    SECONDS field FIRST (as the Go seed's cron): `*/10 * * * * *` = every 10 s;
    aliases @yearly/@annually @monthly @weekly @daily/@midnight @hourly, and @every 30s
    (an interval from the epoch). Times are in --tz (IANA, default UTC).
    DST: a slot in a spring-forward gap fires once at the end of the gap; a slot in a
    fall-back hour fires once, at its first occurrence. `dtsctl cron next NAME` shows it.
    """


@cron.command("add")
@click.option("--tz", "zone", default="", metavar="ZONE", shell_complete=complete_zones,
              help="IANA time zone (default UTC).")
@click.option("--overlap", type=click.Choice(OVERLAP_NAMES), default="allow", show_default=True,
              help="A slot while the previous run still runs: start anyway, skip it, or "
                   "cancel the running one. forbid holds across the whole cluster.")
@click.option("--misfire", type=click.Choice(MISFIRE_NAMES), default="run_once",
              show_default=True, help="Slots missed while no leader could fire them: drop "
                                      "them, fire the latest once, or fire each.")
@click.option("--catchup-window", type=DURATION, default=None, metavar="DUR",
              help="How far back missed slots count (default 1h).")
@click.option("--name", "job_name", default="", help="Name of the submitted jobs (default: "
                                                     "the schedule's).")
@click.option("--env", "env", type=ENV, multiple=True, metavar="KEY=VALUE",
              help="Environment variable for the job (repeatable).")
@click.option("--cwd", default="", help="Working directory, absolute.")
@click.option("--queue", default="", help="Queue to run in (default: default).")
@click.option("--priority", type=click.IntRange(0, models.MAX_PRIORITY), default=0,
              help="0 (default) to 9; higher runs first.")
@click.option("--max-retries", type=click.IntRange(0, models.MAX_RETRIES_LIMIT), default=None,
              help="Retries after a failure (default 3).")
@click.option("--timeout", "job_timeout", type=DURATION, default=None, metavar="DUR",
              help="Kill each run after this long.")
@click.option("--limit", "limits", type=LIMIT, multiple=True, metavar="NAME=VALUE",
              help=LIMIT_HELP)
@click.option("--notify", "notify", type=TARGETS, multiple=True, metavar="NAME[,NAME]",
              help=NOTIFY_HELP.replace("the job ends", "a run ends"))
@click.option("--notify-on", "notify_on", type=EVENTS, multiple=True, metavar="EVENT[,EVENT]",
              help=NOTIFY_ON_HELP)
@click.option("--label", "labels", type=LABEL, multiple=True, metavar="KEY=VALUE",
              help=LABEL_HELP.replace("for selection", "of each run"))
@option_output
@click.argument("name")
@click.argument("expression")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[--] CMD...")
@pass_settings
def cron_add(settings: Settings, name: str, expression: str, command: tuple[str, ...], zone: str,
             overlap: str, misfire: str, catchup_window: float | None, job_name: str,
             env: tuple[tuple[str, str], ...], cwd: str, queue: str, priority: int,
             max_retries: int | None, job_timeout: float | None,
             limits: tuple[dict[str, int], ...], notify: tuple[tuple[str, ...], ...],
             notify_on: tuple[tuple[str, ...], ...],
             labels: tuple[tuple[str, str], ...] = ()) -> None:
    """Add a schedule: dtsctl cron add NAME 'EXPR' [OPTIONS] -- CMD...

    Options may stand anywhere before `--`; everything after it is the command.
    Prints the schedule (JSON: the schedule object: id, name, expression, timezone,
    overlap, misfire, catchup_window_seconds, job, paused, next_fire_time,
    last_fire_time, last_job_id, created_at, updated_at).
    """
    if not command:
        raise click.UsageError("no command: dtsctl cron add NAME 'EXPR' [OPTIONS] -- CMD...")
    text = command[0] if len(command) == 1 else shlex.join(command)
    spec = job_spec(command=text, name=job_name, env=dict(env), cwd=cwd, queue=queue,
                    priority=priority, max_retries=max_retries, timeout=job_timeout,
                    limits=_merge(limits), notify=_names(notify), notify_on=_names(notify_on),
                    labels=dict(labels))
    reply = settings.ask(Role.WRITE, lambda client: client.create_schedule(
        name, expression, timezone=zone, overlap=overlap, misfire=misfire,
        catchup_window_seconds=catchup_window or 0.0, job=spec)).raw
    render(settings.output, schedule_dict(reply), lambda data: schedules_table(
        {"schedules": [data]}))


@cron.command("list")
@option_output
@pass_settings
def cron_list(settings: Settings) -> None:
    """Every schedule. JSON: {schedules: [<schedule>]}."""
    schedules = settings.ask(Role.READ, lambda client: client.schedules())
    render(settings.output, {"schedules": [schedule_dict(s.raw) for s in schedules]},
           schedules_table)


def _schedule_verb(method: str, verb: str, doc: str) -> None:
    """A verb on one schedule by NAME: `method` is the Client's."""
    @cron.command(verb, help=doc)
    @option_output
    @click.argument("name", shell_complete=complete_schedules)
    @pass_settings
    def command(settings: Settings, name: str) -> None:
        reply = settings.ask(Role.WRITE, lambda client: getattr(client, method)(name))
        if method == "delete_schedule":
            render(settings.output, {"name": name, "deleted": True},
                   lambda data: f"deleted {data['name']}")
        elif method == "trigger_schedule":
            render(settings.output, {"id": reply.id, "created": reply.created},
                   lambda data: data["id"])
        else:
            render(settings.output, schedule_dict(reply.raw),
                   lambda data: schedules_table({"schedules": [data]}))


_schedule_verb("pause_schedule", "pause", "Stop firing NAME (JSON: the schedule).")
_schedule_verb("resume_schedule", "resume",
               "Fire NAME again from its next slot; slots missed while paused are not made "
               "up (JSON: the schedule).")
_schedule_verb("delete_schedule", "rm", "Delete NAME; jobs it submitted stay (JSON: {name, "
                                       "deleted}).")
_schedule_verb("trigger_schedule", "run", "Fire NAME now, outside its slots; prints the job id "
                                         "(JSON: {id, created}).")


@cron.command("next")
@click.option("-n", "count", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="How many slots.")
@click.option("--tz", "zone", default="", metavar="ZONE", shell_complete=complete_zones,
              help="With an expression instead of NAME: its time zone.")
@option_output
@click.argument("name_or_expression", shell_complete=complete_schedules)
@pass_settings
def cron_next(settings: Settings, name_or_expression: str, count: int, zone: str) -> None:
    """The next slots of a schedule (or of an expression), in UTC and local time, with
    the DST rule applied where one applies. JSON: {times: [{at, local, note}]}."""
    is_name = models.QUEUE_NAME.match(name_or_expression) is not None and not zone
    times = settings.ask(Role.READ, lambda client: (
        client.preview_schedule(name_or_expression, count=count) if is_name
        else client.preview_schedule(expression=name_or_expression, timezone=zone, count=count)))
    data = {"times": [{"at": iso_utc(t.at), "local": t.local, "note": t.note or None}
                      for t in times]}
    render(settings.output, data, lambda d: format_table(
        ("UTC", "LOCAL", "NOTE"), [(t["at"], t["local"], t["note"] or "") for t in d["times"]]))


# --- queue controls -----------------------------------------------------------------------

def queue_dict(info: Any) -> dict[str, Any]:
    return {"name": info.name, "paused": info.paused, "paused_by": info.paused_by or None,
            "paused_at": _time(info, "paused_at"), "max_running": info.max_running or None}


def queues_table(data: dict[str, Any]) -> str:
    return format_table(("QUEUE", "STATE", "MAX RUNNING", "PAUSED BY", "PAUSED"),
                        [(q["name"], "paused" if q["paused"] else "active",
                          q["max_running"] or "-", q["paused_by"] or "-",
                          ago(q["paused_at"]) if q["paused_at"] else "-")
                         for q in data["queues"]])


@cli.group("queue")
def queue_group() -> None:
    """Queue controls: pause a queue (workers take no new job of it; submits are still
    accepted and wait), resume it, limit its running jobs across the cluster, list the
    queues."""


@queue_group.command("list")
@option_output
@pass_settings
def queue_list(settings: Settings) -> None:
    """Queues that are paused or limited, hold jobs not final, or are served by a live
    worker: QUEUE, STATE (active or paused), MAX RUNNING, PAUSED BY, PAUSED (how long ago).
    JSON: {queues: [{name, paused, paused_by, paused_at, max_running}]}."""
    queues = settings.ask(Role.READ, lambda client: client.queues())
    render(settings.output, {"queues": [queue_dict(q.raw) for q in queues]}, queues_table)


def _queue_verb(method: str, verb: str, doc: str) -> None:
    """A verb on one queue by NAME: `method` is the Client's."""
    @queue_group.command(verb, help=doc)
    @option_output
    @click.argument("name")
    @pass_settings
    def command(settings: Settings, name: str) -> None:
        try:
            models.check_queue(name, "NAME")
        except models.InvalidField as exc:
            raise click.UsageError(str(exc)) from None
        reply = settings.ask(Role.WRITE, lambda client: getattr(client, method)(name)).raw
        render(settings.output, queue_dict(reply),
               lambda data: queues_table({"queues": [data]}))


_queue_verb("pause_queue", "pause",
            "Pause queue NAME (role admin): workers take no new job of it; submits are still "
            "accepted and wait; jobs already taken run on. Held in PostgreSQL: a restart "
            "keeps it. JSON: {name, paused, paused_by, paused_at}.")
@queue_group.command("limit")
@option_output
@click.argument("name")
@click.argument("max_running", type=click.IntRange(0, 1_000_000))
@pass_settings
def queue_limit(settings: Settings, name: str, max_running: int) -> None:
    """At most MAX_RUNNING jobs of queue NAME run at once across the cluster (role admin);
    0 lifts the limit. Checked in PostgreSQL at every claim; jobs running beyond a lowered
    limit run on. JSON: {name, paused, paused_by, paused_at, max_running}."""
    try:
        models.check_queue(name, "NAME")
    except models.InvalidField as exc:
        raise click.UsageError(str(exc)) from None
    reply = settings.ask(Role.WRITE, lambda client: client.limit_queue(name, max_running)).raw
    render(settings.output, queue_dict(reply), lambda data: queues_table({"queues": [data]}))


_queue_verb("resume_queue", "resume",
            "Resume queue NAME (role admin): workers take its jobs again at once. "
            "JSON: {name, paused, paused_by, paused_at}.")


accept_global_options_after_verbs(cli)


def main() -> None:
    cli.main(prog_name="dtsctl")


if __name__ == "__main__":
    main()

