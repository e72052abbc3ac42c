"""Leadership: who runs the leader loops, and the fencing token that proves it.

Two implementations behind one small interface (`Leadership`):

- `SingleNode` — no `[etcd] endpoints`: this node always leads, with the constant token
  `SINGLE_NODE_TOKEN` (1: truthy, and below every token etcd can hand out, because the
  first write to a fresh etcd gets revision 2).
- `EtcdLeadership` — an etcd election:

  keys      /dtsd/<cluster>/leader           value = node id, attached to the leader lease
            /dtsd/<cluster>/nodes/<node_id>  JSON record of the node, attached to its own lease
  campaign  grant a lease (TTL = lease_ttl rounded up, at least 2 s), then one transaction
            `create_revision(leader) == 0` → put(leader, node_id, lease), else get(leader).
            Success makes this node the leader; its fencing token is the revision of that
            transaction, which is the leader key's create_revision. Revisions only grow, so
            every later leader has a larger token.
  keepalive every (ttl - safety) / 3 seconds, for the leader lease and the node lease, each
            call with a deadline (`rpc_timeout`, (ttl - safety) / 2 within 0.5..3 s).
  step-down The time of the last *confirmed* refresh is the monotonic clock read *before*
            the keepalive was sent (the server's renewal happens after that instant, so the
            lease lives at least `ttl` past it). `is_leader()` computes, on every call,
            `now - confirmed < ttl - safety` with safety = max(1 s, ttl/4): it turns False
            before the lease can have expired on the server even if the keepalive thread is
            stuck or the whole process was SIGSTOPped — no flag updated by a thread is
            trusted for that. A refresh counts as confirmed only when a linearizable read of
            the leader key, made after the keepalive reply, succeeds and shows our key: etcd
            answers keepalives from the raft leader's memory without asking a quorum, so an
            etcd leader cut off from its quorum keeps "renewing" for up to two election
            timeouts (seen with etcd 3.4.23); the read needs the quorum. Losing the lease
            (keepalive TTL 0), seeing the leader key gone or owned by another, or the clock
            window running out all step down; the old lease is then revoked (retried until
            etcd answers) so a stale leader key cannot linger, and the node campaigns again.
  followers poll the cluster prefix every `poll_interval` (0.5 s): one linearizable range
            read gives the leader (node id and token) and the registered members; an absent
            leader key starts a campaign at once.
  endpoints python-etcd3 talks to one host:port; on a connection error or timeout the client
            moves to the next endpoint. Every call has a deadline (`rpc_timeout`), so a
            partitioned node never hangs.
  security  `tls_ca` (and `tls_cert`/`tls_key` for --client-cert-auth) make every client a
            TLS one; with `user` each new client authenticates with the password read from
            `password_file` at that moment (so a changed password needs no restart), and
            etcd's token rides on every call, keepalive streams included. A token etcd no
            longer knows (unused past --auth-token-ttl, or etcd restarted) is
            UNAUTHENTICATED: the client is dropped and the next call authenticates again
            (tests/test_backing_security.py freezes a node to show it). A refused password
            is logged as such, naming the user and the keys to check.
  stop      resigns: stops the threads, then revokes both leases, so the leader key goes at
            once and another node takes over within one poll interval.
  on_change called with True/False on each transition, from one of the two background
            threads (or from stop()); keep it short. The coordinator should still ask
            `is_leader()` / `token()` before each leader action rather than trust a flag
            set by the callback.

The etcd3 package is imported lazily, inside `EtcdLeadership`: with PyPI's protobuf it loads
only when PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python was set before protobuf was first
imported, which the master arranges for the coordinator child only.

Safety caveat (etcd's own): a lease is physical time, so a leader can still be deposed
while it believes it leads (clock-rate drift beyond `safety`, etcd revoking leases early).
The token is what makes that harmless: leader-only writes check it against a fence in
PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from . import backing

log = logging.getLogger("dtsd.election")

SINGLE_NODE_TOKEN = 1

OnChange = Callable[[bool], None]


class Leadership:
    """The interface the coordinator uses."""

    single_node: bool = False

    def start(self) -> None:
        """Begin campaigning (in background threads); returns at once."""

    def stop(self) -> None:
        """Resign (revoke the leases) and stop the threads."""

    def is_leader(self) -> bool:
        raise NotImplementedError

    def token(self) -> int | None:
        """The fencing token while leader, else None. Test with `is not None`."""
        raise NotImplementedError

    def leader(self) -> str | None:
        """Node id of the current leader, as last seen; None when there is none."""
        raise NotImplementedError

    def leader_token(self) -> int | None:
        """The current leader's token as last seen (its key's create_revision)."""
        raise NotImplementedError

    def members(self) -> list[dict[str, Any]]:
        """Registered nodes, sorted by node id: {"node_id", "since", "leader", ...}."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        """A small dict for status displays (leader, token, seen leader, freshness)."""
        raise NotImplementedError


class SingleNode(Leadership):
    """No etcd: this node always leads, with token `SINGLE_NODE_TOKEN`."""

    single_node = True

    def __init__(self, node_id: str = "", info: dict[str, Any] | None = None,
                 on_change: OnChange | None = None):
        self.node_id = node_id or socket.gethostname()
        self.since = time.time()
        self.info = dict(info or {})
        self.on_change = on_change
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            log.info("single-node mode: this node leads (token %d)", SINGLE_NODE_TOKEN)
            if self.on_change is not None:
                self.on_change(True)

    def stop(self) -> None:
        self._started = False

    def is_leader(self) -> bool:
        return True

    def token(self) -> int | None:
        return SINGLE_NODE_TOKEN

    def leader(self) -> str | None:
        return self.node_id

    def leader_token(self) -> int | None:
        return SINGLE_NODE_TOKEN

    def members(self) -> list[dict[str, Any]]:
        return [{**self.info, "node_id": self.node_id, "since": self.since, "leader": True}]

    def status(self) -> dict[str, Any]:
        return {"leader": True, "token": SINGLE_NODE_TOKEN, "seen_leader": self.node_id,
                "seen_token": SINGLE_NODE_TOKEN, "single_node": True}


# --- etcd ---------------------------------------------------------------------------------

class EtcdUnavailable(Exception):
    """An etcd call failed (connection refused, deadline, no quorum, ...)."""


class EtcdAuthError(Exception):
    """etcd refused the configured user and password."""


def _read_password(path: str) -> str:
    """The first line of `path` (a trailing newline is not part of the password)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise EtcdAuthError(f"cannot read [etcd] password_file: {exc}") from None


