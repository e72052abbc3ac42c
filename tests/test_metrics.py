"""The web child's /metrics, /healthz and /readyz, scraped from a real node under a job
stream and checked against what PostgreSQL says."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dtsd import config as configmod
from dtsd import metrics
from dtsd.dtsdpb import pb, pb_grpc
from tests.helpers import wait_for
from tests.test_auth import add_token
from tests.test_master import children
from tests.test_pipeline import FAST, merged

WEB = {"web": {"processes": 1}}


def get(url: str, token: str = "") -> tuple[int, str, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode(), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def scrape(master, token: str = "") -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    status, body, headers = get(master.web_url + "/metrics", token)
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_final(api, ids: list[str], timeout: float = 60) -> None:
    final = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
    wait_for(lambda: all(api.GetJob(pb.GetJobRequest(id=i)).status in final for i in ids),
             timeout=timeout)


@pytest.fixture
def node(dtsd_factory):
    return dtsd_factory(merged(FAST, WEB, {"server": {"processes": 2},
                                           "worker": {"processes": 2, "concurrency": 3,
                                                      "queues": "default,q2"}}))


def test_the_node_metrics_add_up_across_children_and_agree_with_postgresql(node):
    channels = [grpc.insecure_channel(node.address) for _ in range(3)]
    apis = [pb_grpc.SchedulerStub(c) for c in channels]
    ids = []
    for i in range(24):
        reply = apis[i % 3].SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true")))
        ids.append(reply.id)
    failing = [apis[i % 3].SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(
        command="exit 3", queue="q2", max_retries=1))).id for i in range(5)]
    # A queue nobody takes: its depth shows.
    waiting = [apis[0].SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(
        command="true", queue="idle", priority=7))).id for _ in range(3)]
    with pytest.raises(grpc.RpcError):
        apis[0].GetJob(pb.GetJobRequest(id="no-such-job"))
    wait_final(apis[0], ids + failing)

    # The leader folds job counts every tick; the workers record in batches.
    def settled():
        samples = scrape(node)
        return (value(samples, "dtsd_jobs", status="SUCCEEDED") == 24
                and value(samples, "dtsd_jobs_finished_total", queue="q2", outcome="failed") == 5
                and samples)
    samples = wait_for(settled, timeout=15)

    assert value(samples, "dtsd_jobs_submitted_total", queue="default") == 24
    assert value(samples, "dtsd_jobs_submitted_total", queue="q2") == 5
    assert value(samples, "dtsd_jobs_submitted_total", queue="idle") == 3
    assert value(samples, "dtsd_jobs_started_total", queue="default") == 24
    assert value(samples, "dtsd_jobs_started_total", queue="q2") == 10      # two attempts each
    assert value(samples, "dtsd_jobs_finished_total", queue="default", outcome="succeeded") == 24
    assert value(samples, "dtsd_jobs_finished_total", queue="q2", outcome="retried") == 5
    assert value(samples, "dtsd_jobs_dead_lettered_total", queue="q2") == 5
    assert value(samples, "dtsd_job_run_seconds_count", queue="default") == 24
    assert value(samples, "dtsd_job_queue_wait_seconds_count", queue="q2") == 10
    assert value(samples, "dtsd_queue_depth", queue="idle", priority="7") == 3
    # Every submit answered OK was counted, on whichever server child took it, and so was
    # the refused GetJob.
    assert value(samples, "dtsd_grpc_requests_total", method="dtsd.v1.Scheduler/SubmitJob",
                 code="OK") == 32
    assert value(samples, "dtsd_grpc_requests_total", method="dtsd.v1.Scheduler/GetJob",
                 code="NOT_FOUND") == 1
    assert value(samples, "dtsd_grpc_request_duration_seconds_count",
                 method="dtsd.v1.Scheduler/SubmitJob") == 32

    with psycopg.connect(node.sections["postgres"]["dsn"]) as conn:
        by_status = dict(conn.execute("SELECT status, count(*) FROM jobs GROUP BY status"))
        dead = conn.execute("SELECT count(*) FROM jobs WHERE dead_lettered_at IS NOT NULL"
                            ).fetchone()[0]
    for status, count in by_status.items():
        assert value(samples, "dtsd_jobs", status=status) == count, status
    assert value(samples, "dtsd_dead_letters") == dead == 5

    assert value(samples, "dtsd_children", role="worker", state="RUNNING") == 2
    assert value(samples, "dtsd_children", role="server", state="RUNNING") == 2
    assert value(samples, "dtsd_children", role="web", state="RUNNING") == 1
    assert value(samples, "dtsd_children", role="worker", state="FATAL") == 0
    assert value(samples, "dtsd_leader") == 1
    assert value(samples, "dtsd_fencing_token") >= 1
    assert value(samples, "dtsd_store_up", store="postgres") == 1
    assert value(samples, "dtsd_store_up", store="redis") == 1
    assert ("dtsd_store_up", (("store", "etcd"),)) not in samples     # single-node
    assert not any(name == "dtsd_etcd_polled" for name, _ in samples)  # internal
    for channel in channels:
        channel.close()


def test_counters_survive_a_child_killed_and_replaced(node):
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(node.address))
    ids = [api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true"))).id
           for _ in range(10)]
    wait_final(api, ids)
    before = wait_for(lambda: (lambda s: value(s, "dtsd_jobs_finished_total", queue="default",
                                               outcome="succeeded") == 10 and s)(scrape(node)))
    workers = children(node, "worker")
    os.kill(workers[0]["pid"], signal.SIGKILL)
    wait_for(lambda: value(scrape(node), "dtsd_child_restarts_total", role="worker") == 1,
             timeout=20)
    wait_for(lambda: value(scrape(node), "dtsd_children", role="worker", state="RUNNING") == 2,
             timeout=20)
    after = scrape(node)
    # What the dead worker counted is still in the sums: nothing went backwards.
    for key, counted in before.items():
        if key[0].endswith(("_total", "_count", "_bucket", "_sum")):
            assert after.get(key, 0.0) >= counted, key
    more = [api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true"))).id
            for _ in range(4)]
    wait_final(api, more)
    wait_for(lambda: value(scrape(node), "dtsd_jobs_started_total", queue="default") == 14)


def test_the_exposition_passes_promtool(node):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make deps` installs Debian's prometheus package"
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(node.address))
    wait_final(api, [api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true"))).id])
    status, body, _ = get(node.web_url + "/metrics")
    assert status == 200
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    families = {f.name for f in text_string_to_metric_families(body)}
    # prometheus_client's parser names counters without `_total`.
    served = {name + "_total" if kind == "counter" else name
              for name, kind in ((f.name, f.type) for f in text_string_to_metric_families(body))}
    missing = set(metrics.FAMILIES) - served - {
        # Only once something happened: a lost job, a cron slot, a store error.
        "dtsd_jobs_lost_total", "dtsd_jobs_dead_lettered_total", "dtsd_cron_slots_fired_total",
        "dtsd_cron_slots_missed_total", "dtsd_cron_slot_lateness_seconds",
        "dtsd_child_restarts_total", "dtsd_store_errors_total", "dtsd_notifications_total"}
    assert not missing, (missing, families)
    assert served <= set(metrics.FAMILIES), served - set(metrics.FAMILIES)


def test_healthz_and_readyz_follow_the_stores(dtsd_factory, redis):
    node = dtsd_factory(merged(FAST, WEB))
    assert get(node.web_url + "/healthz")[:2] == (200, "ok\n")
    status, body, headers = get(node.web_url + "/readyz")
    assert (status, body) == (200, "ready\npostgres: ok\nredis: ok\n")
    assert headers["Cache-Control"] == "no-store"
    redis.stop()
    try:
        def not_ready():
            status, body, _ = get(node.web_url + "/readyz")
            return status == 503 and body
        body = wait_for(not_ready, timeout=15)
        assert body == "not ready\npostgres: ok\nredis: unreachable\n"
        assert get(node.web_url + "/healthz")[0] == 200
        samples = scrape(node)
        assert value(samples, "dtsd_store_up", store="redis") == 0
        assert value(samples, "dtsd_store_up", store="postgres") == 1
        assert value(samples, "dtsd_jobs", status="SUCCEEDED") >= 0   # PostgreSQL still read
    finally:
        redis.start()
    wait_for(lambda: get(node.web_url + "/readyz")[0] == 200, timeout=20)
    assert "redis is unreachable from this node" in node.log_path.read_text()
    assert "redis is reachable again" in node.log_path.read_text()


def test_readyz_names_etcd_from_the_coordinator(dtsd_factory, etcd):
    node = dtsd_factory(merged(FAST, WEB, {"etcd": {"endpoints": etcd.endpoints,
                                                    "lease_ttl": "3s"}}))
    wait_for(lambda: get(node.web_url + "/readyz")[0] == 200, timeout=20)
    assert get(node.web_url + "/readyz")[1] == "ready\npostgres: ok\nredis: ok\netcd: ok\n"
    assert value(scrape(node), "dtsd_store_up", store="etcd") == 1
    etcd.stop_member(0)
    body = wait_for(lambda: (lambda r: r[0] == 503 and r[1])(get(node.web_url + "/readyz")),
                    timeout=20)
    assert body == "not ready\npostgres: ok\nredis: ok\netcd: unreachable\n"
    assert value(scrape(node), "dtsd_leader") == 0


def test_with_a_tokens_file_metrics_want_a_bearer_token(dtsd_factory, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    node = dtsd_factory(merged(FAST, WEB, {"server": {"tokens_file": str(tokens)}}))
    status, body, headers = get(node.web_url + "/metrics")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert "dtsd_" not in body
    assert get(node.web_url + "/metrics", token="made-up")[0] == 401
    secret = add_token(node, "prometheus", "read", wait=False)
    wait_for(lambda: get(node.web_url + "/metrics", token=secret)[0] == 200, timeout=5)
    assert "dtsd_children" in get(node.web_url + "/metrics", token=secret)[1]
    # Probes need no token, and learn nothing but which store answers.
    assert get(node.web_url + "/healthz")[0] == 200
    assert get(node.web_url + "/readyz")[0] == 200
    # Anything else is the web UI, which wants a login first; no path reaches a file.
    status, body, _ = get(node.web_url + "/")
    assert status == 200 and "Log in to dtsd" in body
    status, body, _ = get(node.web_url + "/metrics/../etc/passwd")
    assert "root:" not in body
    request = urllib.request.Request(node.web_url + "/metrics", method="POST", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 405


def test_a_made_up_method_does_not_grow_the_label_set(node):
    channel = grpc.insecure_channel(node.address)
    for n in range(5):
        call = channel.unary_unary(f"/dtsd.v1.Scheduler/Nope{n}")
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    samples = scrape(node)
    methods = {dict(labels).get("method") for name, labels in samples
               if name == "dtsd_grpc_requests_total"}
    assert not any(m and m.startswith("dtsd.v1.Scheduler/Nope") for m in methods)
    assert value(samples, "dtsd_grpc_requests_total", method="unknown",
                 code="UNIMPLEMENTED") == 5


def test_a_child_cannot_be_pointed_at_a_metrics_directory_jobs_can_write(node):
    directory = os.path.join(node.sections["dtsd"]["runtime_dir"], metrics.DIRECTORY)
    mode = os.stat(directory).st_mode & 0o777
    assert mode == 0o700, oct(mode)
    # A job runs as another uid: it can neither read nor forge the node's samples.
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(node.address))
    job = api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(
        command=f"ls {directory} || echo refused; touch {directory}/counter_1.db || echo refused;"
                " env | grep -c PROMETHEUS || true")))
    wait_final(api, [job.id])
    output = api.GetJob(pb.GetJobRequest(id=job.id)).output.decode()
    if os.getuid() == 0:
        assert output.count("refused") == 2, output
    assert output.strip().endswith("0"), output       # not in a job's environment either
    assert not os.path.exists(os.path.join(directory, "counter_1.db"))


def test_queue_labels_are_bounded():
    names = [f"q{n}" for n in range(metrics.MAX_QUEUE_LABELS + 20)]
    labels = [metrics.queue_label(name) for name in names]
    assert len(set(labels)) <= metrics.MAX_QUEUE_LABELS + 1
    assert labels[-1] == metrics.OTHER
    assert metrics.queue_label(labels[0]) == labels[0]


def test_the_web_listener_follows_the_grpc_ports_exposure_rule(tmp_path):
    def check(**web):
        text = "[web]\n" + "".join(f"{k} = {v}\n" for k, v in web.items())
        return configmod.server_exposure(configmod.parse(text, "t.ini", env={}))
    error, _ = check(listen="0.0.0.0:8080")
    assert error and error.startswith("[web] listen = 0.0.0.0:8080 is not a loopback address")
    assert check(listen="0.0.0.0:8080", processes=0) == (None, None)
    assert check(listen="127.0.0.1:9999") == (None, None)
    with pytest.raises(configmod.ConfigError, match=r"\[web\] listen and \[server\] listen use "
                                                   r"the same port 50051"):
        configmod.parse("[web]\nlisten = 127.0.0.1:50051\n", "t.ini", env={})


def test_cron_slots_fired_and_skipped_are_counted(node):
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(node.address))
    # Every second, one run at a time, each run 2.2 s: most slots are skipped (missed).
    api.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(
        name="slow", expression="* * * * * *", overlap=pb.FORBID,
        job=pb.JobSpec(command="sleep 2.2"))))

    def counted():
        samples = scrape(node)
        return (value(samples, "dtsd_cron_slots_fired_total") >= 2
                and value(samples, "dtsd_cron_slots_missed_total") >= 2 and samples)
    samples = wait_for(counted, timeout=30)
    api.PauseSchedule(pb.ScheduleRef(name="slow"))
    fired = value(samples, "dtsd_cron_slots_fired_total")
    assert value(samples, "dtsd_cron_slot_lateness_seconds_count") == fired
    # On time: the leader wakes at each slot.
    assert value(samples, "dtsd_cron_slot_lateness_seconds_bucket", le="1.0") == fired
    with psycopg.connect(node.sections["postgres"]["dsn"]) as conn:
        runs = conn.execute("SELECT count(*) FROM jobs WHERE schedule_id IS NOT NULL"
                            ).fetchone()[0]
    assert runs >= fired


def test_jobs_lost_with_a_killed_worker_are_counted_by_the_leader(dtsd_factory, tmp_path):
    node = dtsd_factory(merged(FAST, WEB, {"worker": {"processes": 1, "heartbeat_ttl": "2s"}}))
    api = pb_grpc.SchedulerStub(grpc.insecure_channel(node.address))
    mark = tmp_path / "mark"
    once = api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(
        command="sleep 300", max_retries=0))).id
    again = api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(
        command=f"test -f {mark} || {{ touch {mark}; sleep 300; }}", max_retries=2))).id
    wait_for(lambda: all(api.GetJob(pb.GetJobRequest(id=i)).status == pb.RUNNING
                         for i in (once, again)) and mark.exists())
    worker = api.GetJob(pb.GetJobRequest(id=once)).worker
    os.kill(int(worker.rsplit("-", 1)[1]), signal.SIGKILL)
    wait_final(api, [once, again])
    samples = wait_for(lambda: (lambda s: value(s, "dtsd_jobs_lost_total", queue="default") == 2
                                and s)(scrape(node)), timeout=15)
    # The one without retries left is dead-lettered by the leader, and counted as such.
    assert value(samples, "dtsd_jobs_dead_lettered_total", queue="default") == 1
    assert value(samples, "dtsd_dead_letters") == 1
    assert value(samples, "dtsd_child_restarts_total", role="worker") == 1
    # Started twice (the lost attempt, then the retry that succeeded); one success.
    assert value(samples, "dtsd_jobs_started_total", queue="default") == 3
    assert value(samples, "dtsd_jobs_finished_total", queue="default", outcome="succeeded") == 1
