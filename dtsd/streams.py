"""Stream caps: long-lived RPCs never take the threads that unary calls need.

The server child runs a sync `grpc.server`: every RPC, unary or streaming, runs on one
thread of its pool, and a stream (WatchJob, `grpc.health.v1.Health/Watch`, reflection's
`ServerReflectionInfo`) holds that thread for as long as the client keeps it open. So the
pool has two budgets: `[server] threads` for unary calls, plus one thread per stream slot
(`[server] max_streams`), and `StreamLimiter` makes sure streams never hold more threads
than they have slots. A unary call therefore always finds a thread, however many streams
are open.

A stream gets a slot when its handler starts, or is refused at once with
RESOURCE_EXHAUSTED and a message naming the cap and its option:

* `[server] max_streams`: open streams in this server child, all kinds together;
* `[server] max_streams_per_peer`: open streams of one peer in this child;
* `[server] max_public_streams`: open streams of the methods that need no credentials
  (health Watch, reflection; `auth.METHODS` marks them PUBLIC), and at most
  `PUBLIC_STREAMS_PER_PEER` of them per peer. Anyone who can connect may open those,
  so their caps are small and hard; a public stream also counts against the two caps
  above.

A peer is the client's IP address for TCP (an IPv6 client by its /64, which one host
usually owns whole; an IPv4-mapped IPv6 address as the IPv4 address), and one peer for
all callers of a unix socket. The caps are per server child: the kernel spreads
connections over the children (SO_REUSEPORT), and one connection's streams all land on
one child.

A slot is released exactly once, when the stream ends for whatever reason: the handler
returns or raises, the client cancels, the deadline passes, the connection drops, or
the server stops. Both the handler's `finally` and gRPC's termination callback release
it, whichever comes first, so a handler gRPC abandons mid-stream cannot leak one.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import resource
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import grpc

from . import auth
from .config import PUBLIC_STREAMS_PER_PEER

log = logging.getLogger("dtsd.streams")

#: A refusal is logged at most this often (seconds), with the count so far, so a client
#: hammering the caps cannot fill the log.
REFUSAL_LOG_EVERY = 60.0

#: Connection housekeeping (see `server_options`), in seconds.
HANDSHAKE_TIMEOUT = 10.0
KEEPALIVE_TIME = 60.0
KEEPALIVE_TIMEOUT = 20.0


def peer_key(peer: str) -> str:
    """Who a stream counts against, from gRPC's `context.peer()`.

    `ipv4:10.0.0.7:51234` -> `10.0.0.7`; `ipv6:[2001:db8::7]:51234` -> `2001:db8::/64`;
    `ipv6:[::ffff:10.0.0.7]:51234` -> `10.0.0.7`; `unix:...` -> `unix` (every local caller
    of a unix socket is one peer). Anything unparsable counts as itself.
    """
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return kind or peer or "unknown"
    host = rest.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def is_public(method: str) -> bool:
    """True for methods anyone may call without credentials (health, reflection)."""
    return method in auth.METHODS and auth.METHODS[method] is auth.PUBLIC


class Refused(Exception):
    """A stream over one of the caps; the message names the cap and its option."""


@dataclass(frozen=True)
class Caps:
    total: int              # [server] max_streams
    per_peer: int           # [server] max_streams_per_peer
    public_total: int       # [server] max_public_streams
    public_per_peer: int = PUBLIC_STREAMS_PER_PEER


class Slot:
    """One open stream's place in the counts; `release()` may be called any number of times."""

    __slots__ = ("_slots", "peer", "public", "_released")

    def __init__(self, slots: "StreamSlots", peer: str, public: bool):
        self._slots = slots
        self.peer = peer
        self.public = public
        self._released = False

    def release(self) -> None:
        self._slots._release(self)


