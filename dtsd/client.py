"""The Python client of dtsd: `Client`, typed methods over the `dtsd.v1.Scheduler` API.

    from dtsd.client import Client
    with Client.from_config() as client:          # servers, token, TLS as dtsctl finds them
        job = client.wait(client.submit("echo hi").id, timeout=60)
        print(job.status, job.output)

Two layers, both public (docs/client.md states the stability rules):
  - `Client`'s typed methods (submit, wait, watch, list, cancel, schedules, ...) take and
    return plain dataclasses and enums, and raise `DtsdError` subclasses;
  - `Connection.call("GetJob", request)` / `.stream(...)`, which `Client` inherits: one RPC
    by name with protobuf messages, so an RPC or field this module does not wrap yet is
    still reachable. It raises `grpc.RpcError` as grpc does.
dtsctl (dtsd/cli.py) is built on `Client`; the tests use both layers.

Fail-over rule: a call moves on to the next server only when a server answers
`UNAVAILABLE` (it cannot be reached, or it says a backing store is down). Any other
error, `DEADLINE_EXCEEDED` included, is raised at once: the request may have been
received, and repeating a submit elsewhere could run a job twice. When every server
failed, the error raised is the answer of the last server that said which store it
could not reach (`unreachable_store`), if any: that says more than "no connection".
"""

from __future__ import annotations

import enum
import os
import queue
import random
import re
import socket
import ssl
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Iterator, Mapping, Self, Sequence

import grpc

from dtsd import config, identity
from dtsd.models import JobStatus
from dtsd.v1 import dtsd_pb2, dtsd_pb2_grpc

__all__ = [
    # the client and where it connects
    "Client", "Connection", "Tls", "Targets", "Role", "resolve_servers", "parse_servers",
    "DEFAULT_TIMEOUT", "build_spec", "error_from", "unreachable_store",
    # what it returns
    "JobStatus", "Job", "JobSpec", "Attempt", "SubmitResult", "JobPage", "JobEvent",
    "EventKind", "CancelResult", "BulkResult", "Schedule", "Overlap", "Misfire", "FireTime",
    "QueueInfo", "ClusterStatus", "NodeInfo", "WorkerInfo", "QueueDepth",
    # what it raises
    "DtsdError", "NotFound", "InvalidArgument", "AlreadyExists", "FailedPrecondition",
    "PermissionDenied", "Unauthenticated", "Unavailable", "DeadlineExceeded",
    "ResourceExhausted", "WaitTimeout", "ConfigurationError",
]

DEFAULT_TIMEOUT = 10.0
MAX_RECEIVE_MESSAGE = 64 * 1024 * 1024
# The trailing metadata key of a server's UNAVAILABLE that names a backing store
# (dtsd/server.py STORE_METADATA).
STORE_METADATA = "dtsd-store"


def unreachable_store(error: grpc.RpcError) -> str | None:
    """The backing store ("postgres", "redis") a server said it could not reach when it
    answered `error`; None when no server said so (no connection, another error).

    The trailing metadata names it; where that was lost (a stream, a proxy), the server's
    message does: it begins with the store's name ("Redis is unreachable from this
    server: ...", "PostgreSQL failed the call: ..."), which no connection error does.
    """
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    try:
        metadata = error.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - an error raised before any call has none
        metadata = ()
    named = next((value for key, value in metadata if key == STORE_METADATA), None)
    if named:
        return named
    from dtsd import backing    # here: it loads prometheus_client, which dtsctl rarely needs
    details = error.details() or ""
    return next((store.value for store in backing.BackingStore
                 if details.startswith((f"{store.label} is unreachable",
                                        f"{store.label} failed the call"))), None)


def _telling(error: grpc.RpcError, best: grpc.RpcError | None) -> grpc.RpcError:
    """Of two UNAVAILABLE errors, the one to report: a server's word about a store wins."""
    if best is not None and unreachable_store(best) and not unreachable_store(error):
        return best
    return error


def parse_servers(text: str) -> list[str]:
    """`host:port[,host:port...]` -> a list of addresses; ValueError on a bad one.

    An empty host (`:50051`) means this machine (127.0.0.1); duplicates are dropped.
    """
    servers: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        config.host_port(item)
        if item.startswith(":"):
            item = "127.0.0.1" + item
        if item not in servers:
            servers.append(item)
    if not servers:
        raise ValueError(f"no server address in {text!r} (use host:port[,host:port...])")
    return servers


# What gRPC's message says when a TLS handshake failed (both OpenSSL's and BoringSSL's
# spellings), and when the peer hung up before any HTTP/2 frame: a TLS server that got
# plaintext, or an mTLS server that got no client certificate.
_HANDSHAKE_WORDS = ("handshake failed", "socket closed", "wrong_version_number",
                    "wrong version number", "certificate verify failed",
                    "certificate_verify_failed", "connection reset")


def tls_mismatch(server: str, tls: Tls | None, details: str, wait: float = 2.0) -> str | None:
    """Why `server` would not talk, when TLS is the reason: plaintext spoken to a TLS port
    or TLS to a plaintext one, no client certificate for an mTLS server, a certificate
    the CA does not vouch for. None when that is not it (or cannot be told).

    Reads gRPC's message first; where it says only "Socket closed", asks the server itself
    with a TLS handshake of its own (no verification, no certificate, nothing sent after
    it): a server that completes it speaks TLS, and one that then refuses or hangs up
    wants a client certificate.
    """
    words = details.lower()
    if server.startswith("unix:") or not any(word in words for word in _HANDSHAKE_WORDS):
        return None
    if tls is not None and ("wrong_version_number" in words or "wrong version number" in words):
        return (f"{server} does not speak TLS (it answered in plaintext): drop --tls-ca "
                "([client] tls_ca), or give that server [server] tls_cert and tls_key")
    if tls is not None and "certificate" in words and "verify" in words:
        name = f" or the name {tls.server_name!r}" if tls.server_name else ""
        return (f"{server}: its certificate is not signed by the CA in {tls.ca}{name} "
                "(--tls-ca, [client] tls_ca), or names another host (--tls-server-name)")
    speaks, wants_certificate = _probe_tls(server, wait)
    if tls is None and speaks:
        return (f"{server} speaks TLS, and dtsctl spoke plaintext: give --tls-ca FILE "
                "(or [client] tls_ca) with the CA that signed its certificate"
                + (", and --tls-cert/--tls-key: it requires a client certificate"
                   if wants_certificate else ""))
    if tls is not None and not tls.cert and wants_certificate:
        return (f"{server} requires a client certificate (mTLS): give --tls-cert FILE and "
                "--tls-key FILE (or [client] tls_cert and tls_key)")
    return None


def _probe_tls(server: str, wait: float) -> tuple[bool, bool]:
    """(whether `server` completes a TLS handshake, whether it then refuses us for want
    of a client certificate)."""
    host, port = config.host_port(server)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=wait) as raw:
            with context.wrap_socket(raw) as conn:
                # With TLS 1.3 a server judges the client's certificate after the handshake:
                # one that wants it and got none sends an alert or just hangs up, while
                # any other waits for the HTTP/2 preface (or sends its SETTINGS).
                try:
                    return True, conn.recv(1) == b""
                except ssl.SSLError as exc:
                    return True, "certificate" in str(exc).lower()
                except OSError:         # socket.timeout included: it waits for us
                    return True, False
    except ssl.SSLError as exc:         # TLS 1.2 refuses it within the handshake
        text = str(exc).lower()
        return ("certificate" in text or "handshake failure" in text), "certificate" in text
    except OSError:
        return False, False


