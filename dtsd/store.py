"""PostgreSQL: the record of every job and attempt. All of dtsd's SQL lives here.

Every state change is one statement (or one transaction) whose WHERE clause says what
must still hold: a claim only takes a PENDING job (`AND status = 'PENDING'`), and a
result only lands on the attempt it belongs to (`AND attempts = %(attempt)s AND status =
'RUNNING'`). So an id delivered twice never runs twice at once, and a stale worker cannot
overwrite a newer attempt or a cancellation.

Hot paths take lists: one statement claims a worker's whole batch (`unnest` of an array
rather than `= ANY`), one statement writes a batch of results or inserts a batch of jobs
(rows passed as one JSON parameter, see `_records`).
Connections run in autocommit: a single-statement write is its own transaction, which
saves the BEGIN and COMMIT round trips; `conn.transaction()` wraps the few writes that
need several statements to be atomic.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from contextlib import contextmanager
from importlib import resources
from typing import Any, Callable, Iterable, Iterator, Sequence

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from .models import FINAL_STATES, EndReason, JobStatus, NewJob, Requirement, SelectorOp

log = logging.getLogger(__name__)


def _wait_without_select() -> None:
    """Make psycopg wait for its sockets with epoll, not select().

    psycopg 3.1.8 and older (Debian 12 ships 3.1.7) wait with select() on Linux, which
    raises "filedescriptor out of range in select()" for a descriptor past 1023. A server
    child holding a thousand client connections gets such descriptors for the PostgreSQL
    connections it opens next, and every query on them failed. psycopg 3.1.9 switched to
    epoll (psycopg#532); this does the same on the older releases, and nothing on newer
    ones or when PSYCOPG_WAIT_FUNC chooses.
    """
    from psycopg import waiting
    if ("PSYCOPG_WAIT_FUNC" not in os.environ and hasattr(select, "epoll")
            and getattr(waiting, "wait", None) is getattr(waiting, "wait_select", False)
            and hasattr(waiting, "wait_epoll")):
        waiting.wait = waiting.wait_epoll


_wait_without_select()

CONNECT_TIMEOUT = 3     # seconds, for each new connection (libpq's connect_timeout)
# Milliseconds the kernel lets sent data go unacknowledged before it drops the connection
# (libpq's tcp_user_timeout): a PostgreSQL host gone without a reset is noticed then,
# not after TCP's fifteen minutes of retransmissions. Keepalives cover idle connections.
TCP_USER_TIMEOUT_MS = 10_000
# Seconds one use of a connection may wait for PostgreSQL before it is cut (see _Cutter):
# an API server answers UNAVAILABLE well within a client's 10 s deadline, a worker's
# heartbeat fails before its lease is in doubt. The leader's steps get longer.
ANSWER_WITHIN = 5.0
LEADER_ANSWER_WITHIN = 10.0


class _Cutter:
    """Cuts a connection that a PostgreSQL call has held past its limit.

    Nothing at the TCP level notices a link that stalls while both kernels still
    acknowledge (a stuck proxy, pgbouncer or NAT box), and psycopg has no deadline of its
    own for a statement: the call would wait for ever, holding a server's thread past its
    client's deadline, or a worker's heartbeat. One thread per process watches the
    connections in use; one held past its limit gets its socket shut down, so the call
    fails at once with a connection error (PostgreSQL unreachable) and the pool drops the
    connection. The limits sit far above any statement dtsd runs (milliseconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, tuple[float, float, psycopg.Connection]] = {}
        self._next = 0
        self._thread: threading.Thread | None = None

    def arm(self, conn: psycopg.Connection, limit: float) -> int:
        with self._lock:
            self._next += 1
            self._held[self._next] = (time.monotonic() + limit, limit, conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="pg-cutter",
                                                daemon=True)
                self._thread.start()
            return self._next

    def disarm(self, ticket: int) -> None:
        with self._lock:
            self._held.pop(ticket, None)

    def _watch(self) -> None:
        while True:
            time.sleep(0.2)
            now = time.monotonic()
            with self._lock:     # cut under the lock: a disarmed connection is never cut
                for ticket, (deadline, limit, conn) in list(self._held.items()):
                    if now >= deadline:
                        del self._held[ticket]
                        self._cut(conn, limit)

    @staticmethod
    def _cut(conn: psycopg.Connection, limit: float) -> None:
        try:
            fd = conn.pgconn.socket
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except (OSError, psycopg.Error):
            return          # closed meanwhile
        log.warning("PostgreSQL did not answer within %.0fs: connection cut", limit)


_cutter = _Cutter()

MIGRATION_LOCK = 0x64747364  # "dtsd": the advisory lock every migrating process takes

# Columns returned for a job; output only where asked (lists never carry it).
_JOB_COLUMNS = """id, name, command, env, cwd, queue, priority, max_retries, timeout, run_at,
    idempotency_key, schedule_id, fire_time, submitted_by, owner, status, attempts, failures,
    worker, exit_code, output_truncated, error, dead_lettered_at, created_at, updated_at,
    started_at, finished_at, limits, notify, notify_on, labels"""

_FINAL = tuple(s.value for s in FINAL_STATES)
OUTPUT_TAIL = 4096      # bytes of a job's output a webhook carries: its last ones

# job_counts' key for the dead-lettered count (the others are statuses): 0006_scale.sql.
DEAD_LETTERED_KEY = "dead_lettered"
ACTIVITY_KEPT = 2 * 3600       # seconds of per-minute activity kept (JobActivity)

# The leader's prune: finished jobs older than the retention (bench/scale.py explains it).
PRUNE_SELECT = """SELECT id FROM jobs WHERE status IN ('SUCCEEDED', 'FAILED', 'CANCELLED')
                    AND finished_at < now() - make_interval(secs => %(older_than)s)
                    AND dead_lettered_at IS NULL
                  LIMIT %(limit)s"""


class StoreError(Exception):
    """Base of the errors the API maps to status codes."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    """The request contradicts what is stored (ALREADY_EXISTS)."""


class Precondition(StoreError):
    """The job is not in a state that allows this (FAILED_PRECONDITION)."""


class Forbidden(StoreError):
    """The job belongs to another principal, and the caller may act on its own only
    (PERMISSION_DENIED)."""


class Deposed(StoreError):
    """A newer leader holds the fence: this node's leader-only write was refused."""


@dataclass(frozen=True)
class Fence:
    """Who writes as leader: the cluster, the leader's fencing token and its node id."""

    cluster: str
    token: int
    holder: str

    def __post_init__(self) -> None:
        if not isinstance(self.token, int):
            raise Deposed(f"{self.holder} holds no fencing token: it does not lead")


@dataclass
class FirePlan:
    """What a schedule's due slots come to, decided by the leader (see coordinator)."""

    jobs: list[NewJob]
    cancel: list[str]
    last_fire_time: datetime | None
    next_fire_time: datetime | None


@dataclass
class Fired:
    """The outcome of firing one schedule, for the caller to push and publish."""

    schedule: str
    jobs: list[NewJob]
    cancelled: list[tuple[str, str, int]]   # (job id, previous status, attempt)


@dataclass
class Claimed:
    """A job a worker now owns: attempt `attempt` of it is RUNNING under that worker."""

    id: str
    command: str
    env: dict[str, str]
    cwd: str
    timeout: float
    attempt: int
    failures: int
    max_retries: int
    queue: str
    priority: int
    limits: dict[str, int]
    name: str
    waited: float = 0.0          # seconds from when it could run (created, run_at) to now
    notified: bool = False       # names webhook targets: its end may fill the outbox


@dataclass
class Outcome:
    """What became of one attempt, decided by the worker, written by `finish`."""

    job_id: str
    attempt: int
    status: JobStatus            # PENDING (retry or hand-back), SUCCEEDED or FAILED
    exit_code: int | None
    output: bytes
    truncated: bool
    error: str
    failed: bool                 # counts against max_retries
    run_at: datetime | None = None
    dead: bool = False
    queue: str = ""
    priority: int = 0
    name: str = ""               # name and duration are for the log, not stored
    duration: float = 0.0
    notified: bool = False       # the job names webhook targets (Claimed.notified)


@dataclass
class Lost:
    """A job whose attempt died with its worker: PENDING again for a retry, or FAILED and
    dead-lettered (`dead`) when that was its last retry."""

    id: str
    name: str
    queue: str
    priority: int
    attempt: int
    failures: int                # counting the lost attempt
    max_retries: int
    run_at: datetime | None
    dead: bool


@dataclass
class Requeued:
    """A job put back to PENDING, for the caller to push to Redis."""

    id: str
    queue: str
    priority: int
    run_at: datetime | None


def _records(rows: list[dict[str, Any]]) -> str:
    """Rows for `jsonb_to_recordset`: one text parameter in place of an array per column.

    Debian 12's psycopg adapts parameters in pure Python, a typed array per column costing
    far more than the whole statement's planning (bench/results/profile-2026-12-03.md:
    19 % of a worker's CPU); json.dumps is C. PostgreSQL reads each value with its
    column type's own input function: ISO timestamps, `\\x`-hex bytea, nested jsonb."""
    return json.dumps(rows, ensure_ascii=False, separators=(",", ":"))


def _instant(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


_INSERT_JOBS = """INSERT INTO jobs (id, name, command, env, cwd, queue, priority, max_retries,
                      timeout, run_at, idempotency_key, fingerprint, submitted_by, owner,
                      schedule_id, fire_time, limits, notify, notify_on, labels)
                  SELECT * FROM jsonb_to_recordset(%s::jsonb) AS u(id text, name text,
                      command text, env jsonb, cwd text, queue text, priority smallint,
                      max_retries int, timeout float8, run_at timestamptz,
                      idempotency_key text, fingerprint text, submitted_by text, owner text,
                      schedule_id bigint, fire_time timestamptz, limits jsonb,
                      notify text[], notify_on text[], labels jsonb)
                  {conflict}
                  RETURNING id"""


def _job_records(jobs: Sequence[NewJob]) -> str:
    return _records([{
        "id": j.id, "name": j.name, "command": j.command, "env": j.env, "cwd": j.cwd,
        "queue": j.queue, "priority": j.priority, "max_retries": j.max_retries,
        "timeout": j.timeout, "run_at": _instant(j.run_at),
        "idempotency_key": j.idempotency_key, "fingerprint": j.fingerprint(),
        "submitted_by": j.submitted_by, "owner": j.owner, "schedule_id": j.schedule_id,
        "fire_time": _instant(j.fire_time), "limits": j.limits,
        "notify": list(j.notify), "notify_on": list(j.notify_on),
        "labels": j.labels or None} for j in jobs])   # NULL: no entry in jobs_labels (0011)


# The notifications a final state asks for (docs/notifications.md): one outbox
# row per target of a job that ended FAILED and dead-lettered, or SUCCEEDED, when it asks
# for that event. Read from a data-modifying CTE's RETURNING (`ended`), in the transaction
# that records the state; a job without targets costs a look at an empty array.
_NOTIFY_ENDED = """notified AS (
                       INSERT INTO notifications (job_id, target, event)
                       SELECT e.id, t.target, e.event
                       FROM (SELECT id, notify,
                                    CASE WHEN status = 'SUCCEEDED' THEN 'succeeded'
                                         WHEN status = 'FAILED' AND dead THEN 'failed'
                                    END AS event, notify_on
                             FROM ended WHERE cardinality(notify) > 0) e,
                            unnest(e.notify) AS t(target)
                       WHERE e.event = ANY(e.notify_on))"""
# How `finish` ends: with the outbox when a job of the batch names targets, else without it.
_ENDED = """    RETURNING j.id)
                   SELECT id FROM ended"""
_ENDED_NOTIFIED = """    RETURNING j.id, j.status, u.dead, j.notify, j.notify_on),
                   """ + _NOTIFY_ENDED + """
                   SELECT id FROM ended"""


# The claim: PENDING -> RUNNING for the ids `{ids}` yields (a FROM item `u(id)`), opening an
# attempt for each; only while the worker's lease holds. `{limited}`: the plain claim takes
# no job of a queue with a max_running (_NOT_LIMITED: a look-up in a table of a few rows),
# so a limit holds even when Redis's mirror of the limits lags; those go to claim_limited.
_CLAIM = """WITH claimed AS (
                UPDATE jobs j SET status = 'RUNNING', attempts = j.attempts + 1,
                       worker = %(worker)s, started_at = now(), updated_at = now(),
                       finished_at = NULL, error = ''
                FROM {ids}
                WHERE j.id = u.id AND j.status = 'PENDING'
                  AND (j.run_at IS NULL OR j.run_at <= now())
                  AND EXISTS (SELECT 1 FROM workers w WHERE w.id = %(worker)s
                              AND w.lease_until > now())
                  {limited}
                RETURNING j.id, j.command, j.env, j.cwd, j.timeout, j.attempts,
                          j.failures, j.max_retries, j.queue, j.priority, j.limits,
                          j.name,
                          extract(epoch FROM now() - greatest(j.created_at, j.run_at))
                              ::float8 AS waited,
                          cardinality(j.notify) > 0 AS notified),
            opened AS (
                INSERT INTO job_attempts (job_id, attempt, worker)
                SELECT id, attempts, %(worker)s FROM claimed)
            SELECT * FROM claimed"""


_NOT_LIMITED = "AND NOT EXISTS (SELECT 1 FROM queue_limits l WHERE l.queue = j.queue)"


def _check_owner(job_id: str, actual: str, wanted: str | None, doing: str) -> None:
    if wanted is not None and actual != wanted:
        raise Forbidden(f"job {job_id} belongs to {actual or 'nobody'}, not to {wanted}: "
                        f"{doing} another's job needs role admin")


def selector_clauses(requirements: Sequence[Requirement]) -> tuple[list[str], list[Any]]:
    """SQL conditions (and their parameters) for a label selector.

    `k=v` and `k in (...)` are containment tests (`labels @> '{"k":"v"}'`), which the GIN
    index jobs_labels (0011) serves; being strict, they also let the planner use that
    partial index (WHERE labels IS NOT NULL). The negations hold for unlabelled jobs
    (labels NULL), as Kubernetes' do for objects without the key."""
    clauses: list[str] = []
    params: list[Any] = []
    for req in requirements:
        if req.op is SelectorOp.EQUALS:
            clauses.append("labels @> %s::jsonb")
            params.append(json.dumps({req.key: req.values[0]}))
        elif req.op is SelectorOp.IN:
            clauses.append("(" + " OR ".join(["labels @> %s::jsonb"] * len(req.values)) + ")")
            params.extend(json.dumps({req.key: value}) for value in req.values)
        elif req.op is SelectorOp.NOT_EQUALS:
            clauses.append("NOT coalesce(labels @> %s::jsonb, false)")
            params.append(json.dumps({req.key: req.values[0]}))
        elif req.op is SelectorOp.NOT_IN:
            clauses.append("NOT coalesce(labels ->> %s = ANY(%s), false)")
            params.extend([req.key, list(req.values)])
        elif req.op is SelectorOp.EXISTS:
            clauses.append("labels ? %s")
            params.append(req.key)
        else:
            clauses.append("NOT coalesce(labels ? %s, false)")
            params.append(req.key)
    return clauses, params


@dataclass
class Selection:
    """Which jobs a listing or a bulk action takes (every given condition holds)."""

    selector: Sequence[Requirement] = ()
    statuses: Sequence[JobStatus] = ()
    queue: str = ""
    name: str = ""
    created_after: datetime | None = None
    created_before: datetime | None = None
    dead_lettered: bool = False
    schedule_id: int | None = None

    def clauses(self) -> tuple[list[str], list[Any]]:
        """The conditions other than the statuses, and their parameters."""
        clauses, params = [], []
        if self.queue:
            clauses.append("queue = %s")
            params.append(self.queue)
        if self.name:
            clauses.append("name = %s")
            params.append(self.name)
        if self.created_after:
            clauses.append("created_at >= %s")
            params.append(self.created_after)
        if self.created_before:
            clauses.append("created_at < %s")
            params.append(self.created_before)
        if self.dead_lettered:
            clauses.append("dead_lettered_at IS NOT NULL")
        if self.schedule_id is not None:
            clauses.append("schedule_id = %s")
            params.append(self.schedule_id)
        more, more_params = selector_clauses(self.selector)
        return clauses + more, params + more_params


@dataclass
class Cancelled:
    """A job a bulk cancel ended, for the caller to kill, forget in Redis and announce."""

    id: str
    previous: JobStatus
    attempt: int
    queue: str
    priority: int


BULK_BATCH = 500       # jobs per transaction of a bulk cancel or retry


def encode_page_token(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[datetime, str]:
    """Raises ValueError on a token this module did not make."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created, job_id = json.loads(raw)
        return datetime.fromisoformat(created), str(job_id)
    except Exception:
        raise ValueError("malformed page token") from None


class Store:
    """A pool of connections and the statements dtsd runs on them."""

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 8,
                 name: str = "dtsd", timeout: float = 10.0, hold_limit: float | None = None,
                 custom_plans: bool = False, answer_within: float | None = None):
        """`hold_limit` (seconds) bounds how long a session may sit in an open transaction
        or wait for a lock. The leader sets it below its lease window: a leader cut off in
        the middle of a fenced transaction would otherwise keep the fence row locked (and
        so every later leader's loops blocked) until TCP gives up, which takes hours.

        `custom_plans` plans every execution of a prepared statement for its parameters.
        The worker's claim and finish need it: psycopg prepares a statement on its fifth
        run and PostgreSQL then settles on a generic plan, and one made while `jobs` and
        `job_attempts` were nearly empty (a fresh install, or right after a TRUNCATE)
        scans `job_attempts` whole on every result until an ANALYZE happens to replace it
        (bench/results/profile-2026-12-03.md measured 0.3-0.4 ms of PostgreSQL CPU per job).

        `answer_within` (seconds) bounds how long one use of a pooled connection may wait
        for PostgreSQL (see `_Cutter`); None for no bound (migrations may run long).
        """
        self.dsn = dsn
        self.answer_within = answer_within
        kwargs: dict[str, Any] = {"application_name": name, "autocommit": True,
                                  "keepalives": 1, "keepalives_idle": 5,
                                  "keepalives_interval": 2, "keepalives_count": 3,
                                  "tcp_user_timeout": TCP_USER_TIMEOUT_MS}
        # A PostgreSQL that does not answer (a host gone, a blackholed route) must not hold
        # a connection attempt for the kernel's minutes: CONNECT_TIMEOUT, unless the DSN
        # sets its own.
        try:
            given = psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError:
            given = {}
        if "connect_timeout" not in given:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT
        options = []
        if hold_limit is not None:
            ms = max(100, int(hold_limit * 1000))
            options += [f"-c idle_in_transaction_session_timeout={ms}", f"-c lock_timeout={ms}"]
        if custom_plans:
            options.append("-c plan_cache_mode=force_custom_plan")
        if options:
            kwargs["options"] = " ".join(options)
        self.pool = ConnectionPool(
            dsn, min_size=min_size, max_size=max_size, timeout=timeout, open=False,
            kwargs=kwargs, name=name)

    def open(self, wait: bool = True, timeout: float = 30.0) -> "Store":
        self.pool.open(wait=wait, timeout=timeout)
        return self

    def close(self, timeout: float = 5.0) -> None:
        self.pool.close(timeout=timeout)

    @contextmanager
    def connection(self, timeout: float | None = None,
                   limit: float | None = None) -> Iterator[psycopg.Connection]:
        """A pooled connection (waiting at most `timeout` for one), cut if this use holds
        it past `limit` seconds (default: the store's `answer_within`)."""
        limit = self.answer_within if limit is None else limit
        with self.pool.connection(timeout=timeout) as conn:
            ticket = _cutter.arm(conn, limit) if limit else None
            try:
                yield conn
            finally:
                if ticket is not None:
                    _cutter.disarm(ticket)


    # --- schema ---------------------------------------------------------------------------

    @staticmethod
    def migrations() -> list[tuple[int, str, str]]:
        """(number, file name, SQL) of every shipped migration, in order."""
        found = []
        for entry in resources.files("dtsd.migrations").iterdir():
            if entry.name.endswith(".sql"):
                found.append((int(entry.name.split("_", 1)[0]), entry.name, entry.read_text()))
        return sorted(found)

    def migrate(self) -> list[str]:
        """Apply the migrations not yet applied, under an advisory lock; returns their names."""
        applied_now = []
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            try:
                conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                    version integer PRIMARY KEY, name text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())""")
                done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
                for number, name, sql in self.migrations():
                    if number in done:
                        continue
                    with conn.transaction():
                        conn.execute(sql)
                        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                                     (number, name))
                    log.info("applied migration %s", name)
                    applied_now.append(name)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        return applied_now


    # --- submit ---------------------------------------------------------------------------

    def insert_jobs(self, jobs: Sequence[NewJob]) -> list[bool]:
        """All of `jobs` in one transaction: every one is stored, or none is.

        Without idempotency keys that transaction is the INSERT alone, in autocommit (one
        round trip, where BEGIN and COMMIT would add two): a duplicate id fails the whole
        statement, and the conflict is then explained the long way, storing nothing.
        """
        rows = _job_records(jobs)
        if not any(job.idempotency_key for job in jobs):
            try:
                with self.connection() as conn:
                    conn.execute(_INSERT_JOBS.format(conflict=""), (rows,))
                return [True] * len(jobs)
            except psycopg.errors.UniqueViolation:
                pass
        with self.connection() as conn, conn.transaction(), conn.cursor() as cur:
            return self._insert_jobs(cur, jobs, rows)

    def _insert_jobs(self, cur: psycopg.Cursor, jobs: Sequence[NewJob],
                     rows: str | None = None) -> list[bool]:
        """Insert all of `jobs` (the caller's transaction); returns per job whether it was created.

        An idempotency key its owner used before with the same spec is not an error: that
        job's id is written back into the NewJob and `created` is False. The same key with a
        different spec, or a caller-chosen id that exists, raises Conflict and stores nothing.
        Keys are per owner: another owner's key never finds (nor reveals) its job.
        """
        cur.execute(_INSERT_JOBS.format(conflict="ON CONFLICT DO NOTHING"),
                    (rows if rows is not None else _job_records(jobs),))
        inserted = {row[0] for row in cur.fetchall()}
        created = []
        for index, job in enumerate(jobs):
            if job.id in inserted:
                inserted.discard(job.id)  # a repeated id inside the batch is a conflict
                created.append(True)
                continue
            created.append(False)
            self._explain_conflict(cur, job, index, len(jobs))
        return created

    @staticmethod
    def _explain_conflict(cur: psycopg.Cursor, job: NewJob, index: int, count: int) -> None:
        where = f"jobs[{index}]." if count > 1 else ""
        if job.idempotency_key:
            cur.execute("SELECT id, fingerprint FROM jobs WHERE owner = %s AND idempotency_key = %s",
                        (job.owner, job.idempotency_key))
            row = cur.fetchone()
            if row and row[1] == job.fingerprint():
                job.id = row[0]
                return
            if row:
                raise Conflict(f"{where}idempotency_key {job.idempotency_key!r} was used for job "
                               f"{row[0]} with a different spec")
        raise Conflict(f"{where}id: job {job.id} already exists")

    # --- the worker's path ----------------------------------------------------------------

    def claim(self, ids: Sequence[str], worker: str) -> list[Claimed]:
        """Compare-and-set PENDING -> RUNNING for every due id, opening an attempt for each.

        Ids that are not PENDING (done, cancelled, running elsewhere) or not yet due are
        left alone and simply absent from the result, and so is everything while the
        worker's lease has run out (the leader may be recovering its work).
        """
        if not ids:
            return []
        with self.connection() as conn:
            rows = conn.execute(_CLAIM.format(ids="unnest(%(ids)s::text[]) AS u(id)",
                                              limited=_NOT_LIMITED),
                                {"ids": list(ids), "worker": worker}).fetchall()
        return [Claimed(*row) for row in rows]

    def limited(self, ids: Sequence[str]) -> dict[str, list[str]]:
        """Of `ids` that `claim` left, those due and PENDING in a queue with a max_running,
        by queue: Redis did not route them to `claim_limited` (its mirror of the limits
        lags PostgreSQL's), so the caller does now."""
        if not ids:
            return {}
        found: dict[str, list[str]] = {}
        with self.connection() as conn:
            for job_id, queue in conn.execute(
                    """SELECT j.id, j.queue FROM unnest(%s::text[]) WITH ORDINALITY AS x(id, n)
                       JOIN jobs j ON j.id = x.id
                       WHERE j.status = 'PENDING' AND (j.run_at IS NULL OR j.run_at <= now())
                         AND j.queue IN (SELECT queue FROM queue_limits)
                       ORDER BY x.n""", (list(ids),)):
                found.setdefault(queue, []).append(job_id)
        return found

    def claim_limited(self, ids: Sequence[str], queue: str,
                      worker: str) -> tuple[list[Claimed], list[str]]:
        """`claim` for ids of a queue with a max_running: (claimed, ids it had no room for).

        One transaction locks the queue's queue_limits row (so claims of the queue,
        wherever they run, take turns), counts its RUNNING jobs and claims, in the given
        order, only as many of the claimable ids as fit. The ids left over that are still
        claimable are the caller's to give back to Redis; the rest (done, cancelled) it
        lets go, as after `claim`. A queue without a limit (lifted meanwhile) claims all."""
        if not ids:
            return [], []
        with self.connection() as conn, conn.transaction():
            row = conn.execute("SELECT max_running FROM queue_limits WHERE queue = %s "
                               "FOR UPDATE", (queue,)).fetchone()
            room = len(ids)
            if row is not None:
                running = conn.execute("SELECT count(*) FROM jobs WHERE queue = %s "
                                       "AND status = 'RUNNING'", (queue,)).fetchone()[0]
                room = max(0, row[0] - running)
            rows = conn.execute(_CLAIM.format(ids="""(
                SELECT c.id FROM unnest(%(ids)s::text[]) WITH ORDINALITY AS x(id, n)
                JOIN jobs c ON c.id = x.id
                WHERE c.status = 'PENDING' AND (c.run_at IS NULL OR c.run_at <= now())
                ORDER BY x.n LIMIT %(room)s) AS u(id)""", limited=""),
                {"ids": list(ids), "worker": worker, "room": room}).fetchall() if room else []
            claimed = [Claimed(*r) for r in rows]
            mine = {job.id for job in claimed}
            left = [job_id for job_id in ids if job_id not in mine]
            waiting = {r[0] for r in conn.execute(
                """SELECT id FROM jobs WHERE id = ANY(%s) AND status = 'PENDING'
                   AND (run_at IS NULL OR run_at <= now())""", (left,))} if left else set()
        return claimed, [job_id for job_id in left if job_id in waiting]

    def claimed_by(self, ids: Sequence[str], worker: str) -> list[Claimed]:
        """Those of `ids` that `worker` holds RUNNING with their attempt still open, as
        `claim` returned them: what a claim committed when its answer was lost."""
        with self.connection() as conn:
            rows = conn.execute(
                """SELECT j.id, j.command, j.env, j.cwd, j.timeout, j.attempts, j.failures,
                          j.max_retries, j.queue, j.priority, j.limits, j.name,
                          extract(epoch FROM now() - greatest(j.created_at, j.run_at))
                              ::float8 AS waited,
                          cardinality(j.notify) > 0 AS notified
                   FROM jobs j JOIN job_attempts a ON a.job_id = j.id AND a.attempt = j.attempts
                   WHERE j.id = ANY(%(ids)s) AND j.status = 'RUNNING' AND j.worker = %(worker)s
                     AND a.worker = %(worker)s AND a.finished_at IS NULL""",
                {"ids": list(ids), "worker": worker}).fetchall()
        return [Claimed(*row) for row in rows]

    def finish(self, outcomes: Sequence[Outcome]) -> set[str]:
        """Record a batch of finished attempts; returns the ids whose job row changed.

        The attempt row is always closed. The job row changes only if it is still RUNNING
        that very attempt; a job cancelled meanwhile keeps its CANCELLED (and its error) but
        takes the output of the attempt the cancel ended, as a job killed by its timeout
        keeps what it wrote (such a job is not among the ids returned: its row's state
        did not change here).

        A job that ends FAILED and dead-lettered, or SUCCEEDED, and asks for that event
        (jobs.notify_on) gets a row in `notifications` per target, in the same statement;
        a batch in which no job names a target (`Claimed.notified`) runs without that part.

        The LIMIT (the batch's own size) tells the planner how many rows the JSON holds: it
        guesses 100 for any set-returning function, and for that many it would hash-join a
        sequential scan of all `job_attempts` (the worker's connections plan every run for
        its parameters: `custom_plans`).
        """
        if not outcomes:
            return set()
        o = outcomes
        # The outbox's part only when a job of the batch names targets: most name none,
        # and the worker's connections plan the whole statement at every run.
        ended = _ENDED_NOTIFIED if any(x.notified for x in o) else _ENDED
        with self.connection() as conn:
            rows = conn.execute(
                """WITH u AS (
                       SELECT * FROM jsonb_to_recordset(%s::jsonb)
                           AS u(job_id text, attempt int, exit_code int, output bytea,
                                truncated bool, error text, status text, failed bool,
                                run_at timestamptz, dead bool)
                       LIMIT %s),
                   closed AS (
                       UPDATE job_attempts a SET finished_at = now(), exit_code = u.exit_code,
                              output = u.output, output_truncated = u.truncated, error = u.error
                       FROM u WHERE a.job_id = u.job_id AND a.attempt = u.attempt
                         AND a.finished_at IS NULL),
                   kept AS (
                       UPDATE jobs j SET output = u.output, output_truncated = u.truncated
                       FROM u WHERE j.id = u.job_id AND j.attempts = u.attempt
                         AND j.status = 'CANCELLED'),
                   ended AS (
                       UPDATE jobs j SET status = u.status, exit_code = u.exit_code,
                              output = u.output, output_truncated = u.truncated, error = u.error,
                              failures = j.failures + u.failed::int, run_at = u.run_at,
                              finished_at = CASE WHEN u.status = ANY(%s) THEN now() END,
                              dead_lettered_at = CASE WHEN u.dead THEN now() END,
                              updated_at = now()
                       FROM u
                       WHERE j.id = u.job_id AND j.attempts = u.attempt AND j.status = 'RUNNING'
                   """ + ended,
                (_records([{
                    "job_id": x.job_id, "attempt": x.attempt, "exit_code": x.exit_code,
                    "output": "\\x" + x.output.hex(), "truncated": x.truncated,
                    "error": x.error, "status": x.status.value, "failed": x.failed,
                    "run_at": _instant(x.run_at), "dead": x.dead} for x in o]), len(o),
                 list(_FINAL))).fetchall()
        return {row[0] for row in rows}

    # --- operations on one job ------------------------------------------------------------

    def get_job(self, job_id: str, *, with_output: bool = True,
                with_attempts: bool = False) -> dict[str, Any]:
        columns = _JOB_COLUMNS + (", output" if with_output else "")
        with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = cur.execute(f"SELECT {columns} FROM jobs WHERE id = %s", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id} not found")
            if with_attempts:
                row["attempt_history"] = cur.execute(
                    """SELECT attempt, worker, started_at, finished_at, exit_code, output,
                              output_truncated, error
                       FROM job_attempts WHERE job_id = %s ORDER BY attempt""",
                    (job_id,)).fetchall()
            return row

    def job_states(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Status, attempts, error and exit code of each of `ids` that exists, in one query.

        The watch hub's recheck: every WatchJob stream of a server child is covered by one
        statement every couple of seconds, not one per stream. No output is read.
        """
        if not ids:
            return {}
        with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            rows = cur.execute(
                """SELECT id, status, attempts, error, exit_code FROM jobs
                   WHERE id = ANY(%s)""", (list(ids),)).fetchall()
        return {row["id"]: row for row in rows}

    def cancel(self, job_id: str, *, owner: str | None = None) -> tuple[JobStatus, JobStatus, int]:
        """PENDING or RUNNING -> CANCELLED. Returns (previous, now, the attempt to kill).

        With `owner`, only a job of that owner (else Forbidden). Cancelling a cancelled job
        is a no-op; cancelling one that finished otherwise is a Precondition error.
        """
        with self.connection() as conn:
            row = conn.execute(
                """UPDATE jobs j SET status = 'CANCELLED', finished_at = now(), updated_at = now(),
                          error = %s, run_at = NULL
                   FROM (SELECT id, status FROM jobs WHERE id = %s FOR UPDATE) AS old
                   WHERE j.id = old.id AND old.status IN ('PENDING', 'RUNNING')
                     AND (%s::text IS NULL OR j.owner = %s)
                   RETURNING old.status, j.attempts""",
                (str(EndReason.CANCELLED), job_id, owner, owner)).fetchone()
            if row:
                return JobStatus(row[0]), JobStatus.CANCELLED, row[1]
            current = conn.execute("SELECT status, owner FROM jobs WHERE id = %s",
                                   (job_id,)).fetchone()
        if current is None:
            raise NotFound(f"job {job_id} not found")
        _check_owner(job_id, current[1], owner, "cancelling")
        status = JobStatus(current[0])
        if status is JobStatus.CANCELLED:
            return status, status, 0
        raise Precondition(f"job {job_id} already finished: {status.value}")

    def retry(self, job_id: str, *, owner: str | None = None) -> Requeued:
        """A FAILED or CANCELLED job runs again, with a fresh retry budget. With `owner`,
        only a job of that owner (else Forbidden)."""
        found = self._requeue("id = %s AND status IN ('FAILED', 'CANCELLED') "
                              "AND (%s::text IS NULL OR owner = %s)", (job_id, owner, owner))
        if found:
            return found[0]
        with self.connection() as conn:
            current = conn.execute("SELECT status, owner FROM jobs WHERE id = %s",
                                   (job_id,)).fetchone()
        if current is None:
            raise NotFound(f"job {job_id} not found")
        _check_owner(job_id, current[1], owner, "retrying")
        raise Precondition(f"job {job_id} is {current[0]}: only FAILED or CANCELLED jobs can be retried")

    def _requeue(self, where: str, params: Iterable[Any]) -> list[Requeued]:
        with self.connection() as conn:
            rows = conn.execute(
                f"""UPDATE jobs SET status = 'PENDING', failures = 0, run_at = NULL,
                           dead_lettered_at = NULL, exit_code = NULL, output = NULL,
                           output_truncated = false, error = '', finished_at = NULL,
                           updated_at = now()
                    WHERE {where}
                    RETURNING id, queue, priority, run_at""", tuple(params)).fetchall()
        return [Requeued(*row) for row in rows]

    # --- lists ----------------------------------------------------------------------------

    def list_jobs(self, *, statuses: Sequence[JobStatus] = (), queue: str = "", name: str = "",
                  created_after: datetime | None = None, created_before: datetime | None = None,
                  dead_lettered: bool = False, schedule_id: int | None = None,
                  selector: Sequence[Requirement] = (),
                  limit: int = 100, page_token: str = "") -> tuple[list[dict[str, Any]], str]:
        """Newest first, keyset-paged. Returns (rows, next page token or '').

        Each status is its own branch with `status = %s`, each read newest first from its
        index and cut at the page, then merged: PostgreSQL 15 cannot keep an index's order
        under `status = ANY(...)`, and sorted every job of those statuses for one page. No
        status filter means every status (jobs has no index without the status, as each
        costs every status change an entry: migration 0007), except for dead letters and
        a schedule's runs, which have their own partial indexes (0007, 0009).
        """
        clauses, params = Selection(
            selector=selector, queue=queue, name=name, created_after=created_after,
            created_before=created_before, dead_lettered=dead_lettered,
            schedule_id=schedule_id).clauses()
        if page_token:
            created, last_id = decode_page_token(page_token)
            clauses.append("(created_at, id) < (%s, %s)")
            params.extend([created, last_id])
        order = "ORDER BY created_at DESC, id DESC LIMIT %s"
        values = sorted({s.value for s in statuses})
        if (dead_lettered or schedule_id is not None) and not values:
            # Dead letters, a schedule's runs: newest first from their own partial index.
            sql = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {' AND '.join(clauses)} {order}"
            args = list(params)
        else:
            values = values or sorted(s.value for s in JobStatus)
            branch = (f"(SELECT {_JOB_COLUMNS} FROM jobs WHERE "
                      + " AND ".join(["status = %s", *clauses]) + f" {order})")
            sql = (f"SELECT * FROM ({' UNION ALL '.join([branch] * len(values))}) AS page "
                   f"{order}")
            args = [arg for value in values for arg in (value, *params, limit + 1)]
        with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            rows = cur.execute(sql, (*args, limit + 1)).fetchall()
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            token = encode_page_token(rows[-1]["created_at"], rows[-1]["id"])
        return rows, token

    # --- bulk actions ---------------------------------------------------------------------

    def now(self) -> datetime:
        with self.connection() as conn:
            return conn.execute("SELECT now()").fetchone()[0]

    @staticmethod
    def _bulk_where(selection: Selection, statuses: Sequence[JobStatus], owner: str | None,
                    cutoff: tuple[str, datetime] | None) -> tuple[str, list[Any]]:
        clauses, params = selection.clauses()
        clauses.insert(0, "status = ANY(%s)")
        params.insert(0, sorted(s.value for s in statuses))
        if owner is not None:
            clauses.append("owner = %s")
            params.append(owner)
        if cutoff is not None:
            clauses.append(f"{cutoff[0]} <= %s")
            params.append(cutoff[1])
        return " AND ".join(clauses), params

    def count_selected(self, selection: Selection, statuses: Sequence[JobStatus], *,
                       owner: str | None = None) -> int:
        where, params = self._bulk_where(selection, statuses, owner, None)
        with self.connection() as conn:
            return conn.execute(f"SELECT count(*) FROM jobs WHERE {where}", params).fetchone()[0]

    def any_selected(self, selection: Selection, statuses: Sequence[JobStatus], *,
                     owner: str | None = None) -> bool:
        where, params = self._bulk_where(selection, statuses, owner, None)
        with self.connection() as conn:
            return conn.execute(f"SELECT EXISTS (SELECT 1 FROM jobs WHERE {where})",
                                params).fetchone()[0]

    def cancel_batch(self, selection: Selection, statuses: Sequence[JobStatus], *,
                     owner: str | None, created_by: datetime, limit: int) -> list[Cancelled]:
        """Cancel up to `limit` jobs of the selection in one statement, oldest first.

        Only jobs created by `created_by` (the bulk action's start): what is submitted while
        it runs is not its business. A job that changed under the row lock (a worker's
        claim, its end) is judged again by its new state: still PENDING or RUNNING, it is
        cancelled; else it is left alone."""
        where, params = self._bulk_where(selection, statuses, owner, ("created_at", created_by))
        with self.connection() as conn:
            rows = conn.execute(
                f"""UPDATE jobs j SET status = 'CANCELLED', finished_at = now(),
                           updated_at = now(), error = %s, run_at = NULL
                    FROM (SELECT id, status FROM jobs WHERE {where}
                          ORDER BY created_at, id LIMIT %s FOR UPDATE) AS old
                    WHERE j.id = old.id AND old.status IN ('PENDING', 'RUNNING')
                    RETURNING j.id, old.status, j.attempts, j.queue, j.priority""",
                (str(EndReason.CANCELLED), *params, limit)).fetchall()
        return [Cancelled(r[0], JobStatus(r[1]), r[2], r[3], r[4]) for r in rows]

    def retry_batch(self, selection: Selection, statuses: Sequence[JobStatus], *,
                    owner: str | None, updated_by: datetime, limit: int) -> list[Requeued]:
        """Put up to `limit` jobs of the selection back to PENDING, as `retry` does.

        Only jobs last changed by `updated_by` (the bulk action's start): a job it retried
        that failed again meanwhile is not retried a second time."""
        where, params = self._bulk_where(selection, statuses, owner, ("updated_at", updated_by))
        return self._requeue(f"id IN (SELECT id FROM jobs WHERE {where} "
                             f"ORDER BY created_at, id LIMIT %s FOR UPDATE) "
                             f"AND status IN ('FAILED', 'CANCELLED')", [*params, limit])

    # --- the dead-letter queue ------------------------------------------------------------

    def requeue_dead(self, ids: Sequence[str] = (), *, queue: str = "") -> list[Requeued]:
        """Dead-lettered jobs (the given ones, or all of `queue`, or all) back to PENDING."""
        where, params = "dead_lettered_at IS NOT NULL AND status = 'FAILED'", []
        if ids:
            where += " AND id = ANY(%s)"
            params.append(list(ids))
        if queue:
            where += " AND queue = %s"
            params.append(queue)
        return self._requeue(where, params)

    def purge_dead(self, ids: Sequence[str] = (), *, queue: str = "") -> int:
        """Take jobs out of the dead-letter queue; their FAILED record stays."""
        where, params = "dead_lettered_at IS NOT NULL", []
        if ids:
            where += " AND id = ANY(%s)"
            params.append(list(ids))
        if queue:
            where += " AND queue = %s"
            params.append(queue)
        with self.connection() as conn:
            return conn.execute(f"UPDATE jobs SET dead_lettered_at = NULL, updated_at = now() "
                                f"WHERE {where}", params).rowcount

    # --- housekeeping (the leader's loops) ------------------------------------------------

    def pending_since(self, older_than: float, after: tuple[datetime, str] | None,
                      limit: int) -> list[tuple[str, str, int, datetime | None, datetime]]:
        """PENDING jobs untouched for `older_than` seconds, in (updated_at, id) order after
        `after`: (id, queue, priority, run_at, updated_at). The reconciler walks these."""
        params: list[Any] = [older_than]
        cursor = ""
        if after:
            cursor = "AND (updated_at, id) > (%s, %s)"
            params.extend(after)
        with self.connection() as conn:
            return conn.execute(
                f"""SELECT id, queue, priority, run_at, updated_at FROM jobs
                    WHERE status = 'PENDING' AND updated_at < now() - make_interval(secs => %s)
                    {cursor} ORDER BY updated_at, id LIMIT %s""",
                (*params, limit)).fetchall()

    def pending_count(self) -> int:
        with self.connection() as conn:
            return conn.execute("SELECT count(*) FROM jobs WHERE status = 'PENDING'").fetchone()[0]

    # --- worker leases ---------------------------------------------------------------------

    def register_worker(self, worker: str, node: str, ttl: float) -> None:
        """Open (or renew) `worker`'s lease for `ttl` seconds from now, by the server's clock."""
        with self.connection() as conn:
            conn.execute(
                """INSERT INTO workers (id, node, lease_until)
                   VALUES (%s, %s, now() + make_interval(secs => %s))
                   ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until""",
                (worker, node, ttl))

    def renew_lease(self, worker: str, ttl: float) -> bool:
        """Extend the lease; False when the row is gone (the leader declared the worker dead)."""
        with self.connection() as conn:
            return conn.execute(
                """UPDATE workers SET lease_until = now() + make_interval(secs => %s)
                   WHERE id = %s""", (ttl, worker)).rowcount == 1

    def retire_worker(self, worker: str) -> None:
        with self.connection() as conn:
            conn.execute("DELETE FROM workers WHERE id = %s", (worker,))

    def expired_workers(self) -> tuple[list[str], list[str]]:
        """(workers whose lease has run out, workers that RUNNING jobs name but that hold no
        lease row at all: a worker of a version before leases, or one long gone)."""
        with self.connection() as conn:
            expired = [row[0] for row in conn.execute(
                "SELECT id FROM workers WHERE lease_until < now() ORDER BY id")]
            unknown = [row[0] for row in conn.execute(
                """SELECT DISTINCT j.worker FROM jobs j
                   WHERE j.status = 'RUNNING' AND j.worker IS NOT NULL
                     AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.id = j.worker)""")]
        return expired, unknown

    def cancelled(self, job_id: str, attempt: int) -> bool:
        """Whether `attempt` of the job was cancelled (what a worker checks before it acts on
        a cancel message: anyone who reaches Redis could publish one)."""
        with self.connection() as conn:
            row = conn.execute("SELECT status, attempts FROM jobs WHERE id = %s",
                               (job_id,)).fetchone()
        return (row is not None and row[0] == JobStatus.CANCELLED.value
                and (attempt == 0 or row[1] == attempt))

    def recover_lost(self, fence: Fence, worker: str, *, backoff: float,
                     backoff_max: float) -> list[Lost]:
        """Close the open attempts of a dead worker as lost; each job is retried or fails.

        A lost attempt counts as a failure (the command may have done harm before dying);
        jobs out of retries end FAILED and dead-lettered, and are notified (as in `finish`)
        in the same transaction. Returns every job it closed an
        attempt of, PENDING and dead-lettered alike, for the caller to push and to log.
        Leader-only: fenced. The worker's lease row goes in the same transaction, if it has
        run out; a worker that renewed its lease meanwhile keeps its jobs.
        """
        with self.fenced(fence) as conn:
            conn.execute("DELETE FROM workers WHERE id = %s AND lease_until < now()", (worker,))
            rows = conn.execute(
                """WITH lost AS (
                       SELECT id, attempts, failures, max_retries FROM jobs
                       WHERE status = 'RUNNING' AND worker = %(worker)s
                         AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.id = %(worker)s)
                       FOR UPDATE),
                   closed AS (
                       UPDATE job_attempts a SET finished_at = now(), error = %(error)s
                       FROM lost WHERE a.job_id = lost.id AND a.attempt = lost.attempts
                         AND a.finished_at IS NULL),
                   ended AS (
                       UPDATE jobs j SET
                           status = CASE WHEN lost.failures < lost.max_retries
                                         THEN 'PENDING' ELSE 'FAILED' END,
                           failures = j.failures + 1, error = %(error)s, exit_code = NULL,
                           run_at = CASE WHEN lost.failures < lost.max_retries
                                         THEN now() + make_interval(secs => least(%(cap)s,
                                              %(base)s * power(2, lost.failures)) * (0.5 + random() / 2))
                                    END,
                           dead_lettered_at = CASE WHEN lost.failures < lost.max_retries
                                                   THEN NULL ELSE now() END,
                           finished_at = CASE WHEN lost.failures < lost.max_retries
                                              THEN NULL ELSE now() END,
                           updated_at = now()
                       FROM lost WHERE j.id = lost.id
                       RETURNING j.id, j.name, j.queue, j.priority, j.attempts, j.failures,
                                 j.max_retries, j.run_at, j.status, j.notify, j.notify_on,
                                 j.dead_lettered_at IS NOT NULL AS dead),
                   """ + _NOTIFY_ENDED + """
                   SELECT id, name, queue, priority, attempts, failures, max_retries, run_at,
                          status FROM ended""",
                {"worker": worker, "error": f"{EndReason.LOST}: worker {worker} died",
                 "base": backoff, "cap": backoff_max}).fetchall()
        return [Lost(*r[:8], dead=r[8] == JobStatus.FAILED.value) for r in rows]

    # --- webhook notifications (the leader's outbox) ---------------------------------------

    def next_notification(self) -> float | None:
        """Seconds until the next notification is due (0 or less: due now; None: none)."""
        with self.connection() as conn:
            row = conn.execute("SELECT extract(epoch FROM min(next_at) - now())::float8 "
                               "FROM notifications").fetchone()
        return row[0]

    def claim_notifications(self, fence: Fence, limit: int, hold: float) -> list[dict[str, Any]]:
        """Take up to `limit` due notifications to POST, with what their payload needs.

        Each counts an attempt and is not due again for `hold` seconds (more than a POST
        may take): a leader that dies mid-POST leaves it to be sent again by the next one
        (at least once). Leader-only: fenced. A job pruned or purged meanwhile comes back
        with its columns NULL."""
        with self.fenced(fence) as conn:
            cur = conn.cursor(row_factory=dict_row)
            return cur.execute(
                """WITH claimed AS (
                       UPDATE notifications n SET attempts = n.attempts + 1,
                              next_at = now() + make_interval(secs => %s)
                       FROM (SELECT id FROM notifications WHERE next_at <= now()
                             ORDER BY next_at LIMIT %s FOR UPDATE SKIP LOCKED) due
                       WHERE n.id = due.id
                       RETURNING n.id, n.delivery_id, n.job_id, n.target, n.event, n.attempts)
                   SELECT c.*, j.id IS NOT NULL AS job_found, j.name, j.queue, j.status,
                          j.exit_code, j.attempts AS job_attempts, j.error, j.submitted_by,
                          j.schedule_id, j.dead_lettered_at IS NOT NULL AS dead_lettered,
                          j.created_at, j.started_at, j.finished_at, j.output_truncated,
                          substring(j.output FROM greatest(1, octet_length(j.output) - %s + 1))
                              AS output_tail,
                          octet_length(j.output) > %s AS output_cut
                   FROM claimed c LEFT JOIN jobs j ON j.id = c.job_id
                   ORDER BY c.id""",
                (hold, limit, OUTPUT_TAIL, OUTPUT_TAIL)).fetchall()

    def notification_delivered(self, notification_id: int) -> None:
        """Delivered, or given up: the row goes (the log and the metrics keep the count)."""
        with self.connection() as conn:
            conn.execute("DELETE FROM notifications WHERE id = %s", (notification_id,))

    def notification_failed(self, notification_id: int, error: str, delay: float) -> None:
        with self.connection() as conn:
            conn.execute("""UPDATE notifications SET last_error = %s,
                                   next_at = now() + make_interval(secs => %s)
                            WHERE id = %s""", (error, delay, notification_id))

    # --- the leader's fence ----------------------------------------------------------------

    @contextmanager
    def fenced(self, fence: Fence) -> Iterator[psycopg.Connection]:
        """A transaction that commits only while `fence.token` is the newest leader's.

        It moves the fence row to our token first (which also locks it until commit, so
        leader-only transactions of two would-be leaders serialize); a fence already
        ahead of our token means a newer leader exists: Deposed, nothing written.
        """
        with self.connection() as conn, conn.transaction():
            row = conn.execute(
                """INSERT INTO leader_fence AS f (cluster, token, holder) VALUES (%s, %s, %s)
                   ON CONFLICT (cluster) DO UPDATE
                       SET token = EXCLUDED.token, holder = EXCLUDED.holder, updated_at = now()
                       WHERE f.token <= EXCLUDED.token
                   RETURNING token""", (fence.cluster, fence.token, fence.holder)).fetchone()
            if row is None:
                current = conn.execute("SELECT token, holder FROM leader_fence WHERE cluster = %s",
                                       (fence.cluster,)).fetchone()
                raise Deposed(f"fencing token {fence.token} is stale: {current[1]} leads with "
                              f"token {current[0]}")
            yield conn

    def fence_token(self, cluster: str) -> tuple[int, str] | None:
        with self.connection() as conn:
            return conn.execute("SELECT token, holder FROM leader_fence WHERE cluster = %s",
                                (cluster,)).fetchone()

    # --- schedules ------------------------------------------------------------------------

    _SCHEDULE_COLUMNS = """id, name, expression, timezone, overlap, misfire, catchup_window, job,
        paused, next_fire_time, last_fire_time, last_job_id, created_by, created_at, updated_at"""

    def create_schedule(self, *, name: str, expression: str, timezone: str, overlap: str,
                        misfire: str, catchup_window: float, job: dict[str, Any],
                        next_fire_time: datetime, created_by: str) -> dict[str, Any]:
        with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            try:
                return cur.execute(
                    f"""INSERT INTO schedules (name, expression, timezone, overlap, misfire,
                            catchup_window, job, next_fire_time, last_fire_time, created_by)
                        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now(), %s)
                        RETURNING {self._SCHEDULE_COLUMNS}""",
                    (name, expression, timezone, overlap, misfire, catchup_window, Jsonb(job),
                     next_fire_time, created_by)).fetchone()
            except psycopg.errors.UniqueViolation:
                raise Conflict(f"name: a schedule named {name!r} exists") from None

    def list_schedules(self) -> list[dict[str, Any]]:
        with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            return cur.execute(f"SELECT {self._SCHEDULE_COLUMNS} FROM schedules ORDER BY name"
                               ).fetchall()

    def get_schedule(self, name: str) -> dict[str, Any]:
        with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            row = cur.execute(f"SELECT {self._SCHEDULE_COLUMNS} FROM schedules WHERE name = %s",
                              (name,)).fetchone()
        if row is None:
            raise NotFound(f"schedule {name!r} not found")
        return row

    def pause_schedule(self, name: str, paused: bool,
                       next_fire_time: Callable[[dict[str, Any]], datetime | None]
                       ) -> dict[str, Any]:
        """Pause, or resume with the next slot from now (missed slots are not made up)."""
        with self.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            row = cur.execute(f"SELECT {self._SCHEDULE_COLUMNS} FROM schedules WHERE name = %s "
                              "FOR UPDATE", (name,)).fetchone()
            if row is None:
                raise NotFound(f"schedule {name!r} not found")
            if row["paused"] == paused:
                return row
            return cur.execute(
                f"""UPDATE schedules SET paused = %s, next_fire_time = %s,
                        last_fire_time = CASE WHEN %s THEN last_fire_time ELSE now() END,
                        updated_at = now()
                    WHERE id = %s RETURNING {self._SCHEDULE_COLUMNS}""",
                (paused, None if paused else next_fire_time(row), paused, row["id"])).fetchone()

    def delete_schedule(self, name: str) -> None:
        with self.connection() as conn:
            if not conn.execute("DELETE FROM schedules WHERE name = %s", (name,)).rowcount:
                raise NotFound(f"schedule {name!r} not found")

    def clock(self) -> datetime:
        """PostgreSQL's time of day: the one clock every node shares, whatever its own
        says (leases run out by it, and the leader fires cron slots by it)."""
        with self.connection() as conn:
            return conn.execute("SELECT clock_timestamp()").fetchone()[0]

    def next_due(self) -> datetime | None:
        """The earliest next_fire_time of all active schedules (the leader sleeps till then)."""
        with self.connection() as conn:
            return conn.execute("SELECT min(next_fire_time) FROM schedules WHERE NOT paused"
                                ).fetchone()[0]

    def fire_due_schedules(self, fence: Fence, now: datetime,
                           decide: Callable[[dict[str, Any], list[tuple[str, str, int]]], FirePlan]
                           ) -> list[Fired]:
        """Fire every due schedule in one fenced transaction.

        Each firing inserts a job whose id and (schedule_id, fire_time) are unique to its
        slot, so even two leaders at once fire a slot at most once; `decide` (the leader's
        policy: misfire, overlap) sees the schedule and its unfinished runs, locked, so an
        overlap rule holds across the whole cluster.
        """
        fired: list[Fired] = []
        with self.fenced(fence) as conn:
            cur = conn.cursor(row_factory=dict_row)
            rows = cur.execute(
                f"""SELECT {self._SCHEDULE_COLUMNS} FROM schedules
                    WHERE NOT paused AND next_fire_time <= %s
                    ORDER BY next_fire_time FOR UPDATE SKIP LOCKED""", (now,)).fetchall()
            for row in rows:
                open_runs = [tuple(r) for r in conn.execute(
                    """SELECT id, status, attempts FROM jobs
                       WHERE schedule_id = %s AND status IN ('PENDING', 'RUNNING')
                       FOR UPDATE""", (row["id"],))]
                plan = decide(row, open_runs)
                cancelled = []
                if plan.cancel:
                    cancelled = [tuple(r) for r in conn.execute(
                        """UPDATE jobs j SET status = 'CANCELLED', finished_at = now(),
                                  updated_at = now(), error = 'replaced by the next run', run_at = NULL
                           FROM (SELECT id, status FROM jobs WHERE id = ANY(%s) FOR UPDATE) old
                           WHERE j.id = old.id AND old.status IN ('PENDING', 'RUNNING')
                           RETURNING j.id, old.status, j.attempts""", (plan.cancel,))]
                created = self._insert_jobs(conn.cursor(), plan.jobs) if plan.jobs else []
                jobs = [job for job, new in zip(plan.jobs, created) if new]
                conn.execute(
                    """UPDATE schedules SET last_fire_time = %s, next_fire_time = %s,
                              last_job_id = coalesce(%s, last_job_id), updated_at = now()
                       WHERE id = %s""",
                    (plan.last_fire_time, plan.next_fire_time, jobs[-1].id if jobs else None,
                     row["id"]))
                fired.append(Fired(row["name"], jobs, cancelled))
        return fired

    def prune(self, fence: Fence, older_than: float, limit: int = 5000) -> int:
        """Delete finished jobs (and their attempts) older than `older_than` seconds."""
        with self.fenced(fence) as conn:
            ids = [r[0] for r in conn.execute(
                PRUNE_SELECT, {"older_than": older_than, "limit": limit})]
            if ids:
                conn.execute("DELETE FROM job_attempts WHERE job_id = ANY(%s)", (ids,))
                conn.execute("DELETE FROM jobs WHERE id = ANY(%s)", (ids,))
            return len(ids)

    # --- queue controls -------------------------------------------------------------------

    def pause_queue(self, queue: str, by: str) -> dict[str, Any]:
        """Record `queue` as paused (a queue paused already keeps who and when)."""
        with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            cur.execute("""INSERT INTO paused_queues (queue, paused_by) VALUES (%s, %s)
                           ON CONFLICT (queue) DO NOTHING""", (queue, by))
            return cur.execute("SELECT queue, paused_by, paused_at FROM paused_queues "
                               "WHERE queue = %s", (queue,)).fetchone()

    def resume_queue(self, queue: str) -> bool:
        """Forget the pause of `queue`; False when it was not paused."""
        with self.connection() as conn:
            return conn.execute("DELETE FROM paused_queues WHERE queue = %s",
                                (queue,)).rowcount == 1

    def set_queue_limit(self, queue: str, max_running: int) -> None:
        """At most `max_running` RUNNING jobs of `queue` (0: no limit)."""
        with self.connection() as conn:
            if max_running:
                conn.execute("""INSERT INTO queue_limits (queue, max_running) VALUES (%s, %s)
                                ON CONFLICT (queue) DO UPDATE
                                    SET max_running = EXCLUDED.max_running, updated_at = now()""",
                             (queue, max_running))
            else:
                conn.execute("DELETE FROM queue_limits WHERE queue = %s", (queue,))

    def queue_limits(self) -> dict[str, int]:
        with self.connection() as conn:
            return dict(conn.execute("SELECT queue, max_running FROM queue_limits"))

    def paused_queues(self) -> list[dict[str, Any]]:
        with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            return cur.execute("SELECT queue, paused_by, paused_at FROM paused_queues "
                               "ORDER BY queue").fetchall()

    # --- cluster status -------------------------------------------------------------------

    def fold_counts(self) -> int:
        """Fold the per-statement count changes into job_counts; returns the keys changed.

        The leader does this every housekeeping tick, so that `counts` sums a few rows
        rather than every change since the start. The counts are exact with or without
        it (see 0006_scale.sql); keys are upserted in key order, so two folders at once
        (a leader and a deposed one) wait for each other rather than deadlock.
        """
        with self.connection() as conn:
            return conn.execute(
                """WITH gone AS (DELETE FROM job_count_deltas RETURNING key, n),
                        sums AS (SELECT key, sum(n) AS n FROM gone GROUP BY key)
                   INSERT INTO job_counts AS c (key, n)
                   SELECT key, n FROM sums ORDER BY key
                   ON CONFLICT (key) DO UPDATE SET n = c.n + EXCLUDED.n""").rowcount

    def forget_activity(self, keep: float = ACTIVITY_KEPT) -> int:
        """Drop the per-minute activity keys (0009_job_activity.sql) older than `keep`
        seconds from job_counts; the leader calls this after folding."""
        with self.connection() as conn:
            return conn.execute(
                """DELETE FROM job_counts
                   WHERE key LIKE 'm:%%' AND split_part(key, ':', 2)::bigint < %s""",
                (int(time.time() - keep),)).rowcount

    @staticmethod
    def _status_counts(conn: psycopg.Connection) -> tuple[dict[str, int], int]:
        by_status = dict(conn.execute(
            """SELECT key, sum(n)::bigint FROM (
                   SELECT key, n FROM job_counts WHERE key NOT LIKE 'm:%'
                   UNION ALL SELECT key, n FROM job_count_deltas WHERE key NOT LIKE 'm:%') c
               GROUP BY key"""))
        return by_status, by_status.pop(DEAD_LETTERED_KEY, 0)

    def activity(self, minutes: int) -> list[tuple[int, dict[str, int]]]:
        """[(minute as epoch seconds, {final status: jobs that ended in it})] for the last
        `minutes` minutes including the current one, oldest first, every minute present."""
        now = int(time.time()) // 60 * 60
        first = now - (minutes - 1) * 60
        with self.connection() as conn:
            rows = conn.execute(
                """SELECT split_part(key, ':', 2)::bigint, split_part(key, ':', 3), sum(n)::bigint
                   FROM (SELECT key, n FROM job_counts WHERE key LIKE 'm:%%'
                         UNION ALL SELECT key, n FROM job_count_deltas WHERE key LIKE 'm:%%') c
                   WHERE split_part(key, ':', 2)::bigint >= %s
                   GROUP BY 1, 2""", (first,)).fetchall()
        found: dict[int, dict[str, int]] = {}
        for minute, status, n in rows:
            found.setdefault(minute, {})[status] = max(n, 0)
        return [(minute, found.get(minute, {})) for minute in range(first, now + 60, 60)]

    def status_counts(self, timeout: float | None = None) -> tuple[dict[str, int], int]:
        """(jobs by status, dead-lettered count): a few rows, whatever the table holds."""
        with self.connection(timeout=timeout) as conn:
            return self._status_counts(conn)

    def counts(self) -> tuple[dict[str, int], int, list[tuple[str, int, int, int]]]:
        """(jobs by status, dead-lettered count, per queue: (queue, ready, delayed, running))."""
        with self.connection() as conn:
            by_status, dead = self._status_counts(conn)
            queues = conn.execute(
                """SELECT queue,
                          count(*) FILTER (WHERE status = 'PENDING'
                                           AND (run_at IS NULL OR run_at <= now())),
                          count(*) FILTER (WHERE status = 'PENDING' AND run_at > now()),
                          count(*) FILTER (WHERE status = 'RUNNING')
                   FROM jobs WHERE status IN ('PENDING', 'RUNNING')
                   GROUP BY queue ORDER BY queue""").fetchall()
        return by_status, dead, queues

