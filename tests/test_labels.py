"""Labels and selection: the selector's syntax (pure), and against a real dtsd: labels on
jobs and schedules, `list --selector`, bulk cancel, retry and dead-letter requeue with a
dry-run count, confirmation and a limit."""

from __future__ import annotations

import grpc
import pytest

from dtsd import models
from dtsd.dtsdpb import pb
from dtsd.models import InvalidField, Requirement, SelectorOp, parse_selector
from tests.helpers import wait_for
# A dtsd with two workers serving queues default and batch, and the API to it.
from tests.test_queues import api, as_json, dtsd, ok  # noqa: F401 (fixtures)
from tests.test_queues import FAST

FAST_ONE = {**FAST, "worker": {**FAST["worker"], "processes": 1}}


# --- the syntax ----------------------------------------------------------------------------

def test_a_selector_reads_as_kubernetes_writes_it():
    assert parse_selector("team=data, env!=prod,tier in (a, b),x notin (c),has,!gone,"
                          "example.com/k==v") == [
        Requirement("team", SelectorOp.EQUALS, ("data",)),
        Requirement("env", SelectorOp.NOT_EQUALS, ("prod",)),
        Requirement("tier", SelectorOp.IN, ("a", "b")),
        Requirement("x", SelectorOp.NOT_IN, ("c",)),
        Requirement("has", SelectorOp.EXISTS),
        Requirement("gone", SelectorOp.NOT_EXISTS),
        Requirement("example.com/k", SelectorOp.EQUALS, ("v",))]
    assert parse_selector("") == [] and parse_selector("  ") == []


@pytest.mark.parametrize("text, problem", [
    ("team=Data!", "bad label value 'Data!'"),
    ("a in (b", "unbalanced parentheses"),
    ("a b", "cannot read 'a b'"),
    ("a,,b", "an empty requirement"),
    ("k" * 64, "bad label key"),
    ("/x=y", "bad label key '/x'"),
    ("Bad_Prefix/x=y", "bad label key"),
    ("a=b\0", "NUL"),
])
def test_a_bad_selector_is_refused_naming_the_field(text, problem):
    with pytest.raises(InvalidField) as caught:
        parse_selector(text, "selection.selector")
    assert caught.value.field == "selection.selector"
    assert problem in caught.value.problem


def test_labels_are_bounded_and_checked():
    assert models.check_labels({"b": "", "a": "x-1"}) == {"a": "x-1", "b": ""}
    with pytest.raises(InvalidField, match=r"^labels: has 33 labels; at most 32$"):
        models.check_labels({f"k{i}": "v" for i in range(33)})
    with pytest.raises(InvalidField, match=r"^jobs\[2\]\.labels\[team\]: bad label value"):
        models.validate_spec(command="true", labels={"team": "-x"}, prefix="jobs[2].")
    job = models.validate_spec(command="true", labels={"team": "data"})
    assert job.fingerprint() != models.validate_spec(command="true").fingerprint()


# --- against a real dtsd --------------------------------------------------------------------

def submit(dtsd, *args):
    return ok(dtsd.dtsctl("submit", *args)).strip()


def listed(dtsd, *args):
    jobs = as_json(dtsd.dtsctl("-o", "json", "list", "--all", *args))["jobs"]
    return sorted(job["id"] for job in jobs)


def status_of(api, job_id):
    return pb.JobStatus.Name(api.GetJob(pb.GetJobRequest(id=job_id)).status)


