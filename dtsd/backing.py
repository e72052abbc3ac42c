"""Whether this process reaches its backing stores (PostgreSQL, Redis, etcd), said once.

A store that goes away makes every loop of a child fail at once, and each loop retries
within a second: logging each failure filled the journal twice a second per loop and
process. Instead, every failure to use a store goes to the process's one `StoreHealth`
(`health`), which logs one WARNING when the store becomes unreachable, a reminder at most
once a minute while it stays so (with the count of failed attempts), and one INFO line when
it answers again ("redis reachable again after 41 s, 23 attempts failed").

Its listeners hear each change as it happens: a child tells the master
(`store redis down <unix time>`, `store redis up`; see dtsd/child.py), whose systemd status
line and node record (`dtsctl status`) then name the store, and an API server turns its
gRPC health NOT_SERVING while PostgreSQL or Redis is down. While a store is down, a probe
thread tries it once a second, so its return is seen even by a process that stopped using
it (an idle server probes its stores all the time, for its health).

Every failure is counted in `dtsd_store_errors_total{store}` (dtsd/metrics.py), whose
label values are the store names here. This module imports no client library at load
time: the master, which holds none, reads the store names from here.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from . import metrics

log = logging.getLogger("dtsd.stores")

REMIND_EVERY = 60.0     # seconds between reminders while a store stays unreachable
PROBE_EVERY = 1.0       # seconds between probes of a store that is down
PROBE_TIMEOUT = 2.0     # how long a probe may wait for a PostgreSQL connection
# PostgreSQL's SQLSTATEs that say the server is away rather than that a statement failed:
# class 08 (connection exception), and 57P01-57P03 (shut down, crashed, not accepting yet).
_PG_AWAY = ("08", "57P01", "57P02", "57P03")


class BackingStore(str, enum.Enum):
    """A store a dtsd process depends on; the value is its name in logs and reports."""

    POSTGRES = "postgres"
    REDIS = "redis"
    ETCD = "etcd"

    @property
    def label(self) -> str:
        """The store's own spelling, for messages to people ("PostgreSQL")."""
        return {"postgres": "PostgreSQL", "redis": "Redis", "etcd": "etcd"}[self.value]


def store_of(exc: BaseException) -> BackingStore | None:
    """The store whose absence `exc` reports, or None for any other error (a bug, a
    refused statement, a serialization failure: nothing that says the store is away)."""
    import psycopg
    import psycopg_pool
    import redis
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return BackingStore.POSTGRES
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate or ""
        if not state or state.startswith(_PG_AWAY):
            return BackingStore.POSTGRES
        return None
    if isinstance(exc, psycopg.InterfaceError):        # "the connection is closed"
        return BackingStore.POSTGRES
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return BackingStore.REDIS
    return None


def _only_waited(error: BaseException | str) -> bool:
    """A pool's timeout says only that no connection came, not why: not worth keeping
    over the error that made the store unreachable."""
    if isinstance(error, str):
        return False
    import psycopg_pool
    return isinstance(error, psycopg_pool.PoolTimeout)


