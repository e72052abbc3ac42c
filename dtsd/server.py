"""The gRPC API child: dtsd.v1, the seed's `scheduler` surface, health and reflection.

Every server child binds the same `[server] listen` address (SO_REUSEPORT); the kernel
spreads connections over them. Each also serves its own unix socket
`<runtime_dir>/api-<pid>.sock` for local callers, who identify with a local token from the
master (dtsd/identity.py). Who may call what is dtsd/auth.py's interceptor; what a caller
sees of other principals' jobs (env values) and may do to them (cancel, retry) is decided
here, with `auth.caller()`. A request is validated at the edge and answered with
the status code that says what went wrong (INVALID_ARGUMENT naming the field,
NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, UNAVAILABLE when a backing store is
down, so clients try another server). A submit is committed to PostgreSQL first and
then pushed to Redis; if the push fails the job is still safe, and the leader's
reconciler pushes it later.

TERM: health goes NOT_SERVING, new RPCs are refused, in-flight ones get `stopwaitsecs`
to finish, watch streams end. QUIT: the same without the grace.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Collection, Iterator, Sequence

import grpc
import psycopg
import psycopg_pool
import redis

from . import __version__, auth, backing, child, identity, introspection, metrics, streams
from . import cron as cronmod
from .combine import Combiner
from .config import Config, limit_ceiling
from .dtsdpb import pb, pb_grpc, seed_pb, seed_pb_grpc
from .models import (DEFAULT_QUEUE, LIMIT_PROTO_FIELDS, MAX_NAME, QUEUE_NAME,
                     InvalidField, JobStatus, NewJob, check_job_id, check_queue, check_text,
                     parse_selector, resolve_notify, schedule_job, validate_spec)
from .queue import Event, Queue, Ready, connect
from .store import (ANSWER_WITHIN, BULK_BATCH, Conflict, Forbidden, NotFound, Precondition,
                    Selection, Store, decode_page_token)
from .watch import Watch, WatchHub

log = logging.getLogger("dtsd.server")

SERVICES = ("dtsd.v1.Scheduler", "scheduler.JobService", "scheduler.TaskScheduler")
MAX_PAGE = 1000

_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout,
                redis.ConnectionError, redis.TimeoutError)
# How long a call waits for a PostgreSQL connection of its server's pool: with PostgreSQL
# away the pool has none to give, and the caller must hear so well within its deadline
# (dtsctl's is 10 s), not run into it.
POOL_WAIT = 3.0
# The trailing metadata key naming the store an UNAVAILABLE answer is about: the client
# tells "this server answered: PostgreSQL is down" from "no server could be reached".
STORE_METADATA = "dtsd-store"
# What this server's overall health needs (etcd is the coordinator's affair).
SERVING_NEEDS = (backing.BackingStore.POSTGRES, backing.BackingStore.REDIS)


# --- conversions --------------------------------------------------------------------------

def timestamp(value: datetime | None, message) -> None:
    """Fill a google.protobuf.Timestamp from an aware datetime (None leaves it unset)."""
    if value is not None:
        seconds = value.timestamp()
        message.seconds = int(seconds // 1)
        message.nanos = int(round((seconds - int(seconds // 1)) * 1e9)) % 1_000_000_000


# The range of google.protobuf.Timestamp (and of datetime): 0001-01-01 to 9999-12-31, UTC.
MIN_SECONDS, MAX_SECONDS = -62135596800, 253402300799


def to_datetime(message, field: str = "timestamp") -> datetime:
    """An aware datetime from a Timestamp; InvalidField naming `field` outside its range."""
    if not (MIN_SECONDS <= message.seconds <= MAX_SECONDS and 0 <= message.nanos < 1_000_000_000):
        raise InvalidField(field, f"seconds={message.seconds} nanos={message.nanos} is not a "
                                  "valid timestamp (years 1 to 9999, nanos 0 to 999999999)")
    return (datetime.fromtimestamp(message.seconds, tz=timezone.utc)
            + timedelta(microseconds=message.nanos // 1000))


def job_message(row: dict[str, Any], viewer: auth.Caller, job: pb.Job | None = None) -> pb.Job:
    """A stored job as the API sends it to `viewer`: its env values only to the job's owner
    and to admins; others get the names with empty values, and `env_hidden` set.

    `job`: an empty message to fill, such as `response.jobs.add()`. A list fills its
    response in place: handing finished messages to the response's constructor copies
    each one again, which cost 2 ms of a 100-job page."""
    if job is None:
        job = pb.Job()
    job.id, job.status, job.attempts = row["id"], pb.JobStatus.Value(row["status"]), row["attempts"]
    job.output_truncated, job.error = row["output_truncated"], row["error"]
    job.dead_lettered, job.worker = row["dead_lettered_at"] is not None, row["worker"] or ""
    job.submitted_by, job.schedule_id = row["submitted_by"], row["schedule_id"] or 0
    spec = job.spec
    spec.id, spec.name, spec.command = row["id"], row["name"], row["command"]
    hidden = bool(row["env"]) and not viewer.owns(row["owner"])
    spec.env.update({key: "" for key in row["env"]} if hidden else row["env"])
    job.env_hidden = hidden
    spec.cwd, spec.queue, spec.priority = row["cwd"], row["queue"], row["priority"]
    spec.max_retries, spec.timeout_seconds = row["max_retries"], row["timeout"]
    spec.idempotency_key = row["idempotency_key"] or ""
    limits_message(row["limits"], spec.limits)
    spec.notify.extend(row["notify"])
    spec.notify_on.extend(row["notify_on"])
    if row["labels"]:
        spec.labels.update(row["labels"])
    timestamp(row["run_at"], spec.run_at)
    if row["exit_code"] is not None:
        job.exit_code = row["exit_code"]
    if row.get("output"):
        job.output = bytes(row["output"])
    for name in ("created_at", "updated_at", "started_at", "finished_at", "fire_time"):
        timestamp(row[name], getattr(job, name))
    for attempt in row.get("attempt_history", ()):
        item = job.attempt_history.add(
            number=attempt["attempt"], worker=attempt["worker"],
            output=bytes(attempt["output"] or b""), output_truncated=attempt["output_truncated"],
            error=attempt["error"])
        if attempt["exit_code"] is not None:
            item.exit_code = attempt["exit_code"]
        timestamp(attempt["started_at"], item.started_at)
        timestamp(attempt["finished_at"], item.finished_at)
    return job


def limits_message(limits: dict[str, int], message) -> None:
    for name, field_name in LIMIT_PROTO_FIELDS.items():
        setattr(message, field_name, limits.get(name, 0))


def spec_limits(spec: pb.JobSpec) -> dict[str, int]:
    return {name: getattr(spec.limits, field_name)
            for name, field_name in LIMIT_PROTO_FIELDS.items() if getattr(spec.limits, field_name)}


def spec_to_job(spec: pb.JobSpec, who: auth.Caller, prefix: str = "",
                ceiling: dict[str, int] | None = None,
                targets: Collection[str] | None = None) -> NewJob:
    """A validated job submitted by `who`, which owns it; `targets`: [notify] targets."""
    return validate_spec(
        id=spec.id, command=spec.command, name=spec.name, env=dict(spec.env), cwd=spec.cwd,
        queue=spec.queue, priority=spec.priority,
        max_retries=spec.max_retries if spec.HasField("max_retries") else None,
        timeout=spec.timeout_seconds,
        run_at=to_datetime(spec.run_at, prefix + "run_at") if spec.HasField("run_at") else None,
        idempotency_key=spec.idempotency_key, submitted_by=who.submitted_by,
        owner=who.principal, prefix=prefix, limits=spec_limits(spec), ceiling=ceiling,
        notify=list(spec.notify), notify_on=list(spec.notify_on), targets=targets,
        labels=dict(spec.labels))


OVERLAP = {pb.OVERLAP_UNSPECIFIED: cronmod.Overlap.ALLOW, pb.ALLOW: cronmod.Overlap.ALLOW,
           pb.FORBID: cronmod.Overlap.FORBID, pb.REPLACE: cronmod.Overlap.REPLACE}
MISFIRE = {pb.MISFIRE_UNSPECIFIED: cronmod.Misfire.RUN_ONCE, pb.SKIP: cronmod.Misfire.SKIP,
           pb.RUN_ONCE: cronmod.Misfire.RUN_ONCE, pb.RUN_ALL: cronmod.Misfire.RUN_ALL}
DEFAULT_CATCHUP = 3600.0
MAX_CATCHUP = 366 * 86400.0


def parse_cron(expression: str, zone: str) -> cronmod.Cron:
    try:
        return cronmod.parse(expression, zone)
    except cronmod.CronError as exc:
        text = str(exc)
        field = "timezone" if text.startswith("timezone") else "expression"
        raise InvalidField(field, text.split(": ", 1)[1] if ": " in text else text) from None


def schedule_message(row: dict[str, Any], viewer: auth.Caller) -> pb.Schedule:
    """A schedule as the API sends it to `viewer`: the template's env values to admins
    only (schedules are an admin's), the names with `env_hidden` to others."""
    template = row["job"]
    message = pb.Schedule(
        id=row["id"], name=row["name"], expression=row["expression"], timezone=row["timezone"],
        overlap=pb.OverlapPolicy.Value(row["overlap"].upper()),
        misfire=pb.MisfirePolicy.Value(row["misfire"].upper()),
        catchup_window_seconds=row["catchup_window"], paused=row["paused"],
        last_job_id=row["last_job_id"] or "")
    job = message.job
    job.command, job.name = template["command"], template.get("name", "")
    env = template.get("env", {})
    message.env_hidden = bool(env) and not viewer.admin
    job.env.update({key: "" for key in env} if message.env_hidden else env)
    job.cwd, job.queue = template.get("cwd", ""), template.get("queue", "")
    job.priority, job.max_retries = template.get("priority", 0), template.get("max_retries", 3)
    job.timeout_seconds = template.get("timeout", 0.0)
    limits_message(template.get("limits", {}), job.limits)
    job.notify.extend(template.get("notify", ()))
    job.notify_on.extend(template.get("notify_on", ()))
    job.labels.update(template.get("labels", {}))
    timestamp(row["next_fire_time"], message.next_fire_time)
    timestamp(row["last_fire_time"], message.last_fire_time)
    timestamp(row["created_at"], message.created_at)
    timestamp(row["updated_at"], message.updated_at)
    return message


def check_schedule_name(name: str) -> str:
    if not QUEUE_NAME.match(name):
        raise InvalidField("name", f"bad schedule name {name[:80]!r} (lower-case letters, digits, "
                                   "'_', '.', '-'; at most 64; starts with a letter or digit)")
    return name


def readable(output: bytes | None) -> str:
    """The seed's string fields: UTF-8 where it is, U+FFFD where it is not."""
    return bytes(output or b"").decode("utf-8", errors="replace")


def epoch(value: datetime | None) -> int:
    return int(value.timestamp()) if value else 0


# --- queue depths -------------------------------------------------------------------------

DEPTH_FRESH = 0.1   # seconds a depth read from Redis may admit further submits
SERVED_FRESH = 2.0  # seconds the queues the live workers serve are taken as still served


class DepthCache:
    """Queue depths as this server child last read them from Redis, plus what it has
    admitted since.

    Reading two depths from Redis cost every submit two round trips and 14 Redis commands
    (bench/results/profile-2026-12-03.md). A reading younger than `fresh` seconds admits a
    submit that fits under the limit by it; a submit that would not fit reads again, so a
    refusal always rests on a count taken now, and a queue that drained is seen at once.
    """

    def __init__(self, fresh: float = DEPTH_FRESH):
        self.fresh = fresh
        self.lock = threading.Lock()
        self.seen: dict[str, tuple[float, int]] = {}   # key -> (monotonic, depth)

    def depth(self, key: str, adding: int, limit: int, read: Callable[[], int]) -> int:
        """The depth to judge a submit of `adding` jobs by, counting them as admitted if
        they fit."""
        now = time.monotonic()
        with self.lock:
            at, value = self.seen.get(key, (None, 0))
            if at is not None and now - at < self.fresh and value + adding <= limit:
                self.seen[key] = (at, value + adding)
                return value
        value = read()
        with self.lock:
            self.seen[key] = (time.monotonic(), value + adding if value + adding <= limit
                              else value)
        return value


class ServedQueues:
    """The queues some live worker serves, by the workers' heartbeats in Redis, read at
    most every `fresh` seconds, so that a submit pays no round trip for it. None when
    Redis cannot tell: then no queue is said to be unserved."""

    def __init__(self, queue: Queue, fresh: float = SERVED_FRESH):
        self.queue = queue
        self.fresh = fresh
        self.lock = threading.Lock()
        self.read_at: float | None = None
        self.served: frozenset[str] | None = None

    def unserved(self, name: str) -> bool:
        now = time.monotonic()
        with self.lock:
            stale = self.read_at is None or now - self.read_at >= self.fresh
            if stale:
                self.read_at = now      # one reader per period; the others use the last set
        if stale:
            try:
                beats = self.queue.workers().values()
                served = frozenset(q for beat in beats if beat for q in beat.get("queues", ()))
            except redis.RedisError:
                served = None
            with self.lock:
                self.served = served
        served = self.served
        return served is not None and name not in served


# --- error mapping ------------------------------------------------------------------------

class QueueFull(Exception):
    """A submit that would take a queue past [server] max_pending: RESOURCE_EXHAUSTED."""


def _status_for(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    if isinstance(exc, InvalidField):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, Conflict):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, Precondition):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, Forbidden):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    return None     # _UNAVAILABLE: abort() names the store