def test_labels_select_jobs_in_list(dtsd, api):
    ok(dtsd.dtsctl("queue", "pause", "batch"))      # so that the jobs stay as they are
    data_prod = submit(dtsd, "--queue", "batch", "--label", "team=data", "--label", "env=prod",
                       "--", "true")
    data_dev = submit(dtsd, "--queue", "batch", "--label", "team=data", "--label", "env=dev",
                      "--", "true")
    web = submit(dtsd, "--queue", "batch", "--label", "team=web", "--", "true")
    plain = submit(dtsd, "--queue", "batch", "--", "true")
    assert listed(dtsd, "--selector", "team=data") == sorted([data_prod, data_dev])
    assert listed(dtsd, "--selector", "team=data,env!=prod") == [data_dev]
    # != and notin hold for jobs without the key, as in Kubernetes.
    assert listed(dtsd, "--selector", "env!=prod") == sorted([data_dev, web, plain])
    assert listed(dtsd, "-l", "team in (web,data)", "--status", "pending") == \
        sorted([data_prod, data_dev, web])
    assert listed(dtsd, "-l", "team notin (data)") == sorted([web, plain])
    assert listed(dtsd, "-l", "env") == sorted([data_prod, data_dev])
    assert listed(dtsd, "-l", "!team") == [plain]
    assert listed(dtsd, "-l", "team=data", "--status", "succeeded") == []

    job = as_json(dtsd.dtsctl("-o", "json", "status", data_prod))["jobs"][0]
    assert job["spec"]["labels"] == {"env": "prod", "team": "data"}
    assert "Labels:       env=prod,team=data" in ok(dtsd.dtsctl("status", data_prod))

    bad = dtsd.dtsctl("submit", "--label", "team=Data!", "--", "true")
    assert bad.returncode == 2 and "--label" in bad.stderr and "Data!" in bad.stderr, bad.stderr
    bad = dtsd.dtsctl("list", "--selector", "team in (a")
    assert bad.returncode == 2 and "--selector" in bad.stderr, bad.stderr
    with pytest.raises(grpc.RpcError) as caught:
        api.SubmitJob(pb.SubmitJobRequest(job=pb.JobSpec(command="true", labels={"a b": "c"})))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("labels: bad label key 'a b'")
    with pytest.raises(grpc.RpcError) as caught:
        api.ListJobs(pb.ListJobsRequest(selector="x=(y"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("selector:")


def test_bulk_cancel_counts_asks_and_cancels_in_batches(dtsd, api):
    ok(dtsd.dtsctl("queue", "pause", "batch"))
    data = [submit(dtsd, "--queue", "batch", "--label", "team=data", "--", "true")
            for _ in range(5)]
    web = [submit(dtsd, "--queue", "batch", "--label", "team=web", "--", "true")
           for _ in range(3)]
    running = submit(dtsd, "--label", "team=data", "--", "sleep 60")
    wait_for(lambda: status_of(api, running) == "RUNNING", timeout=20)

    counted = as_json(dtsd.dtsctl("-o", "json", "cancel", "--selector", "team=data",
                                  "--dry-run"))
    assert counted == {"matched": 6, "changed": 0, "more": False, "dry_run": True}
    assert ok(dtsd.dtsctl("cancel", "-l", "team=data", "--status", "pending",
                          "--dry-run")).strip() == "5 job(s) match"
    # Off a terminal a selection needs --yes: nothing is cancelled without it.
    refused = dtsd.dtsctl("cancel", "--selector", "team=data")
    assert refused.returncode == 2 and "--yes" in refused.stderr, refused.stderr
    assert status_of(api, data[0]) == "PENDING"
    both = dtsd.dtsctl("cancel", data[0], "--selector", "team=data")
    assert both.returncode == 2 and "not both" in both.stderr

    assert ok(dtsd.dtsctl("cancel", "--selector", "team=data", "--yes")).strip() == "cancelled 6"
    assert {status_of(api, job_id) for job_id in data} == {"CANCELLED"}
    wait_for(lambda: status_of(api, running) == "CANCELLED", timeout=10)
    job = api.GetJob(pb.GetJobRequest(id=running, include_attempts=True))
    wait_for(lambda: api.GetJob(pb.GetJobRequest(id=running, include_attempts=True))
             .attempt_history[0].finished_at.seconds, timeout=15,
             message="the running job to be killed")
    assert {status_of(api, job_id) for job_id in web} == {"PENDING"}

    # A limit stops it and says that more match.
    limited = as_json(dtsd.dtsctl("-o", "json", "cancel", "-l", "team=web", "--limit", "2",
                                  "--yes"))
    assert limited == {"matched": 2, "changed": 2, "more": True, "dry_run": False}
    assert sorted(status_of(api, job_id) for job_id in web) == ["CANCELLED", "CANCELLED",
                                                                  "PENDING"]
    # The API refuses a selection that selects everything, and statuses it cannot act on.
    for selection, field in ((pb.JobSelection(), "selection"),
                             (pb.JobSelection(statuses=[pb.SUCCEEDED]), "selection.statuses"),
                             (pb.JobSelection(selector="a in"), "selection.selector"),
                             (pb.JobSelection(queue="Bad Queue"), "selection.queue")):
        with pytest.raises(grpc.RpcError) as caught:
            api.CancelJobs(pb.BulkJobsRequest(selection=selection))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(field + ":"), caught.value.details()
    assert job.id == running


def test_bulk_retry_and_dead_letter_requeue_by_selector(dtsd, api):
    failing = {group: [submit(dtsd, "--max-retries", "0", "--label", f"grp={group}", "--",
                              "exit 3") for _ in range(count)]
               for group, count in (("a", 3), ("b", 2), ("c", 2))}
    every = [job_id for ids in failing.values() for job_id in ids]
    wait_for(lambda: all(status_of(api, job_id) == "FAILED" for job_id in every), timeout=30)

    assert ok(dtsd.dtsctl("dlq", "requeue", "--selector", "grp=a", "--dry-run")).strip() == \
        "3 job(s) match"
    assert ok(dtsd.dtsctl("dlq", "requeue", "-l", "grp=a", "--yes")).strip() == "requeued 3"
    # They run again and fail again, once each: a bulk action does not take up the jobs it
    # changed itself, even when they fail again while it runs.
    wait_for(lambda: all(api.GetJob(pb.GetJobRequest(id=job_id)).attempts == 2
                         and status_of(api, job_id) == "FAILED" for job_id in failing["a"]),
             timeout=30)
    dead = {job.id for job in api.ListDeadLetters(pb.ListDeadLettersRequest()).jobs}
    assert set(every) <= dead

    retried = as_json(dtsd.dtsctl("-o", "json", "retry", "--selector", "grp in (b)",
                                  "--status", "failed", "--yes"))
    assert retried == {"matched": 2, "changed": 2, "more": False, "dry_run": False}
    wait_for(lambda: all(api.GetJob(pb.GetJobRequest(id=job_id)).attempts == 2
                         and status_of(api, job_id) == "FAILED" for job_id in failing["b"]),
             timeout=30)
    assert all(api.GetJob(pb.GetJobRequest(id=job_id)).attempts == 1
               for job_id in failing["c"])


def test_a_schedule_s_labels_go_to_its_runs(dtsd, api):
    shown = as_json(dtsd.dtsctl("-o", "json", "cron", "add", "nightly", "@daily",
                                "--label", "team=data", "--", "true"))
    assert shown["job"]["labels"] == {"team": "data"}
    job_id = as_json(dtsd.dtsctl("-o", "json", "cron", "run", "nightly"))["id"]
    assert dict(api.GetJob(pb.GetJobRequest(id=job_id)).spec.labels) == {"team": "data"}
    assert job_id in listed(dtsd, "--selector", "team=data")
    bad = dtsd.dtsctl("cron", "add", "other", "@daily", "--label", "x=-", "--", "true")
    assert bad.returncode == 2 and "--label" in bad.stderr, bad.stderr


def test_without_admin_a_selection_takes_only_the_caller_s_own_jobs(dtsd_factory, tmp_path):
    from tests.test_auth import add_token
    tokens = tmp_path / "tokens"
    tokens.write_text("# none yet\n")
    master = dtsd_factory({**FAST_ONE, "server": {"tokens_file": str(tokens), "processes": 1}})
    admin, alice, bob = (add_token(master, name, role) for name, role in
                         (("ops", "admin"), ("alice", "submit"), ("bob", "submit")))
    ok(master.dtsctl("queue", "pause", "batch", token=admin))
    mine = {who: [ok(master.dtsctl("submit", "--queue", "batch", "--label", "team=data", "--",
                                   "true", token=token)).strip() for _ in range(2)]
            for who, token in (("alice", alice), ("bob", bob))}
    assert ok(master.dtsctl("cancel", "-l", "team=data", "--yes", token=bob)).strip() == \
        "cancelled 2"
    counted = as_json(master.dtsctl("-o", "json", "cancel", "-l", "team=data", "--dry-run",
                                    token=admin))
    assert counted["matched"] == 2
    states = {job["id"]: job["status"] for job in as_json(master.dtsctl(
        "-o", "json", "list", "-l", "team=data", token=admin))["jobs"]}
    assert [states[i] for i in mine["alice"]] == ["PENDING", "PENDING"]
    assert [states[i] for i in mine["bob"]] == ["CANCELLED", "CANCELLED"]
