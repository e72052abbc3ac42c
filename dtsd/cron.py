"""Cron schedules: parsing, slot arithmetic with explicit DST rules, and the misfire rule.

Pure logic with no I/O. The API validates and previews with it; the leader asks it which
slots are due.

Expressions
-----------
- Five fields: ``minute hour day-of-month month day-of-week``.
- Six fields: the same with **seconds first** (``*/10 * * * * *`` is every 10 seconds,
  ``0 30 9 * * *`` is 09:30:00 every day), as in the seed's robfig/cron ``SecondOptional``.
- Each field is a list (``,``) of ``*``, ``?``, ``N``, ``N-M``, each optionally with a step
  ``/S``; ``N/S`` means ``N-max/S``. Months take ``JAN``-``DEC`` and days of the week
  ``SUN``-``SAT`` (either case); day-of-week 0 and 7 are both Sunday.
- If both day-of-month and day-of-week are restricted, a day matches when **either** does
  (classic cron). If either field starts with ``*`` or ``?``, a day must match both.
- Aliases: ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily``
  (``@midnight``) and ``@hourly``. ``@every 90s`` / ``@every 1h30m`` fires at a fixed
  interval (whole seconds, 1 s to 366 days) counted from the Unix epoch, so every node
  computes the same instants and the time zone does not move them.
- A leading ``CRON_TZ=Zone`` (or ``TZ=Zone``) sets the time zone, as robfig/cron allows.
- Rejected, with a message naming the problem: a wrong number of fields, values out of
  range, reversed ranges, zero steps, unknown names or aliases, NUL bytes, more than 256
  characters, and expressions that can never fire (``0 0 30 2 *``).

Time zones and daylight saving time
-----------------------------------
A schedule has an IANA time zone (default UTC). The expression is matched against the
wall clock of that zone, then each matching wall-clock time becomes one instant:

- A wall-clock time that does not exist, because the clocks jump forward (02:30 on the
  last Sunday of March in Europe/Berlin), fires **once, at the end of the gap** (03:00
  local), the first instant after the jump. Several slots in the same gap, and a slot at
  the end of the gap itself, are one firing.
- A wall-clock time that happens twice, because the clocks go back (02:30 on the last
  Sunday of October in Europe/Berlin), fires **once, at its first occurrence**. The
  repeated hour does not fire again.

Every instant dtsd computes or stores is in UTC. ``dtsctl cron next`` shows the
instant, the local time with its UTC offset, and a note wherever one of these rules applied.

Missed slots (misfire policy)
-----------------------------
The leader fires the slots that fall after the schedule's last fired slot (or after its
creation, before the first firing), never counting from "now", so downtime behaves
predictably. How late a slot is decides what happens to it:

- **On time**: less than the grace late (the caller's `grace`; ``MISFIRE_GRACE``, 60 s,
  when none is given; never more than the catch-up window). It always fires, whatever
  the policy. The dtsd leader passes three housekeeping ticks (at least 1 s): it wakes
  at each slot, so a slot fired on time is a few milliseconds late, and a slot that
  waited out a failover or a loss of quorum is missed and follows the policy.
- **Missed**: later than that but less than the catch-up window (default 1 hour) late.
  ``skip`` drops it; ``run_once`` fires only the latest missed slot; ``run_all`` fires
  every one, oldest first.
- **Expired**: the catch-up window or more late. It never fires.

After a three-hour outage, a schedule that fires every 15 minutes with a one-hour window
and the leader back at 12:00:30 fires 12:00 under ``skip``, 11:45 and 12:00 under
``run_once``, and 11:15, 11:30, 11:45 and 12:00 under ``run_all``.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

__all__ = [
    "CronError", "Misfire", "Overlap", "Cron", "parse", "due_slots",
    "MAX_EXPRESSION", "MAX_DUE", "MISFIRE_GRACE", "DEFAULT_CATCHUP_WINDOW",
]

MAX_EXPRESSION = 256
MAX_TIMEZONE = 128
MISFIRE_GRACE = 60.0            # seconds late a slot may be and still count as on time
DEFAULT_CATCHUP_WINDOW = 3600.0  # what a catch-up window of 0 means (as in the proto)
MAX_DUE = 1000                   # slots due_slots returns at most in one call
MAX_EVERY = 366 * 86400          # @every at most this many seconds

UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
_ZERO = timedelta()
_MINUTE = timedelta(minutes=1)
_HOUR = timedelta(hours=1)
# The never-fires check asks croniter for a match after this date. A date that a cron
# expression matches at all recurs within 28 years (40 across 2100, not a leap year), and
# croniter searches 50 before it gives up.
_PROBE_WALL = datetime(2000, 1, 1)

_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = {name: i + 1 for i, name in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"))}
_DAYS = {name: i for i, name in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int] | None = None


_SECOND_FIELD = _Field("second", 0, 59)
_FIVE_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, _MONTHS),
    _Field("day-of-week", 0, 7, _DAYS),
)
_NUMBER = re.compile(r"[0-9]{1,9}")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|us|µs|ns|h|m|s)")
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


class CronError(ValueError):
    """An expression or time zone dtsd cannot schedule. The message starts with the part
    at fault (``expression:`` or ``timezone:``) and says what is wrong with it."""


class Misfire(str, enum.Enum):
    """What happens to slots missed while no leader could fire them (see the module doc)."""

    SKIP = "skip"
    RUN_ONCE = "run_once"
    RUN_ALL = "run_all"

    def __str__(self) -> str:
        return self.value


class Overlap(str, enum.Enum):
    """What a firing does while the schedule's previous job still runs."""

    ALLOW = "allow"       # start it anyway
    FORBID = "forbid"     # skip the slot
    REPLACE = "replace"   # cancel the running job, then start

    def __str__(self) -> str:
        return self.value