def store_unavailable(exc: Exception) -> tuple[backing.BackingStore, str]:
    """The store a call failed on, and what the caller is told: which store, why, and that
    trying again (here later, or another server now) may work. Counted by backing.health,
    which logs it once per outage rather than once per call."""
    store = backing.store_of(exc)
    if store is not None:
        # A pool that had no connection to give says only that it waited: the error that
        # made the store unreachable (connection refused, say) is what the caller can use.
        outage = backing.health.down().get(store)
        why = backing.describe(exc)
        if isinstance(exc, psycopg_pool.PoolTimeout) and outage is not None:
            why = f"{outage.error} (no connection within {POOL_WAIT:g} s)"
        backing.health.failure(store, exc)
        return store, f"{store.label} is unreachable from this server: {why}; retry later"
    store = (backing.BackingStore.REDIS if isinstance(exc, redis.RedisError)
             else backing.BackingStore.POSTGRES)
    return store, f"{store.label} failed the call: {backing.describe(exc)}; retry later"


def abort(context, exc: Exception, method: str) -> None:
    """End the call with the status `exc` maps to; anything unmapped is INTERNAL, logged.
    An UNAVAILABLE for a store names it in the trailing metadata too (STORE_METADATA)."""
    if isinstance(exc, _UNAVAILABLE):
        store, message = store_unavailable(exc)
        context.set_trailing_metadata(((STORE_METADATA, store.value),))
        context.abort(grpc.StatusCode.UNAVAILABLE, message)
    mapped = _status_for(exc)
    if mapped is None:
        log.exception("%s failed", method)
        mapped = (grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
    context.abort(*mapped)


def rpc(method: Callable) -> Callable:
    """Map dtsd's exceptions to gRPC status codes; anything else is INTERNAL and logged."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:
            abort(context, exc, method.__name__)
    return wrapper


class DecodeRequests(grpc.ServerInterceptor):
    """Request bytes that do not parse are INVALID_ARGUMENT, not grpc's INTERNAL.

    grpc answers a request its deserializer cannot parse (a string that is not UTF-8, a
    truncated field) with INTERNAL, and logs a traceback each time: a client's bad bytes
    would look like a dtsd bug, and anyone could fill the log. Behind this interceptor the
    method gets the raw bytes and the parsing happens here, every method, every service.
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method

        def decode(data: bytes, context):
            try:
                return parse(data)
            except Exception as exc:  # noqa: BLE001 - DecodeError, or whatever garbage raises
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{method}: the request does not parse: {exc}")

        codecs = dict(request_deserializer=None, response_serializer=handler.response_serializer)
        if handler.unary_unary or handler.unary_stream:
            original = handler.unary_unary or handler.unary_stream
            make = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                    else grpc.unary_stream_rpc_method_handler)
            return make(lambda data, context: original(decode(data, context), context), **codecs)
        original = handler.stream_unary or handler.stream_stream
        make = (grpc.stream_unary_rpc_method_handler if handler.stream_unary
                else grpc.stream_stream_rpc_method_handler)
        return make(lambda requests, context: original(
            (decode(data, context) for data in requests), context), **codecs)


