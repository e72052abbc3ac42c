"""A small client for the `dtsd.v1.Scheduler` API: round-robin over servers, fail-over.

Used by dtsctl, the tests and the benchmarks. It stays generic: `call("GetJob", request)`
looks the method up on the generated stub, so a new RPC needs no code here.

Fail-over rule: a call moves on to the next server only when a server answers
`UNAVAILABLE` (it cannot be reached, or it says a backing store is down). Any other
error, `DEADLINE_EXCEEDED` included, is raised at once: the request may have been
received, and repeating a submit elsewhere could run a job twice. When every server
failed, the error raised is the answer of the last server that said which store it
could not reach (`unreachable_store`), if any: that says more than "no connection".
"""

from __future__ import annotations

import queue
import random
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import grpc

from dtsd import config
from dtsd.v1 import dtsd_pb2_grpc

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


class Client:
    """One channel per server (TLS when `tls` is given), created on first use; calls go
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

    def __enter__(self) -> Client:
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
