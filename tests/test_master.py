"""The master supervising real children: crashes, FATAL, reloads, drains, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import psycopg
import pytest

from dtsd.dtsdpb import pb, pb_grpc
from tests.helpers import REPO_ROOT, clean_env, free_port, wait_for, write_ini

FAST = {"worker": {"retry_backoff": "50ms", "retry_backoff_max": "200ms", "kill_grace": "1s",
                   "startsecs": "0", "stopwaitsecs": "10s"},
        "server": {"startsecs": "0"},
        "dtsd": {"housekeeping_interval": "200ms", "reconcile_interval": "1s"}}


def node(master) -> dict:
    with open(master.workdir / "run" / "node.json") as handle:
        return json.load(handle)


def children(master, role=None, state=None) -> list[dict]:
    return [c for c in node(master)["children"]
            if (role is None or c["role"] == role) and (state is None or c["state"] == state)]


def counts_are(master, **wanted) -> bool:
    try:
        record = node(master)
    except (OSError, ValueError):
        return False
    for role, count in wanted.items():
        items = [c for c in record["children"] if c["role"] == role]
        if len(items) != count or any(c["state"] != "RUNNING" for c in items):
            return False
    return True


def rewrite(master, **sections) -> None:
    for section, values in sections.items():
        master.sections.setdefault(section, {}).update(values)
    write_ini(master.ini_path, master.sections)


def api_of(master):
    return pb_grpc.SchedulerStub(grpc.insecure_channel(master.address))


def final_jobs(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())


class Stream:
    """Submits one job every `period` s from a thread until stopped; counts what it sent."""

    def __init__(self, master, command: str = "sleep 0.2", period: float = 0.05):
        self.api = api_of(master)
        self.command, self.period = command, period
        self.ids: list[str] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(self.period):
            try:
                self.ids.append(self.api.SubmitJob(pb.SubmitJobRequest(
                    job=pb.JobSpec(command=self.command)), timeout=10).id)
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code()}: {exc.details()}")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_killed_children_are_replaced_and_the_service_keeps_answering(dtsd_factory):
    master = dtsd_factory(FAST)
    wait_for(lambda: counts_are(master, server=2, worker=2, coordinator=1))
    with Stream(master) as stream:
        for role in ("server", "worker", "coordinator"):
            victim = children(master, role)[0]
            os.kill(victim["pid"], signal.SIGKILL)
            wait_for(lambda: any(c["index"] == victim["index"] and c["pid"] != victim["pid"]
                                 and c["state"] == "RUNNING" for c in children(master, role)),
                     message=f"{role}-{victim['index']} to be replaced")
            replaced = [c for c in children(master, role) if c["index"] == victim["index"]][0]
            assert replaced["restarts"] >= 1
            # The service answers after each replacement, not just before the first kill.
            answered = len(stream.ids)
            wait_for(lambda: len(stream.ids) >= answered + 8, timeout=20,
                     message=f"submissions to go on after {role} was replaced")
    assert len(stream.ids) > 20
    # A server killed mid-call can fail that one call; the next server answers the rest.
    assert len(stream.errors) <= 2, stream.errors
    dsn = master.sections["postgres"]["dsn"]
    wait_for(lambda: final_jobs(dsn).get("SUCCEEDED") == len(stream.ids), timeout=60,
             message="every submitted job to succeed")


def test_a_config_error_stops_the_master_with_the_message(tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text("[worker]\nconcurrency = lots\n")
    result = subprocess.run([sys.executable, "-m", "dtsd", "-c", str(ini)], cwd=REPO_ROOT,
                            env=clean_env({"PYTHONPATH": str(REPO_ROOT)}), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 78      # EX_CONFIG: systemd does not restart it
    assert f"{ini}: [worker] concurrency: not a whole number: 'lots'" in result.stderr
    check = subprocess.run([sys.executable, "-m", "dtsd", "--check-config", "-c", str(ini)],
                           cwd=REPO_ROOT, env=clean_env({"PYTHONPATH": str(REPO_ROOT)}),
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 1 and "concurrency" in check.stderr
    ini.write_text("[server]\nlisten = 127.0.0.1:1\n[nonsense]\n")
    check = subprocess.run([sys.executable, "-m", "dtsd", "--check-config", "-c", str(ini)],
                           cwd=REPO_ROOT, env=clean_env({"PYTHONPATH": str(REPO_ROOT)}),
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 1 and "unknown section [nonsense]" in check.stderr


def test_a_busy_address_stops_the_master_instead_of_sharing_the_port(dtsd_factory):
    first = dtsd_factory(FAST)
    second = dtsd_factory(FAST, server={"listen": first.address}, start=False)
    try:
        second.start(timeout=10)    # the health check may well be answered by the first one
    except Exception:
        pass
    assert second.proc.wait(10) == 1
    assert "cannot listen on" in second.log()


def test_a_child_that_keeps_failing_at_boot_ends_fatal(dtsd_factory):
    master = dtsd_factory(FAST, worker={"startretries": "2"})
    # Only once the node has been ready does a boot failure back off instead of stopping it.
    wait_for(lambda: counts_are(master, coordinator=1, server=2, worker=2))
    # An operator breaks the file; a worker then crashes and cannot come back.
    master.ini_path.write_text("[worker]\nconcurrency = broken\n")
    victim = children(master, "worker")[0]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: any(c["state"] == "FATAL" for c in children(master, "worker")), timeout=30,
             message="the worker to end FATAL")
    def shown_fatal():      # the coordinator publishes node.json once a housekeeping tick
        status = json.loads(master.dtsctl("-o", "json", "status").stdout)
        return "FATAL" in [c["state"] for n in status["nodes"] for c in n["children"]]
    wait_for(shown_fatal, timeout=10, message="dtsctl status to show the FATAL worker")
    assert "gave up after 2 failed starts" in master.log()
    # The rest of the node goes on serving.
    assert api_of(master).SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true"))).id


def test_hup_scales_the_children_while_jobs_stream_and_each_job_succeeds_once(dtsd_factory):
    master = dtsd_factory(FAST)
    wait_for(lambda: counts_are(master, server=2, worker=2))
    with Stream(master, period=0.03) as stream:
        for servers, workers in ((2, 4), (3, 1)):
            rewrite(master, server={"processes": servers}, worker={"processes": workers})
            master.signal(signal.SIGHUP)
            wait_for(lambda: counts_are(master, server=servers, worker=workers), timeout=60,
                     message=f"{servers} servers and {workers} workers")
        time.sleep(1)
    assert not stream.errors, stream.errors
    dsn = master.sections["postgres"]["dsn"]
    wait_for(lambda: final_jobs(dsn).get("SUCCEEDED") == len(stream.ids), timeout=90,
             message=f"all {len(stream.ids)} jobs to succeed")
    with psycopg.connect(dsn) as conn:
        runs = conn.execute("""SELECT count(*) FILTER (WHERE exit_code = 0), count(DISTINCT job_id)
                               FROM job_attempts""").fetchone()
    assert runs == (len(stream.ids), len(stream.ids))  # every job ran to success exactly once


def test_hup_with_a_changed_setting_restarts_that_role_one_at_a_time(dtsd_factory):
    master = dtsd_factory(FAST)
    wait_for(lambda: counts_are(master, server=2, worker=2))
    before = {(c["role"], c["index"]): c["pid"] for c in children(master)}
    rewrite(master, worker={"max_output_bytes": "2MB"})
    master.signal(signal.SIGHUP)

    def workers_replaced():
        now = {(c["role"], c["index"]): c["pid"] for c in children(master, state="RUNNING")}
        return (all(now.get(("worker", i)) not in (None, before[("worker", i)]) for i in (0, 1))
                and counts_are(master, worker=2) and now)
    now = wait_for(workers_replaced, timeout=60, message="both workers to be replaced")
    assert now[("server", 0)] == before[("server", 0)]   # servers' settings did not change
    assert "reload complete" in master.log()


def test_hup_with_new_job_limit_ceilings_replaces_the_servers_that_enforce_them(dtsd_factory):
    master = dtsd_factory(FAST)
    wait_for(lambda: counts_are(master, server=2, worker=2))
    before = {(c["role"], c["index"]): c["pid"] for c in children(master)}
    rewrite(master, worker={"limits_max": "processes=8192 open_files=65536"})
    master.signal(signal.SIGHUP)

    def servers_replaced():
        now = {(c["role"], c["index"]): c["pid"] for c in children(master, state="RUNNING")}
        return (all(now.get(("server", i)) not in (None, before[("server", i)]) for i in (0, 1))
                and counts_are(master, server=2) and now)
    wait_for(servers_replaced, timeout=60, message="both servers to be replaced")


def test_hup_with_a_broken_file_changes_nothing(dtsd_factory):
    master = dtsd_factory(FAST)
    wait_for(lambda: counts_are(master, server=2, worker=2))
    before = sorted(c["pid"] for c in children(master))
    rewrite(master, worker={"processes": "many"})
    master.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in master.log(), message="the refusal in the log")
    assert "[worker] processes" in master.log()
    time.sleep(1.5)
    assert sorted(c["pid"] for c in children(master)) == before
    assert master.running()
    job = api_of(master).SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true")))
    assert job.id


def test_ttin_and_ttou_add_and_remove_a_worker(dtsd_factory):
    master = dtsd_factory(FAST)
    wait_for(lambda: counts_are(master, worker=2))
    master.signal(signal.SIGTTIN)
    wait_for(lambda: counts_are(master, worker=3), message="3 workers")
    master.signal(signal.SIGTTOU)
    wait_for(lambda: counts_are(master, worker=2), message="2 workers")


def test_term_lets_running_jobs_finish(dtsd_factory):
    master = dtsd_factory(FAST)
    api = api_of(master)
    ids = [j.id for j in api.SubmitJobs(pb.SubmitJobsRequest(
        jobs=[pb.JobSpec(command="sleep 3") for _ in range(8)])).jobs]
    wait_for(lambda: all(api.GetJob(pb.GetJobRequest(id=i)).status == pb.RUNNING for i in ids),
             message="all 8 jobs running")
    master.signal(signal.SIGTERM)
    assert master.proc.wait(60) == 0
    with psycopg.connect(master.sections["postgres"]["dsn"]) as conn:
        rows = conn.execute("SELECT status, attempts FROM jobs").fetchall()
    assert rows == [("SUCCEEDED", 1)] * 8


def test_term_past_stopwaitsecs_hands_jobs_back_and_another_dtsd_completes_them(dtsd_factory):
    master = dtsd_factory(FAST, worker={"stopwaitsecs": "1s"})
    channel = grpc.insecure_channel(master.address)
    api = pb_grpc.SchedulerStub(channel)
    ids = [j.id for j in api.SubmitJobs(pb.SubmitJobsRequest(
        jobs=[pb.JobSpec(command="sleep 4") for _ in range(8)])).jobs]
    wait_for(lambda: all(api.GetJob(pb.GetJobRequest(id=i)).status == pb.RUNNING for i in ids))
    # An idle client connection held open would make gRPC wait ~5 s for its GOAWAY
    # acknowledgement; what is measured here is that workers do not wait for the jobs.
    channel.close()
    started = time.monotonic()
    master.signal(signal.SIGTERM)
    assert master.proc.wait(60) == 0
    assert time.monotonic() - started < 3.5      # it did not wait for the 4 s jobs
    dsn = master.sections["postgres"]["dsn"]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT status, failures FROM jobs").fetchall()
    assert rows == [("PENDING", 0)] * 8           # handed back; no retry spent
    second = dtsd_factory(FAST)
    api = api_of(second)
    for job_id in ids:
        job = wait_for(lambda: (j := api.GetJob(pb.GetJobRequest(id=job_id, include_attempts=True)))
                       .status == pb.SUCCEEDED and j, timeout=60)
        assert [a.error for a in job.attempt_history] == ["handed back", ""]


def test_quit_hands_running_jobs_back_at_once(dtsd_factory):
    master = dtsd_factory(FAST)
    api = api_of(master)
    job_id = api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="sleep 30"))).id
    wait_for(lambda: api.GetJob(pb.GetJobRequest(id=job_id)).status == pb.RUNNING)
    started = time.monotonic()
    master.signal(signal.SIGQUIT)
    assert master.proc.wait(30) == 0
    assert time.monotonic() - started < 5
    with psycopg.connect(master.sections["postgres"]["dsn"]) as conn:
        assert conn.execute("SELECT status, failures FROM jobs").fetchall() == [("PENDING", 0)]


def test_a_silent_child_is_killed_and_replaced(dtsd_factory):
    master = dtsd_factory(FAST, dtsd={"child_timeout": "2s"})
    wait_for(lambda: counts_are(master, worker=2))
    victim = children(master, "worker")[0]
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        wait_for(lambda: any(c["index"] == victim["index"] and c["pid"] != victim["pid"]
                             and c["state"] == "RUNNING" for c in children(master, "worker")),
                 timeout=20, message="the stopped worker to be replaced")
    finally:
        try:
            os.kill(victim["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert "silent for" in master.log()


def test_usr1_reopens_the_log_file(dtsd_factory, tmp_path):
    log_file = tmp_path / "dtsd.log"
    master = dtsd_factory(FAST, dtsd={"log_file": str(log_file)})
    wait_for(lambda: counts_are(master, server=2, worker=2))
    rotated = tmp_path / "dtsd.log.1"
    log_file.rename(rotated)
    master.signal(signal.SIGUSR1)
    wait_for(lambda: log_file.exists() and "USR1: log files reopened" in log_file.read_text(),
             message="the master to log into a new file")
    # A child's next line lands in the new file too.
    os.kill(children(master, "worker")[0]["pid"], signal.SIGKILL)
    wait_for(lambda: "worker" in log_file.read_text() and "ready" in log_file.read_text())


def test_the_master_loads_no_client_library():
    """The master forks children and must hold no gRPC, Redis, PostgreSQL or etcd state;
    it does not even import them (importing grpc alone cost it 10 MB of RSS)."""
    probe = ("import sys, dtsd.master, dtsd.daemon; "
             "print(sorted(m for m in ('grpc', 'redis', 'psycopg', 'psycopg_pool', 'etcd3', "
             "'google.protobuf') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                            text=True, env=clean_env({"PYTHONPATH": str(REPO_ROOT)}), timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_missing_database_or_role_is_named_with_the_commands_that_create_it(pg_dsn, tmp_path):
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    params = conninfo_to_dict(pg_dsn)

    def migrate(**changes) -> str:
        ini = tmp_path / "dtsd.ini"
        write_ini(ini, {"postgres": {"dsn": make_conninfo(**{**params, **changes})}})
        result = subprocess.run([sys.executable, "-m", "dtsd", "migrate", "-c", str(ini)],
                                capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                                env=clean_env({"PYTHONPATH": str(REPO_ROOT)}),
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 78, result     # EX_CONFIG: a restart would not help
        return result.stderr
    missing_db = migrate(dbname="no_such_db")
    assert 'database "no_such_db" does not exist' in missing_db
    assert "create it on the PostgreSQL host: sudo -u postgres createdb -O dtsd no_such_db" \
        in missing_db
    missing_role = migrate(user="no_such_role")
    assert ('create the role and its database on the PostgreSQL host: sudo -u postgres '
            'createuser no_such_role && sudo -u postgres createdb -O no_such_role dtsd'
            in missing_role), missing_role


def test_a_start_without_its_database_exits_78_and_says_how_to_create_it(dtsd_factory, pg_dsn):
    """The daemon's start path, not only `dtsd migrate`: systemd would restart a plain
    failure every 5 s (RestartPreventExitStatus=78 stops that), and the journal holds the
    commands that fix it."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    params = conninfo_to_dict(pg_dsn)
    for changes, commands in (
            ({"dbname": "no_such_db"}, "sudo -u postgres createdb -O dtsd no_such_db"),
            ({"user": "no_such_role"}, "sudo -u postgres createuser no_such_role && "
                                       "sudo -u postgres createdb -O no_such_role dtsd")):
        master = dtsd_factory(FAST, postgres={"dsn": make_conninfo(**{**params, **changes})},
                              start=False)
        write_ini(master.ini_path, master.sections)
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "dtsd", "-c", str(master.ini_path)],
                                capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                                env=clean_env({"PYTHONPATH": str(REPO_ROOT)}),
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 78, result
        assert commands in result.stderr, result.stderr
        assert "schema migration failed: the database or its role does not exist" \
            in result.stderr
        assert time.monotonic() - started < 30
    # Unreachable is another matter: it may pass, so 1 (systemd retries).
    master = dtsd_factory(FAST, postgres={"dsn": make_conninfo(
        **{**params, "host": "127.0.0.1", "port": str(free_port())})}, start=False)
    write_ini(master.ini_path, master.sections)
    result = subprocess.run([sys.executable, "-m", "dtsd", "-c", str(master.ini_path)],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                            env=clean_env({"PYTHONPATH": str(REPO_ROOT)}),
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result
    assert "schema migration failed (exit code 1)" in result.stderr