class _Kind(enum.Enum):
    PLAIN = ""
    GAP = "gap"      # the wall time does not exist; moved to the end of the gap
    FOLD = "fold"    # the wall time happens twice; the first occurrence


@dataclass(frozen=True)
class Cron:
    """A validated schedule: ``expression`` (whitespace normalised, any ``CRON_TZ=`` prefix
    moved into ``timezone``) and ``timezone`` (an IANA name, ``"UTC"`` when none is given).

    Constructing one validates it and raises `CronError`. Every method takes aware
    datetimes (a naive one raises ValueError) and returns aware UTC datetimes.
    """

    expression: str
    timezone: str = "UTC"
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)
    _spec: str = field(init=False, repr=False, compare=False)      # croniter form, 5 fields
    _seconds: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _day_or: bool = field(init=False, repr=False, compare=False)
    _every: int = field(init=False, repr=False, compare=False)     # seconds; 0: not @every

    def __post_init__(self) -> None:
        expression, prefix_zone = _split_expression(self.expression)
        zone_name = _zone_name(self.timezone, prefix_zone)
        set_ = object.__setattr__
        set_(self, "expression", expression)
        set_(self, "timezone", zone_name)
        set_(self, "_zone", _load_zone(zone_name))
        every = _every_seconds(expression)
        set_(self, "_every", every)
        set_(self, "_spec", "")
        set_(self, "_seconds", (0,))
        set_(self, "_day_or", True)
        if every:
            return
        spec, seconds, day_or = _compile(expression)
        set_(self, "_spec", spec)
        set_(self, "_seconds", seconds)
        set_(self, "_day_or", day_or)
        if next(self._walls(_PROBE_WALL), None) is None:
            fields = _ALIASES.get(expression.lower(), expression).split()[-5:]
            raise CronError(f"expression: {expression!r} never fires: day-of-month "
                            f"{fields[2]!r} does not occur in month {fields[3]!r}")

    # -- public --------------------------------------------------------------------------

    def next_after(self, instant: datetime) -> datetime:
        """The first slot strictly after ``instant``.

        Cheap enough for every leader tick: one croniter object and usually one step.
        """
        after = _utc(instant, "instant")
        if self._every:
            return self._every_slot(_floor_seconds(after) // self._every + 1)
        for at, _wall, _kind in self._fires(after):
            return at
        raise CronError(f"expression: {self.expression!r} never fires after {after.isoformat()}")

    def slots_between(self, start: datetime, end: datetime, limit: int = 10000) -> list[datetime]:
        """The slots ``s`` with ``start < s <= end``, ascending, at most ``limit`` (the
        earliest ones). Each instant appears once, however many wall times map to it."""
        lo, hi = _utc(start, "start"), _utc(end, "end")
        if hi <= lo or limit <= 0:
            return []
        if self._every:
            first = _floor_seconds(lo) // self._every + 1
            last = min(_floor_seconds(hi) // self._every, first + limit - 1)
            return [self._every_slot(k) for k in range(first, last + 1)]
        slots: list[datetime] = []
        for at, _wall, _kind in self._fires(lo):
            if at > hi:
                break
            if slots and slots[-1] == at:
                continue
            slots.append(at)
            if len(slots) >= limit:
                break
        return slots

    def preview(self, after: datetime, count: int) -> list[tuple[datetime, str, str]]:
        """The next ``count`` slots after ``after`` as ``(utc instant, local wall time with
        its UTC offset, note)``, e.g. ``"2026-03-29 03:00:00+02:00"``. The note says which
        DST rule moved or merged the slot, and is empty otherwise."""
        after = _utc(after, "after")
        if count <= 0:
            return []
        if self._every:
            at = self.next_after(after)
            out = []
            for _ in range(count):
                out.append((at, _local_text(at.astimezone(self._zone)), ""))
                at += timedelta(seconds=self._every)
            return out
        groups: list[tuple[datetime, list[tuple[datetime, _Kind]]]] = []
        for at, wall, kind in self._fires(after, explain=True):
            if groups and groups[-1][0] == at:
                groups[-1][1].append((wall, kind))
                continue
            if len(groups) == count:
                break
            groups.append((at, [(wall, kind)]))
        return [(at, _local_text(at.astimezone(self._zone)), self._note(at, walls))
                for at, walls in groups]

    # -- internals -----------------------------------------------------------------------

    def _every_slot(self, k: int) -> datetime:
        return _EPOCH + timedelta(seconds=k * self._every)

    def _walls(self, after_wall: datetime) -> Iterator[datetime]:
        """Naive local wall times matching the expression, strictly after ``after_wall``.

        croniter finds the matching minutes and the seconds field is applied here, so a
        per-second schedule costs one croniter step per minute, not per second.
        """
        minute = after_wall.replace(second=0, microsecond=0)
        it = croniter(self._spec, minute - _MINUTE, ret_type=datetime, day_or=self._day_or)
        offsets = [timedelta(seconds=s) for s in self._seconds]
        while True:
            try:
                minute = it.get_next()
            except (CroniterBadDateError, OverflowError, ValueError):
                return  # no match within croniter's horizon, or past year 9999
            for offset in offsets:
                wall = minute + offset
                if wall > after_wall:
                    yield wall

    def _fires(self, after: datetime, explain: bool = False
               ) -> Iterator[tuple[datetime, datetime, _Kind]]:
        """``(instant, wall time, kind)`` for each matching wall time whose instant is
        strictly after ``after`` (UTC), instants non-decreasing. Several wall times map to
        one instant only at a spring-forward gap; callers merge them."""
        zone = self._zone
        hour, offset = None, None
        gap_start = gap_end = gap_at = None            # the last gap met, in wall times
        for wall in self._walls(self._start_wall(after)):
            if hour is None or not _ZERO <= wall - hour < _HOUR:
                hour = wall.replace(minute=0, second=0)
                offset = _plain_offset(zone, hour)
            if offset is not None:                     # the usual case: no DST change
                at = (wall - offset).replace(tzinfo=UTC)
                if at > after:
                    yield at, wall, _Kind.PLAIN
                continue
            if gap_start is not None and gap_start <= wall < gap_end:
                if gap_at > after:
                    yield gap_at, wall, _Kind.GAP
                continue
            local = wall.replace(tzinfo=zone)          # fold=0: the first occurrence
            at = local.astimezone(UTC)
            kind = _Kind.PLAIN
            if at.astimezone(zone).replace(tzinfo=None) != wall:
                gap_at, gap_start, gap_end = _gap(wall, zone)
                at, kind = gap_at, _Kind.GAP
            elif explain and local.replace(fold=1).utcoffset() != local.utcoffset():
                kind = _Kind.FOLD
            if at > after:
                yield at, wall, kind

    def _start_wall(self, after: datetime) -> datetime:
        """The wall time to start matching from so that no slot after ``after`` is missed
        and few before it are visited."""
        local = after.astimezone(self._zone)
        if not local.fold:
            return local.replace(tzinfo=None, microsecond=0)
        # `after` is in the second pass of a repeated hour. Wall times up to the end of
        # the repeat fire at their first pass, which is already over: start at its end.
        first, second = local.replace(fold=0).utcoffset(), local.utcoffset()
        hi = _floor_seconds(after)
        lo = hi - int((first - second).total_seconds())
        change = _transition(self._zone, lo, hi)
        repeat_end = (datetime.fromtimestamp(change, UTC) + first).replace(tzinfo=None)
        return repeat_end - _SECOND

    def _note(self, at: datetime, walls: list[tuple[datetime, _Kind]]) -> str:
        local = at.astimezone(self._zone)
        gaps = [wall for wall, kind in walls if kind is _Kind.GAP]
        if gaps:
            fires = f"{_clock(local)}{_offset_text(local.utcoffset())}"
            if len(gaps) == 1:
                return f"spring-forward gap: {_clock(gaps[0])} does not exist, fires at {fires}"
            return (f"spring-forward gap: {len(gaps)} slots from {_clock(gaps[0])} to "
                    f"{_clock(gaps[-1])} do not exist, fire once at {fires}")
        if walls[0][1] is _Kind.FOLD:
            return (f"fall-back: {_clock(walls[0][0])} occurs twice, fires at the first "
                    f"({_offset_text(local.utcoffset())})")
        return ""

    def _latest(self, start: datetime, end: datetime) -> datetime | None:
        """The last slot in ``(start, end]``, looking back in doubling steps so that a
        long window of a dense schedule is never listed whole."""
        span = timedelta(seconds=MISFIRE_GRACE)
        while True:
            lo = max(start, end - span)
            slots = self.slots_between(lo, end)
            while len(slots) == 10000:
                slots = self.slots_between(slots[-1], end) or slots
            if slots:
                return slots[-1]
            if lo <= start:
                return None
            span *= 2


def parse(expression: str, timezone: str = "") -> Cron:
    """Validate ``expression`` in ``timezone`` (an IANA name; empty means UTC).

    Raises:
        CronError: naming the problem, e.g. ``expression: field 'minute' value 61 out of
            range 0-59`` or ``timezone: unknown zone 'Mars/Base'``.
    """
    return Cron(expression, timezone)


def due_slots(cron: Cron, last_slot: datetime | None, created: datetime, now: datetime,
              misfire: Misfire, catchup_window: float, *, grace: float = MISFIRE_GRACE,
              limit: int = MAX_DUE) -> list[datetime]:
    """The slots of ``cron`` to fire now, ascending.

    The rule:

    - The candidates are the slots in ``(last_slot, now]``, or ``(created, now]`` before
      the first firing: slots are counted from the last fired slot, never from ``now``.
    - A slot is *late* by ``now - slot``. With ``grace = min(grace, catchup_window)``:
      less than ``grace`` late is **on time**; ``grace`` or more but less than
      ``catchup_window`` late is **missed**; ``catchup_window`` or more late is
      **expired**.
    - On-time slots fire under every policy. This is normal operation: the leader ticks
      far more often than ``grace``, so the latest slot is a few milliseconds late and
      fires whatever the policy.
    - Missed slots: ``SKIP`` fires none; ``RUN_ONCE`` fires only the latest one;
      ``RUN_ALL`` fires all of them.
    - Expired slots never fire.
    - At most ``limit`` slots are returned, the oldest first. Store the last one returned
      as ``last_slot`` and call again on the next tick for the rest. When nothing is
      returned, keep ``last_slot``: no call looks further back than ``catchup_window``,
      so slots already dropped cost nothing later.

    Args:
        cron: the schedule.
        last_slot: the last slot fired, or None if it never fired.
        created: when the schedule was created; nothing at or before it fires.
        now: the time to judge by (the leader host's clock).
        misfire: the policy for missed slots.
        catchup_window: seconds; 0 means `DEFAULT_CATCHUP_WINDOW` (as in the proto).
        grace: seconds late a slot may be and still be on time.
        limit: at most this many slots.

    Raises:
        ValueError: a naive datetime, or a negative or non-finite window or grace.
    """
    now = _utc(now, "now")
    anchor = _utc(created if last_slot is None else last_slot,
                  "created" if last_slot is None else "last_slot")
    misfire = Misfire(misfire)
    window = float(catchup_window)
    if not math.isfinite(window) or window < 0:
        raise ValueError(f"catchup_window must be finite and not negative, not {catchup_window!r}")
    if not math.isfinite(grace) or grace < 0:
        raise ValueError(f"grace must be finite and not negative, not {grace!r}")
    window = window or DEFAULT_CATCHUP_WINDOW
    if anchor >= now or limit <= 0:
        return []
    on_time_from = max(anchor, now - timedelta(seconds=min(grace, window)))
    missed_from = max(anchor, now - timedelta(seconds=window))
    missed: list[datetime] = []
    if missed_from < on_time_from:
        if misfire is Misfire.RUN_ALL:
            missed = cron.slots_between(missed_from, on_time_from, limit)
        elif misfire is Misfire.RUN_ONCE:
            latest = cron._latest(missed_from, on_time_from)
            missed = [latest] if latest else []
    if len(missed) >= limit:
        return missed[:limit]
    return missed + cron.slots_between(on_time_from, now, limit - len(missed))


# -- parsing helpers ---------------------------------------------------------------------

def _split_expression(text: object) -> tuple[str, str]:
    """Normalise whitespace and split off a ``CRON_TZ=``/``TZ=`` prefix."""
    if not isinstance(text, str):
        raise CronError(f"expression: must be a string, not {type(text).__name__}")
    if "\0" in text:
        raise CronError("expression: contains a NUL byte")
    if len(text) > MAX_EXPRESSION:
        raise CronError(f"expression: {len(text)} characters, at most {MAX_EXPRESSION}")
    words = text.split()
    zone = ""
    if words and words[0].upper().startswith(("CRON_TZ=", "TZ=")):
        zone = words.pop(0).partition("=")[2]
        if not zone:
            raise CronError("expression: CRON_TZ= names no time zone")
    if not words:
        raise CronError("expression: empty")
    return " ".join(words), zone


def _zone_name(name: object, prefix_zone: str) -> str:
    if not isinstance(name, str):
        raise CronError(f"timezone: must be a string, not {type(name).__name__}")
    name = name.strip()
    if prefix_zone and name and name != prefix_zone and name != "UTC":
        raise CronError(f"timezone: {name!r} conflicts with CRON_TZ={prefix_zone} "
                        f"in the expression")
    return prefix_zone or name or "UTC"


def _load_zone(name: str) -> ZoneInfo:
    if "\0" in name:
        raise CronError("timezone: contains a NUL byte")
    if len(name) > MAX_TIMEZONE:
        raise CronError(f"timezone: {len(name)} characters, at most {MAX_TIMEZONE}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise CronError(f"timezone: unknown zone {name!r}") from None


def _every_seconds(expression: str) -> int:
    """The interval of an ``@every`` expression in seconds, or 0 for any other."""
    head, _, rest = expression.partition(" ")
    if head.lower() != "@every":
        return 0
    text = rest.replace(" ", "")
    if not text or _DURATION.sub("", text):
        raise CronError(f"expression: @every needs a duration like 30s, 5m or 1h30m, "
                        f"not {rest!r}")
    seconds = sum(float(number) * _UNIT_SECONDS[unit]
                  for number, unit in _DURATION.findall(text))
    whole = round(seconds)
    if abs(seconds - whole) > 1e-6 or whole < 1:
        raise CronError(f"expression: @every {rest} is not a whole number of seconds "
                        f"of at least 1s")
    if whole > MAX_EVERY:
        raise CronError(f"expression: @every {rest} is longer than 366 days")
    return whole


def _compile(expression: str) -> tuple[str, tuple[int, ...], bool]:
    """Check every field; return the croniter expression for the five minute-and-up
    fields (numbers only), the seconds to fire at within each minute, and croniter's
    ``day_or`` flag."""
    if expression.startswith("@"):
        alias, _, rest = expression.lower().partition(" ")
        if alias in _ALIASES and rest:
            raise CronError(f"expression: {alias} takes nothing after it, not {rest!r}")
        if alias not in _ALIASES:
            raise CronError(f"expression: unknown alias {expression.split()[0]!r}; "
                            f"known: {', '.join(sorted(_ALIASES))}, @every <duration>")
        expression = _ALIASES[alias]
    words = expression.split()
    if len(words) == 5:
        words.insert(0, "0")
    elif len(words) != 6:
        raise CronError(f"expression: {len(words)} fields; expected 5 (minute hour "
                        f"day-of-month month day-of-week) or 6 (second first)")
    fields = (_SECOND_FIELD, *_FIVE_FIELDS)
    parts = [_expand(text, f) for text, f in zip(words, fields)]
    second, minute, hour, dom, month, dow = (text for text, _star in parts)
    seconds = tuple(range(60)) if second == "*" else tuple(map(int, second.split(",")))
    day_or = not (parts[3][1] or parts[5][1])
    return f"{minute} {hour} {dom} {month} {dow}", seconds, day_or


def _expand(text: str, f: _Field) -> tuple[str, bool]:
    """One field as croniter text (``*`` or a sorted list of numbers) and whether it
    starts with ``*`` or ``?`` (which makes the day fields combine with AND)."""
    if text in ("*", "?"):
        return "*", True
    values: set[int] = set()
    star = False
    for item in text.split(","):
        if not item:
            raise CronError(f"expression: field {f.name!r} has an empty list item in {text!r}")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not _NUMBER.fullmatch(step_text):
                raise CronError(f"expression: field {f.name!r} step {step_text!r} "
                                f"is not a number")
            step = int(step_text)
            span = f.high - f.low + 1 if f.names is not _DAYS else 7
            if not 1 <= step <= span:
                raise CronError(f"expression: field {f.name!r} step {step} out of range "
                                f"1-{span}")
        if base in ("*", "?"):
            star = True
            low, high = f.low, (6 if f.names is _DAYS else f.high)
        else:
            first, dash, last = base.partition("-")
            low = _value(first, f)
            high = _value(last, f) if dash else (f.high if slash else low)
            if low > high:
                raise CronError(f"expression: field {f.name!r} range {base!r} is reversed "
                                f"(start after end)")
        values.update(range(low, high + 1, step))
    if f.names is _DAYS:
        values = {v % 7 for v in values}
    return ",".join(map(str, sorted(values))), star


def _value(text: str, f: _Field) -> int:
    if _NUMBER.fullmatch(text):
        value = int(text)
    elif f.names and text.upper() in f.names:
        return f.names[text.upper()]
    elif f.names:
        kind = "month" if f.names is _MONTHS else "day"
        raise CronError(f"expression: field {f.name!r} value {text!r} is not a number "
                        f"or a {kind} name")
    else:
        raise CronError(f"expression: field {f.name!r} value {text!r} is not a number")
    if not f.low <= value <= f.high:
        raise CronError(f"expression: field {f.name!r} value {value} out of range "
                        f"{f.low}-{f.high}")
    return value


# -- time helpers ------------------------------------------------------------------------

def _utc(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, not naive ({value.isoformat()})")
    return value.astimezone(UTC)


def _floor_seconds(value: datetime) -> int:
    """Whole seconds since the epoch, rounded down (exact, no float)."""
    return (value - _EPOCH) // _SECOND


def _offset(zone: ZoneInfo, second: int) -> timedelta | None:
    return datetime.fromtimestamp(second, zone).utcoffset()


def _plain_offset(zone: ZoneInfo, hour: datetime) -> timedelta | None:
    """The UTC offset of every wall time in the hour from the naive ``hour``, or None if
    the hour holds a DST change (a gap or a repeat) and needs a closer look."""
    first = hour.replace(tzinfo=zone)
    last = (hour + _HOUR - _SECOND).replace(tzinfo=zone)
    offsets = {first.utcoffset(), first.replace(fold=1).utcoffset(),
               last.utcoffset(), last.replace(fold=1).utcoffset()}
    return offsets.pop() if len(offsets) == 1 else None


def _transition(zone: ZoneInfo, lo: int, hi: int) -> int:
    """The first whole second in ``(lo, hi]`` with the UTC offset that ``hi`` has, when the
    offset changes once in between."""
    target = _offset(zone, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset(zone, mid) == target:
            hi = mid
        else:
            lo = mid
    return hi


def _gap(wall: datetime, zone: ZoneInfo) -> tuple[datetime, datetime, datetime]:
    """For a non-existent ``wall``: the first instant after the clocks jumped over it, and
    the naive wall times where the gap starts (included) and ends (excluded)."""
    before = _floor_seconds(wall.replace(tzinfo=zone, fold=0))
    after = _floor_seconds(wall.replace(tzinfo=zone, fold=1))
    change = _transition(zone, min(before, after), max(before, after))
    at = datetime.fromtimestamp(change, UTC)
    start = (at + _offset(zone, change - 1)).replace(tzinfo=None)
    end = (at + _offset(zone, change)).replace(tzinfo=None)
    return at, start, end


def _clock(value: datetime) -> str:
    return value.strftime("%H:%M:%S" if value.second else "%H:%M")


def _offset_text(offset: timedelta | None) -> str:
    seconds = int((offset or timedelta()).total_seconds())
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{sign}{hours:02d}:{minutes:02d}" + (f":{secs:02d}" if secs else "")


def _local_text(local: datetime) -> str:
    return f"{local:%Y-%m-%d %H:%M:%S}{_offset_text(local.utcoffset())}"
