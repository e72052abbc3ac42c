"""dtsd/cron.py: parsing, slots in UTC and across DST changes, previews, the misfire rule.

Pure and fast: no services. The DST dates are real ones: Europe/Berlin springs forward on
2026-03-29 (02:00 CET -> 03:00 CEST, 01:00 UTC) and falls back on 2026-10-25 (03:00 CEST
-> 02:00 CET, 01:00 UTC); America/New_York on 2026-03-08 (02:00 EST -> 03:00 EDT, 07:00
UTC) and 2026-11-01 (02:00 EDT -> 01:00 EST, 06:00 UTC).
"""

from __future__ import annotations

import random
import time
from datetime import datetime, timedelta, timezone

import pytest

from dtsd import cron
from dtsd.cron import Cron, CronError, Misfire, Overlap, due_slots, parse

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def at(text: str) -> datetime:
    """An aware UTC datetime from ``"2026-03-29 01:00:00"`` (optionally ``.ffffff``)."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def hhmm(slots: list[datetime]) -> list[str]:
    return [s.strftime("%H:%M:%S") for s in slots]


def locals_of(c: Cron, slots: list[datetime]) -> list[str]:
    return [s.astimezone(c._zone).strftime("%Y-%m-%d %H:%M:%S%z") for s in slots]


# -- parsing ---------------------------------------------------------------------------

def test_parse_normalises_whitespace_and_defaults_to_utc():
    c = parse("  */5 \t*  * *\n * ")
    assert c.expression == "*/5 * * * *"
    assert c.timezone == "UTC"
    assert parse(c.expression, c.timezone) == c
    assert Cron("*/5 * * * *") == c


def test_five_fields_fire_on_the_minute():
    c = parse("*/20 * * * *")
    assert hhmm(c.slots_between(at("2026-01-01 10:00:00"), at("2026-01-01 11:00:00"))) == [
        "10:20:00", "10:40:00", "11:00:00"]


def test_six_fields_have_seconds_first():
    every_10s = parse("*/10 * * * * *")
    assert hhmm(every_10s.slots_between(at("2026-01-01 10:00:00"), at("2026-01-01 10:01:00"))) == [
        "10:00:10", "10:00:20", "10:00:30", "10:00:40", "10:00:50", "10:01:00"]
    daily = parse("0 30 9 * * *")
    assert daily.next_after(at("2026-01-01 09:30:00")) == at("2026-01-02 09:30:00")
    assert daily.next_after(at("2026-01-01 00:00:00")) == at("2026-01-01 09:30:00")
    odd = parse("15,45 0 12 * * *")
    assert hhmm(odd.slots_between(at("2026-01-01 00:00:00"), at("2026-01-01 23:59:59"))) == [
        "12:00:15", "12:00:45"]


@pytest.mark.parametrize("expression, after, expected", [
    ("0 9 * JAN-MAR MON-FRI", "2026-01-02 09:00:00", "2026-01-05 09:00:00"),  # Fri -> Mon
    ("0 9 * jan-mar mon-fri", "2026-03-31 09:00:00", "2027-01-01 09:00:00"),
    ("0 0 * * 7", "2026-01-01 00:00:00", "2026-01-04 00:00:00"),              # 7 = Sunday
    ("0 0 * * SUN", "2026-01-01 00:00:00", "2026-01-04 00:00:00"),
    ("0 0 * * 5-7", "2026-01-02 00:00:00", "2026-01-03 00:00:00"),
    ("5/15 * * * *", "2026-01-01 00:50:00", "2026-01-01 01:05:00"),           # 5,20,35,50
    ("0 0 ? * *", "2026-01-01 00:00:00", "2026-01-02 00:00:00"),
    ("0 0 29 2 *", "2026-01-01 00:00:00", "2028-02-29 00:00:00"),             # leap day only
    ("0 0 1 * MON", "2026-01-02 00:00:00", "2026-01-05 00:00:00"),            # 1st OR Monday
    ("0 0 1 * MON", "2026-01-26 00:00:00", "2026-02-01 00:00:00"),
    ("0 0 */2 * MON", "2026-01-01 00:00:00", "2026-01-05 00:00:00"),          # odd day AND Mon
    ("0 0 */2 * MON", "2026-01-05 00:00:00", "2026-01-19 00:00:00"),
])
def test_field_syntax(expression, after, expected):
    assert parse(expression).next_after(at(after)) == at(expected)


@pytest.mark.parametrize("alias, after, expected", [
    ("@yearly", "2026-06-01 00:00:00", "2027-01-01 00:00:00"),
    ("@annually", "2026-06-01 00:00:00", "2027-01-01 00:00:00"),
    ("@monthly", "2026-06-01 00:00:00", "2026-07-01 00:00:00"),
    ("@weekly", "2026-01-01 00:00:00", "2026-01-04 00:00:00"),
    ("@daily", "2026-01-01 00:00:00", "2026-01-02 00:00:00"),
    ("@midnight", "2026-01-01 12:00:00", "2026-01-02 00:00:00"),
    ("@hourly", "2026-01-01 10:20:00", "2026-01-01 11:00:00"),
    ("@HOURLY", "2026-01-01 10:20:00", "2026-01-01 11:00:00"),
])
def test_aliases(alias, after, expected):
    assert parse(alias).next_after(at(after)) == at(expected)


def test_every_is_anchored_at_the_epoch_whatever_the_zone():
    c = parse("@every 30s")
    assert c.next_after(at("2026-01-01 12:00:10.5")) == at("2026-01-01 12:00:30")
    assert c.next_after(at("2026-01-01 12:00:30")) == at("2026-01-01 12:01:00")
    seven = parse("@every 7m")
    berlin = parse("@every 7m", "Europe/Berlin")
    start, end = at("2026-03-28 23:00:00"), at("2026-03-29 03:00:00")  # across the DST gap
    slots = seven.slots_between(start, end)
    assert slots == berlin.slots_between(start, end)
    epoch_seconds = int((start - EPOCH).total_seconds()), int((end - EPOCH).total_seconds())
    assert len(slots) == epoch_seconds[1] // 420 - epoch_seconds[0] // 420
    assert all((s - EPOCH).total_seconds() % 420 == 0 for s in slots)
    assert [b - a for a, b in zip(slots, slots[1:])] == [timedelta(minutes=7)] * (len(slots) - 1)
    assert parse("@every 1h30m").next_after(EPOCH) == EPOCH + timedelta(minutes=90)
    assert parse("@every 1.5h").next_after(EPOCH) == EPOCH + timedelta(minutes=90)
    assert seven.slots_between(start, end, limit=3) == slots[:3]


@pytest.mark.parametrize("expression, message", [
    ("61 * * * *", "expression: field 'minute' value 61 out of range 0-59"),
    ("* 24 * * *", "field 'hour' value 24 out of range 0-23"),
    ("0 0 0 * *", "field 'day-of-month' value 0 out of range 1-31"),
    ("0 0 32 * *", "field 'day-of-month' value 32 out of range 1-31"),
    ("0 0 * 13 *", "field 'month' value 13 out of range 1-12"),
    ("0 0 * * 8", "field 'day-of-week' value 8 out of range 0-7"),
    ("60 * * * * *", "field 'second' value 60 out of range 0-59"),
    ("* * * *", "4 fields; expected 5"),
    ("* * * * * * *", "7 fields; expected 5"),
    ("*/0 * * * *", "field 'minute' step 0 out of range 1-60"),
    ("*/61 * * * *", "field 'minute' step 61 out of range 1-60"),
    ("*/x * * * *", "field 'minute' step 'x' is not a number"),
    ("*/5/2 * * * *", "step '5/2' is not a number"),
    ("5-1 * * * *", "field 'minute' range '5-1' is reversed"),
    ("1,,2 * * * *", "field 'minute' has an empty list item"),
    ("abc * * * *", "field 'minute' value 'abc' is not a number"),
    ("1.5 * * * *", "value '1.5' is not a number"),
    ("1-2-3 * * * *", "value '2-3' is not a number"),
    ("\u0663 * * * *", "is not a number"),                     # Arabic-Indic digit three
    ("-1 * * * *", "value '' is not a number"),
    ("0 0 * FOO *", "field 'month' value 'FOO' is not a number or a month name"),
    ("0 0 * * FUNDAY", "field 'day-of-week' value 'FUNDAY' is not a number or a day name"),
    ("0 0 * MON *", "field 'month' value 'MON' is not a number or a month name"),
    ("* * * * *\x00", "expression: contains a NUL byte"),
    ("", "expression: empty"),
    ("   ", "expression: empty"),
    ("0 " * 128 + "*", "expression: 257 characters, at most 256"),
    ("@fortnightly", "expression: unknown alias '@fortnightly'"),
    ("@daily 5", "expression: @daily takes nothing after it"),
    ("@every", "expression: @every needs a duration like 30s"),
    ("@every 10", "@every needs a duration"),
    ("@every 5 minutes", "@every needs a duration"),
    ("@every 500ms", "@every 500ms is not a whole number of seconds of at least 1s"),
    ("@every 1.5s", "is not a whole number of seconds"),
    ("@every 0s", "is not a whole number of seconds of at least 1s"),
    ("@every 9000h", "@every 9000h is longer than 366 days"),
    ("0 0 30 2 *", "expression: '0 0 30 2 *' never fires: day-of-month '30' does not occur "
                   "in month '2'"),
    ("0 0 0 31 4,6,9,11 *", "never fires"),
    ("0 0 30 FEB ?", "never fires"),
    ("CRON_TZ= 0 0 * * *", "CRON_TZ= names no time zone"),
])
def test_invalid_expressions_name_the_problem(expression, message):
    with pytest.raises(CronError) as caught:
        parse(expression)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_the_longest_expression_allowed_is_256_characters():
    longest = "00" + ",0" * 123 + " * * * *"
    assert len(longest) == 256
    assert parse(longest).next_after(at("2026-01-01 10:00:00")) == at("2026-01-01 11:00:00")
    with pytest.raises(CronError, match="257 characters, at most 256"):
        parse(" " + longest)


@pytest.mark.parametrize("zone, message", [
    ("Mars/Base", "timezone: unknown zone 'Mars/Base'"),
    ("Europe", "timezone: unknown zone 'Europe'"),
    ("../../etc/passwd", "timezone: unknown zone"),
    ("/etc/localtime", "timezone: unknown zone"),
    ("Europe/Berlin\x00", "timezone: contains a NUL byte"),
    ("A" * 200, "timezone: 200 characters, at most 128"),
])
def test_unknown_zones_are_named(zone, message):
    with pytest.raises(CronError) as caught:
        parse("0 0 * * *", zone)
    assert message in str(caught.value)


def test_zones():
    assert parse("0 9 * * *", "").timezone == "UTC"
    assert parse("0 9 * * *", " Europe/Berlin ").timezone == "Europe/Berlin"
    berlin = parse("0 9 * * *", "Europe/Berlin")
    assert berlin.next_after(at("2026-01-01 00:00:00")) == at("2026-01-01 08:00:00")  # CET
    assert berlin.next_after(at("2026-07-01 00:00:00")) == at("2026-07-01 07:00:00")  # CEST
    tokyo = parse("0 9 * * *", "Asia/Tokyo")
    assert tokyo.next_after(at("2026-01-01 00:00:00")) == at("2026-01-02 00:00:00")


def test_cron_tz_prefix_sets_the_zone():
    c = parse("CRON_TZ=Europe/Berlin 0 9 * * *")
    assert (c.expression, c.timezone) == ("0 9 * * *", "Europe/Berlin")
    assert parse("TZ=Asia/Tokyo @daily").timezone == "Asia/Tokyo"
    assert parse("CRON_TZ=Europe/Berlin 0 9 * * *", "Europe/Berlin") == c
    with pytest.raises(CronError, match="timezone: 'Asia/Tokyo' conflicts with CRON_TZ"):
        parse("CRON_TZ=Europe/Berlin 0 9 * * *", "Asia/Tokyo")
    with pytest.raises(CronError, match="timezone: unknown zone 'Nowhere/Land'"):
        parse("CRON_TZ=Nowhere/Land 0 9 * * *")


def test_non_strings_are_rejected():
    with pytest.raises(CronError, match="expression: must be a string"):
        parse(None)  # type: ignore[arg-type]
    with pytest.raises(CronError, match="timezone: must be a string"):
        parse("* * * * *", 5)  # type: ignore[arg-type]


def test_random_input_raises_only_cron_error():
    """Only CronError escapes parse; whatever it accepts can be scheduled."""
    rng = random.Random(20260329)
    atoms = ["*", "?", "/", ",", "-", "0", "1", "5", "7", "12", "23", "29", "30", "31", "59",
             "60", "99", "L", "#", "MON", "jan", "FEB", "SUN", "@every", "@daily", "1h", "30s",
             " ", " ", " ", "\t", "x", "\x00", "\u00e9", "CRON_TZ=UTC", "H"]
    accepted = 0
    for _ in range(3000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 14)))
        try:
            c = parse(text)
        except CronError:
            continue
        accepted += 1
        first = c.next_after(at("2026-01-01 00:00:00"))
        assert first > at("2026-01-01 00:00:00") and first.tzinfo is UTC
    assert accepted > 0


# -- next_after and slots_between in UTC -----------------------------------------------

def test_next_after_is_strictly_after():
    c = parse("*/15 * * * *")
    assert c.next_after(at("2026-01-01 10:15:00")) == at("2026-01-01 10:30:00")
    assert c.next_after(at("2026-01-01 10:14:59.999999")) == at("2026-01-01 10:15:00")
    assert c.next_after(at("2026-01-01 10:15:00.000001")) == at("2026-01-01 10:30:00")
    assert c.next_after(at("2026-12-31 23:59:00")) == at("2027-01-01 00:00:00")
    per_second = parse("* * * * * *")
    assert per_second.next_after(at("2026-01-01 10:15:00.5")) == at("2026-01-01 10:15:01")


def test_results_are_utc_whatever_the_input_offset():
    c = parse("0 * * * *")
    plus5 = datetime(2026, 1, 1, 15, 30, tzinfo=timezone(timedelta(hours=5)))  # 10:30 UTC
    nxt = c.next_after(plus5)
    assert nxt == at("2026-01-01 11:00:00") and nxt.tzinfo is UTC
    assert all(s.tzinfo is UTC for s in c.slots_between(plus5, plus5 + timedelta(hours=3)))


def test_naive_datetimes_are_rejected():
    c = parse("* * * * *")
    with pytest.raises(ValueError, match="instant must be timezone-aware"):
        c.next_after(datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="end must be timezone-aware"):
        c.slots_between(at("2026-01-01 00:00:00"), datetime(2026, 1, 2))
    with pytest.raises(ValueError, match="after must be timezone-aware"):
        c.preview(datetime(2026, 1, 1), 3)


def test_slots_between_bounds_and_limit():
    c = parse("0 * * * *")
    start, end = at("2026-01-01 10:00:00"), at("2026-01-01 13:00:00")
    assert hhmm(c.slots_between(start, end)) == ["11:00:00", "12:00:00", "13:00:00"]
    assert hhmm(c.slots_between(start, end, limit=2)) == ["11:00:00", "12:00:00"]
    assert c.slots_between(end, start) == []
    assert c.slots_between(start, start) == []
    assert c.slots_between(start, end, limit=0) == []


def test_the_time_zone_of_the_process_does_not_matter(monkeypatch):
    expected = parse("*/15 * * * *", "Europe/Berlin").slots_between(
        at("2026-03-28 23:00:00"), at("2026-03-29 22:00:00"))
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        again = parse("*/15 * * * *", "Europe/Berlin").slots_between(
            at("2026-03-28 23:00:00"), at("2026-03-29 22:00:00"))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert again == expected


# -- DST -------------------------------------------------------------------------------

def test_berlin_spring_forward_fires_a_missing_time_once_at_the_end_of_the_gap():
    c = parse("30 2 * * *", "Europe/Berlin")
    slots = c.slots_between(at("2026-03-28 00:00:00"), at("2026-03-30 12:00:00"))
    assert locals_of(c, slots) == ["2026-03-28 02:30:00+0100", "2026-03-29 03:00:00+0200",
                                   "2026-03-30 02:30:00+0200"]
    assert slots[1] == at("2026-03-29 01:00:00")
    assert c.next_after(at("2026-03-29 00:59:59")) == at("2026-03-29 01:00:00")
    assert c.next_after(at("2026-03-29 01:00:00")) == at("2026-03-30 00:30:00")
    assert parse("0 30 2 * * *", "Europe/Berlin").slots_between(
        at("2026-03-28 00:00:00"), at("2026-03-30 12:00:00")) == slots


def test_berlin_fall_back_fires_a_repeated_time_once_at_its_first_occurrence():
    c = parse("30 2 * * *", "Europe/Berlin")
    slots = c.slots_between(at("2026-10-24 12:00:00"), at("2026-10-26 12:00:00"))
    assert locals_of(c, slots) == ["2026-10-25 02:30:00+0200", "2026-10-26 02:30:00+0100"]
    assert slots[0] == at("2026-10-25 00:30:00")
    # Asked during the second 02:30 (01:30 UTC), the next slot is the next day's.
    assert c.next_after(at("2026-10-25 01:30:00")) == at("2026-10-26 01:30:00")
    assert c.next_after(at("2026-10-25 00:29:59")) == at("2026-10-25 00:30:00")


def test_new_york_both_transitions():
    two_thirty = parse("30 2 * * *", "America/New_York")
    spring = two_thirty.slots_between(at("2026-03-07 12:00:00"), at("2026-03-09 12:00:00"))
    assert locals_of(two_thirty, spring) == ["2026-03-08 03:00:00-0400", "2026-03-09 02:30:00-0400"]
    assert spring[0] == at("2026-03-08 07:00:00")
    # On the fall-back day 02:30 happens once (01:00-01:59 repeats), in EST.
    fall = two_thirty.slots_between(at("2026-10-31 12:00:00"), at("2026-11-02 12:00:00"))
    assert locals_of(two_thirty, fall) == ["2026-11-01 02:30:00-0500", "2026-11-02 02:30:00-0500"]
    one_thirty = parse("30 1 * * *", "America/New_York")
    fall = one_thirty.slots_between(at("2026-10-31 12:00:00"), at("2026-11-02 12:00:00"))
    assert locals_of(one_thirty, fall) == ["2026-11-01 01:30:00-0400", "2026-11-02 01:30:00-0500"]
    assert fall[0] == at("2026-11-01 05:30:00")


@pytest.mark.parametrize("zone, day_start, day_end, count", [
    ("Europe/Berlin", "2026-03-28 23:00:00", "2026-03-29 22:00:00", 92),     # 23-hour day
    ("Europe/Berlin", "2026-10-24 22:00:00", "2026-10-25 23:00:00", 96),     # 25-hour day
    ("America/New_York", "2026-03-08 05:00:00", "2026-03-09 04:00:00", 92),
    ("America/New_York", "2026-11-01 04:00:00", "2026-11-02 05:00:00", 96),
    ("UTC", "2026-03-29 00:00:00", "2026-03-30 00:00:00", 96),
])
def test_every_15_minutes_through_a_transition(zone, day_start, day_end, count):
    """One local day, from its midnight (included) to the next (excluded)."""
    c = parse("*/15 * * * *", zone)
    second = timedelta(seconds=1)
    slots = c.slots_between(at(day_start) - second, at(day_end) - second)
    assert len(slots) == count
    assert len(set(slots)) == len(slots)
    assert slots == sorted(slots)
    assert slots[0] == at(day_start)
    local = [s.astimezone(c._zone) for s in slots]
    assert len({(t.hour, t.minute) for t in local}) == count   # no wall time twice


def test_every_15_minutes_berlin_details():
    c = parse("*/15 * * * *", "Europe/Berlin")
    spring = c.slots_between(at("2026-03-29 00:30:00"), at("2026-03-29 01:30:00"))
    assert locals_of(c, spring) == ["2026-03-29 01:45:00+0100", "2026-03-29 03:00:00+0200",
                                    "2026-03-29 03:15:00+0200", "2026-03-29 03:30:00+0200"]
    fall = c.slots_between(at("2026-10-25 00:30:00"), at("2026-10-25 02:30:00"))
    # 02:30 and 02:45 CEST fire; the repeated 02:00-02:45 CET (01:00-01:45 UTC) do not.
    assert hhmm(fall) == ["00:45:00", "02:00:00", "02:15:00", "02:30:00"]
    assert c.next_after(at("2026-10-25 01:10:00")) == at("2026-10-25 02:00:00")
    assert c.next_after(at("2026-10-25 00:10:00")) == at("2026-10-25 00:15:00")


def test_per_second_schedule_collapses_the_gap_and_skips_the_repeat():
    c = parse("* * * * * *", "Europe/Berlin")
    # 3600 wall times 02:00:00-02:59:59 and 03:00:00 itself are one instant, 01:00:00 UTC.
    assert hhmm(c.slots_between(at("2026-03-29 00:59:58"), at("2026-03-29 01:00:02"))) == [
        "00:59:59", "01:00:00", "01:00:01", "01:00:02"]
    # During the repeated hour nothing fires until 03:00 CET.
    assert c.next_after(at("2026-10-25 01:00:00")) == at("2026-10-25 02:00:00")
    assert c.next_after(at("2026-10-25 01:59:59.5")) == at("2026-10-25 02:00:00")
    assert c.next_after(at("2026-10-25 00:59:58")) == at("2026-10-25 00:59:59")
    day = c.slots_between(at("2026-10-24 22:00:00"), at("2026-10-25 23:00:00"), limit=100000)
    assert len(day) == 86400 and len(set(day)) == 86400


def test_half_hour_shift_and_a_skipped_day():
    lord_howe = parse("*/15 * * * *", "Australia/Lord_Howe")   # falls back 02:00 -> 01:30
    fall = lord_howe.slots_between(at("2026-04-04 14:20:00"), at("2026-04-04 16:00:00"))
    assert locals_of(lord_howe, fall) == [
        "2026-04-05 01:30:00+1100", "2026-04-05 01:45:00+1100", "2026-04-05 02:00:00+1030",
        "2026-04-05 02:15:00+1030", "2026-04-05 02:30:00+1030"]
    apia = parse("0 12 * * *", "Pacific/Apia")                   # 2011-12-30 never happened
    days = apia.slots_between(at("2011-12-29 00:00:00"), at("2011-12-31 00:00:00"))
    assert locals_of(apia, days) == ["2011-12-29 12:00:00-1000", "2011-12-31 00:00:00+1400",
                                     "2011-12-31 12:00:00+1400"]


# -- preview ---------------------------------------------------------------------------

def test_preview_notes_berlin():
    c = parse("30 2 * * *", "Europe/Berlin")
    assert c.preview(at("2026-03-28 12:00:00"), 2) == [
        (at("2026-03-29 01:00:00"), "2026-03-29 03:00:00+02:00",
         "spring-forward gap: 02:30 does not exist, fires at 03:00+02:00"),
        (at("2026-03-30 00:30:00"), "2026-03-30 02:30:00+02:00", ""),
    ]
    assert c.preview(at("2026-10-24 12:00:00"), 2) == [
        (at("2026-10-25 00:30:00"), "2026-10-25 02:30:00+02:00",
         "fall-back: 02:30 occurs twice, fires at the first (+02:00)"),
        (at("2026-10-26 01:30:00"), "2026-10-26 02:30:00+01:00", ""),
    ]


def test_preview_notes_new_york_and_merged_gap_slots():
    ny = parse("30 1,2 * * *", "America/New_York")
    assert ny.preview(at("2026-03-08 00:00:00"), 2) == [
        (at("2026-03-08 06:30:00"), "2026-03-08 01:30:00-05:00", ""),
        (at("2026-03-08 07:00:00"), "2026-03-08 03:00:00-04:00",
         "spring-forward gap: 02:30 does not exist, fires at 03:00-04:00"),
    ]
    assert ny.preview(at("2026-11-01 00:00:00"), 2) == [
        (at("2026-11-01 05:30:00"), "2026-11-01 01:30:00-04:00",
         "fall-back: 01:30 occurs twice, fires at the first (-04:00)"),
        (at("2026-11-01 07:30:00"), "2026-11-01 02:30:00-05:00", ""),
    ]
    quarter = parse("*/15 * * * *", "Europe/Berlin")
    assert quarter.preview(at("2026-03-29 00:40:00"), 3) == [
        (at("2026-03-29 00:45:00"), "2026-03-29 01:45:00+01:00", ""),
        (at("2026-03-29 01:00:00"), "2026-03-29 03:00:00+02:00",
         "spring-forward gap: 4 slots from 02:00 to 02:45 do not exist, fire once at 03:00+02:00"),
        (at("2026-03-29 01:15:00"), "2026-03-29 03:15:00+02:00", ""),
    ]


def test_preview_plain_and_every():
    c = parse("0 0 12 * * *")
    assert c.preview(at("2026-01-01 00:00:00"), 2) == [
        (at("2026-01-01 12:00:00"), "2026-01-01 12:00:00+00:00", ""),
        (at("2026-01-02 12:00:00"), "2026-01-02 12:00:00+00:00", ""),
    ]
    assert c.preview(at("2026-01-01 00:00:00"), 0) == []
    tokyo = parse("@every 1h", "Asia/Tokyo")
    assert tokyo.preview(at("2026-01-01 00:10:00"), 2) == [
        (at("2026-01-01 01:00:00"), "2026-01-01 10:00:00+09:00", ""),
        (at("2026-01-01 02:00:00"), "2026-01-01 11:00:00+09:00", ""),
    ]


# -- performance -----------------------------------------------------------------------

def best_of(runs: int, fn) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def test_an_hour_of_a_per_second_schedule_is_cheap():
    c = parse("* * * * * *", "Europe/Berlin")
    start = at("2026-06-01 10:00:00")
    assert len(c.slots_between(start, start + timedelta(hours=1))) == 3600
    assert best_of(3, lambda: c.slots_between(start, start + timedelta(hours=1))) < 0.1
    gap = at("2026-03-29 00:30:00")                  # 3600 wall times in the gap
    assert len(c.slots_between(gap, gap + timedelta(hours=1))) == 3600
    assert best_of(3, lambda: c.slots_between(gap, gap + timedelta(hours=1))) < 0.1


def test_next_after_is_cheap_for_the_leader_tick():
    c = parse("* * * * * *", "Europe/Berlin")
    start = at("2026-06-01 10:00:00.25")
    ticks = [start + timedelta(seconds=i) for i in range(500)]
    assert best_of(3, lambda: [c.next_after(t) for t in ticks]) < 0.5   # < 1 ms a call
    # In the repeated hour too, where every wall time until 03:00 CET has already fired.
    repeat = [at("2026-10-25 01:00:00.25") + timedelta(seconds=7 * i) for i in range(500)]
    assert all(c.next_after(t) == at("2026-10-25 02:00:00") for t in repeat)
    assert best_of(3, lambda: [c.next_after(t) for t in repeat]) < 0.5


# -- due_slots -------------------------------------------------------------------------

QUARTER = parse("*/15 * * * *")
HOUR = 3600.0
ALL_POLICIES = list(Misfire)


@pytest.mark.parametrize("now, expected", [
    # Back 5 ms after 12:00: 12:00 is on time; 11:15-11:45 missed; 09:15-11:00 expired.
    ("2026-01-01 12:00:00.005", {Misfire.SKIP: ["12:00:00"],
                                 Misfire.RUN_ONCE: ["11:45:00", "12:00:00"],
                                 Misfire.RUN_ALL: ["11:15:00", "11:30:00", "11:45:00",
                                                   "12:00:00"]}),
    # The module doc's example.
    ("2026-01-01 12:00:30", {Misfire.SKIP: ["12:00:00"],
                             Misfire.RUN_ONCE: ["11:45:00", "12:00:00"],
                             Misfire.RUN_ALL: ["11:15:00", "11:30:00", "11:45:00", "12:00:00"]}),
    # Back at 12:05: nothing is on time.
    ("2026-01-01 12:05:00", {Misfire.SKIP: [],
                             Misfire.RUN_ONCE: ["12:00:00"],
                             Misfire.RUN_ALL: ["11:15:00", "11:30:00", "11:45:00", "12:00:00"]}),
])
def test_three_hour_outage_with_one_hour_window(now, expected):
    last = at("2026-01-01 09:00:00")
    for policy in Misfire:
        got = due_slots(QUARTER, last, at("2025-12-01 00:00:00"), at(now), policy, HOUR)
        assert hhmm(got) == expected[policy], policy


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_normal_operation_fires_the_latest_slot_under_every_policy(policy):
    now = at("2026-01-01 12:00:00.003")
    got = due_slots(QUARTER, at("2026-01-01 11:45:00"), at("2026-01-01 00:00:00"), now,
                    policy, HOUR)
    assert got == [at("2026-01-01 12:00:00")]
    # A per-second schedule whose leader ticks every 15 s fires all 15 slots.
    per_second = parse("* * * * * *")
    last = at("2026-01-01 12:00:00")
    got = due_slots(per_second, last, at("2026-01-01 00:00:00"),
                    last + timedelta(seconds=15.002), policy, HOUR)
    assert got == [last + timedelta(seconds=i) for i in range(1, 16)]
    # A failover of 40 s is still on time.
    got = due_slots(QUARTER, at("2026-01-01 11:45:00"), at("2026-01-01 00:00:00"),
                    at("2026-01-01 12:00:40"), policy, HOUR)
    assert got == [at("2026-01-01 12:00:00")]


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_first_run_counts_from_creation(policy):
    created = at("2026-01-01 11:52:00")
    got = due_slots(QUARTER, None, created, at("2026-01-01 12:00:00.004"), policy, HOUR)
    assert got == [at("2026-01-01 12:00:00")]
    # Nothing at or before the creation instant fires.
    assert due_slots(QUARTER, None, at("2026-01-01 12:00:00"), at("2026-01-01 12:00:00.5"),
                     policy, HOUR) == []
    assert due_slots(QUARTER, None, created, at("2026-01-01 11:59:59"), policy, HOUR) == []
    assert due_slots(QUARTER, None, at("2026-01-02 00:00:00"), at("2026-01-01 12:00:00"),
                     policy, HOUR) == []


def test_first_run_after_a_long_wait_follows_the_policy():
    created = at("2026-01-01 10:00:00")
    now = at("2026-01-01 12:05:00")
    assert due_slots(QUARTER, None, created, now, "skip", HOUR) == []
    assert hhmm(due_slots(QUARTER, None, created, now, "run_once", HOUR)) == ["12:00:00"]
    assert hhmm(due_slots(QUARTER, None, created, now, "run_all", HOUR)) == [
        "11:15:00", "11:30:00", "11:45:00", "12:00:00"]


def test_grace_boundary():
    last = at("2026-01-01 11:45:00")
    created = at("2026-01-01 00:00:00")
    assert due_slots(QUARTER, last, created, at("2026-01-01 12:00:59.999"),
                     Misfire.SKIP, HOUR) == [at("2026-01-01 12:00:00")]
    assert due_slots(QUARTER, last, created, at("2026-01-01 12:01:00"),
                     Misfire.SKIP, HOUR) == []          # 60 s late: missed
    assert due_slots(QUARTER, last, created, at("2026-01-01 12:01:00"),
                     Misfire.SKIP, HOUR, grace=120) == [at("2026-01-01 12:00:00")]


def test_window_boundary_and_a_window_shorter_than_the_grace():
    last = at("2026-01-01 09:00:00")
    created = at("2026-01-01 00:00:00")
    # 11:00 is exactly one hour late at 12:00: expired.
    at_noon = due_slots(QUARTER, last, created, at("2026-01-01 12:00:00"), Misfire.RUN_ALL, HOUR)
    assert hhmm(at_noon) == ["11:15:00", "11:30:00", "11:45:00", "12:00:00"]
    before = due_slots(QUARTER, last, created, at("2026-01-01 11:59:59.999"), Misfire.RUN_ALL, HOUR)
    assert hhmm(before) == ["11:00:00", "11:15:00", "11:30:00", "11:45:00"]
    minutely = parse("* * * * *")
    last = at("2026-01-01 11:00:00")
    for policy in Misfire:
        assert due_slots(minutely, last, created, at("2026-01-01 12:00:45"), policy, 30) == []
        assert due_slots(minutely, last, created, at("2026-01-01 12:00:20"), policy, 30) == [
            at("2026-01-01 12:00:00")]


def test_a_zero_window_means_one_hour():
    last = at("2026-01-01 09:00:00")
    got = due_slots(QUARTER, last, last, at("2026-01-01 12:05:00"), Misfire.RUN_ALL, 0)
    assert hhmm(got) == ["11:15:00", "11:30:00", "11:45:00", "12:00:00"]
    assert cron.DEFAULT_CATCHUP_WINDOW == HOUR


def test_run_once_finds_the_latest_missed_slot_of_a_sparse_schedule():
    daily = parse("0 3 * * *", "Europe/Berlin")
    got = due_slots(daily, at("2026-01-01 02:00:00"), at("2025-01-01 00:00:00"),
                    at("2026-01-04 12:00:00"), Misfire.RUN_ONCE, 7 * 86400)
    assert got == [at("2026-01-04 02:00:00")]
    got = due_slots(daily, at("2026-01-01 02:00:00"), at("2025-01-01 00:00:00"),
                    at("2026-01-04 12:00:00"), Misfire.RUN_ALL, 7 * 86400)
    assert hhmm(got) == ["02:00:00"] * 3


def test_run_once_on_a_dense_schedule_after_a_day_down_is_cheap():
    per_second = parse("* * * * * *")
    now = at("2026-01-02 12:00:00.5")
    started = time.perf_counter()
    got = due_slots(per_second, at("2026-01-01 12:00:00"), at("2026-01-01 00:00:00"), now,
                    Misfire.RUN_ONCE, 86400)
    assert time.perf_counter() - started < 0.5
    # The latest missed slot (60.5 s late) and the 60 on-time ones.
    assert got[0] == at("2026-01-02 11:59:00")
    assert got[1:] == [at("2026-01-02 11:59:01") + timedelta(seconds=i) for i in range(60)]


def test_run_all_pages_through_many_missed_slots():
    per_second = parse("* * * * * *")
    now = at("2026-01-01 12:00:00.5")
    created = at("2026-01-01 00:00:00")
    first = due_slots(per_second, at("2026-01-01 10:00:00"), created, now, Misfire.RUN_ALL, HOUR)
    assert len(first) == cron.MAX_DUE
    assert first[0] == at("2026-01-01 11:00:01")     # 11:00:00 is 3600.5 s late: expired
    fired = list(first)
    while True:
        more = due_slots(per_second, fired[-1], created, now, Misfire.RUN_ALL, HOUR)
        if not more:
            break
        fired += more
    assert fired == [at("2026-01-01 11:00:01") + timedelta(seconds=i) for i in range(3600)]
    assert due_slots(per_second, None, created, now, Misfire.RUN_ALL, HOUR, limit=5) == fired[:5]


def test_due_slots_across_the_spring_gap():
    c = parse("30 2 * * *", "Europe/Berlin")
    for policy in Misfire:
        got = due_slots(c, at("2026-03-28 01:30:00"), at("2026-01-01 00:00:00"),
                        at("2026-03-29 01:00:00.01"), policy, HOUR)
        assert got == [at("2026-03-29 01:00:00")]


def test_due_slots_rejects_bad_arguments():
    now = at("2026-01-01 12:00:00")
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        due_slots(QUARTER, None, now, datetime(2026, 1, 1, 12), Misfire.SKIP, HOUR)
    with pytest.raises(ValueError, match="last_slot must be timezone-aware"):
        due_slots(QUARTER, datetime(2026, 1, 1), now, now, Misfire.SKIP, HOUR)
    with pytest.raises(ValueError, match="catchup_window"):
        due_slots(QUARTER, None, now, now, Misfire.SKIP, -1)
    with pytest.raises(ValueError, match="catchup_window"):
        due_slots(QUARTER, None, now, now, Misfire.SKIP, float("inf"))
    with pytest.raises(ValueError):
        due_slots(QUARTER, None, now, now, "sometimes", HOUR)  # type: ignore[arg-type]
    assert due_slots(QUARTER, now, now, now - timedelta(hours=1), Misfire.RUN_ALL, HOUR) == []


def test_policy_enums_are_the_stored_strings():
    assert [m.value for m in Misfire] == ["skip", "run_once", "run_all"]
    assert [o.value for o in Overlap] == ["allow", "forbid", "replace"]
    assert str(Misfire.RUN_ONCE) == "run_once" and Misfire("run_all") is Misfire.RUN_ALL
    assert str(Overlap.FORBID) == "forbid"