_PROTOBUF_HINT = ("python-etcd3 cannot load its protobuf stubs with this protobuf; set "
                  "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python before protobuf is first "
                  "imported (the master does this for the coordinator child), or use "
                  "Debian's python3-etcd3")


def _import_etcd3():
    try:
        import etcd3  # noqa: PLC0415 - lazy on purpose (see the module docstring)
    except TypeError as exc:  # "Descriptors cannot be created directly"
        raise RuntimeError(f"{_PROTOBUF_HINT}: {exc}") from exc
    except ImportError as exc:
        raise RuntimeError(f"the etcd3 package is missing (apt install python3-etcd3): {exc}"
                           ) from exc
    return etcd3


def parse_endpoints(endpoints: Iterable[str] | str, tls: bool = False) -> list[tuple[str, int]]:
    """`["127.0.0.1:2379", "http://h2:2379"]` or `"a:1,b:2"` -> [(host, port), ...].

    With `tls` (an `[etcd] tls_ca` is set) endpoints may say https://, never http://;
    without, an https:// endpoint is refused rather than spoken to in plain text.
    """
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.replace(",", " ").split() if e]
    result = []
    for item in endpoints:
        text = item.strip()
        scheme = text.partition("://")[0] if "://" in text else ""
        if scheme == "https" and not tls:
            raise ValueError(f"etcd endpoint {item!r} is https:// but [etcd] tls_ca is not set")
        if scheme == "http" and tls:
            raise ValueError(f"etcd endpoint {item!r} is http:// but [etcd] tls_ca is set")
        if scheme in ("http", "https"):
            text = text[len(scheme) + 3:]
        text = text.rstrip("/")
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"etcd endpoint {item!r} is not host:port")
        result.append((host.strip("[]") or "127.0.0.1", int(port)))
    if not result:
        raise ValueError("no etcd endpoints")
    return result