class CountCalls(grpc.ServerInterceptor):
    """dtsd_grpc_requests_total{method,code} for every call, and the time unary calls take.

    The outermost interceptor: a call that authentication or a stream cap refuses is
    counted with its code too. The method label is `service/Method`, and only for the
    methods this server serves (anything else is `unknown`): a client cannot grow the label
    set by calling made-up names.
    """

    def __init__(self, services: Sequence[str]):
        self.services = tuple(f"/{name}/" for name in services)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        full = handler_call_details.method
        method = (full[1:] if handler is not None and full.startswith(self.services)
                  else "unknown")
        if handler is None:
            metrics.GRPC_REQUESTS.labels(method, "UNIMPLEMENTED").inc()
            return handler
        requests = metrics.GRPC_REQUESTS
        duration = metrics.GRPC_DURATION.labels(method)
        codecs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)

        def code_of(context, failed: BaseException | None) -> str:
            code = context.code()
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed is not None else grpc.StatusCode.OK
            return code.name

        if handler.unary_unary or handler.stream_unary:
            original = handler.unary_unary or handler.stream_unary
            make = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                    else grpc.stream_unary_rpc_method_handler)

            def unary(request, context):
                started = time.perf_counter()
                failed = None
                try:
                    return original(request, context)
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    duration.observe(time.perf_counter() - started)
                    requests.labels(method, code_of(context, failed)).inc()
            return make(unary, **codecs)

        original = handler.unary_stream or handler.stream_stream
        make = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
                else grpc.stream_stream_rpc_method_handler)

        def streaming(request, context):
            failed = None
            try:
                yield from original(request, context)
            except BaseException as exc:
                failed = exc
                raise
            finally:
                requests.labels(method, code_of(context, failed)).inc()
        return make(streaming, **codecs)


# --- the shared core ----------------------------------------------------------------------

class Api:
    """What both API surfaces do, over one store and one queue."""

    def __init__(self, cfg: Config, store: Store, queue: Queue, watches: WatchHub):
        self.cfg = cfg
        self.store = store
        self.queue = queue
        self.watches = watches      # every WatchJob stream of this child (dtsd/watch.py)
        self.ceiling = limit_ceiling(cfg)   # highest per-job limits ([worker] limits_max)
        self.targets = frozenset(cfg.get("notify", "targets"))   # webhook target names
        self.notify_default = cfg.get("notify", "default")
        self.notify_on = cfg.get("notify", "on")
        self.max_pending = cfg.get("server", "max_pending")
        self.max_pending_total = cfg.get("server", "max_pending_total")
        self.submits = Combiner(self._store_round, max_weight=cfg.get("server", "max_batch"))
        self.depths = DepthCache()
        self.served = ServedQueues(queue)

    def submit(self, jobs: list[NewJob]) -> list[bool]:
        """Store `jobs` (all or none) and push them to Redis; per job, whether it is new.

        Concurrent calls share a transaction and a Redis pipeline (`dtsd.combine`): each
        returns after the commit that holds its jobs, as if it had been alone. Jobs that
        name no webhook targets or events get [notify] default and on here."""
        for job in jobs:
            resolve_notify(job, self.notify_default, self.notify_on)
        self.check_depth(jobs)
        return self.submits.call(jobs, weight=len(jobs))

    def _store_round(self, calls: list[list[NewJob]]) -> list[list[bool] | BaseException]:
        """One combined round of submits: one transaction for all, or, if any of them is
        refused (an id or idempotency key that conflicts), each in a transaction of its
        own so that only that call fails, with its own message."""
        replies: list[list[bool] | BaseException]
        if len(calls) == 1:
            replies = [self.store.insert_jobs(calls[0])]
        else:
            try:
                created = self.store.insert_jobs([job for jobs in calls for job in jobs])
                replies, start = [], 0
                for jobs in calls:
                    replies.append(created[start:start + len(jobs)])
                    start += len(jobs)
            except (Conflict, psycopg.DataError, psycopg.IntegrityError):
                # Refused for what some call carries (not for PostgreSQL being away): each
                # call alone, so no call fails, or reads the message, for another's jobs.
                replies = []
                for jobs in calls:
                    try:
                        replies.append(self.store.insert_jobs(jobs))
                    except Exception as exc:
                        replies.append(exc)
        ready = [Ready(job.id, job.queue, job.priority, job.run_at)
                 for jobs, created in zip(calls, replies) if not isinstance(created, BaseException)
                 for job, new in zip(jobs, created) if new]
        for queue, count in collections.Counter(job.queue for job in ready).items():
            metrics.JOBS_SUBMITTED.labels(metrics.queue_label(queue)).inc(count)
        try:
            self.queue.push(ready)
        except redis.RedisError as exc:
            # Committed is committed: the reconciler pushes these once Redis is back. Redis
            # out of reach is logged once (backing.health), not at every submit.
            level = logging.DEBUG if backing.health.note(exc) else logging.WARNING
            log.log(level, "%d job(s) stored but not pushed to Redis yet: %s", len(ready), exc)
        return replies

    def check_depth(self, jobs: list[NewJob]) -> None:
        """Refuse the whole batch if it would take a queue past [server] max_pending, or
        all queues together past [server] max_pending_total.

        The depths are Redis's counts (`Queue.depth`, `Queue.total`), read before the
        insert (through `DepthCache`: a count that lets the submit in may be up to
        DEPTH_FRESH old plus what this child added since; a refusal always reads again):
        submits in flight at the same time, here or on other servers, may overshoot the
        limits by what they carry. With Redis down the limits are not enforced; the submit
        is stored all the same, as ever.
        """
        try:
            if self.max_pending_total:
                total = self.depths.depth("", len(jobs), self.max_pending_total,
                                          self.queue.total)
                if total >= self.max_pending_total:
                    raise QueueFull(f"the queues hold {total} pending jobs together "
                                    f"([server] max_pending_total = {self.max_pending_total})")
                if total + len(jobs) > self.max_pending_total:
                    raise QueueFull(f"the queues hold {total} pending jobs together; "
                                    f"{len(jobs)} more would pass [server] max_pending_total "
                                    f"= {self.max_pending_total}")
            if not self.max_pending:
                return
            for queue, adding in sorted(collections.Counter(job.queue for job in jobs).items()):
                depth = self.depths.depth(queue, adding, self.max_pending,
                                          functools.partial(self.queue.depth, queue))
                if depth >= self.max_pending:
                    raise QueueFull(f"queue {queue!r} holds {depth} pending jobs "
                                    f"([server] max_pending = {self.max_pending})")
                if depth + adding > self.max_pending:
                    raise QueueFull(f"queue {queue!r} holds {depth} pending jobs; {adding} "
                                    f"more would pass [server] max_pending = {self.max_pending}")
        except redis.RedisError as exc:
            level = logging.DEBUG if backing.health.note(exc) else logging.WARNING
            log.log(level, "[server] max_pending and max_pending_total not enforced: depths "
                    "unknown: %s", exc)

    def forget_pending(self, job_id: str) -> None:
        """A PENDING job was cancelled: take its id out of Redis, so that it no longer
        counts toward max_pending. Committed is committed: with Redis down the worker that
        takes the id drops it (its claim fails)."""
        try:
            job = self.store.get_job(job_id, with_output=False)
            self.queue.forget(job_id, job["queue"], job["priority"])
        except redis.RedisError as exc:
            log.debug("cancelled job %s left in Redis: %s", job_id, exc)

    def publish_state(self, job_id: str, status: JobStatus, attempt: int = 0) -> None:
        try:
            self.queue.publish([(job_id, Event("state", attempt=attempt, status=status))])
        except redis.RedisError as exc:
            log.debug("state event of %s not published: %s", job_id, exc)