def describe(exc: BaseException) -> str:
    """One line about `exc`: libpq's messages run over several lines."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


@dataclass
class Outage:
    """A store that is unreachable from this process since `since` (unix time)."""

    since: float
    started: float          # time.monotonic() of the first failure
    failures: int
    error: str
    reminded: float         # time.monotonic() of the last line logged about it


Listener = Callable[[BackingStore, "Outage | None"], None]


class StoreHealth:
    """Each store's state in this process (reachable, or down since when, with a count of
    failed attempts), shared by all its threads.

    `failure` and `success` may be called from any thread, as often as the store is used:
    they log and tell the listeners only when the state changes (and `failure` reminds at
    most every `remind_every` seconds). `success` costs nothing while the store is up.
    """

    def __init__(self, logger: logging.Logger = log, remind_every: float = REMIND_EVERY,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.log = logger
        self.remind_every = remind_every
        self.clock = clock
        self.wall = wall
        self._lock = threading.Lock()
        self._down: dict[BackingStore, Outage] = {}
        self._listeners: list[Listener] = []
        self._probes: dict[BackingStore, Callable[[], object]] = {}

    # --- what the loops report ------------------------------------------------------------

    def failure(self, store: BackingStore, error: BaseException | str) -> None:
        """One failed attempt to use `store`. Every store error of the process passes here
        once, and is counted here (dtsd_store_errors_total)."""
        metrics.STORE_ERRORS.labels(store.value).inc()
        text = error if isinstance(error, str) else describe(error)
        now = self.clock()
        with self._lock:
            outage = self._down.get(store)
            if outage is None:
                outage = self._down[store] = Outage(since=self.wall(), started=now,
                                                    failures=1, error=text, reminded=now)
                self.log.warning("%s unreachable: %s", store.value, text)
                self._tell(store, outage)
                return
            outage.failures += 1
            if not _only_waited(error):     # keep the error that says why
                outage.error = text
            if now - outage.reminded >= self.remind_every:
                outage.reminded = now
                self.log.warning("%s still unreachable after %.0f s, %d attempts failed: %s",
                                 store.value, now - outage.started, outage.failures, text)

    def success(self, store: BackingStore) -> None:
        """`store` answered. Free while it was not down (no lock taken)."""
        if store not in self._down:
            return
        with self._lock:
            outage = self._down.pop(store, None)
            if outage is None:
                return
            self.log.info("%s reachable again after %.0f s, %d attempt%s failed", store.value,
                          self.clock() - outage.started, outage.failures,
                          "" if outage.failures == 1 else "s")
            self._tell(store, None)

    def note(self, exc: BaseException) -> BackingStore | None:
        """Count `exc` as a failure of the store it reports, if any; returns that store.
        The caller logs what returned None (not a store's absence) as before."""
        store = store_of(exc)
        if store is not None:
            self.failure(store, exc)
        return store

    # --- what the others read -------------------------------------------------------------

    def is_down(self, store: BackingStore) -> bool:
        return store in self._down

    def down(self) -> dict[BackingStore, Outage]:
        """The stores down right now, each with a copy of its outage."""
        with self._lock:
            return {store: Outage(**vars(outage)) for store, outage in self._down.items()}

    def listen(self, listener: Listener) -> None:
        """Call `listener(store, outage)` at each change (`outage` None: reachable again),
        in order, under the tracker's lock: it must be quick and must not call back."""
        with self._lock:
            self._listeners.append(listener)

    def _tell(self, store: BackingStore, outage: Outage | None) -> None:
        for listener in self._listeners:
            try:
                listener(store, outage)
            except Exception:  # noqa: BLE001 - a listener's bug must not break the loops
                self.log.exception("store state listener failed")

    # --- probes ---------------------------------------------------------------------------

    def probe_with(self, store: BackingStore, check: Callable[[], object]) -> None:
        """How to try `store` (a PING, a `SELECT 1`): raises when it is unreachable."""
        with self._lock:
            self._probes[store] = check

    def probe(self, always: bool = False) -> None:
        """Try each store that is down (every store with `always`), once."""
        with self._lock:
            probes = list(self._probes.items())
        for store, check in probes:
            if not always and store not in self._down:
                continue
            try:
                check()
            except Exception as exc:  # noqa: BLE001 - whatever it is, the store failed
                self.failure(store, exc)
            else:
                self.success(store)

    def start_probing(self, stop: threading.Event, always: bool = False,
                      every: float = PROBE_EVERY) -> threading.Thread:
        """A daemon thread probing (see `probe`) every `every` seconds until `stop`."""
        def loop() -> None:
            while not stop.wait(every):
                self.probe(always)
        thread = threading.Thread(target=loop, name="store-probe", daemon=True)
        thread.start()
        return thread


#: The process's tracker: every child's loops report to it (dtsd/child.py wires it to the
#: master's pipe at boot).
health = StoreHealth()


def probe_postgres(store) -> Callable[[], object]:
    """A probe of a dtsd.store.Store's pool: a connection within PROBE_TIMEOUT, SELECT 1
    answered within PROBE_TIMEOUT (or the connection is cut)."""
    def check() -> None:
        with store.connection(timeout=PROBE_TIMEOUT, limit=PROBE_TIMEOUT) as conn:
            conn.execute("SELECT 1")
    return check


def probe_redis(client) -> Callable[[], object]:
    """A probe of a redis-py client: PING."""
    return client.ping