def _describe(exc: BaseException) -> str:
    """python-etcd3 turns gRPC errors into bare exceptions; dig out the gRPC detail."""
    for candidate in (exc, exc.__cause__, exc.__context__):
        if candidate is None:
            continue
        code = getattr(candidate, "code", None)
        details = getattr(candidate, "details", None)
        if callable(code) and callable(details):
            try:
                return f"{code().name}: {details()}"
            except Exception:  # noqa: BLE001
                pass
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass(frozen=True)
class _Term:
    """One leadership term: immutable, swapped as a whole (reads need no lock)."""
    token: int
    lease_id: int
    ttl: float                 # min(requested, granted) seconds
    confirmed: float           # monotonic time before the last request that renewed the lease
    since: float               # monotonic time it began


class EtcdLeadership(Leadership):
    """Leader election on an etcd lease + create-if-absent transaction (see module doc)."""

    single_node = False

    def __init__(self, endpoints: Iterable[str] | str, *, cluster: str, node_id: str,
                 ttl: float, info: dict[str, Any] | None = None,
                 on_change: OnChange | None = None, poll_interval: float = 0.5,
                 rpc_timeout: float | None = None, user: str = "", password_file: str = "",
                 tls_ca: str = "", tls_cert: str = "", tls_key: str = ""):
        self.endpoints = parse_endpoints(endpoints, tls=bool(tls_ca))
        if bool(user) != bool(password_file) or bool(tls_cert) != bool(tls_key) \
                or (tls_cert and not tls_ca):
            raise ValueError("etcd: user goes with password_file, tls_cert with tls_key, "
                             "and both need tls_ca")
        self.user = user
        self.password_file = password_file
        self.tls = {"ca_cert": tls_ca, "cert_cert": tls_cert or None,
                    "cert_key": tls_key or None} if tls_ca else {}
        self.cluster = cluster
        self.node_id = node_id
        self.lease_ttl = max(2, int(math.ceil(ttl)))
        self.safety = max(1.0, self.lease_ttl / 4)
        self.window = self.lease_ttl - self.safety                  # >= 1 s
        self.refresh_interval = self.window / 3
        self.rpc_timeout = rpc_timeout or max(0.5, min(3.0, self.window / 2))
        self.retry_delay = min(0.2, self.refresh_interval / 2)
        self.poll_interval = poll_interval
        self.info = dict(info or {})
        self.on_change = on_change

        self.prefix = f"/dtsd/{cluster}/"
        self.leader_key = f"{self.prefix}leader"
        self.nodes_prefix = f"{self.prefix}nodes/"
        self.node_key = f"{self.nodes_prefix}{node_id}"

        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_keepalive = threading.Event()
        self._threads: list[threading.Thread] = []
        self._term: _Term | None = None
        self._abandoned: set[int] = set()      # leader leases to revoke
        self._node_lease: int | None = None
        self._node_confirmed = 0.0
        self._since = time.time()
        self._seen: tuple[str | None, int | None] = (None, None)   # leader key: value, rev
        self._members: list[dict[str, Any]] = []
        self._last_error: str | None = None
        self._polled_at = 0.0                   # monotonic time of the last successful poll
        self._warned: dict[str, float] = {}      # kind of failure -> last warned at

        self._etcd3 = None
        self._client = None
        self._endpoint_index = 0
        self._retired: list[tuple[Any, float]] = []

    # --- the interface ----------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            return
        self._etcd3 = _import_etcd3()
        self._stop.clear()
        for name, target in (("dtsd-etcd-keepalive", self._keepalive_loop),
                             ("dtsd-etcd-campaign", self._campaign_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("etcd election started: node %s, cluster %s, endpoints %s, lease %ds "
                 "(leads at most %.1fs past a confirmed refresh)", self.node_id, self.cluster,
                 ",".join(f"{h}:{p}" for h, p in self.endpoints), self.lease_ttl, self.window)

    def stop(self) -> None:
        """Resign: stop the threads, then revoke the leader and node leases."""
        self._stop.set()
        self._wake_keepalive.set()
        # A thread finishes at most its current call; one still running after this cannot
        # take leadership any more (the stop flag is checked under the lock).
        for thread in self._threads:
            thread.join(timeout=2 * self.rpc_timeout)
        self._threads = []
        with self._lock:
            term, self._term = self._term, None
            node_lease, self._node_lease = self._node_lease, None
            abandoned, self._abandoned = set(self._abandoned), set()
        if term is not None:
            abandoned.add(term.lease_id)
        if node_lease is not None:
            abandoned.add(node_lease)
        # Leader lease first (it hands over), each endpoint once, within a bounded time.
        budget_end = time.monotonic() + max(2.0, 2 * self.rpc_timeout)
        first = [term.lease_id] if term is not None else []
        for lease_id in first + sorted(abandoned - set(first)):
            for attempt in range(len(self.endpoints)):
                if time.monotonic() > budget_end:
                    log.warning("could not revoke lease %x on stop in time; it expires within "
                                "%ds", lease_id, self.lease_ttl)
                    break
                try:
                    self._call(lambda c, i=lease_id: c.revoke_lease(i))
                    break
                except Exception as exc:  # noqa: BLE001
                    if _is_not_found(exc):
                        break
                    if attempt == len(self.endpoints) - 1 or not isinstance(exc, EtcdUnavailable):
                        log.warning("could not revoke lease %x on stop (%s); it expires "
                                    "within %ds", lease_id, _describe(exc), self.lease_ttl)
                        break
        if term is not None:
            log.info("resigned leadership (token %d)", term.token)
            self._notify(False)
        self._close_clients()

    def is_leader(self) -> bool:
        term = self._term
        return term is not None and self._valid(term, time.monotonic())

    def token(self) -> int | None:
        term = self._term
        if term is not None and self._valid(term, time.monotonic()):
            return term.token
        return None

    def leader(self) -> str | None:
        if self.is_leader():
            return self.node_id
        return self._seen[0]

    def leader_token(self) -> int | None:
        token = self.token()
        return token if token is not None else self._seen[1]

    def members(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self._members]

    def status(self) -> dict[str, Any]:
        """For status displays and tests: what this node knows and how fresh it is."""
        now = time.monotonic()
        term = self._term
        host, port = self.endpoints[self._endpoint_index % len(self.endpoints)]
        return {
            "leader": term is not None and self._valid(term, now),
            "token": self.token(),
            "seen_leader": self._seen[0], "seen_token": self._seen[1],
            "lease_confirmed_ago": None if term is None else round(now - term.confirmed, 3),
            "last_poll_ago": None if not self._polled_at else round(now - self._polled_at, 3),
            "endpoint": f"{host}:{port}", "last_error": self._last_error,
        }

    # --- timing -------------------------------------------------------------------------------

    def _valid(self, term: _Term, now: float) -> bool:
        return now - term.confirmed < term.ttl - self.safety and not self._stop.is_set()

    def _deadline(self, term: _Term) -> float:
        return term.confirmed + term.ttl - self.safety

    # --- etcd access --------------------------------------------------------------------------

    def _new_client(self):
        """A client for the current endpoint; with `user`, authenticated (a call to etcd)."""
        host, port = self.endpoints[self._endpoint_index % len(self.endpoints)]
        credentials = {}
        if self.user:
            credentials = {"user": self.user, "password": _read_password(self.password_file)}
        try:
            return self._etcd3.client(
                host=host, port=port, timeout=self.rpc_timeout, **self.tls, **credentials,
                grpc_options=[("grpc.initial_reconnect_backoff_ms", 200),
                              ("grpc.min_reconnect_backoff_ms", 200),
                              ("grpc.max_reconnect_backoff_ms", 1000)])
        except Exception as exc:  # noqa: BLE001 - sorted by _call
            if not (self.user and _grpc_code(exc) in ("INVALID_ARGUMENT", "FAILED_PRECONDITION")):
                raise
            refused = _describe(exc)
        # Raised outside the handler: the message, not the gRPC error, is what gets logged.
        raise EtcdAuthError(f"etcd {host}:{port} refused user {self.user!r}: {refused} (check "
                            f"[etcd] user and the password in {self.password_file})")

    def _current(self):
        with self._lock:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def _rotate(self, failed) -> None:
        """Move to the next endpoint, unless another thread already did."""
        with self._lock:
            if self._client is not failed:
                return
            self._endpoint_index += 1
            now = time.monotonic()
            # Close clients retired long enough ago that no call can still be using them.
            keep = []
            for client, retired_at in self._retired:
                if now - retired_at > 3 * self.rpc_timeout:
                    _close_quietly(client)
                else:
                    keep.append((client, retired_at))
            self._retired = keep
            if failed is not None:
                self._retired.append((failed, now))
            self._client = None
        host, port = self.endpoints[self._endpoint_index % len(self.endpoints)]
        log.debug("etcd: switching to endpoint %s:%d", host, port)

    def _close_clients(self) -> None:
        with self._lock:
            clients = [c for c, _ in self._retired] + ([self._client] if self._client else [])
            self._retired, self._client = [], None
        for client in clients:
            _close_quietly(client)

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        """Run `fn(client)`; connection trouble rotates the endpoint and raises
        EtcdUnavailable. Other server errors (lease not found, ...) are re-raised."""
        client = None
        try:
            client = self._current()        # may authenticate: a call of its own
            return fn(client)
        except Exception as exc:  # noqa: BLE001 - sorted below
            if _is_connection_error(exc) or _grpc_code(exc) == "UNAUTHENTICATED":
                # UNAUTHENTICATED: etcd forgot our token; a new client logs in again.
                self._rotate(client)
                raise EtcdUnavailable(_describe(exc)) from exc
            raise

    def _note_error(self, what: str, exc: BaseException) -> None:
        """etcd out of reach goes to dtsd.backing (a line per change of state, and the
        master's status line); any other failure is warned once per kind and then every
        30 s, the rest going to debug."""
        text = f"{what}: {_describe(exc)}"
        self._last_error = text
        if isinstance(exc, EtcdUnavailable):
            backing.health.failure(backing.BackingStore.ETCD, text)
            log.debug("etcd: %s", text)
            return
        now = time.monotonic()
        if now - self._warned.get(what, -math.inf) > 30:
            self._warned[what] = now
            log.warning("etcd: %s", text)
        else:
            log.debug("etcd: %s", text)

    def _note_success(self) -> None:
        backing.health.success(backing.BackingStore.ETCD)
        if self._warned:
            self._warned = {}
            self._last_error = None
            log.info("etcd: answering again")

    # --- keepalive thread ---------------------------------------------------------------------

    def _refresh(self, lease_id: int) -> tuple[bool, float]:
        """One keepalive. (alive, sent_at): sent_at is read before the request goes out."""
        sent_at = time.monotonic()
        replies = self._call(lambda c: list(c.refresh_lease(lease_id)))
        ttl = replies[0].TTL if replies else 0
        return ttl > 0, sent_at

    def _keepalive_loop(self) -> None:
        leader_tried = node_tried = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            self._check_window(now)         # log and notify the step-down on time
            term = self._term
            if term is not None and now >= max(term.confirmed + self.refresh_interval,
                                               leader_tried + self.retry_delay):
                leader_tried = now
                self._keepalive_leader(term)
            node_lease = self._node_lease
            if node_lease is not None and now >= max(self._node_confirmed + self.refresh_interval,
                                                     node_tried + self.retry_delay):
                node_tried = now
                self._keepalive_node(node_lease)
            # Sleep until the next refresh is due (or a new term/lease wakes us).
            now = time.monotonic()
            due = [now + self.poll_interval]
            term = self._term
            if term is not None:
                due.append(max(term.confirmed + self.refresh_interval,
                               leader_tried + self.retry_delay))
                due.append(self._deadline(term) + 0.001)
            if self._node_lease is not None:
                due.append(max(self._node_confirmed + self.refresh_interval,
                               node_tried + self.retry_delay))
            self._wake_keepalive.wait(max(0.01, min(due) - now))
            self._wake_keepalive.clear()

    def _keepalive_leader(self, term: _Term) -> None:
        """Keepalive, then a linearizable read of the leader key; only both together
        confirm the lease as of the keepalive's send time.

        The read is needed because etcd serves keepalives from the raft leader's memory
        without asking a quorum: an etcd leader that has lost its quorum goes on renewing
        leases until CheckQuorum deposes it (up to two election timeouts), and those
        renewals die with it. A linearizable read succeeds only while a quorum still follows
        that etcd leader, so a new etcd leader (which would revoke the lease on its own
        clock) cannot have been elected before the renewal. It also catches a leader key that
        is gone or now someone else's."""
        try:
            alive, sent_at = self._refresh(term.lease_id)
            if alive:
                reply = self._call(lambda c: c.get_response(self.leader_key))
        except Exception as exc:  # noqa: BLE001 - any failure: try again shortly
            self._note_error("leader lease keepalive failed", exc)
            return
        if not alive:
            self._step_down(term, "the leader lease expired on the etcd server")
            return
        kv = reply.kvs[0] if reply.kvs else None
        if kv is None or kv.create_revision != term.token or kv.lease != term.lease_id:
            self._step_down(term, "the leader key is gone" if kv is None else
                            f"the leader key now belongs to "
                            f"{kv.value.decode('utf-8', 'replace')} (token {kv.create_revision})")
            return
        log.debug("leader lease %x renewed and confirmed (request sent %.3fs ago)",
                  term.lease_id, time.monotonic() - sent_at)
        with self._lock:
            current = self._term
            if current is not None and current.lease_id == term.lease_id \
                    and sent_at > current.confirmed:
                self._term = _Term(current.token, current.lease_id, current.ttl, sent_at,
                                   current.since)

    def _keepalive_node(self, lease_id: int) -> None:
        try:
            alive, sent_at = self._refresh(lease_id)
        except Exception as exc:  # noqa: BLE001
            self._note_error("node lease keepalive failed", exc)
            return
        with self._lock:
            if self._node_lease != lease_id:
                return
            if alive:
                self._node_confirmed = max(self._node_confirmed, sent_at)
            else:
                log.warning("etcd: the node lease expired; registering again")
                self._node_lease = None

    # --- campaign thread ----------------------------------------------------------------------

    def _campaign_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self._check_window(started)
            try:
                self._revoke_abandoned()
                if self._node_lease is None:
                    self._register()
                self._observe_and_campaign()
                self._note_success()
            except Exception as exc:  # noqa: BLE001 - etcd trouble: try again next tick
                self._note_error("election round failed", exc)
            # Wake for the next poll, or when the current term's window runs out.
            wake = started + self.poll_interval
            term = self._term
            if term is not None:
                wake = min(wake, self._deadline(term) + 0.001)
            self._stop.wait(max(0.01, wake - time.monotonic()))

    def _check_window(self, now: float) -> None:
        term = self._term
        if term is not None and not self._valid(term, now):
            self._step_down(term, f"lease not confirmed for {now - term.confirmed:.1f}s "
                                  f"(limit {term.ttl - self.safety:.1f}s)")

    def _register(self) -> None:
        sent_at = time.monotonic()
        granted = self._call(lambda c: c.lease(self.lease_ttl))
        record = {**self.info, "node_id": self.node_id, "since": self._since,
                  "pid": os.getpid(), "host": socket.gethostname()}
        try:
            self._call(lambda c: c.put(self.node_key, json.dumps(record, sort_keys=True),
                                       lease=granted.id))
        except Exception:
            self._forget_lease(granted.id)
            raise
        with self._lock:
            self._node_lease = granted.id
            self._node_confirmed = sent_at
        self._wake_keepalive.set()
        log.info("registered node %s in etcd", self.node_id)

    def _observe_and_campaign(self) -> None:
        reply = self._call(lambda c: c.get_prefix_response(self.prefix))
        leader_kv = None
        members = []
        for kv in reply.kvs:
            key = kv.key.decode("utf-8", "replace")
            if key == self.leader_key:
                leader_kv = kv
            elif key.startswith(self.nodes_prefix):
                try:
                    record = json.loads(kv.value)
                except ValueError:
                    record = {}
                if not isinstance(record, dict):
                    record = {}
                record.setdefault("node_id", key[len(self.nodes_prefix):])
                members.append(record)
        seen_leader = leader_kv.value.decode("utf-8", "replace") if leader_kv else None
        seen_token = leader_kv.create_revision if leader_kv else None
        for record in members:
            record["leader"] = record["node_id"] == seen_leader
        members.sort(key=lambda r: str(r["node_id"]))
        self._members = members
        self._polled_at = time.monotonic()
        self._seen = (seen_leader, seen_token)

        term = self._term
        if term is not None:
            if leader_kv is None:
                self._step_down(term, "the leader key is gone")
            elif leader_kv.create_revision != term.token or leader_kv.lease != term.lease_id:
                self._step_down(term, f"the leader key now belongs to {seen_leader} "
                                      f"(token {seen_token})")
            else:
                return
        if leader_kv is None and not self._stop.is_set():
            self._campaign()

    def _campaign(self) -> None:
        sent_at = time.monotonic()                 # before the grant: the lease's clock starts later
        granted = self._call(lambda c: c.lease(self.lease_ttl))
        ttl = float(min(self.lease_ttl, granted.ttl or self.lease_ttl))
        try:
            succeeded, responses = self._call(lambda c: c.transaction(
                compare=[c.transactions.create(self.leader_key) == 0],
                success=[c.transactions.put(self.leader_key, self.node_id, lease=granted.id),
                         c.transactions.get(self.leader_key)],
                failure=[c.transactions.get(self.leader_key)]))
        except Exception:
            # Unknown outcome: if the put did happen, the key is attached to this lease, so
            # revoking it (now or later) removes it.
            self._forget_lease(granted.id)
            raise
        if not succeeded:
            self._forget_lease(granted.id)
            if responses and responses[0]:
                value, meta = responses[0][0]
                self._seen = (value.decode("utf-8", "replace"), meta.create_revision)
            return
        # The get in the same transaction reads the key just created: its create_revision.
        created = responses[1] if len(responses) > 1 else []
        token = created[0][1].create_revision if created else 0
        if not token:
            self._forget_lease(granted.id)
            raise EtcdUnavailable("transaction reply without the leader key")
        term = _Term(token=token, lease_id=granted.id, ttl=ttl, confirmed=sent_at,
                     since=time.monotonic())
        if not self._valid(term, time.monotonic()):
            # Stopping, or it took too long to be sure of the lease: give it back.
            self._forget_lease(granted.id)
            if not self._stop.is_set():
                log.warning("won the election too slowly to be sure of the lease; retrying")
            return
        with self._lock:
            stopping = self._stop.is_set()      # stop() takes this lock after setting it
            if not stopping:
                self._term = term
        if stopping:
            self._forget_lease(granted.id)
            return
        self._seen = (self.node_id, token)
        self._wake_keepalive.set()
        log.info("became leader with token %d (lease %x, ttl %ds)", token, granted.id, int(ttl))
        self._notify(True)

    def _step_down(self, term: _Term, reason: str) -> None:
        with self._lock:
            if self._term is not term:
                return
            self._term = None
            self._abandoned.add(term.lease_id)
        log.warning("lost leadership (token %d): %s", term.token, reason)
        self._notify(False)

    def _forget_lease(self, lease_id: int) -> None:
        """Revoke a lease we no longer want; if etcd does not answer, retry later."""
        try:
            self._call(lambda c: c.revoke_lease(lease_id))
        except Exception as exc:  # noqa: BLE001
            if not _is_not_found(exc):
                with self._lock:
                    self._abandoned.add(lease_id)

    def _revoke_abandoned(self) -> None:
        with self._lock:
            pending = sorted(self._abandoned)
        for lease_id in pending:
            try:
                self._call(lambda c, i=lease_id: c.revoke_lease(i))
            except Exception as exc:  # noqa: BLE001
                if not _is_not_found(exc):
                    raise
            with self._lock:
                self._abandoned.discard(lease_id)
            log.debug("revoked old lease %x", lease_id)

    def _notify(self, leading: bool) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(leading)
        except Exception:  # noqa: BLE001 - a callback must not kill the election
            log.exception("leadership change callback failed")


def _grpc_code(exc: BaseException) -> str | None:
    for candidate in (exc, exc.__cause__, exc.__context__):
        code = getattr(candidate, "code", None)
        if callable(code):
            try:
                return code().name
            except Exception:  # noqa: BLE001
                continue
    return None


def _is_connection_error(exc: BaseException) -> bool:
    name = type(exc).__name__
    if name in ("ConnectionFailedError", "ConnectionTimeoutError"):
        return True
    if isinstance(exc, ValueError) and "closed channel" in str(exc).lower():
        return True
    return _grpc_code(exc) in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN",
                               "INTERNAL")


def _is_not_found(exc: BaseException) -> bool:
    return _grpc_code(exc) == "NOT_FOUND" or "lease not found" in _describe(exc)


def _close_quietly(client) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001
        pass


def create(cfg, *, info: dict[str, Any] | None = None,
           on_change: OnChange | None = None) -> Leadership:
    """`SingleNode` when `[etcd] endpoints` is empty, else an `EtcdLeadership` (not started)."""
    endpoints = cfg.get("etcd", "endpoints")
    if not endpoints:
        return SingleNode(cfg.node_id, info=info, on_change=on_change)
    etcd = {key: cfg.get("etcd", key)
            for key in ("user", "password_file", "tls_ca", "tls_cert", "tls_key")}
    return EtcdLeadership(endpoints, cluster=cfg.get("dtsd", "cluster"), node_id=cfg.node_id,
                          ttl=cfg.get("etcd", "lease_ttl"), info=info, on_change=on_change,
                          **etcd)
