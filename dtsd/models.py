"""The job model shared by every process: states, limits, and validation of new jobs.

Everything stored or sent is an Enum member here, never a bare string. Validation is
the edge: `validate_spec` either returns a `NewJob` that the store may insert as is, or
raises `InvalidField` naming the field and the problem, before anything is written.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Collection, Mapping, Sequence

# Per-job resource limits are defined beside the configuration that sets their defaults
# (config.py, which the master loads without this module's hashlib and uuid).
from .config import LIMIT_PROTO_FIELDS, LIMITS, MAX_LIMIT, limits_text  # noqa: F401
from .config import NOTIFY_EVENTS, TARGET_NAME, NotifyEvent  # noqa: F401


class JobStatus(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    def __str__(self) -> str:
        return self.value


FINAL_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class EndReason(str, enum.Enum):
    """Why an attempt ended other than by the command exiting on its own."""

    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    LOST = "lost"            # its worker died; recovered by the leader
    HANDED_BACK = "handed back"  # worker stopped before the job finished; not counted as a failure
    SPAWN_FAILED = "spawn failed"

    def __str__(self) -> str:
        return self.value


# Limits on what a submitter may send. They keep rows, messages and environments sane.
MAX_ID = 128
MAX_NAME = 256
MAX_COMMAND = 64 * 1024
MAX_ENV_ENTRIES = 256
MAX_NOTIFY = 16
MAX_ENV_KEY = 256
MAX_ENV_TOTAL = 128 * 1024
MAX_CWD = 4096
MAX_IDEMPOTENCY_KEY = 256
MAX_PRIORITY = 9
MAX_RETRIES_LIMIT = 100
MAX_TIMEOUT = 30 * 86400.0
DEFAULT_QUEUE = "default"
DEFAULT_MAX_RETRIES = 3

# \Z, not $: `$` also matches before a final newline, and "default\n" is no queue name.
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,%d}\Z" % (MAX_ID - 1))
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
QUEUE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}\Z")
RESERVED_ENV = frozenset({"DTSD_JOB_ID", "DTSD_ATTEMPT"})


def check_limits(limits: Mapping[str, int], ceiling: Mapping[str, int] | None,
                 field_name: str = "limits") -> dict[str, int]:
    """A job's own limits: known names, positive, and at most the admin's ceiling.

    0 (or absent) means "the worker's default", so it is dropped here.
    """
    checked = {}
    for name, value in limits.items():
        if name not in LIMITS:
            raise InvalidField(field_name, f"unknown limit {name[:40]!r} "
                                           f"(known: {', '.join(LIMITS)})")
        if not isinstance(value, int) or value < 0 or value > MAX_LIMIT:
            raise InvalidField(f"{field_name}.{name}", f"must be 0 (the default) or a positive "
                                                       f"whole number, not {value!r}")
        if value == 0:
            continue
        top = (ceiling or {}).get(name)
        if top is not None and value > top:
            raise InvalidField(f"{field_name}.{name}",
                               f"{limits_text({name: value})} is above the ceiling "
                               f"{limits_text({name: top})} ([worker] limits_max)")
        checked[name] = value
    return checked


class InvalidField(ValueError):
    """Bad input. `field` names what is wrong, in the API's own words."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


@dataclass
class NewJob:
    """A validated job, ready to insert."""

    id: str
    command: str
    name: str = ""
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout: float = 0.0
    run_at: datetime | None = None
    idempotency_key: str | None = None
    submitted_by: str = ""
    owner: str = ""              # the principal that may see its env, cancel and retry it
    schedule_id: int | None = None
    fire_time: datetime | None = None
    limits: dict[str, int] = field(default_factory=dict)
    notify: tuple[str, ...] = ()     # webhook target names ([notify] targets); see resolve_notify
    notify_on: tuple[str, ...] = ()  # NotifyEvent values

    def fingerprint(self) -> str:
        """What an idempotent repeat must match: the spec, not the id or submitter (the
        key itself belongs to the owner: the same key of another owner is another job)."""
        spec = [self.command, self.name, sorted(self.env.items()), self.cwd, self.queue,
                self.priority, self.max_retries, self.timeout]
        if self.limits:   # only when set, so fingerprints stored before limits existed hold
            spec.append(sorted(self.limits.items()))
        if self.notify or self.notify_on:   # the same: fingerprints from before still hold
            spec.append([list(self.notify), list(self.notify_on)])
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def new_job_id() -> str:
    return str(uuid.uuid4())