class ScheduleService:
    """The schedule RPCs of dtsd.v1.Scheduler (mixed into SchedulerService)."""

    api: Api

    @rpc
    def CreateSchedule(self, request, context):
        given = request.schedule
        name = check_schedule_name(given.name)
        cron = parse_cron(given.expression, given.timezone)
        if given.job.id or given.job.HasField("run_at") or given.job.idempotency_key:
            raise InvalidField("job", "a schedule's job takes no id, run_at or idempotency_key: "
                                      "each firing gets its own")
        job = spec_to_job(given.job, auth.caller(), prefix="job.", ceiling=self.api.ceiling,
                          targets=self.api.targets)
        window = given.catchup_window_seconds or DEFAULT_CATCHUP
        if not 0 < window <= MAX_CATCHUP:
            raise InvalidField("catchup_window_seconds", f"must be positive and at most "
                                                         f"{MAX_CATCHUP:.0f} (a year)")
        if given.overlap not in OVERLAP:
            raise InvalidField("overlap", f"unknown policy {given.overlap}")
        if given.misfire not in MISFIRE:
            raise InvalidField("misfire", f"unknown policy {given.misfire}")
        template = {"command": job.command, "name": job.name, "env": job.env, "cwd": job.cwd,
                    "queue": job.queue, "priority": job.priority,
                    "max_retries": job.max_retries, "timeout": job.timeout,
                    "limits": job.limits, "notify": list(job.notify),
                    "notify_on": list(job.notify_on), "labels": job.labels}
        row = self.api.store.create_schedule(
            name=name, expression=cron.expression, timezone=cron.timezone,
            overlap=OVERLAP[given.overlap].value, misfire=MISFIRE[given.misfire].value,
            catchup_window=window, job=template,
            next_fire_time=cron.next_after(datetime.now(timezone.utc)),
            created_by=auth.caller().submitted_by)
        auth.audit("schedule create", f"{name}: {cron.expression} ({cron.timezone}): "
                                      f"{job.command[:200]!r}")
        self._wake_leader()
        return schedule_message(row, auth.caller())

    def _wake_leader(self) -> None:
        """The leader sleeps until the next slot it knows of: tell it about a new one."""
        try:
            self.api.queue.schedules_changed()
        except redis.RedisError as exc:   # it looks again within a housekeeping interval
            log.debug("could not wake the leader: %s", exc)

    @rpc
    def ListSchedules(self, request, context):
        return pb.ListSchedulesResponse(
            schedules=[schedule_message(row, auth.caller())
                       for row in self.api.store.list_schedules()])

    @rpc
    def PauseSchedule(self, request, context):
        row = self.api.store.pause_schedule(check_schedule_name(request.name), True, _next_slot)
        auth.audit("schedule pause", request.name)
        return schedule_message(row, auth.caller())

    @rpc
    def ResumeSchedule(self, request, context):
        row = self.api.store.pause_schedule(check_schedule_name(request.name), False, _next_slot)
        auth.audit("schedule resume", request.name)
        self._wake_leader()
        return schedule_message(row, auth.caller())

    @rpc
    def DeleteSchedule(self, request, context):
        self.api.store.delete_schedule(check_schedule_name(request.name))
        auth.audit("schedule delete", request.name)
        return pb.DeleteScheduleResponse()

    @rpc
    def TriggerSchedule(self, request, context):
        row = self.api.store.get_schedule(check_schedule_name(request.name))
        job = schedule_job(row, None)
        self.api.submit([job])
        auth.audit("schedule trigger", f"{row['name']}: job {job.id}")
        return pb.SubmitJobResponse(id=job.id, created=True)

    @rpc
    def PreviewSchedule(self, request, context):
        count = request.count or 10
        if not 0 < count <= 1000:
            raise InvalidField("count", f"must be 1 to 1000, not {request.count}")
        if request.name:
            row = self.api.store.get_schedule(check_schedule_name(request.name))
            cron = parse_cron(row["expression"], row["timezone"])
        else:
            cron = parse_cron(request.expression, request.timezone)
        response = pb.PreviewScheduleResponse()
        for instant, local, note in cron.preview(datetime.now(timezone.utc), count):
            item = response.times.add(local=local, note=note)
            timestamp(instant, item.at)
        return response


BULK_LIMIT = 100_000           # jobs a CancelJobs or RetryJobs changes at most, by default
BULK_LIMIT_MAX = 1_000_000
CANCELLABLE = frozenset({JobStatus.PENDING, JobStatus.RUNNING})
RETRYABLE = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})


def _selection_text(selection) -> str:
    """A bulk request's selection, for the audit log: its fields that are set."""
    return "{" + ", ".join(f"{field.name}: {value!r}" for field, value in selection.ListFields()
                           if field.name not in ("created_after", "created_before")) + "}"