class StreamSlots:
    """The open-stream counts of one server child, safe from any thread."""

    def __init__(self, caps: Caps):
        self.caps = caps
        self._lock = threading.Lock()
        self._total = 0
        self._public = 0
        self._by_peer: collections.Counter[str] = collections.Counter()
        self._public_by_peer: collections.Counter[str] = collections.Counter()
        self._refused = 0
        self._refusal_logged = -REFUSAL_LOG_EVERY

    def acquire(self, peer: str, public: bool) -> Slot:
        """A slot for a stream of `peer`, or Refused naming the cap that is full."""
        caps = self.caps
        with self._lock:
            problem = None
            if self._total >= caps.total:
                problem = (f"this server holds {self._total} open streams "
                           f"([server] max_streams = {caps.total})")
            elif self._by_peer[peer] >= caps.per_peer:
                problem = (f"peer {peer} holds {self._by_peer[peer]} open streams on this server "
                           f"([server] max_streams_per_peer = {caps.per_peer})")
            elif public and self._public >= caps.public_total:
                problem = (f"this server holds {self._public} open streams that need no "
                           f"credentials (health Watch, reflection; "
                           f"[server] max_public_streams = {caps.public_total})")
            elif public and self._public_by_peer[peer] >= min(caps.public_per_peer,
                                                               caps.public_total):
                problem = (f"peer {peer} holds {self._public_by_peer[peer]} open streams that "
                           f"need no credentials (health Watch, reflection) on this server; "
                           f"at most {min(caps.public_per_peer, caps.public_total)} per peer")
            if problem is not None:
                self._refused += 1
                self._maybe_log(problem)
                raise Refused(f"stream refused: {problem}; close a stream or try later")
            self._total += 1
            self._by_peer[peer] += 1
            if public:
                self._public += 1
                self._public_by_peer[peer] += 1
            return Slot(self, peer, public)

    def _release(self, slot: Slot) -> None:
        with self._lock:
            if slot._released:
                return
            slot._released = True
            self._total -= 1
            _decrement(self._by_peer, slot.peer)
            if slot.public:
                self._public -= 1
                _decrement(self._public_by_peer, slot.peer)

    def counts(self) -> dict[str, int]:
        """Open streams (`total`, `public`), peers holding any, refusals so far."""
        with self._lock:
            return {"total": self._total, "public": self._public,
                    "peers": len(self._by_peer), "refused": self._refused}

    def _maybe_log(self, problem: str) -> None:
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_EVERY:
            self._refusal_logged = now
            log.warning("streams refused (%d so far), latest: %s", self._refused, problem)


def _decrement(counter: collections.Counter, key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class StreamLimiter(grpc.ServerInterceptor):
    """Counts every streaming RPC against `StreamSlots`; refuses the ones over a cap.

    Put it after the authentication interceptor: a call refused for its credentials
    never takes a slot. Unary calls pass untouched.
    """

    def __init__(self, slots: StreamSlots):
        self.slots = slots

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        public = is_public(handler_call_details.method)
        original = (handler.unary_stream or handler.stream_stream or handler.stream_unary)
        slots = self.slots

        def take(context) -> Slot:
            try:
                slot = slots.acquire(peer_key(context.peer() or ""), public)
            except Refused as exc:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
                raise       # abort raises; this only tells readers (and linters) so
            if not context.add_callback(slot.release):
                slot.release()      # the call is over already
            return slot

        codecs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
        if handler.response_streaming:
            def stream(request_or_iterator, context) -> Iterator:
                slot = take(context)
                try:
                    yield from original(request_or_iterator, context)
                finally:
                    slot.release()
            make: Callable = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
                              else grpc.stream_stream_rpc_method_handler)
            return make(stream, **codecs)

        def unary_response(request_iterator, context):
            slot = take(context)
            try:
                return original(request_iterator, context)
            finally:
                slot.release()
        return grpc.stream_unary_rpc_method_handler(unary_response, **codecs)


def server_options(*, threads: int, caps: Caps, idle_timeout: float) -> list[tuple[str, int]]:
    """gRPC core settings that keep connections from holding what calls need.

    * `grpc.max_connection_idle_ms`: a connection with no RPC in flight for
      `[server] idle_timeout` gets a GOAWAY and is closed (clients reconnect on their
      next call). An open stream is an RPC in flight, so watchers are never cut.
    * `grpc.server_handshake_timeout_ms`: a connection that has not finished its TLS and
      HTTP/2 handshake within `HANDSHAKE_TIMEOUT` (or the idle time, if shorter) is closed;
      otherwise a silent TCP connection would wait gRPC's default of two minutes.
    * keepalive: the server pings a connection with calls in flight that has been quiet
      for `KEEPALIVE_TIME` and closes it when no answer comes within `KEEPALIVE_TIMEOUT`,
      so the streams of a client that vanished (power cut, partition) give their slots
      back. Clients may not ping more often than every 5 minutes without calls in flight
      (gRPC's default, written out): after two such pings the next one closes the
      connection, so pings cannot keep an idle connection open either.
    * `grpc.max_concurrent_streams`: one connection may carry a peer's whole stream
      allowance plus one unary call per thread. More wait in the client, or, sent
      before the client learnt the limit, are refused by HTTP/2 (UNAVAILABLE).
    """
    idle_ms = max(1, int(idle_timeout * 1000))
    return [
        ("grpc.max_connection_idle_ms", idle_ms),
        ("grpc.server_handshake_timeout_ms", min(idle_ms, int(HANDSHAKE_TIMEOUT * 1000))),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_TIME * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", 300_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_concurrent_streams", caps.per_peer + threads),
    ]


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE of this process to its hard limit; returns the new one.

    Every client connection is a file descriptor, and systemd starts services with a
    soft limit of 1024 (kept low for select(); gRPC uses epoll), so a few thousand idle
    connections would otherwise make accept() fail for everyone. The hard limit is the
    operator's (systemd's default is 524288).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("open files limit stays %d (hard %d): %s", soft, hard, exc)
        return soft
    return target