def check_text(field_name: str, value: str, limit: int, *, required: bool = False) -> str:
    if required and not value.strip():
        raise InvalidField(field_name, "must not be empty")
    if "\0" in value:
        raise InvalidField(field_name, "must not contain NUL bytes")
    if len(value.encode("utf-8", "surrogatepass")) > limit:
        raise InvalidField(field_name, f"is longer than {limit} bytes")
    return value


def check_job_id(value: str, field_name: str = "id") -> str:
    if not JOB_ID.match(value):
        raise InvalidField(field_name, f"malformed job id {value[:80]!r} (letters, digits, "
                                       f"'.', '_', ':', '-'; at most {MAX_ID})")
    return value


def check_queue(value: str, field_name: str = "queue") -> str:
    if not QUEUE_NAME.match(value):
        raise InvalidField(field_name, f"bad queue name {value[:80]!r} (lower-case letters, "
                                       "digits, '_', '.', '-'; at most 64; starts with a letter "
                                       "or digit)")
    return value


def validate_spec(*, id: str = "", command: str, name: str = "", env: dict[str, str] | None = None,
                  cwd: str = "", queue: str = "", priority: int = 0,
                  max_retries: int | None = None, timeout: float = 0.0,
                  run_at: datetime | None = None, idempotency_key: str = "",
                  submitted_by: str = "", owner: str = "", prefix: str = "",
                  limits: Mapping[str, int] | None = None,
                  ceiling: Mapping[str, int] | None = None,
                  notify: Sequence[str] = (), notify_on: Sequence[str] = (),
                  targets: Collection[str] | None = None) -> NewJob:
    """Check every field of a submitted job; `prefix` qualifies field names (`jobs[3].`).

    `ceiling` is the admin's highest allowed value per limit ([worker] limits_max);
    `targets` the webhook target names of [notify] targets (None: not checked, as dtsctl
    does, which does not know the server's)."""
    def f(name_: str) -> str:
        return prefix + name_

    job_id = check_job_id(id, f("id")) if id else new_job_id()
    check_text(f("command"), command, MAX_COMMAND, required=True)
    check_text(f("name"), name, MAX_NAME)
    env = dict(env or {})
    if len(env) > MAX_ENV_ENTRIES:
        raise InvalidField(f("env"), f"has more than {MAX_ENV_ENTRIES} entries")
    total = 0
    for key, value in env.items():
        if not ENV_KEY.match(key) or len(key) > MAX_ENV_KEY:
            raise InvalidField(f("env"), f"bad variable name {key[:80]!r} "
                                         "(letters, digits and '_', not starting with a digit)")
        if key in RESERVED_ENV:
            raise InvalidField(f("env"), f"{key} is set by dtsd itself")
        check_text(f(f"env[{key}]"), value, MAX_ENV_TOTAL)
        total += len(key) + len(value.encode("utf-8", "surrogatepass")) + 2
    if total > MAX_ENV_TOTAL:
        raise InvalidField(f("env"), f"is larger than {MAX_ENV_TOTAL} bytes in all")
    if cwd:
        check_text(f("cwd"), cwd, MAX_CWD)
        if not cwd.startswith("/"):
            raise InvalidField(f("cwd"), f"must be an absolute path, not {cwd[:80]!r}")
    queue = check_queue(queue or DEFAULT_QUEUE, f("queue"))
    if not 0 <= priority <= MAX_PRIORITY:
        raise InvalidField(f("priority"), f"must be 0 to {MAX_PRIORITY}, not {priority}")
    if max_retries is None:
        max_retries = DEFAULT_MAX_RETRIES
    if not 0 <= max_retries <= MAX_RETRIES_LIMIT:
        raise InvalidField(f("max_retries"), f"must be 0 to {MAX_RETRIES_LIMIT}, not {max_retries}")
    if not math.isfinite(timeout) or timeout < 0:
        raise InvalidField(f("timeout_seconds"), f"must be 0 (none) or positive, not {timeout}")
    if timeout > MAX_TIMEOUT:
        raise InvalidField(f("timeout_seconds"), f"must be at most {MAX_TIMEOUT:.0f} (30 days)")
    if run_at is not None and run_at.tzinfo is None:
        run_at = run_at.replace(tzinfo=timezone.utc)
    check_text(f("idempotency_key"), idempotency_key, MAX_IDEMPOTENCY_KEY)
    checked_limits = check_limits(limits or {}, ceiling, f("limits"))
    return NewJob(id=job_id, command=command, name=name, env=env, cwd=cwd, queue=queue,
                  priority=priority, max_retries=max_retries, timeout=timeout, run_at=run_at,
                  idempotency_key=idempotency_key or None, submitted_by=submitted_by,
                  owner=owner, limits=checked_limits,
                  notify=check_notify(notify, targets, f("notify")),
                  notify_on=check_notify_on(notify_on, f("notify_on")))