ACTIVITY_MINUTES = 60          # JobActivity's default span
ACTIVITY_MAX = 120             # and its longest: what the store keeps (ACTIVITY_KEPT)


def _owner_filter() -> str | None:
    """Whose jobs the caller may cancel and retry: its own (its principal), or any (admin)."""
    who = auth.caller()
    return None if who.admin else who.principal


def _next_slot(row: dict[str, Any]) -> datetime:
    return parse_cron(row["expression"], row["timezone"]).next_after(datetime.now(timezone.utc))


class SchedulerService(ScheduleService, pb_grpc.SchedulerServicer):
    """dtsd.v1.Scheduler."""

    def __init__(self, api: Api):
        self.api = api
        self.max_batch = api.cfg.get("server", "max_batch")

    @rpc
    def SubmitJob(self, request, context):
        job = spec_to_job(request.job, auth.caller(), ceiling=self.api.ceiling,
                          targets=self.api.targets)
        created = self.api.submit([job])[0]
        auth.audit("submit", f"1 job: {job.id}{'' if created else ' (existed)'}")
        return pb.SubmitJobResponse(id=job.id, created=created,
                                    queue_unserved=self.api.served.unserved(job.queue))

    @rpc
    def SubmitJobs(self, request, context):
        if not request.jobs:
            raise InvalidField("jobs", "must hold at least one job")
        if len(request.jobs) > self.max_batch:
            raise InvalidField("jobs", f"holds {len(request.jobs)} jobs; at most "
                                       f"{self.max_batch} per call ([server] max_batch)")
        who = auth.caller()
        jobs = [spec_to_job(spec, who, prefix=f"jobs[{i}].", ceiling=self.api.ceiling,
                            targets=self.api.targets)
                for i, spec in enumerate(request.jobs)]
        created = self.api.submit(jobs)
        auth.audit("submit", f"{len(jobs)} jobs ({sum(created)} new): {_ids(jobs)}")
        return pb.SubmitJobsResponse(jobs=[
            pb.SubmitJobResponse(id=job.id, created=new,
                                 queue_unserved=self.api.served.unserved(job.queue))
            for job, new in zip(jobs, created)])

    @rpc
    def GetJob(self, request, context):
        check_job_id(request.id)
        return job_message(self.api.store.get_job(request.id, with_attempts=request.include_attempts),
                           auth.caller())

    @rpc
    def ListJobs(self, request, context):
        return self._list(request, dead_lettered=request.dead_lettered,
                          statuses=[self._status(s) for s in request.statuses],
                          name=request.name, created_after=request.created_after
                          if request.HasField("created_after") else None,
                          created_before=request.created_before
                          if request.HasField("created_before") else None,
                          schedule=request.schedule, selector=request.selector)

    def _list(self, request, *, dead_lettered: bool, statuses=(), name: str = "",
              created_after=None, created_before=None, schedule: str = "", selector: str = ""):
        size = request.page_size or 100
        if not 0 < size <= MAX_PAGE:
            raise InvalidField("page_size", f"must be 1 to {MAX_PAGE}, not {request.page_size}")
        if request.queue:
            check_queue(request.queue)
        if name:
            check_text("name", name, MAX_NAME)      # PostgreSQL text holds no NUL
        if request.page_token:
            try:
                if "\0" in decode_page_token(request.page_token)[1]:
                    raise ValueError("NUL in the job id")
            except ValueError:
                raise InvalidField("page_token", "malformed; pass next_page_token back unchanged")
        after = to_datetime(created_after, "created_after") if created_after else None
        before = to_datetime(created_before, "created_before") if created_before else None
        schedule_id = None
        if schedule:
            schedule_id = self.api.store.get_schedule(check_schedule_name(schedule))["id"]
        rows, token = self.api.store.list_jobs(
            statuses=statuses, queue=request.queue, name=name, created_after=after,
            created_before=before, dead_lettered=dead_lettered, schedule_id=schedule_id,
            selector=parse_selector(selector), limit=size, page_token=request.page_token)
        viewer = auth.caller()
        response = pb.ListJobsResponse(next_page_token=token)
        for row in rows:
            job_message(row, viewer, response.jobs.add())
        return response

    @staticmethod
    def _status(value: int, field_name: str = "statuses") -> JobStatus:
        if value == pb.JOB_STATUS_UNSPECIFIED or value not in pb.JobStatus.values():
            raise InvalidField(field_name, f"unknown status {value}")
        return JobStatus(pb.JobStatus.Name(value))

    def WatchJob(self, request, context) -> Iterator[pb.JobEvent]:
        try:
            check_job_id(request.id)
            yield from Watch(self.api.watches, self.api.store, self.api.queue, request.id,
                             context).events()
        except Exception as exc:
            abort(context, exc, "WatchJob")

    @rpc
    def CancelJob(self, request, context):
        check_job_id(request.id)
        previous, status, attempt = self.api.store.cancel(request.id, owner=_owner_filter())
        if previous is JobStatus.RUNNING:
            self.api.queue.request_cancel(request.id, attempt)
        elif previous is JobStatus.PENDING:
            self.api.forget_pending(request.id)
        if previous is not status:
            self.api.publish_state(request.id, status)
        auth.audit("cancel", f"{request.id} ({previous.value} -> {status.value})")
        return pb.CancelJobResponse(previous_status=pb.JobStatus.Value(previous.value),
                                    status=pb.JobStatus.Value(status.value))

    @rpc
    def RetryJob(self, request, context):
        check_job_id(request.id)
        requeued = self.api.store.retry(request.id, owner=_owner_filter())
        # Read before the push: once the id is in Redis a worker may claim it at once, and
        # the answer is the job as the retry left it (PENDING), not as a race leaves it.
        job = self.api.store.get_job(request.id)
        self.api.queue.push([Ready(requeued.id, requeued.queue, requeued.priority)])
        self.api.publish_state(request.id, JobStatus.PENDING)
        auth.audit("retry", request.id)
        return pb.RetryJobResponse(job=job_message(job, auth.caller()))

    # --- bulk actions -------------------------------------------------------------------

    def _selection(self, request, allowed: frozenset[JobStatus]) -> tuple[Selection, list[JobStatus], int]:
        """The validated selection of a bulk request, its statuses (default: every one in
        `allowed`) and its limit."""
        given = request.selection
        statuses = [self._status(value, "selection.statuses") for value in given.statuses]
        wrong = sorted(s.value for s in set(statuses) - allowed)
        if wrong:
            raise InvalidField("selection.statuses", f"{', '.join(wrong)}: this action takes "
                                                     f"only {', '.join(sorted(allowed))} jobs")
        if given.queue:
            check_queue(given.queue, "selection.queue")
        check_text("selection.name", given.name, MAX_NAME)
        selection = Selection(
            selector=parse_selector(given.selector, "selection.selector"),
            queue=given.queue, name=given.name,
            created_after=to_datetime(given.created_after, "selection.created_after")
            if given.HasField("created_after") else None,
            created_before=to_datetime(given.created_before, "selection.created_before")
            if given.HasField("created_before") else None,
            dead_lettered=given.dead_lettered)
        if not (selection.selector or statuses or selection.queue or selection.name
                or selection.created_after or selection.created_before
                or selection.dead_lettered):
            raise InvalidField("selection", "selects every job: give a selector, statuses, "
                                            "a queue, a name or a time")
        limit = request.limit or BULK_LIMIT
        if not 0 < limit <= BULK_LIMIT_MAX:
            raise InvalidField("limit", f"must be 1 to {BULK_LIMIT_MAX}, not {request.limit}")
        return selection, statuses or sorted(allowed), limit

    def _bulk(self, request, allowed, action: Callable[[Selection, list[JobStatus], str | None,
                                                       datetime, int], int], verb: str):
        """Count (dry run), or run `action` in batches of BULK_BATCH until it changes
        nothing more or the limit is reached."""
        selection, statuses, limit = self._selection(request, allowed)
        owner = _owner_filter()
        if request.dry_run:
            return pb.BulkJobsResponse(matched=self.api.store.count_selected(
                selection, statuses, owner=owner))
        started = self.api.store.now()
        changed = 0
        while changed < limit:
            done = action(selection, statuses, owner, started, min(BULK_BATCH, limit - changed))
            if not done:
                break
            changed += done
        more = changed >= limit and self.api.store.any_selected(selection, statuses, owner=owner)
        auth.audit(verb, f"{changed} jobs by selection {_selection_text(request.selection)}"
                         f"{' (limit reached)' if more else ''}")
        return pb.BulkJobsResponse(matched=changed, changed=changed, more=more)

    def _cancel_batch(self, selection, statuses, owner, started, limit) -> int:
        ended = self.api.store.cancel_batch(selection, statuses, owner=owner,
                                            created_by=started, limit=limit)
        try:
            self.api.queue.cancelled(
                pending=[(job.id, job.queue, job.priority) for job in ended
                         if job.previous is JobStatus.PENDING],
                running=[(job.id, job.attempt) for job in ended
                         if job.previous is JobStatus.RUNNING],
                events=[(job.id, Event("state", status=JobStatus.CANCELLED)) for job in ended])
        except redis.RedisError as exc:
            # Committed is committed: a worker drops a cancelled id when its claim fails,
            # and checks PostgreSQL while it runs a job (watchers poll it too).
            log.warning("%d cancelled job(s) not announced in Redis: %s", len(ended), exc)
        return len(ended)

    def _retry_batch(self, selection, statuses, owner, started, limit) -> int:
        requeued = self.api.store.retry_batch(selection, statuses, owner=owner,
                                              updated_by=started, limit=limit)
        self.api.queue.push([Ready(r.id, r.queue, r.priority) for r in requeued])
        try:
            self.api.queue.publish([(r.id, Event("state", status=JobStatus.PENDING))
                                    for r in requeued])
        except redis.RedisError as exc:
            log.debug("state events of %d retried jobs not published: %s", len(requeued), exc)
        return len(requeued)

    @rpc
    def CancelJobs(self, request, context):
        return self._bulk(request, CANCELLABLE, self._cancel_batch, "bulk cancel")

    @rpc
    def RetryJobs(self, request, context):
        allowed = (frozenset({JobStatus.FAILED}) if request.selection.dead_lettered
                   else RETRYABLE)
        return self._bulk(request, allowed, self._retry_batch, "bulk retry")

    @rpc
    def ListDeadLetters(self, request, context):
        return self._list(request, dead_lettered=True)

    @rpc
    def RequeueDeadLetters(self, request, context):
        for job_id in request.ids:
            check_job_id(job_id, "ids")
        if request.queue:
            check_queue(request.queue)
        if not request.ids and not request.all:
            raise InvalidField("ids", "name the jobs to requeue, or set all")
        requeued = self.api.store.requeue_dead(request.ids, queue=request.queue)
        self.api.queue.push([Ready(r.id, r.queue, r.priority) for r in requeued])
        auth.audit("dead-letter requeue", f"{len(requeued)} jobs: {_ids(requeued)}")
        return pb.RequeueDeadLettersResponse(ids=[r.id for r in requeued])

    @rpc
    def PurgeDeadLetters(self, request, context):
        for job_id in request.ids:
            check_job_id(job_id, "ids")
        if request.queue:
            check_queue(request.queue)
        purged = self.api.store.purge_dead(request.ids, queue=request.queue)
        what = ", ".join(request.ids) if request.ids else f"all of queue {request.queue or '*'}"
        auth.audit("dead-letter purge", f"{purged} jobs ({what[:500]})")
        return pb.PurgeDeadLettersResponse(purged=purged)

    def _node_records(self) -> list[dict]:
        """Every node's record from Redis; this host's own children from the master's file,
        which is current the moment the master says READY (Redis gets it a tick later).
        With Redis down, this host's record alone (it says that Redis is unreachable)."""
        try:
            records = self.api.queue.nodes()
        except redis.RedisError as exc:
            store_unavailable(exc)
            records = []
        local = _local_node_record(self.api.cfg)
        if local is not None:
            mine = next((r for r in records if r.get("node_id") == local.get("node_id")), None)
            if mine is None:
                records.append({**local, "seen_at": time.time()})
            else:
                mine.update({k: local[k] for k in ("children", "state", "status", "version",
                                                   "unreachable") if k in local})
        return records

    def _workers(self) -> dict[str, dict | None]:
        """The workers' heartbeats in Redis: none to show while it is down."""
        try:
            return self.api.queue.workers()
        except redis.RedisError as exc:
            store_unavailable(exc)
            return {}

    @rpc
    def JobActivity(self, request, context):
        minutes = request.minutes or ACTIVITY_MINUTES
        if not 0 < minutes <= ACTIVITY_MAX:
            raise InvalidField("minutes", f"must be 1 to {ACTIVITY_MAX}, not {request.minutes}")
        response = pb.JobActivityResponse()
        for minute, counts in self.api.store.activity(minutes):
            item = response.minutes.add(succeeded=counts.get("SUCCEEDED", 0),
                                        failed=counts.get("FAILED", 0),
                                        cancelled=counts.get("CANCELLED", 0))
            timestamp(_from_epoch(minute), item.minute)
        return response

    # --- queue controls -----------------------------------------------------------------

    @rpc
    def PauseQueue(self, request, context):
        """Recorded in PostgreSQL first (the truth, which the leader mirrors into Redis at
        every reconcile), then put in Redis, where the workers' fetch sees it at once."""
        name = check_queue(request.name, "name")
        row = self.api.store.pause_queue(name, auth.caller().submitted_by)
        self.api.queue.pause(name)
        auth.audit("queue pause", name)
        return self._queue_info(name, row)

    @rpc
    def ResumeQueue(self, request, context):
        name = check_queue(request.name, "name")
        self.api.store.resume_queue(name)
        self.api.queue.resume(name)
        auth.audit("queue resume", name)
        return self._queue_info(name)

    @rpc
    def SetQueueLimit(self, request, context):
        """PostgreSQL holds the limit (claims check it there); Redis's mirror only routes
        the queue's ids to the limited claim, and the leader rebuilds it."""
        name = check_queue(request.name, "name")
        if not 0 <= request.max_running <= MAX_RUNNING_LIMIT:
            raise InvalidField("max_running", f"must be 0 (no limit) to {MAX_RUNNING_LIMIT}, "
                                              f"not {request.max_running}")
        self.api.store.set_queue_limit(name, request.max_running)
        self.api.queue.set_limit(name, request.max_running)
        auth.audit("queue limit", f"{name}: max_running {request.max_running or 'none'}")
        return self._queue_info(name)

    def _queue_info(self, name: str, paused: dict[str, Any] | None = None) -> pb.QueueInfo:
        if paused is None:
            paused = next((r for r in self.api.store.paused_queues() if r["queue"] == name), None)
        return _queue_info(name, paused, self.api.store.queue_limits().get(name, 0))

    @rpc
    def ListQueues(self, request, context):
        paused = {row["queue"]: row for row in self.api.store.paused_queues()}
        limits = self.api.store.queue_limits()
        _, _, queues = self.api.store.counts()
        names = set(paused) | set(limits) | {row[0] for row in queues}
        names |= {q for beat in self._workers().values() if beat for q in beat.get("queues", ())}
        return pb.ListQueuesResponse(queues=[
            _queue_info(name, paused.get(name), limits.get(name, 0)) for name in sorted(names)])

    @rpc
    def ClusterStatus(self, request, context):
        by_status, dead, queues = self.api.store.counts()
        response = pb.ClusterStatusResponse(
            cluster=self.api.cfg.get("dtsd", "cluster"),
            single_node=True,
            dead_lettered=dead, server_node=self.api.cfg.node_id)
        for status in JobStatus:
            response.job_counts[status.value] = by_status.get(status.value, 0)
        try:
            by_priority, _ = self.api.queue.depths()
        except redis.RedisError as exc:
            store_unavailable(exc)
            by_priority = {}
        depths = {}
        for name, ready, delayed, running in queues:
            depths[name] = response.queues.add(queue=name, pending=ready, delayed=delayed,
                                               running=running)
        for (name, priority), count in sorted(by_priority.items()):
            if name not in depths:      # ids in Redis whose jobs are no longer PENDING
                depths[name] = response.queues.add(queue=name)
            depths[name].ready_by_priority[priority] = count
        for row in self.api.store.paused_queues():     # a paused queue shows, even empty
            if row["queue"] not in depths:
                depths[row["queue"]] = response.queues.add(queue=row["queue"])
            depths[row["queue"]].paused = True
        for name, limit in sorted(self.api.store.queue_limits().items()):    # and a limited one
            if name not in depths:
                depths[name] = response.queues.add(queue=name)
            depths[name].max_running = limit
        fence = self.api.store.fence_token(self.api.cfg.get("dtsd", "cluster"))
        if fence is not None:
            response.fencing_token = fence[0]
        for record in self._node_records():
            node = response.nodes.add(node_id=record.get("node_id", ""),
                                      version=record.get("version", ""),
                                      leader=bool(record.get("leader")),
                                      state=record.get("state", ""))
            timestamp(_from_epoch(record.get("started_at")), node.started_at)
            timestamp(_from_epoch(record.get("seen_at")), node.seen_at)
            for item in record.get("children", ()):
                node.children.add(role=item["role"], index=item["index"], pid=item.get("pid") or 0,
                                  state=item["state"], uptime_seconds=item.get("uptime", 0.0),
                                  restarts=item.get("restarts", 0))
            for store, since in sorted((record.get("unreachable") or {}).items()):
                timestamp(_from_epoch(since), node.unreachable.add(store=store).since)
            if node.leader and not response.leader:
                response.leader = node.node_id
            response.single_node = response.single_node and record.get("single_node", True)
        for worker_id, beat in self._workers().items():
            if beat is None:
                continue
            info = response.workers.add(id=worker_id, node_id=beat["node"], pid=beat["pid"],
                                        queues=beat["queues"], concurrency=beat["concurrency"],
                                        running=beat["running"])
            timestamp(_from_epoch(beat.get("seen")), info.seen_at)
        return response