@dataclass(frozen=True)
class Tls:
    """PEM file paths for a TLS channel: the CA that signed the servers' certificates, and
    for mTLS a client certificate and key. `server_name` overrides the name checked
    against the server's certificate (default: the host of the address)."""

    ca: str
    cert: str = ""
    key: str = ""
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as handle:
                return handle.read()
        return grpc.ssl_channel_credentials(root_certificates=read(self.ca),
                                            private_key=read(self.key),
                                            certificate_chain=read(self.cert))


class Connection:
    """The low-level client. One channel per server (TLS when `tls` is given), created on first use; calls go
    round-robin, starting at a random server.

    A server is `host:port`, or `unix:PATH` for a server's local socket on this host (always
    plaintext: it never leaves the host). `timeout` is the deadline of each unary call in
    seconds. `token`, when given, is sent as `authorization: Bearer <token>` metadata on
    every call; a callable is asked before each call (a local token renews itself). After a call,
    `last_server` is the server that answered (or failed last) and `last_tried` lists
    every server the call tried, in order; `store_told_by` the server whose UNAVAILABLE
    named a backing store (the error raised then is that answer).
    """

    def __init__(self, servers: Sequence[str], timeout: float = DEFAULT_TIMEOUT, *,
                 token: str | Callable[[], str] | None = None, tls: Tls | None = None):
        if not servers:
            raise ValueError("Client needs at least one server")
        self.servers = list(servers)
        self.timeout = timeout
        self.tls = tls
        self._credentials = tls.credentials() if tls else None
        self.token = token
        self.last_server: str | None = None
        self.store_told_by: str | None = None   # the server that named a store, last call
        self.last_tried: list[str] = []
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, dtsd_pb2_grpc.SchedulerStub] = {}
        # Each client starts at a random server, so that many short dtsctl runs spread
        # over the servers instead of all landing on the first one.
        self._next = random.randrange(len(self.servers))
        self._lock = threading.Lock()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        token = self.token() if callable(self.token) else self.token
        return (("authorization", f"Bearer {token}"),) if token else None

    # --- calls ----------------------------------------------------------------------------

    def call(self, method_name: str, request: Any, *, timeout: float | None = None) -> Any:
        """Run one unary RPC, failing over to the next server on UNAVAILABLE.

        Raises the last `grpc.RpcError` when every server answered UNAVAILABLE.
        """
        deadline = self.timeout if timeout is None else timeout
        error: grpc.RpcError | None = None
        self.last_tried = []
        self.store_told_by = None
        metadata = self.metadata
        for server in self._rotation():
            self.last_server = server
            self.last_tried.append(server)
            method = getattr(self._stub(server), method_name)
            try:
                return method(request, timeout=deadline, metadata=metadata)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                error = _telling(exc, error)
                if error is exc and unreachable_store(exc):
                    self.store_told_by = server
        assert error is not None
        raise error

    def stream(self, method_name: str, request: Any, *,
               timeout: float | None = None) -> Iterator[Any]:
        """Iterate a server-streaming RPC (WatchJob), failing over on UNAVAILABLE.

        Fail-over happens only while connecting, i.e. until the first message arrives;
        an error after that is raised to the caller, who knows how to resume. No deadline
        unless `timeout` is given: a watch lasts as long as the job does.
        """
        error: grpc.RpcError | None = None
        self.last_tried = []
        self.store_told_by = None
        metadata = self.metadata
        for server in self._rotation():
            self.last_server = server
            self.last_tried.append(server)
            method = getattr(self._stub(server), method_name)
            responses = method(request, timeout=timeout, metadata=metadata)
            try:
                first = next(responses)
            except StopIteration:
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                error = _telling(exc, error)
                if error is exc and unreachable_store(exc):
                    self.store_told_by = server
                continue
            try:
                yield first
                yield from responses
            finally:
                responses.cancel()
            return
        assert error is not None
        raise error

    def connected(self, server: str | None = None, wait: float = 1.0) -> bool:
        """Whether the channel to `server` (default: `last_server`) is READY right now.

        Tells "the server is slow" from "no connection was ever made" after a
        DEADLINE_EXCEEDED. Never opens a channel or starts a connection attempt.
        """
        channel = self._channels.get(server or self.last_server or "")
        if channel is None:
            return False
        states: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
        callback = states.put
        channel.subscribe(callback, try_to_connect=False)
        try:
            return states.get(timeout=wait) == grpc.ChannelConnectivity.READY
        except queue.Empty:
            return False
        finally:
            channel.unsubscribe(callback)

    def close(self) -> None:
        with self._lock:
            channels, self._channels, self._stubs = self._channels, {}, {}
        for channel in channels.values():
            channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------------------

    def _rotation(self) -> list[str]:
        """Every server once, starting one further than the previous call did."""
        with self._lock:
            start = self._next
            self._next = (start + 1) % len(self.servers)
        count = len(self.servers)
        return [self.servers[(start + i) % count] for i in range(count)]

    def _stub(self, server: str) -> dtsd_pb2_grpc.SchedulerStub:
        with self._lock:
            stub = self._stubs.get(server)
            if stub is None:
                options = [("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE)]
                if self._credentials is None or server.startswith("unix:"):
                    channel = grpc.insecure_channel(server, options=options)
                else:
                    if self.tls and self.tls.server_name:
                        options.append(("grpc.ssl_target_name_override", self.tls.server_name))
                    channel = grpc.secure_channel(server, self._credentials, options=options)
                self._channels[server] = channel
                stub = self._stubs[server] = dtsd_pb2_grpc.SchedulerStub(channel)
            return stub


# --- errors -------------------------------------------------------------------------------

class DtsdError(Exception):
    """Any failure of a `Client` method: the gRPC status and the server's own message.

    `code` is the `grpc.StatusCode` (None when no call was made: a config or token
    problem), `details` the server's message, `server` the server that answered (or was
    tried last), `tried` every server the call tried, in order. The `grpc.RpcError` it
    came from is `rpc_error` (and `__cause__`).
    """

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None,
                 details: str = "", server: str | None = None,
                 tried: Sequence[str] = (), rpc_error: grpc.RpcError | None = None):
        super().__init__(message)
        self.code = code
        self.details = details or message
        self.server = server
        self.tried = list(tried)
        self.rpc_error = rpc_error


class NotFound(DtsdError):
    """NOT_FOUND: no such job, schedule or queue."""


class InvalidArgument(DtsdError, ValueError):
    """INVALID_ARGUMENT: a field of the request is wrong. `field` names it in the API's
    words (`priority`, `limits.memory`, `labels[team]`, `selector`), or is "" when the
    server's message names none."""

    def __init__(self, message: str, *, field: str = "", **kwargs: Any):
        super().__init__(message, **kwargs)
        self.field = field


class AlreadyExists(DtsdError):
    """ALREADY_EXISTS: a schedule of that name, a job of that id with another spec."""


class FailedPrecondition(DtsdError):
    """FAILED_PRECONDITION: the job is in the wrong state for it (cancel a final job,
    retry one that has not failed)."""


class PermissionDenied(DtsdError):
    """PERMISSION_DENIED: the token's role does not allow the call (a read token that
    submits), or another principal's job."""


class Unauthenticated(PermissionDenied):
    """UNAUTHENTICATED: no token, or one the server does not know."""


class Unavailable(DtsdError, ConnectionError):
    """UNAVAILABLE from every server tried. `store` names the backing store ("postgres",
    "redis") a server said it could not reach; None when no server could be reached."""

    def __init__(self, message: str, *, store: str | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.store = store


class DeadlineExceeded(DtsdError, TimeoutError):
    """DEADLINE_EXCEEDED: no answer within the call's deadline (`timeout`)."""


class ResourceExhausted(DtsdError):
    """RESOURCE_EXHAUSTED: the queue holds [server] max_pending jobs already."""


class WaitTimeout(DtsdError, TimeoutError):
    """`Client.wait` gave up: the job was not final within its `timeout`. `job` is its
    last state seen (None if it could not be read)."""

    def __init__(self, message: str, *, job: Job | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.job = job


class ConfigurationError(DtsdError):
    """Where to connect or which credential to send could not be worked out: a bad config
    file or variable, an unreadable token or TLS file (`reason` "usage"), this host's dtsd
    serving no local socket (`reason` "unreachable"), or its master giving this user no
    local token (`reason` "unauthorised"). dtsctl maps the reasons to exit codes 2, 3, 4."""

    def __init__(self, message: str, reason: str = "usage", **kwargs: Any):
        super().__init__(message, **kwargs)
        self.reason = reason


_ERRORS: dict[grpc.StatusCode, type[DtsdError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}
# The server's INVALID_ARGUMENT message starts with the field: "priority: must be ...",
# "labels[team]: bad label value ...", "jobs[1].limits.memory: ..." (models.InvalidField).
_FIELD = re.compile(r"^([A-Za-z_]\w*(?:\[[^\]]*\]|\.[A-Za-z_]\w*)*): ")


def error_from(error: grpc.RpcError, connection: Connection | None = None) -> DtsdError:
    """The `DtsdError` subclass for a gRPC error, with the server's message."""
    code = error.code()
    details = error.details() or code.name
    kind = _ERRORS.get(code, DtsdError)
    common: dict[str, Any] = dict(
        code=code, details=details, rpc_error=error,
        server=connection.last_server if connection else None,
        tried=connection.last_tried if connection else ())
    if kind is InvalidArgument:
        found = _FIELD.match(details)
        return InvalidArgument(details, field=found.group(1) if found else "", **common)
    if kind is Unavailable:
        store = unreachable_store(error)
        if connection is not None and store and connection.store_told_by:
            common["server"] = connection.store_told_by
        return Unavailable(details, store=store, **common)
    return kind(details, **common)


# --- what the methods return --------------------------------------------------------------

class EventKind(str, enum.Enum):
    """What a `JobEvent` carries."""

    STATE = "STATE"
    OUTPUT = "OUTPUT"

    def __str__(self) -> str:
        return self.value


class Overlap(str, enum.Enum):
    """A schedule's rule for a slot that comes while its previous run still runs."""

    ALLOW = "ALLOW"        # start it anyway
    FORBID = "FORBID"      # skip the slot
    REPLACE = "REPLACE"    # cancel the running one, then start

    def __str__(self) -> str:
        return self.value


class Misfire(str, enum.Enum):
    """A schedule's rule for slots missed while no leader could fire them."""

    SKIP = "SKIP"
    RUN_ONCE = "RUN_ONCE"
    RUN_ALL = "RUN_ALL"

    def __str__(self) -> str:
        return self.value


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _when(message: Any, name: str) -> datetime | None:
    """A Timestamp field as an aware UTC datetime; None when unset."""
    if not message.HasField(name):
        return None
    stamp = getattr(message, name)
    return _EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)


def _timestamp(moment: datetime) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} has no time zone: give an aware datetime")
    delta = moment - _EPOCH
    return Timestamp(seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000)


def _optional(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def _status(value: int) -> JobStatus | None:
    """A proto JobStatus number as the enum; None for one this version does not know (a
    newer server's), whose number stays in the message's `.raw`."""
    try:
        return JobStatus(dtsd_pb2.JobStatus.Name(value))
    except ValueError:
        return None


def _policy(kind: Any, proto_enum: Any, value: int) -> Any:
    """A schedule policy as `kind`'s member; None for one this version does not know."""
    try:
        return kind(proto_enum.Name(value))
    except ValueError:
        return None


def _status_name(value: int) -> str:
    try:
        return dtsd_pb2.JobStatus.Name(value)
    except ValueError:
        return str(value)


def _status_number(status: JobStatus | str) -> int:
    return dtsd_pb2.JobStatus.Value(JobStatus(str(status).upper()).value)


@dataclass(frozen=True)
class JobSpec:
    """What was asked for: the fields of `dtsd.v1.JobSpec` (docs/api.md). `limits` by the
    names of `[worker] limits` (processes, open_files, file_size, memory, cpu_time)."""

    id: str
    name: str
    command: str
    env: dict[str, str]
    cwd: str
    queue: str
    priority: int
    max_retries: int | None          # None: the server's default
    timeout_seconds: float           # 0: [worker] default_timeout
    run_at: datetime | None
    idempotency_key: str
    limits: dict[str, int]
    notify: list[str]
    notify_on: list[str]
    labels: dict[str, str]
    raw: Any = field(repr=False, compare=False, default=None)

    @classmethod
    def from_proto(cls, spec: Any) -> JobSpec:
        return cls(id=spec.id, name=spec.name, command=spec.command, env=dict(spec.env),
                   cwd=spec.cwd, queue=spec.queue, priority=spec.priority,
                   max_retries=_optional(spec, "max_retries"),
                   timeout_seconds=spec.timeout_seconds, run_at=_when(spec, "run_at"),
                   idempotency_key=spec.idempotency_key,
                   limits={name: getattr(spec.limits, proto)
                           for name, proto in config.LIMIT_PROTO_FIELDS.items()
                           if getattr(spec.limits, proto)},
                   notify=list(spec.notify), notify_on=list(spec.notify_on),
                   labels=dict(spec.labels), raw=spec)


@dataclass(frozen=True)
class Attempt:
    """One run of a job. `exit_code` -N: killed by signal N; None: it did not exit."""

    number: int
    worker: str
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    output: bytes
    output_truncated: bool
    error: str
    raw: Any = field(repr=False, compare=False, default=None)

    @classmethod
    def from_proto(cls, attempt: Any) -> Attempt:
        return cls(number=attempt.number, worker=attempt.worker,
                   started_at=_when(attempt, "started_at"),
                   finished_at=_when(attempt, "finished_at"),
                   exit_code=_optional(attempt, "exit_code"), output=bytes(attempt.output),
                   output_truncated=attempt.output_truncated, error=attempt.error, raw=attempt)


@dataclass(frozen=True)
class Job:
    """A job as the server keeps it. `output` is the last finished attempt's, as bytes
    (a command may print anything: decode it yourself); `list` leaves it empty.
    `attempt_history` is filled by `get(..., attempts=True)` and by `wait`."""

    id: str
    status: JobStatus | None         # None: a status this client does not know (see .raw)
    spec: JobSpec
    attempts: int
    exit_code: int | None
    output: bytes
    output_truncated: bool
    error: str
    dead_lettered: bool
    worker: str
    submitted_by: str
    created_at: datetime | None
    updated_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    schedule_id: int
    fire_time: datetime | None
    env_hidden: bool
    attempt_history: list[Attempt]
    raw: Any = field(repr=False, compare=False, default=None)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def queue(self) -> str:
        return self.spec.queue

    @property
    def labels(self) -> dict[str, str]:
        return self.spec.labels

    @property
    def raw_status(self) -> str:
        """The status's name as the server sent it, known to this client or not."""
        if self.status is not None or self.raw is None:
            return self.status.value if self.status else ""
        return _status_name(self.raw.status)

    @property
    def final(self) -> bool:
        """Whether the job has ended: SUCCEEDED, FAILED or CANCELLED."""
        return self.status is not None and self.status.final

    @classmethod
    def from_proto(cls, job: Any) -> Job:
        return cls(id=job.id, status=_status(job.status), spec=JobSpec.from_proto(job.spec),
                   attempts=job.attempts, exit_code=_optional(job, "exit_code"),
                   output=bytes(job.output), output_truncated=job.output_truncated,
                   error=job.error, dead_lettered=job.dead_lettered, worker=job.worker,
                   submitted_by=job.submitted_by, created_at=_when(job, "created_at"),
                   updated_at=_when(job, "updated_at"), started_at=_when(job, "started_at"),
                   finished_at=_when(job, "finished_at"), schedule_id=job.schedule_id,
                   fire_time=_when(job, "fire_time"), env_hidden=job.env_hidden,
                   attempt_history=[Attempt.from_proto(a) for a in job.attempt_history],
                   raw=job)


@dataclass(frozen=True)
class SubmitResult:
    """`created` False: an idempotent repeat answered with the existing job.
    `queue_unserved`: no live worker serves the job's queue now; it waits until one does."""

    id: str
    created: bool
    queue_unserved: bool
    raw: Any = field(repr=False, compare=False, default=None)

    @classmethod
    def from_proto(cls, reply: Any) -> SubmitResult:
        return cls(id=reply.id, created=reply.created,
                   queue_unserved=getattr(reply, "queue_unserved", False), raw=reply)


@dataclass(frozen=True)
class JobPage:
    """One page of a listing; `next_page_token` is "" on the last page."""

    jobs: list[Job]
    next_page_token: str
    raw: Any = field(repr=False, compare=False, default=None)


@dataclass(frozen=True)
class JobEvent:
    """One event of `watch`: a state (`status`, and for final states `exit_code`, `error`)
    or a chunk of an attempt's output (`output` starting at byte `offset`)."""

    kind: EventKind
    status: JobStatus | None
    attempt: int
    output: bytes
    offset: int
    exit_code: int | None
    error: str
    raw: Any = field(repr=False, compare=False, default=None)

    @property
    def final(self) -> bool:
        """A STATE event of a final status: the last event of a watch."""
        return self.kind is EventKind.STATE and self.status is not None and self.status.final

    @classmethod
    def from_proto(cls, event: Any) -> JobEvent:
        kind = (EventKind.OUTPUT if event.kind == dtsd_pb2.JobEvent.OUTPUT
                else EventKind.STATE)
        return cls(kind=kind, status=_status(event.status),
                   attempt=event.attempt, output=bytes(event.output), offset=event.offset,
                   exit_code=_optional(event, "exit_code"), error=event.error, raw=event)


@dataclass(frozen=True)
class CancelResult:
    id: str
    previous_status: JobStatus | None
    status: JobStatus | None
    raw: Any = field(repr=False, compare=False, default=None)


@dataclass(frozen=True)
class BulkResult:
    """What a selection action did: `matched` (a dry run: would change), `changed`, and
    `more` (its limit stopped it: more jobs match)."""

    matched: int
    changed: int
    more: bool
    raw: Any = field(repr=False, compare=False, default=None)


@dataclass(frozen=True)
class Schedule:
    """A cron schedule. `job` is the spec each firing submits."""

    id: int
    name: str
    expression: str
    timezone: str
    overlap: Overlap | None          # None: a policy this client does not know (see .raw)
    misfire: Misfire | None
    catchup_window_seconds: float
    job: JobSpec
    paused: bool
    next_fire_time: datetime | None
    last_fire_time: datetime | None
    last_job_id: str
    created_at: datetime | None
    updated_at: datetime | None
    env_hidden: bool
    raw: Any = field(repr=False, compare=False, default=None)

    @classmethod
    def from_proto(cls, schedule: Any) -> Schedule:
        return cls(id=schedule.id, name=schedule.name, expression=schedule.expression,
                   timezone=schedule.timezone,
                   overlap=_policy(Overlap, dtsd_pb2.OverlapPolicy,
                                   schedule.overlap or dtsd_pb2.ALLOW),
                   misfire=_policy(Misfire, dtsd_pb2.MisfirePolicy,
                                   schedule.misfire or dtsd_pb2.RUN_ONCE),
                   catchup_window_seconds=schedule.catchup_window_seconds,
                   job=JobSpec.from_proto(schedule.job), paused=schedule.paused,
                   next_fire_time=_when(schedule, "next_fire_time"),
                   last_fire_time=_when(schedule, "last_fire_time"),
                   last_job_id=schedule.last_job_id,
                   created_at=_when(schedule, "created_at"),
                   updated_at=_when(schedule, "updated_at"),
                   env_hidden=schedule.env_hidden, raw=schedule)


@dataclass(frozen=True)
class FireTime:
    """A slot of `preview_schedule`: `local` is the wall-clock time in the schedule's zone,
    `note` a DST remark ("spring-forward gap: moved to ...") or ""."""

    at: datetime | None
    local: str
    note: str


@dataclass(frozen=True)
class QueueInfo:
    name: str
    paused: bool
    paused_by: str
    paused_at: datetime | None
    max_running: int                 # 0: no limit
    raw: Any = field(repr=False, compare=False, default=None)

    @classmethod
    def from_proto(cls, info: Any) -> QueueInfo:
        return cls(name=info.name, paused=info.paused, paused_by=info.paused_by,
                   paused_at=_when(info, "paused_at"), max_running=info.max_running, raw=info)


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    version: str
    leader: bool
    state: str
    started_at: datetime | None
    seen_at: datetime | None
    unreachable: dict[str, datetime | None]   # store -> since when this node cannot reach it


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    node_id: str
    pid: int
    queues: list[str]
    concurrency: int
    running: int
    seen_at: datetime | None


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    pending: int
    delayed: int
    running: int
    paused: bool
    max_running: int


@dataclass(frozen=True)
class ClusterStatus:
    """The cluster as the answering server sees it (`raw` has every detail, such as each
    node's children)."""

    cluster: str
    single_node: bool
    leader: str
    server_node: str
    nodes: list[NodeInfo]
    workers: list[WorkerInfo]
    queues: list[QueueDepth]
    job_counts: dict[JobStatus, int]
    dead_lettered: int
    raw: Any = field(repr=False, compare=False, default=None)

    @classmethod
    def from_proto(cls, status: Any) -> ClusterStatus:
        counts = {JobStatus(name): count for name, count in status.job_counts.items()
                  if name in JobStatus.__members__}
        return cls(
            cluster=status.cluster, single_node=status.single_node, leader=status.leader,
            server_node=status.server_node,
            nodes=[NodeInfo(node_id=n.node_id, version=n.version, leader=n.leader,
                            state=n.state, started_at=_when(n, "started_at"),
                            seen_at=_when(n, "seen_at"),
                            unreachable={o.store: _when(o, "since") for o in n.unreachable})
                   for n in status.nodes],
            workers=[WorkerInfo(id=w.id, node_id=w.node_id, pid=w.pid, queues=list(w.queues),
                                concurrency=w.concurrency, running=w.running,
                                seen_at=_when(w, "seen_at")) for w in status.workers],
            queues=[QueueDepth(queue=q.queue, pending=q.pending, delayed=q.delayed,
                               running=q.running, paused=q.paused, max_running=q.max_running)
                    for q in status.queues],
            job_counts=counts, dead_lettered=status.dead_lettered, raw=status)


# --- building requests --------------------------------------------------------------------

def build_spec(command: str | None = None, *, spec: Any = None, **fields: Any) -> Any:
    """A `dtsd.v1.JobSpec` from keyword arguments named as its fields, on top of `spec`
    (a JobSpec message, copied) when given. `limits` is {name: value} by the names of
    `[worker] limits`; `run_at` an aware datetime; a field this module does not know
    (added to the proto later) is set as given, so new fields need no code here.
    Nothing is validated here: the server does that, and answers `InvalidArgument`.
    """
    message = dtsd_pb2.JobSpec()
    if spec is not None:
        message.CopyFrom(spec)
    if command is not None:
        message.command = command
    for name, value in fields.items():
        if value is None:
            continue
        if name == "limits":
            for limit, number in value.items():
                if limit not in config.LIMIT_PROTO_FIELDS:
                    raise InvalidArgument(f"limits: unknown limit {limit!r} (known: "
                                          f"{', '.join(config.LIMIT_PROTO_FIELDS)})",
                                          field="limits")
                setattr(message.limits, config.LIMIT_PROTO_FIELDS[limit], number)
        elif name == "run_at":
            message.run_at.CopyFrom(_timestamp(value))
        elif name in ("env", "labels") or isinstance(value, Mapping):
            target = getattr(message, name)
            target.clear()
            target.update(dict(value))
        elif isinstance(value, (list, tuple)):
            target = getattr(message, name)
            del target[:]
            target.extend(value)
        elif isinstance(value, timedelta):
            setattr(message, name, value.total_seconds())
        elif name not in message.DESCRIPTOR.fields_by_name:
            raise TypeError(f"JobSpec has no field {name!r}")
        elif hasattr(value, "DESCRIPTOR"):         # a message field: copied
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def _selection(*, selector: str = "", statuses: Iterable[JobStatus | str] = (),
               queue: str = "", name: str = "", since: datetime | None = None,
               until: datetime | None = None, dead_lettered: bool = False) -> Any:
    selection = dtsd_pb2.JobSelection(
        selector=selector, statuses=[_status_number(s) for s in statuses], queue=queue,
        name=name, dead_lettered=dead_lettered)
    if since is not None:
        selection.created_after.CopyFrom(_timestamp(since))
    if until is not None:
        selection.created_before.CopyFrom(_timestamp(until))
    return selection


# --- the client ---------------------------------------------------------------------------

_FATAL_WATCH = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
POLL_INTERVAL = 0.5


class Client(Connection):
    """The dtsd client: typed methods over the `dtsd.v1.Scheduler` API.

    `Client(servers, timeout, token=..., tls=...)` talks to the given servers with exactly
    the given credentials; `Client()` or `Client.from_config(...)` finds the servers, the
    token and TLS as dtsctl does (docs/client.md). Every method raises a `DtsdError`
    subclass on failure. The low-level `call(method, request)` and `stream(...)` (from
    `Connection`) reach any RPC with protobuf messages; each returned dataclass keeps
    the message it was made from in `.raw`.

    Calls fail over to the next server on UNAVAILABLE only (see `Connection`). A client
    may be shared between threads; its `last_server`/`last_tried` then tell of whichever
    call ended last, while each exception carries its own call's `server` and `tried`.
    """

    def __init__(self, servers: Sequence[str] | None = None, timeout: float | None = None,
                 *, token: str | Callable[[], str] | None = None, tls: Tls | None = None):
        if servers is None:
            targets = resolve_servers(timeout=timeout)
            token = token if token is not None else resolve_credential(targets)
            tls = tls if tls is not None else (None if targets.local_dir
                                               else resolve_tls(targets))
            servers, timeout = targets.write, targets.timeout
        super().__init__(servers, DEFAULT_TIMEOUT if timeout is None else timeout,
                         token=token, tls=tls)

    @classmethod
    def from_config(cls, config_path: str | None = None, *, servers: Sequence[str] | None = None,
                    role: Role | str = "write", timeout: float | None = None,
                    token: str | None = None, token_file: str | None = None,
                    tls_ca: str | None = None, tls_cert: str | None = None,
                    tls_key: str | None = None, tls_server_name: str | None = None,
                    env: Mapping[str, str] | None = None) -> Client:
        """A client configured as dtsctl is: each argument stands for the dtsctl flag of
        its name and, as there, beats the environment (`DTSD_SERVERS`, `DTSD_TOKEN`,
        `DTSD_TOKEN_FILE`, `DTSD_CONFIG`, ...), which beats this host's local sockets,
        which beat the config file's `[client]` section, which beats 127.0.0.1:50051.
        `role` "read" takes the read servers (`--status-servers`, `$STATUS_SERVERS`)
        instead of the write ones. ConfigurationError says what is wrong.
        """
        targets = resolve_servers(servers, timeout=timeout, config_path=config_path, env=env)
        credential = resolve_credential(targets, token=token, token_file=token_file, env=env)
        tls = None if targets.local_dir else resolve_tls(
            targets, ca=tls_ca, cert=tls_cert, key=tls_key, server_name=tls_server_name)
        chosen = targets.read if Role(role) is Role.READ else targets.write
        return cls(chosen, targets.timeout, token=credential, tls=tls)

    # --- calling ------------------------------------------------------------------------

    def _unary(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        try:
            return self.call(method, request, timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from(exc, self) from exc

    # --- jobs ---------------------------------------------------------------------------

    def submit(self, command: str | None = None, *, spec: Any = None, name: str | None = None,
               env: Mapping[str, str] | None = None, cwd: str | None = None,
               queue: str | None = None, priority: int | None = None,
               max_retries: int | None = None, timeout_seconds: float | None = None,
               run_at: datetime | None = None, id: str | None = None,
               idempotency_key: str | None = None, limits: Mapping[str, int] | None = None,
               notify: Sequence[str] | None = None, notify_on: Sequence[str] | None = None,
               labels: Mapping[str, str] | None = None, **extra: Any) -> SubmitResult:
        """Submit one job; `command` runs under /bin/sh -c.

        Keyword arguments are the fields of `dtsd.v1.JobSpec` (docs/api.md); `spec=` takes
        a ready JobSpec message that they are laid over, and `**extra` sets fields added to
        the proto after this client was written. The server validates everything:
        a bad field raises `InvalidArgument` whose `field` names it.
        """
        message = build_spec(command, spec=spec, name=name, env=env, cwd=cwd, queue=queue,
                             priority=priority, max_retries=max_retries,
                             timeout_seconds=timeout_seconds, run_at=run_at, id=id,
                             idempotency_key=idempotency_key, limits=limits, notify=notify,
                             notify_on=notify_on, labels=labels, **extra)
        return SubmitResult.from_proto(
            self._unary("SubmitJob", dtsd_pb2.SubmitJobRequest(job=message)))

    def submit_many(self, jobs: Iterable[Mapping[str, Any] | Any]) -> list[SubmitResult]:
        """Submit several jobs in one transaction: every one is stored, or none is.

        Each job is a dict of `submit`'s keyword arguments (`{"command": ..., "name": ...}`)
        or a ready JobSpec message. Results come in the order given.
        """
        specs = [dict_spec if not isinstance(dict_spec, Mapping) else build_spec(**dict_spec)
                 for dict_spec in jobs]
        reply = self._unary("SubmitJobs", dtsd_pb2.SubmitJobsRequest(jobs=specs))
        return [SubmitResult.from_proto(one) for one in reply.jobs]

    def get(self, job_id: str, *, attempts: bool = False) -> Job:
        """The job; `attempts=True` fills `attempt_history` (each attempt's output too)."""
        return Job.from_proto(self._unary(
            "GetJob", dtsd_pb2.GetJobRequest(id=job_id, include_attempts=attempts)))

    def list_page(self, *, statuses: Iterable[JobStatus | str] = (), queue: str = "",
                  name: str = "", selector: str = "", since: datetime | None = None,
                  until: datetime | None = None, schedule: str = "",
                  dead_lettered: bool = False, page_size: int = 0,
                  page_token: str = "") -> JobPage:
        """One page of jobs, newest first (output left empty). `page_size` 0: the server's
        100 (at most 1000); pass `next_page_token` back as `page_token` for the next."""
        request = dtsd_pb2.ListJobsRequest(
            statuses=[_status_number(s) for s in statuses], queue=queue, name=name,
            selector=selector, schedule=schedule, dead_lettered=dead_lettered,
            page_size=page_size, page_token=page_token)
        if since is not None:
            request.created_after.CopyFrom(_timestamp(since))
        if until is not None:
            request.created_before.CopyFrom(_timestamp(until))
        reply = self._unary("ListJobs", request)
        return JobPage([Job.from_proto(job) for job in reply.jobs], reply.next_page_token,
                       raw=reply)

    def list(self, *, statuses: Iterable[JobStatus | str] = (), queue: str = "",
             name: str = "", selector: str = "", since: datetime | None = None,
             until: datetime | None = None, schedule: str = "", dead_lettered: bool = False,
             page_size: int = 0) -> Iterator[Job]:
        """Every matching job, newest first, fetching pages as the iteration needs them.

        `statuses`: any of them (empty: any status); `selector` a label selector
        (`team=data,tier in (1,2)`, Kubernetes' syntax); `since`/`until` bound the
        creation time (aware datetimes); `schedule` the name of the schedule that fired it.
        """
        statuses = list(statuses)
        token, seen = "", set()
        while True:
            page = self.list_page(statuses=statuses, queue=queue, name=name, selector=selector,
                                  since=since, until=until, schedule=schedule,
                                  dead_lettered=dead_lettered, page_size=page_size,
                                  page_token=token)
            yield from page.jobs
            token = page.next_page_token
            if not token or token in seen:
                return
            seen.add(token)

    def watch(self, job_id: str) -> Iterator[JobEvent]:
        """The job's events as they happen: its current state first, then output chunks
        and state changes; the final state is the last event. Of a job already final: its
        output, then its final state. A broken stream raises (`Unavailable`, ...); `wait`
        with `on_output` rides over breaks instead."""
        events = self.stream("WatchJob", dtsd_pb2.WatchJobRequest(id=job_id))
        try:
            for event in events:
                yield JobEvent.from_proto(event)
        except grpc.RpcError as exc:
            raise error_from(exc, self) from exc
        finally:
            events.close()

    def wait(self, job_id: str, timeout: float | None = None, *,
             on_output: Callable[[int, int, bytes], None] | None = None,
             poll_interval: float = POLL_INTERVAL) -> Job:
        """Block until the job is final; return it with `attempt_history`.

        Watches the job (WatchJob); when the stream breaks, or a server does not stream,
        polls GetJob every `poll_interval` seconds. `on_output(attempt, offset, chunk)`
        gets the output as it is written (a chunk may repeat bytes already given after a
        reconnect: `offset` says where it starts); the watch is re-opened after a break so
        that it stays live. `timeout` (seconds; None: no limit) raises `WaitTimeout`.
        Servers out of reach for longer than the client's `timeout` raise `Unavailable`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        watch = True
        last_contact = time.monotonic()
        job: Job | None = None
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeout(f"job {job_id} is not final after {timeout:g}s"
                                  + (f" (it is {job.raw_status})" if job else ""),
                                  job=job, server=self.last_server, tried=self.last_tried)
            if watch:
                watch = False
                events = self.stream("WatchJob", dtsd_pb2.WatchJobRequest(id=job_id),
                                     timeout=left)
                try:
                    for event in events:
                        watch = on_output is not None
                        if event.kind == dtsd_pb2.JobEvent.OUTPUT:
                            if on_output is not None:
                                on_output(event.attempt, event.offset, bytes(event.output))
                        elif (event.status in _FINAL_NUMBERS):
                            break
                except grpc.RpcError as exc:
                    if exc.code() in _FATAL_WATCH:
                        raise error_from(exc, self) from exc
                finally:
                    events.close()
            try:
                job = self.get(job_id, attempts=True)
                last_contact = time.monotonic()
            except DtsdError as exc:
                if exc.code not in _TRANSIENT or time.monotonic() - last_contact > self.timeout:
                    raise
            if job is not None and job.final:
                return job
            time.sleep(poll_interval if left is None else max(0.0, min(poll_interval, left)))

    def cancel(self, job_id: str) -> CancelResult:
        """Cancel a job: a pending one never runs, a running one is killed. A job already
        final is left as it is (`previous_status` == `status`)."""
        reply = self._unary("CancelJob", dtsd_pb2.CancelJobRequest(id=job_id))
        return CancelResult(job_id, _status(reply.previous_status), _status(reply.status),
                            raw=reply)

    def retry(self, job_id: str) -> Job:
        """Run a FAILED or CANCELLED job again with a fresh retry budget."""
        return Job.from_proto(self._unary("RetryJob", dtsd_pb2.RetryJobRequest(id=job_id)).job)

    def _bulk(self, method: str, selection: Any, dry_run: bool, limit: int) -> BulkResult:
        reply = self._unary(method, dtsd_pb2.BulkJobsRequest(
            selection=selection, dry_run=dry_run, limit=limit))
        return BulkResult(reply.matched, reply.changed, reply.more, raw=reply)

    def cancel_many(self, *, selector: str = "", statuses: Iterable[JobStatus | str] = (),
                    queue: str = "", name: str = "", since: datetime | None = None,
                    until: datetime | None = None, dry_run: bool = False,
                    limit: int = 0) -> BulkResult:
        """Cancel the PENDING and RUNNING jobs of a selection (all conditions hold; at least
        one given). `dry_run` counts them only; `limit` 0: the server's 100000. Without
        role admin only the caller's own jobs are taken."""
        return self._bulk("CancelJobs", _selection(
            selector=selector, statuses=statuses, queue=queue, name=name, since=since,
            until=until), dry_run, limit)

    def retry_many(self, *, selector: str = "", statuses: Iterable[JobStatus | str] = (),
                   queue: str = "", name: str = "", since: datetime | None = None,
                   until: datetime | None = None, dead_lettered: bool = False,
                   dry_run: bool = False, limit: int = 0) -> BulkResult:
        """Run the FAILED and CANCELLED jobs of a selection again, as `retry` does;
        `dead_lettered` takes only dead letters (requeues them)."""
        return self._bulk("RetryJobs", _selection(
            selector=selector, statuses=statuses, queue=queue, name=name, since=since,
            until=until, dead_lettered=dead_lettered), dry_run, limit)

    # --- dead letters -------------------------------------------------------------------

    def dead_letters_page(self, *, queue: str = "", page_size: int = 0,
                          page_token: str = "") -> JobPage:
        """One page of the dead-letter queue (jobs that failed for good), newest first."""
        reply = self._unary("ListDeadLetters", dtsd_pb2.ListDeadLettersRequest(
            queue=queue, page_size=page_size, page_token=page_token))
        return JobPage([Job.from_proto(job) for job in reply.jobs], reply.next_page_token,
                       raw=reply)

    def dead_letters(self, *, queue: str = "", page_size: int = 0) -> Iterator[Job]:
        """Every dead-lettered job (of `queue`, if given), page after page."""
        token, seen = "", set()
        while True:
            page = self.dead_letters_page(queue=queue, page_size=page_size, page_token=token)
            yield from page.jobs
            token = page.next_page_token
            if not token or token in seen:
                return
            seen.add(token)

    def requeue_dead_letters(self, ids: Sequence[str] = (), *, all: bool = False,
                             queue: str = "") -> list[str]:
        """Run dead-lettered jobs again: these `ids`, or `all` (of `queue`). The ids requeued."""
        reply = self._unary("RequeueDeadLetters", dtsd_pb2.RequeueDeadLettersRequest(
            ids=list(ids), all=all, queue=queue))
        return list(reply.ids)

    def purge_dead_letters(self, ids: Sequence[str] = (), *, queue: str = "") -> int:
        """Take jobs out of the dead-letter queue (their FAILED record stays): these `ids`,
        or, with none given, all of them (of `queue`). How many were purged."""
        reply = self._unary("PurgeDeadLetters", dtsd_pb2.PurgeDeadLettersRequest(
            ids=list(ids), queue=queue))
        return int(reply.purged)

    # --- schedules ----------------------------------------------------------------------

    def create_schedule(self, name: str, expression: str, command: str | None = None, *,
                        timezone: str = "", overlap: Overlap | str = Overlap.ALLOW,
                        misfire: Misfire | str = Misfire.RUN_ONCE,
                        catchup_window_seconds: float = 0.0, job: Any = None,
                        **job_fields: Any) -> Schedule:
        """Create a cron schedule: `expression` has 5 fields, 6 with seconds first, or is
        `@hourly`-style, in `timezone` (IANA; "": UTC). The job it submits is `command`
        with `job_fields` (as `submit`'s keyword arguments), or a ready JobSpec `job=`."""
        spec = build_spec(command, spec=job, **job_fields)
        message = dtsd_pb2.Schedule(
            name=name, expression=expression, timezone=timezone,
            overlap=dtsd_pb2.OverlapPolicy.Value(Overlap(str(overlap).upper()).value),
            misfire=dtsd_pb2.MisfirePolicy.Value(Misfire(str(misfire).upper()).value),
            catchup_window_seconds=catchup_window_seconds, job=spec)
        return Schedule.from_proto(self._unary(
            "CreateSchedule", dtsd_pb2.CreateScheduleRequest(schedule=message)))

    def schedules(self) -> list[Schedule]:
        """Every schedule."""
        reply = self._unary("ListSchedules", dtsd_pb2.ListSchedulesRequest())
        return [Schedule.from_proto(schedule) for schedule in reply.schedules]

    def pause_schedule(self, name: str) -> Schedule:
        return Schedule.from_proto(self._unary("PauseSchedule", dtsd_pb2.ScheduleRef(name=name)))

    def resume_schedule(self, name: str) -> Schedule:
        return Schedule.from_proto(self._unary("ResumeSchedule",
                                               dtsd_pb2.ScheduleRef(name=name)))

    def delete_schedule(self, name: str) -> None:
        self._unary("DeleteSchedule", dtsd_pb2.ScheduleRef(name=name))

    def trigger_schedule(self, name: str) -> SubmitResult:
        """Fire the schedule now, outside its slots: the job it submitted."""
        return SubmitResult.from_proto(self._unary("TriggerSchedule",
                                                   dtsd_pb2.ScheduleRef(name=name)))

    def preview_schedule(self, name: str = "", *, expression: str = "", timezone: str = "",
                         count: int = 10) -> list[FireTime]:
        """The next `count` fire times of the schedule `name`, or of an `expression` in
        `timezone` that is not stored."""
        reply = self._unary("PreviewSchedule", dtsd_pb2.PreviewScheduleRequest(
            name=name, expression=expression, timezone=timezone, count=count))
        return [FireTime(_when(t, "at"), t.local, t.note) for t in reply.times]

    # --- the cluster and its queues -----------------------------------------------------

    def cluster_status(self) -> ClusterStatus:
        return ClusterStatus.from_proto(self._unary("ClusterStatus",
                                                    dtsd_pb2.ClusterStatusRequest()))

    def queues(self) -> list[QueueInfo]:
        """Every queue that is paused or limited, holds jobs not final, or is served."""
        reply = self._unary("ListQueues", dtsd_pb2.ListQueuesRequest())
        return [QueueInfo.from_proto(info) for info in reply.queues]

    def pause_queue(self, name: str) -> QueueInfo:
        """Workers take no new job of the queue (submits are still accepted). Admin."""
        return QueueInfo.from_proto(self._unary("PauseQueue", dtsd_pb2.QueueRef(name=name)))

    def resume_queue(self, name: str) -> QueueInfo:
        return QueueInfo.from_proto(self._unary("ResumeQueue", dtsd_pb2.QueueRef(name=name)))

    def limit_queue(self, name: str, max_running: int) -> QueueInfo:
        """At most `max_running` of the queue's jobs RUNNING at once (0: no limit). Admin."""
        return QueueInfo.from_proto(self._unary(
            "SetQueueLimit", dtsd_pb2.QueueLimit(name=name, max_running=max_running)))


_FINAL_NUMBERS = frozenset(dtsd_pb2.JobStatus.Value(status.value) for status in JobStatus
                           if status.final)


# --- where the servers are, and which credential: as dtsctl finds them ----------------------
# dtsctl's module docstring (dtsd/cli.py) and docs/client.md state the precedence.

DEFAULT_SERVER = "127.0.0.1:50051"


class Role(str, enum.Enum):
    """Which servers a client is for: writes (`--submit-server`) or reads (`--status-servers`)."""

    WRITE = "write"
    READ = "read"


@dataclass(frozen=True)
class Targets:
    """The servers for writes and for reads, where each list came from, and the deadline."""

    write: list[str]
    read: list[str]
    write_source: str
    read_source: str
    timeout: float = DEFAULT_TIMEOUT
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    local_dir: str = ""       # the runtime directory, when these are its local sockets
    token_file: str = ""      # [client] token_file of the config file that was read


# What a client reads of a config file: [client], where this host's dtsd keeps its sockets,
# and (dtsctl web-login) where its web child listens.
CLIENT_KEYS = (*((option.section, option.key) for option in config.OPTIONS
                 if option.section == "client"), ("dtsd", "runtime_dir"), ("web", "listen"))


def _warn_config(error: config.ConfigError) -> None:
    warnings.warn(f"{error} (the client reads only [client] and [dtsd] runtime_dir of it, "
                  "which are fine)", stacklevel=3)


def read_client_config(config_path: str | None, env: Mapping[str, str], *,
                       on_warning: Callable[[config.ConfigError], None] | None = None
                       ) -> config.Config | None:
    """The named config file (`config_path`, else $DTSD_CONFIG), else /etc/dtsd/dtsd.ini
    if readable; None when none is named and that one is not readable.

    An error in a part a client does not read (the server's sections) goes to `on_warning`
    (default: `warnings.warn`), not fatal: the client still works while the server's file
    is being fixed. An error in CLIENT_KEYS raises ConfigurationError.
    """
    path = config_path or env.get("DTSD_CONFIG") or None
    if path is None:
        if not os.access(config.DEFAULT_PATH, os.R_OK):
            return None
        path = config.DEFAULT_PATH
    try:
        return config.load(path, env={})
    except config.ConfigError as exc:
        whole = exc
    try:
        partial = config.load_keys(path, CLIENT_KEYS)
    except config.ConfigError as exc:
        raise ConfigurationError(str(exc)) from None
    (on_warning or _warn_config)(whole)
    return partial


def local_sockets(runtime_dir: str) -> list[str] | None:
    """This host's dtsd API sockets (`unix:` addresses), or None when this host runs no
    dtsd there (no `ident.sock`). ConfigurationError when it runs one that serves no
    socket yet."""
    if not os.path.exists(os.path.join(runtime_dir, identity.IDENT_SOCKET)):
        return None
    try:
        paths = identity.api_sockets(runtime_dir)
    except OSError as exc:
        raise ConfigurationError(f"cannot list {runtime_dir}: {exc.strerror}",
                                 "unreachable") from None
    if not paths:
        raise ConfigurationError(
            f"dtsd runs on this host ({runtime_dir}) but serves no local API socket yet: is "
            "it starting, or has it [server] processes = 0? (or name servers with --servers)",
            "unreachable")
    return [f"unix:{path}" for path in paths]


def resolve_servers(servers: Sequence[str] | None = None,
                    submit_server: Sequence[str] | None = None,
                    status_servers: Sequence[str] | None = None, *,
                    timeout: float | None = None,
                    config_path: str | None = None,
                    env: Mapping[str, str] | None = None,
                    on_warning: Callable[[config.ConfigError], None] | None = None) -> Targets:
    """Apply dtsctl's precedence: flags (these arguments), environment, this host's local
    sockets, config file, default.

    The default config file is read only when neither arguments nor environment name the
    servers; a file named by `config_path`/$DTSD_CONFIG is always read (for its timeout too).
    """
    environ = os.environ if env is None else env

    def from_env(name: str) -> list[str] | None:
        text = environ.get(name, "").strip()
        if not text:
            return None
        try:
            return parse_servers(text)
        except ValueError as exc:
            raise ConfigurationError(f"${name}: {exc}") from None

    def first(*candidates: tuple[str, Sequence[str] | None]) -> tuple[list[str], str] | None:
        for source, value in candidates:
            if value:
                return list(value), source
        return None

    env_general = (("$DTSD_SERVERS", from_env("DTSD_SERVERS")), ("$SERVERS", from_env("SERVERS")))
    write = first(("--submit-server", submit_server), ("--servers", servers),
                  ("$SUBMIT_SERVER", from_env("SUBMIT_SERVER")), *env_general)
    read = first(("--status-servers", status_servers), ("--servers", servers),
                 ("$STATUS_SERVERS", from_env("STATUS_SERVERS")), *env_general)

    named = config_path or environ.get("DTSD_CONFIG")
    cfg = (read_client_config(config_path, environ, on_warning=on_warning)
           if (named or not (write and read)) else None)
    fallback = ([DEFAULT_SERVER], "the default")
    settings: dict[str, str] = {}
    if cfg is not None:
        fallback = (list(cfg.get("client", "servers")), f"{cfg.path} [client] servers")
        if timeout is None:
            timeout = cfg.get("client", "timeout")
        settings = {f"tls_{key}": cfg.get("client", f"tls_{key}") for key in ("ca", "cert", "key")}
        settings["token_file"] = cfg.get("client", "token_file")
    if not write and not read:
        runtime_dir = (cfg.get("dtsd", "runtime_dir") if cfg is not None
                       else config.default("dtsd", "runtime_dir"))
        local = local_sockets(runtime_dir)
        if local is not None:
            fallback = (local, f"the local sockets in {runtime_dir}")
            settings["local_dir"] = runtime_dir
    write = write or fallback
    read = read or fallback
    return Targets(write=write[0], read=read[0], write_source=write[1], read_source=read[1],
                   timeout=DEFAULT_TIMEOUT if timeout is None else timeout, **settings)


def read_token_file(path: str, source: str) -> str:
    """The token in `path` (its first non-blank line), for `source` (what named the file)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(65536)
    except OSError as exc:
        raise ConfigurationError(f"{source}: cannot read the token file {path}: "
                                 f"{exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"{source}: the token file {path} is not text") from None
    secret = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not secret:
        raise ConfigurationError(f"{source}: the token file {path} is empty")
    return secret


class LocalToken:
    """A local token from this host's master (dtsd/identity.py), renewed shortly before it
    expires, so that a long `wait` keeps its credential. Calling it gives the current
    token; a refusal (no role) raises ConfigurationError with reason "unauthorised", no
    answer with reason "unreachable"."""

    RENEW_BEFORE = 30.0

    def __init__(self, runtime_dir: str):
        self.runtime_dir = runtime_dir
        self.token = ""
        self.expires = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> str:
        with self.lock:
            if time.time() > self.expires - self.RENEW_BEFORE:
                try:
                    self.token = identity.fetch_local_token(self.runtime_dir)
                except identity.LocalIdentityError as exc:
                    what = "not authorised" if exc.refused else "cannot reach this host's dtsd"
                    raise ConfigurationError(f"{what}: {exc}", "unauthorised" if exc.refused
                                             else "unreachable") from None
                self.expires = identity.claim_expiry(self.token)
            return self.token


def resolve_credential(targets: Targets, *, token: str | None = None,
                       token_file: str | None = None, env: Mapping[str, str] | None = None,
                       local_token: Callable[[str], LocalToken] = LocalToken
                       ) -> str | LocalToken | None:
    """The token to send, first match wins: `token`, `token_file`, $DTSD_TOKEN,
    $DTSD_TOKEN_FILE, `[client] token_file` of the config file read; else, on this host's
    local sockets, a local token from its master (asked now, so that a refusal is said
    first); else None."""
    environ = os.environ if env is None else env
    if token:
        return token
    if token_file:
        return read_token_file(token_file, "--token-file")
    if environ.get("DTSD_TOKEN"):
        return environ["DTSD_TOKEN"]
    if environ.get("DTSD_TOKEN_FILE"):
        return read_token_file(environ["DTSD_TOKEN_FILE"], "$DTSD_TOKEN_FILE")
    if targets.token_file:
        return read_token_file(targets.token_file, "[client] token_file")
    if targets.local_dir:
        local = local_token(targets.local_dir)
        local()
        return local
    return None


def resolve_tls(targets: Targets, *, ca: str | None = None, cert: str | None = None,
                key: str | None = None, server_name: str | None = None) -> Tls | None:
    """TLS when a CA is given (argument, else [client] tls_ca); arguments beat the file."""
    ca = ca or targets.tls_ca
    cert = cert or targets.tls_cert
    key = key or targets.tls_key
    if not ca:
        if cert or key or server_name:
            raise ConfigurationError("--tls-cert, --tls-key and --tls-server-name need "
                                     "--tls-ca (or [client] tls_ca)")
        return None
    if bool(cert) != bool(key):
        raise ConfigurationError("--tls-cert and --tls-key go together")
    return Tls(ca, cert, key, server_name or "")