def check_notify(names: Sequence[str], targets: Collection[str] | None,
                 field_name: str = "notify") -> tuple[str, ...]:
    """Target names a job asks to be notified at: known ones only, never URLs
    (docs/notifications.md: a submitter choosing a URL could make dtsd POST anywhere)."""
    names = tuple(dict.fromkeys(names))
    if len(names) > MAX_NOTIFY:
        raise InvalidField(field_name, f"names {len(names)} targets; at most {MAX_NOTIFY}")
    for name in names:
        if not TARGET_NAME.match(name):
            raise InvalidField(field_name, f"bad target name {name[:80]!r} (a name from the "
                                           "server's [notify] targets, not a URL)")
        if targets is not None and name not in targets:
            raise InvalidField(field_name, f"unknown target {name!r} (known: "
                                           f"{', '.join(sorted(targets)) or 'none'})")
    return names


def check_notify_on(events: Sequence[str], field_name: str = "notify_on") -> tuple[str, ...]:
    events = tuple(dict.fromkeys(events))
    for event in events:
        if event not in NOTIFY_EVENTS:
            raise InvalidField(field_name, f"unknown event {event[:80]!r} (known: "
                                           f"{', '.join(NOTIFY_EVENTS)})")
    return events


def resolve_notify(job: NewJob, default: Sequence[str], on: Sequence[str]) -> NewJob:
    """Fill in [notify] default and on where the job names no targets or events; what is
    stored is what is notified. No target: no events either (nothing to notify)."""
    job.notify = job.notify or tuple(default)
    job.notify_on = (job.notify_on or tuple(on)) if job.notify else ()
    return job


def schedule_job(schedule: dict, slot: datetime | None) -> NewJob:
    """The job a schedule row submits for `slot` (None: fired by hand).

    A slot's job id names the schedule and the slot, so a slot can be inserted only once,
    whichever leader (or two) fires it.
    """
    template = schedule["job"]
    job_id = (f"cron-{schedule['id']}-{int(slot.timestamp())}" if slot else
              f"cron-{schedule['id']}-run-{uuid.uuid4().hex[:12]}")
    return NewJob(id=job_id, command=template["command"],
                  name=template.get("name") or schedule["name"], env=template.get("env", {}),
                  cwd=template.get("cwd", ""), queue=template.get("queue", DEFAULT_QUEUE),
                  priority=template.get("priority", 0),
                  max_retries=template.get("max_retries", DEFAULT_MAX_RETRIES),
                  timeout=template.get("timeout", 0.0), limits=template.get("limits", {}),
                  notify=tuple(template.get("notify", ())),
                  notify_on=tuple(template.get("notify_on", ())),
                  submitted_by=f"schedule:{schedule['name']}",
                  owner=f"schedule:{schedule['name']}", schedule_id=schedule["id"],
                  fire_time=slot)


def retry_delay(failures: int, base: float, cap: float, rand: float) -> float:
    """Exponential back-off with full jitter on the upper half: base * 2^(n-1), capped.

    `rand` is a uniform number in [0, 1) supplied by the caller (testable, no hidden state).
    The delay lies in [d/2, d], so retries of jobs that failed together spread out.
    """
    delay = min(cap, base * (2 ** max(0, failures - 1)))
    return delay / 2 + delay / 2 * rand


# --- the job lines of the log -------------------------------------------------------------

#: The logger of the lines about single jobs (docs/processes.md, Logs): a job that failed
#: for good or was lost with its worker, and with `[dtsd] log_jobs` every attempt's start
#: and end. Its lines name user text (the job's name, its error): the log formatter escapes
#: every control character of a message, arguments included (child.LogFormatter).
JOB_LOGGER = "dtsd.jobs"


def job_label(job_id: str, name: str, queue: str) -> str:
    """How a log line names a job: `job ID (NAME) on queue QUEUE`, no parentheses when the
    job has no name."""
    named = f" ({name})" if name else ""
    return f"job {job_id}{named} on queue {queue}"