MAX_RUNNING_LIMIT = 1_000_000


def _queue_info(name: str, paused: dict[str, Any] | None, max_running: int) -> pb.QueueInfo:
    info = pb.QueueInfo(name=name, max_running=max_running)
    if paused is not None:
        info.paused, info.paused_by = True, paused["paused_by"]
        timestamp(paused["paused_at"], info.paused_at)
    return info


def _ids(jobs, shown: int = 20) -> str:
    ids = [job.id for job in jobs]
    return ", ".join(ids[:shown]) + (f", ... ({len(ids) - shown} more)" if len(ids) > shown else "")


def _local_node_record(cfg: Config) -> dict | None:
    """The master's node.json, each RUNNING child's uptime as of now (the file is rewritten
    every few seconds; `running_since` is a unix time of this host's clock)."""
    try:
        with open(os.path.join(cfg.get("dtsd", "runtime_dir"), "node.json"), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    now = time.time()
    for item in record.get("children", ()):
        if item.get("running_since"):
            item["uptime"] = round(max(0.0, now - item["running_since"]), 1)
    return record


def _from_epoch(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, tz=timezone.utc) if value else None


# --- the seed's surface -------------------------------------------------------------------

class SeedJobService(seed_pb_grpc.JobServiceServicer):
    """scheduler.JobService, as the Go seed's clients call it."""

    def __init__(self, api: Api):
        self.api = api

    @rpc
    def SubmitJob(self, request, context):
        who = auth.caller()
        job = validate_spec(id=request.id, command=request.command, queue=DEFAULT_QUEUE,
                            submitted_by=who.submitted_by, owner=who.principal)
        self.api.submit([job])
        auth.audit("submit", f"1 job: {job.id} (seed JobService)")
        return seed_pb.JobResponse(job_id=job.id, success=True, message="Job submitted successfully")

    @rpc
    def GetJobStatus(self, request, context):
        check_job_id(request.id)
        row = self.api.store.get_job(request.id)
        return seed_pb.JobStatus(id=row["id"], status=row["status"], output=readable(row["output"]),
                                 created_at=epoch(row["created_at"]),
                                 updated_at=epoch(row["updated_at"]))


class SeedTaskScheduler(seed_pb_grpc.TaskSchedulerServicer):
    """scheduler.TaskScheduler: defined but dead in the seed; here `schedule_time` delays."""

    def __init__(self, api: Api):
        self.api = api

    @rpc
    def SubmitTask(self, request, context):
        if not 0 <= request.schedule_time <= MAX_SECONDS:
            raise InvalidField("schedule_time", f"must be unix seconds from 0 to {MAX_SECONDS} "
                                                f"(9999-12-31), not {request.schedule_time}")
        run_at = (datetime.fromtimestamp(request.schedule_time, tz=timezone.utc)
                  if request.schedule_time else None)
        who = auth.caller()
        job = validate_spec(id=request.id, name=request.name, command=request.command,
                            run_at=run_at, submitted_by=who.submitted_by, owner=who.principal)
        self.api.submit([job])
        auth.audit("submit", f"1 job: {job.id} (seed TaskScheduler)")
        return seed_pb.TaskResponse(task_id=job.id, success=True, message="Task scheduled successfully")

    @rpc
    def GetTaskStatus(self, request, context):
        check_job_id(request.id)
        row = self.api.store.get_job(request.id)
        status = "COMPLETED" if row["status"] == JobStatus.SUCCEEDED.value else row["status"]
        return seed_pb.TaskStatus(id=row["id"], status=status, result=readable(row["output"]))


# --- the process --------------------------------------------------------------------------

class Server:
    """One API child: a sync gRPC server whose streams can never starve its unary calls.

    The thread pool holds `[server] threads` for unary calls plus `[server] max_streams`
    for streams, and `streams.StreamLimiter` refuses a stream beyond its caps before it
    can take more (dtsd/streams.py). Every WatchJob stream shares one Redis subscription
    and one PostgreSQL recheck (dtsd/watch.py), so an open stream costs a sleeping thread.
    """

    def __init__(self, cfg: Config, index: int, parent: child.Parent):
        self.cfg = cfg
        self.index = index
        self.parent = parent
        threads = cfg.get("server", "threads")
        self.store = Store(cfg.get("postgres", "dsn"), min_size=cfg.get("postgres", "pool_min"),
                           max_size=max(2, min(cfg.get("postgres", "pool_max"), threads)),
                           name=f"dtsd-server-{index}", timeout=POOL_WAIT,
                           answer_within=ANSWER_WITHIN)
        self.queue = Queue(connect(cfg.get("redis", "url")), cfg.key_prefix)
        self.stopping = threading.Event()
        self.fast = False
        self.watches = WatchHub(self.store, self.queue)
        self.api = Api(cfg, self.store, self.queue, self.watches)
        max_message = cfg.get("server", "max_message_size")
        tokens_file = cfg.get("server", "tokens_file")
        caps = streams.Caps(total=cfg.get("server", "max_streams"),
                            per_peer=cfg.get("server", "max_streams_per_peer"),
                            public_total=cfg.get("server", "max_public_streams"))
        self.stream_slots = streams.StreamSlots(caps)
        anonymous = cfg.get("server", "anonymous_role")
        self.runtime_dir = cfg.get("dtsd", "runtime_dir")
        self.local_socket = identity.api_socket(self.runtime_dir, os.getpid())
        # The caps after auth (a call it refuses takes no slot); DecodeRequests innermost,
        # so that both refuse before any parsing.
        interceptors = [
            CountCalls([*SERVICES, introspection.HEALTH_SERVICE_NAME,
                        introspection.REFLECTION_SERVICE_NAME]),
            auth.AuthInterceptor(auth.TokenFile(tokens_file) if tokens_file else None,
                                 local_key=identity.read_key(self.runtime_dir),
                                 node=cfg.node_id, runtime_dir=self.runtime_dir,
                                 anonymous_role=auth.Role(anonymous) if anonymous else None),
            streams.StreamLimiter(self.stream_slots),
            DecodeRequests(),
        ]
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads + caps.total, thread_name_prefix="rpc"),
            interceptors=interceptors,
            options=[("grpc.so_reuseport", 1),
                     ("grpc.max_receive_message_length", max_message),
                     ("grpc.max_send_message_length", 64 * 1024 * 1024),
                     *streams.server_options(threads=threads, caps=caps,
                                             idle_timeout=cfg.get("server", "idle_timeout"))])
        pb_grpc.add_SchedulerServicer_to_server(SchedulerService(self.api), self.grpc)
        seed_pb_grpc.add_JobServiceServicer_to_server(SeedJobService(self.api), self.grpc)
        seed_pb_grpc.add_TaskSchedulerServicer_to_server(SeedTaskScheduler(self.api), self.grpc)
        self.health = introspection.add_to_server(self.grpc, list(SERVICES))
        backing.health.listen(lambda store, outage: self._set_overall_health())

    def _on_signal(self, signum, frame) -> None:
        self.fast = self.fast or signum == signal.SIGQUIT
        self.stopping.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGQUIT, self._on_signal)
        if not child.connect(self.store, self.queue, log, self.stopping, probe_always=True):
            return child.EXIT_OK
        streams.raise_open_files_limit()
        self.watches.start()
        host, port = self.cfg.get("server", "listen")
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            credentials = self._credentials()
            bound = (self.grpc.add_secure_port(address, credentials) if credentials
                     else self.grpc.add_insecure_port(address))
        except (RuntimeError, OSError) as exc:
            bound, error = 0, exc
        else:
            error = None
        if not bound:
            log.error("cannot listen on %s: %s", address, error or "address in use or not available")
            return child.EXIT_BOOT
        if not self._bind_local_socket():
            return child.EXIT_BOOT
        self.grpc.start()
        for name in SERVICES:
            self.health.set(name, introspection.health_pb2.HealthCheckResponse.SERVING)
        self._set_overall_health()
        anonymous = self.cfg.get("server", "anonymous_role")
        log.info("serving dtsd %s on %s (%s, %s) and %s; calls without a token: %s",
                 __version__, address,
                 "mTLS" if self.cfg.get("server", "tls_client_ca") else
                 "TLS" if self.cfg.get("server", "tls_cert") else "plaintext",
                 "tokens file" if self.cfg.get("server", "tokens_file") else "no tokens",
                 self.local_socket,
                 f"role {anonymous}" if anonymous else "refused (local users: local_roles)")
        self.parent.ready()
        while not self.stopping.wait(1.0):
            self.parent.alive()
        grace = 0 if self.fast else self.cfg.get("server", "stopwaitsecs")
        log.info("stopping: in-flight RPCs have %.0fs", grace)
        self.health.enter_graceful_shutdown()
        self.watches.stop()     # WatchJob streams end now; others get the grace
        self.grpc.stop(grace).wait()
        self.store.close()
        return child.EXIT_OK

    def _set_overall_health(self) -> None:
        """The server as a whole ("") serves only while it reaches PostgreSQL and Redis:
        a balancer then sends its callers elsewhere. After TERM it stays NOT_SERVING."""
        status = introspection.health_pb2.HealthCheckResponse
        down = any(backing.health.is_down(store) for store in SERVING_NEEDS)
        self.health.set("", status.NOT_SERVING if down else status.SERVING)

    def _bind_local_socket(self) -> bool:
        """The API for local callers: `<runtime_dir>/api-<pid>.sock`, mode 0666 (anyone may
        connect: who they are decides what they may do). Plaintext: it never leaves the
        host. The master removes it when this child is gone; gRPC removes it on stop."""
        address = f"unix:{self.local_socket}"
        try:
            bound = self.grpc.add_insecure_port(address)
            if bound:
                os.chmod(self.local_socket, 0o666)
        except (RuntimeError, OSError) as exc:
            log.error("cannot listen on %s: %s", address, exc)
            return False
        if not bound:
            log.error("cannot listen on %s ([dtsd] runtime_dir must be writable, and the "
                      "path shorter than 108 bytes)", address)
        return bool(bound)

    def _credentials(self) -> grpc.ServerCredentials | None:
        """TLS when [server] tls_cert and tls_key are set; mTLS with tls_client_ca too."""
        cert, key = self.cfg.get("server", "tls_cert"), self.cfg.get("server", "tls_key")
        if not (cert and key):
            return None
        client_ca = self.cfg.get("server", "tls_client_ca")

        def read(path: str) -> bytes:
            with open(path, "rb") as handle:
                return handle.read()
        return grpc.ssl_server_credentials(
            [(read(key), read(cert))], root_certificates=read(client_ca) if client_ca else None,
            require_client_auth=bool(client_ca))


def main(argv: list[str] | None = None) -> int:
    cfg, index, parent = child.boot("server", argv)
    return Server(cfg, index, parent).run()


if __name__ == "__main__":
    sys.exit(main())
