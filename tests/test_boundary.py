"""The boundaries around a job, tried as an attacker would, on a real dtsd (issue 10).

Each test names the finding it keeps closed. Jobs here are the attackers: they try to reach
the privileged steps that start them, other jobs, what outlives them, the worker's Redis
and its liveness, and the files of the slot's previous job. The suite runs as root, so the
master holds every capability and the boxes are the real ones.
"""

from __future__ import annotations

import os
import time

import grpc
import psycopg
import pytest

from dtsd import config as configmod
from dtsd.dtsdpb import pb, pb_grpc
from tests.helpers import wait_for

FAST = {"worker": {"retry_backoff": "50ms", "retry_backoff_max": "200ms", "kill_grace": "1s",
                   "processes": 1},
        "dtsd": {"housekeeping_interval": "200ms"}}
FINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


@pytest.fixture
def master(dtsd_factory):
    return dtsd_factory(FAST)


@pytest.fixture
def api(master):
    channel = grpc.insecure_channel(master.address)
    yield pb_grpc.SchedulerStub(channel)
    channel.close()


def submit(api, command: str, **spec) -> str:
    spec.setdefault("max_retries", 0)
    return api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command=command, **spec))).id


def final(api, job_id: str, timeout: float = 30) -> pb.Job:
    def done():
        job = api.GetJob(pb.GetJobRequest(id=job_id, include_attempts=True))
        return job if job.status in FINAL else None
    return wait_for(done, timeout=timeout, message=f"job {job_id} to finish")


def run(api, command: str, **spec) -> pb.Job:
    return final(api, submit(api, command, **spec))


def status(api, job_id: str) -> int:
    return api.GetJob(pb.GetJobRequest(id=job_id)).status


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def read_pid(path, timeout: float = 20) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text().strip(), timeout=timeout,
                        message=f"a pid in {path}"))


def slot_uids(master) -> range:
    first, last = configmod.load(str(master.ini_path)).get("worker", "job_uids")
    return range(first, last + 1)


def processes_of(uids: range) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid in uids and alive(int(entry)):
                    found.append(int(entry))
            except OSError:
                continue
    return found


# --- 1. the job's environment reaches its own exec only -----------------------------------

def test_a_job_s_ld_preload_is_read_by_its_own_shell_only(api):
    """Finding 1: setpriv and prlimit ran with the job's LD_PRELOAD while still holding the
    worker's privileges; the loader complained once per program of the chain. Now it is
    once: the job's shell, which holds nothing."""
    job = run(api, "exit 0", env={"LD_PRELOAD": "/nonexistent-dtsd-preload.so"})
    assert job.status == pb.SUCCEEDED, job.error
    assert job.output.count(b"/nonexistent-dtsd-preload.so") == 1, job.output


# --- 4. jobs are strangers to each other ----------------------------------------------------

def test_a_job_cannot_read_signal_or_trace_another_running_job(api, tmp_path):
    """Finding 4: a job read another submitter's environment and memory through /proc and
    stopped it with SIGSTOP, because every job ran as one uid."""
    pidfile = tmp_path / "victim.pid"
    victim = submit(api, f"echo $$ > {pidfile}; exec sleep 60",
                    env={"OTHER_TOKEN": "s3cret-token"})
    pid = read_pid(pidfile)
    attack = run(api, f"cat /proc/{pid}/environ; echo environ=$?; "
                      f"dd if=/proc/{pid}/mem bs=1 count=1 skip=4096 2>&1; echo mem=$?; "
                      f"kill -STOP {pid}; echo stop=$?; kill -TERM {pid}; echo term=$?")
    out = attack.output.decode(errors="replace")
    for probe in ("environ=1", "mem=1", "stop=1", "term=1"):
        assert probe in out, out
    assert "s3cret-token" not in out
    with open(f"/proc/{pid}/stat") as handle:
        assert handle.read().rsplit(")", 1)[1].split()[0] == "S", "the victim was stopped"
    assert status(api, victim) == pb.RUNNING
    api.CancelJob(pb.CancelJobRequest(id=victim))


def test_each_job_gets_a_private_emptied_tmpdir(api):
    """Finding 4: all jobs shared /tmp and could read each other's files."""
    first = run(api, 'echo "$TMPDIR"; echo secret > "$TMPDIR/mine"; '
                     'umask; stat -c %a "$TMPDIR"; echo x > /tmp/dtsd-stray-$$; echo $$')
    tmpdir, umask, mode, pid = first.output.decode().split()
    assert (umask, mode) == ("0027", "700")
    # Another job (maybe of the same slot, maybe not) sees none of it.
    second = run(api, f'ls -A "$TMPDIR"; ls -ld "$TMPDIR" >/dev/null; '
                      f'cat "{tmpdir}/mine" 2>/dev/null || echo unreadable; '
                      f'cat /tmp/dtsd-stray-{pid} 2>/dev/null || echo gone')
    lines = second.output.decode().split()
    assert "secret" not in lines and "x" not in lines, lines
    assert lines[-2:] == ["unreadable", "gone"] or lines[-1] == "gone", lines


# --- 5. an attempt ends whole ------------------------------------------------------------------

ESCAPE = "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}; " \
         "( ( sleep 301 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}2 ) & ); sleep 0.3"


