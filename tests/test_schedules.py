"""Cron schedules on a real dtsd: firing, the verbs, bad input, overlap, misfire, the fence."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import grpc
import psycopg
import pytest

from dtsd.dtsdpb import pb, pb_grpc
from dtsd.models import validate_spec
from dtsd.store import Deposed, Fence, Store
from tests.helpers import wait_for

FAST = {"worker": {"retry_backoff": "50ms", "kill_grace": "1s", "startsecs": "0"},
        "server": {"startsecs": "0"},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}


@pytest.fixture
def dtsd(dtsd_factory):
    return dtsd_factory(FAST)


@pytest.fixture
def api(dtsd):
    return pb_grpc.SchedulerStub(grpc.insecure_channel(dtsd.address))


def ok(result):
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def runs(dsn: str, name: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            """SELECT j.fire_time, j.status, j.started_at, j.finished_at, j.id FROM jobs j
               JOIN schedules s ON s.id = j.schedule_id WHERE s.name = %s
               ORDER BY j.fire_time NULLS LAST, j.created_at""", (name,)).fetchall()


def test_an_every_second_schedule_fires_each_slot_once_and_on_time(dtsd):
    out = json.loads(ok(dtsd.dtsctl("-o", "json", "cron", "add", "tick", "* * * * * *",
                                    "--", "true")))
    assert out["name"] == "tick" and out["next_fire_time"]
    dsn = dtsd.sections["postgres"]["dsn"]
    wait_for(lambda: len(runs(dsn, "tick")) >= 6, timeout=20, message="six firings")
    ok(dtsd.dtsctl("cron", "pause", "tick"))
    time.sleep(1.5)
    fired = runs(dsn, "tick")
    slots = [row[0] for row in fired]
    assert len(slots) == len(set(slots)), "a slot fired twice"
    seconds = [int(s.timestamp()) for s in slots]
    assert seconds == list(range(seconds[0], seconds[0] + len(seconds))), "a slot was missed"
    assert all(s.microsecond == 0 for s in slots)
    wait_for(lambda: all(r[1] == "SUCCEEDED" for r in runs(dsn, "tick")), timeout=20)
    lateness = sorted((r[2] - r[0]).total_seconds() for r in runs(dsn, "tick"))
    assert lateness[-1] < 0.5, lateness          # started within half a second of the slot
    paused = len(runs(dsn, "tick"))
    time.sleep(1.5)
    assert len(runs(dsn, "tick")) == paused      # paused: nothing more fires


def test_the_cron_verbs(dtsd):
    ok(dtsd.dtsctl("cron", "add", "nightly", "30 2 * * *", "--tz", "Europe/Berlin",
                   "--overlap", "forbid", "--misfire", "skip", "--", "echo", "hi"))
    listed = json.loads(ok(dtsd.dtsctl("-o", "json", "cron", "list")))["schedules"]
    assert [(s["name"], s["overlap"], s["misfire"], s["timezone"], s["job"]["command"])
            for s in listed] == [("nightly", "forbid", "skip", "Europe/Berlin", "echo hi")]
    assert json.loads(ok(dtsd.dtsctl("-o", "json", "cron", "pause", "nightly")))["paused"]
    resumed = json.loads(ok(dtsd.dtsctl("-o", "json", "cron", "resume", "nightly")))
    assert not resumed["paused"] and resumed["next_fire_time"]
    job_id = json.loads(ok(dtsd.dtsctl("-o", "json", "cron", "run", "nightly")))["id"]
    wait_for(lambda: "SUCCEEDED" in dtsd.dtsctl("status", job_id).stdout)
    assert "hi" in dtsd.dtsctl("status", job_id).stdout
    preview = json.loads(ok(dtsd.dtsctl("-o", "json", "cron", "next", "nightly", "-n", "400")))
    notes = [t["note"] for t in preview["times"] if t["note"]]
    assert any("spring-forward" in n for n in notes), notes   # the next March gap is listed
    assert len(preview["times"]) == 400
    table = ok(dtsd.dtsctl("cron", "next", "*/15 * * * *", "--tz", "America/New_York", "-n", "3"))
    assert "UTC" in table and "-0" in table                       # local times with offsets
    ok(dtsd.dtsctl("cron", "rm", "nightly"))
    assert json.loads(ok(dtsd.dtsctl("-o", "json", "cron", "list")))["schedules"] == []
    assert dtsd.dtsctl("cron", "rm", "nightly").returncode == 1


BAD = [
    (dict(name="x", expression="61 * * * *"), "expression"),
    (dict(name="x", expression="* * *"), "expression"),
    (dict(name="x", expression="0 0 30 2 *"), "expression"),
    (dict(name="x", expression="* * * * *", timezone="Mars/Olympus"), "timezone"),
    (dict(name="Bad Name", expression="* * * * *"), "name"),
    (dict(name="x", expression="* * * * *", job=pb.JobSpec(command="")), "job.command"),
    (dict(name="x", expression="* * * * *", job=pb.JobSpec(command="true", id="fixed")), "job"),
]


@pytest.mark.parametrize("fields,field", BAD, ids=[f for _, f in BAD])
def test_bad_schedules_are_refused_naming_the_field(api, fields, field):
    fields = {"job": pb.JobSpec(command="true"), **fields}
    with pytest.raises(grpc.RpcError) as err:
        api.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(**fields)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()
    assert not api.ListSchedules(pb.ListSchedulesRequest()).schedules


def test_a_schedule_name_is_unique(api):
    schedule = pb.Schedule(name="dup", expression="@daily", job=pb.JobSpec(command="true"))
    api.CreateSchedule(pb.CreateScheduleRequest(schedule=schedule))
    with pytest.raises(grpc.RpcError) as err:
        api.CreateSchedule(pb.CreateScheduleRequest(schedule=schedule))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def _overlapping(rows) -> bool:
    spans = sorted((r[2], r[3]) for r in rows if r[2] and r[3])
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


def test_overlap_forbid_never_runs_two_at_once(dtsd, api):
    api.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(
        name="slow", expression="* * * * * *", overlap=pb.FORBID,
        job=pb.JobSpec(command="sleep 2.2"))))
    dsn = dtsd.sections["postgres"]["dsn"]
    wait_for(lambda: sum(r[1] == "SUCCEEDED" for r in runs(dsn, "slow")) >= 2, timeout=30)
    api.PauseSchedule(pb.ScheduleRef(name="slow"))
    rows = runs(dsn, "slow")
    assert not _overlapping(rows), rows
    seconds = [int(r[0].timestamp()) for r in rows]
    assert seconds[-1] - seconds[0] + 1 > len(rows)       # slots were skipped, not queued


def test_overlap_replace_cancels_the_running_one(dtsd, api):
    api.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(
        name="latest", expression="*/2 * * * * *", overlap=pb.REPLACE,
        job=pb.JobSpec(command="sleep 30"))))
    dsn = dtsd.sections["postgres"]["dsn"]
    wait_for(lambda: sum(r[1] == "CANCELLED" for r in runs(dsn, "latest")) >= 2, timeout=30)
    api.PauseSchedule(pb.ScheduleRef(name="latest"))
    rows = runs(dsn, "latest")
    assert sum(r[1] in ("PENDING", "RUNNING") for r in rows) <= 1


@pytest.mark.parametrize("misfire,expect_backlog", [(pb.RUN_ALL, True), (pb.SKIP, False)])
def test_slots_missed_while_down_follow_the_misfire_policy(dtsd_factory, misfire, expect_backlog):
    master = dtsd_factory(FAST)
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))
    api.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(
        name="every", expression="* * * * * *", misfire=misfire, catchup_window_seconds=120,
        job=pb.JobSpec(command="true"))))
    dsn = master.sections["postgres"]["dsn"]
    wait_for(lambda: len(runs(dsn, "every")) >= 2, timeout=20)
    assert master.stop() == 0
    down_from = datetime.now(timezone.utc)
    time.sleep(5)
    # The leader may fire before the API answers: slots within its grace (1 s here) of its
    # first tick are on time, so "missed" means older than a second before the restart.
    restarting = datetime.now(timezone.utc)
    master.start()
    wait_for(lambda: any(r[0] > restarting for r in runs(dsn, "every")), timeout=20)
    time.sleep(1)       # the first tick after the restart has fired its backlog
    missed = [r for r in runs(dsn, "every") if down_from + timedelta(seconds=1) < r[0]
              < restarting - timedelta(seconds=1)]
    if expect_backlog:
        assert len(missed) >= 2, "run_all must fire the slots missed while down"
    else:
        assert missed == [], "skip must not fire slots missed while down"
    slots = [r[0] for r in runs(dsn, "every")]
    assert len(slots) == len(set(slots))


def test_a_stale_fencing_token_writes_nothing(pg_dsn):
    store = Store(pg_dsn).open()
    try:
        store.migrate()
        newer, older = Fence("c", 7, "b"), Fence("c", 5, "a")
        with store.fenced(newer) as conn:
            conn.execute("INSERT INTO jobs (id, command) VALUES ('by-newer', 'true')")
        with pytest.raises(Deposed, match="stale"):
            with store.fenced(older) as conn:
                conn.execute("INSERT INTO jobs (id, command) VALUES ('by-older', 'true')")
        assert store.fence_token("c") == (7, "b")
        with psycopg.connect(pg_dsn) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM jobs ORDER BY id")]
        assert ids == ["by-newer"]
        with pytest.raises(Deposed):   # a deposed leader cannot recover anyone's jobs either
            store.recover_lost(older, "w", backoff=1, backoff_max=2)
    finally:
        store.close()