@pytest.mark.parametrize("end", ["success", "cancel", "timeout"])
def test_nothing_a_job_started_outlives_its_attempt(api, master, tmp_path, end):
    """Finding 5: `setsid sleep 300 &` and a double fork outlived the job's success, a
    cancel and a timeout, as orphans of init."""
    pidfile = tmp_path / "escaped"
    command = ESCAPE.format(pidfile=pidfile)
    if end != "success":
        command += "; sleep 120"
    job_id = submit(api, command, timeout_seconds=2 if end == "timeout" else 0)
    escaped = [read_pid(pidfile), read_pid(tmp_path / "escaped2")]
    assert all(alive(pid) for pid in escaped)
    if end == "cancel":
        api.CancelJob(pb.CancelJobRequest(id=job_id))
    job = final(api, job_id)
    expected = {"success": pb.SUCCEEDED, "cancel": pb.CANCELLED, "timeout": pb.FAILED}[end]
    assert job.status == expected, job.error
    wait_for(lambda: not any(alive(pid) for pid in escaped), timeout=5,
             message="every process the job started to be gone")
    assert not processes_of(slot_uids(master))


# --- 10. the working directory is entered as the job's user --------------------------------

def test_a_job_cannot_start_in_a_directory_its_user_cannot_enter(api, tmp_path):
    """Finding 10: the worker entered the job's cwd before switching user (cwd=/root)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    job = run(api, "pwd; ls", cwd=str(private))
    assert job.status == pb.FAILED
    assert "cannot enter the working directory" in job.error, job.error
    assert "Permission denied" in job.error


# --- 3. Redis cannot steer the workers ----------------------------------------------------------

def test_a_forged_cancel_on_redis_kills_nothing(master, api, redis, tmp_path):
    """Finding 3: a job cancelled another's running job with a PUBLISH on the cancel channel.
    The worker now asks PostgreSQL whether the job was cancelled."""
    marker = tmp_path / "started"
    job_id = submit(api, f"touch {marker}; sleep 2; echo finished")
    wait_for(marker.exists, timeout=20, message="the job to start")
    client = redis.client()
    prefix = configmod.load(str(master.ini_path)).key_prefix
    for _ in range(3):
        assert client.publish(prefix + "cancel", f"{job_id} 1") >= 1   # a worker listens
    job = final(api, job_id)
    assert job.status == pb.SUCCEEDED and job.output == b"finished\n"
    assert "ignored a cancel message for job" in master.log()


def test_deleting_a_worker_s_redis_heartbeat_does_not_make_it_dead(dtsd_factory, redis, tmp_path):
    """Finding 3: deleting a live worker's heartbeat key in a loop made the leader declare it
    dead three times; one job ran four copies at once. The lease is in PostgreSQL now."""
    master = dtsd_factory(FAST, worker={"heartbeat_ttl": "2s"})
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))
    runs = tmp_path / "runs"
    job_id = submit(api, f"echo run >> {runs}; sleep 8", max_retries=3)
    wait_for(runs.exists, timeout=20, message="the job to start")
    client = redis.client()
    prefix = configmod.load(str(master.ini_path)).key_prefix
    deadline = time.monotonic() + 9
    while time.monotonic() < deadline and status(api, job_id) == pb.RUNNING:
        client.delete(*(client.keys(prefix + "worker:*") or [prefix + "worker:none"]))
        time.sleep(0.05)
    job = final(api, job_id, timeout=30)
    assert job.status == pb.SUCCEEDED, job.error
    assert job.attempts == 1
    assert runs.read_text() == "run\n"
    assert "is dead" not in master.log()


def test_a_worker_that_cannot_renew_its_lease_kills_its_jobs_before_the_lease_ends(
        dtsd_factory, pg_dsn, tmp_path):
    """Finding 3: a worker cut off from its liveness record kept running jobs that the leader
    re-queued. Here the worker's renewals stall (its lease row is locked); by the time the
    lease has run out, by PostgreSQL's clock, the job's processes are gone already."""
    master = dtsd_factory(FAST, worker={"heartbeat_ttl": "4s"})
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))
    pidfile = tmp_path / "job.pid"
    job_id = submit(api, f"echo $$ > {pidfile}; exec sleep 120", max_retries=3)
    pid = read_pid(pidfile)
    with psycopg.connect(pg_dsn) as conn:     # a transaction: the row stays locked
        worker = conn.execute("SELECT worker FROM jobs WHERE id = %s", (job_id,)).fetchone()[0]
        conn.execute("SELECT 1 FROM workers WHERE id = %s FOR UPDATE", (worker,))
        with psycopg.connect(pg_dsn, autocommit=True) as watcher:
            def lease_over() -> bool:
                return watcher.execute("SELECT lease_until < now() FROM workers WHERE id = %s",
                                       (worker,)).fetchone()[0]
            wait_for(lease_over, timeout=15, interval=0.02, message="the lease to run out")
            assert not alive(pid), "the job still ran when its worker's lease ran out"
        conn.rollback()
    # The worker renews again (or the leader has recovered the job): it runs once more, alone.
    wait_for(lambda: status(api, job_id) == pb.RUNNING and
             api.GetJob(pb.GetJobRequest(id=job_id)).attempts == 2, timeout=30,
             message="the job to run again")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT attempt, started_at, finished_at FROM job_attempts "
                            "WHERE job_id = %s ORDER BY attempt", (job_id,)).fetchall()
    assert rows[0][2] is not None and rows[0][2] <= rows[1][1], rows
    api.CancelJob(pb.CancelJobRequest(id=job_id))
