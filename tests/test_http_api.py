"""The HTTP JSON API (/api/v1/) of the web child against a real node: every route, the
error mapping, tokens relayed to the gRPC API, and the OpenAPI document against the routes."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import urllib.error
import urllib.request

import pytest
from aiohttp import web as aioweb

from dtsd import config as configmod
from dtsd import httpapi
from dtsd.dtsdpb import pb
from tests.helpers import wait_for
from tests.test_auth import add_token
from tests.test_pipeline import FAST, merged

WEB = {"web": {"processes": 1}}
JSON = "application/json"


def call(node, method: str, path: str, body=None, *, token: str = "",
         content_type: str | None = JSON, raw: bytes | None = None) -> tuple[int, dict, dict]:
    """(status, decoded JSON body, headers) of one request to the node's web child."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if content_type and method not in ("GET", "HEAD"):
        headers["Content-Type"] = content_type
    request = urllib.request.Request(node.web_url + path, data=data, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15) as reply:
            status, text, answer_headers = reply.status, reply.read(), reply.headers
    except urllib.error.HTTPError as exc:
        status, text, answer_headers = exc.code, exc.read(), exc.headers
    assert answer_headers["Content-Type"].startswith(JSON), (status, text)
    assert answer_headers["Cache-Control"] == "no-store"
    assert answer_headers["X-Content-Type-Options"] == "nosniff"
    assert not any(h.lower().startswith("access-control-") for h in answer_headers)
    return status, json.loads(text), dict(answer_headers)


def ok(node, method: str, path: str, body=None, **kwargs) -> dict:
    status, answer, _ = call(node, method, path, body, **kwargs)
    assert status == 200, (status, answer)
    return answer


def refused(node, status: int, code: str, method: str, path: str, body=None, **kwargs) -> str:
    """The error message of a request answered `status` with `code`."""
    got, answer, _ = call(node, method, path, body, **kwargs)
    assert (got, answer["error"]["code"]) == (status, code), (got, answer)
    return answer["error"]["message"]


def final(node, job_id: str, **kwargs) -> dict:
    return wait_for(lambda: (lambda j: j["status"] in ("SUCCEEDED", "FAILED", "CANCELLED") and j)(
        ok(node, "GET", f"/api/v1/jobs/{job_id}", **kwargs)), timeout=30)


@pytest.fixture
def node(dtsd_factory):
    return dtsd_factory(merged(FAST, WEB, {"server": {"processes": 1},
                                           "worker": {"processes": 1}}))


def test_submit_then_get_until_it_succeeds_with_its_output(node):
    submitted = ok(node, "POST", "/api/v1/jobs", {"command": "echo hello; echo $GREETING",
                                                  "name": "greet", "env": {"GREETING": "hi"},
                                                  "idempotency_key": "k1"})
    assert submitted["created"] is True and submitted["id"]
    job = final(node, submitted["id"])
    assert job["status"] == "SUCCEEDED" and job["exit_code"] == 0
    assert base64.b64decode(job["output"]) == b"hello\nhi\n"     # bytes: base64, as protobuf
    assert job["spec"]["name"] == "greet" and job["spec"]["env"] == {"GREETING": "hi"}
    # Fields without presence are printed, so a repeat says created: false.
    again = ok(node, "POST", "/api/v1/jobs", {"command": "echo hello; echo $GREETING",
                                              "name": "greet", "env": {"GREETING": "hi"},
                                              "idempotency_key": "k1"})
    assert again == {"id": submitted["id"], "created": False, "queue_unserved": False}
    with_attempts = ok(node, "GET", f"/api/v1/jobs/{submitted['id']}?include_attempts=true")
    assert [a["number"] for a in with_attempts["attempt_history"]] == [1]

    batch = ok(node, "POST", "/api/v1/jobs", {"jobs": [{"command": "true"},
                                                       {"command": "exit 3", "max_retries": 0}]})
    assert [j["created"] for j in batch["jobs"]] == [True, True]
    assert final(node, batch["jobs"][1]["id"])["exit_code"] == 3
    # A batch is one transaction: a bad job refuses all of it, naming it.
    message = refused(node, 400, "INVALID_ARGUMENT", "POST", "/api/v1/jobs",
                      {"jobs": [{"command": "true"}, {"command": "true", "priority": 12}]})
    assert "jobs[1].priority" in message


def test_list_filter_cancel_and_retry(node):
    done = ok(node, "POST", "/api/v1/jobs", {"command": "true", "name": "done"})["id"]
    final(node, done)
    # Nobody serves queue "idle": these stay PENDING.
    waiting = [ok(node, "POST", "/api/v1/jobs", {"command": "true", "queue": "idle",
                                                 "name": f"wait-{n}"})["id"] for n in range(3)]
    pending = ok(node, "GET", "/api/v1/jobs?status=PENDING")
    assert [j["id"] for j in pending["jobs"]] == waiting[::-1]           # newest first
    both = ok(node, "GET", "/api/v1/jobs?status=PENDING&status=SUCCEEDED")
    assert {j["id"] for j in both["jobs"]} == {done, *waiting}
    assert ok(node, "GET", "/api/v1/jobs?status=PENDING,SUCCEEDED") == both
    assert [j["id"] for j in ok(node, "GET", "/api/v1/jobs?name=done")["jobs"]] == [done]
    assert ok(node, "GET", "/api/v1/jobs?created_after=2000-01-01T00:00:00Z") == ok(
        node, "GET", "/api/v1/jobs")
    assert ok(node, "GET", "/api/v1/jobs?created_before=2000-01-01T00:00:00Z")["jobs"] == []
    refused(node, 400, "INVALID_ARGUMENT", "GET", "/api/v1/jobs?created_after=yesterday")
    refused(node, 400, "INVALID_ARGUMENT", "GET", "/api/v1/jobs?dead_lettered=yes")
    page = ok(node, "GET", "/api/v1/jobs?queue=idle&limit=2")
    assert [j["id"] for j in page["jobs"]] == waiting[:0:-1] and page["next_page_token"]
    rest = ok(node, "GET", f"/api/v1/jobs?queue=idle&limit=2&page_token={page['next_page_token']}")
    assert [j["id"] for j in rest["jobs"]] == waiting[:1]
    message = refused(node, 400, "INVALID_ARGUMENT", "GET", "/api/v1/jobs?status=RUNNIN")
    assert "RUNNIN" in message
    message = refused(node, 400, "INVALID_ARGUMENT", "GET", "/api/v1/jobs?colour=red")
    assert "colour" in message and "status" in message

    cancelled = ok(node, "POST", f"/api/v1/jobs/{waiting[0]}/cancel")
    assert cancelled == {"previous_status": "PENDING", "status": "CANCELLED"}
    assert ok(node, "POST", f"/api/v1/jobs/{waiting[0]}/cancel", {}) == {
        "previous_status": "CANCELLED", "status": "CANCELLED"}       # the API: idempotent
    message = refused(node, 409, "FAILED_PRECONDITION", "POST", f"/api/v1/jobs/{done}/cancel")
    assert "SUCCEEDED" in message
    retried = ok(node, "POST", f"/api/v1/jobs/{waiting[0]}/retry")
    assert retried["job"]["id"] == waiting[0] and retried["job"]["status"] == "PENDING"
    refused(node, 409, "FAILED_PRECONDITION", "POST", f"/api/v1/jobs/{done}/retry")


def test_errors_map_to_http_statuses_with_the_apis_message(node):
    message = refused(node, 400, "INVALID_ARGUMENT", "POST", "/api/v1/jobs",
                      {"comand": "true"})
    assert '"comand"' in message and "JobSpec" in message
    message = refused(node, 400, "INVALID_ARGUMENT", "POST", "/api/v1/jobs",
                      {"command": "true", "priority": 12})
    assert message.startswith("priority")        # the API's own words
    message = refused(node, 400, "INVALID_ARGUMENT", "POST", "/api/v1/jobs",
                      raw=b'{"command": "true",}')
    assert "bad JSON" in message and "column" in message
    refused(node, 400, "INVALID_ARGUMENT", "POST", "/api/v1/jobs", ["true"])
    message = refused(node, 404, "NOT_FOUND", "GET", "/api/v1/jobs/no-such-job")
    assert "no-such-job" in message
    refused(node, 404, "NOT_FOUND", "POST", "/api/v1/jobs/no-such-job/cancel")
    refused(node, 404, "NOT_FOUND", "GET", "/api/v1/nothing-here")
    refused(node, 404, "NOT_FOUND", "GET", "/api/v1/jobs/a/b/c")
    _, answer, headers = call(node, "DELETE", "/api/v1/jobs", {})
    assert answer["error"]["code"] == "METHOD_NOT_ALLOWED" and "POST" in headers["Allow"]
    # A form post, or anything but JSON, cannot change state; a preflight gets no answer.
    message = refused(node, 415, "UNSUPPORTED_MEDIA_TYPE", "POST", "/api/v1/jobs",
                      content_type="text/plain", raw=b'{"command": "true"}')
    assert JSON in message
    refused(node, 415, "UNSUPPORTED_MEDIA_TYPE", "POST", "/api/v1/jobs/x/cancel",
            content_type="application/x-www-form-urlencoded", raw=b"a=b")
    refused(node, 405, "METHOD_NOT_ALLOWED", "OPTIONS", "/api/v1/jobs", content_type=None)
    # Over [server] max_message_size (4MB by default).
    message = refused(node, 413, "PAYLOAD_TOO_LARGE", "POST", "/api/v1/jobs",
                      {"command": "x" * (5 * 1024 * 1024)})
    assert "max_message_size" in message
    # A token goes in the Authorization header only.
    refused(node, 400, "INVALID_ARGUMENT", "GET", "/api/v1/jobs?access_token=x")
    # The API was asked, and said nothing was stored.
    assert ok(node, "GET", "/api/v1/jobs")["jobs"] == []


def test_schedules_dead_letters_and_the_cluster(node):
    schedule = ok(node, "POST", "/api/v1/schedules", {
        "name": "nightly", "expression": "30 2 * * *", "timezone": "Europe/Berlin",
        "overlap": "FORBID", "job": {"command": "echo nightly"}})
    assert schedule["name"] == "nightly" and schedule["next_fire_time"]
    refused(node, 409, "ALREADY_EXISTS", "POST", "/api/v1/schedules",
            {"name": "nightly", "expression": "@daily", "job": {"command": "true"}})
    assert [s["name"] for s in ok(node, "GET", "/api/v1/schedules")["schedules"]] == ["nightly"]
    assert ok(node, "GET", "/api/v1/schedules/nightly")["overlap"] == "FORBID"
    refused(node, 404, "NOT_FOUND", "GET", "/api/v1/schedules/weekly")
    assert ok(node, "POST", "/api/v1/schedules/nightly/pause")["paused"] is True
    assert ok(node, "POST", "/api/v1/schedules/nightly/resume")["paused"] is False
    fired = ok(node, "POST", "/api/v1/schedules/nightly/trigger")
    assert base64.b64decode(final(node, fired["id"])["output"]) == b"nightly\n"
    # A schedule's runs, by its name; an unknown name is a 404, a bad one a 400.
    ok(node, "POST", "/api/v1/jobs", {"command": "true", "name": "nightly"})
    assert [j["id"] for j in ok(node, "GET", "/api/v1/jobs?schedule=nightly")["jobs"]] == [
        fired["id"]]
    refused(node, 404, "NOT_FOUND", "GET", "/api/v1/jobs?schedule=weekly")
    refused(node, 400, "INVALID_ARGUMENT", "GET", "/api/v1/jobs?schedule=Bad%20Name")
    times = ok(node, "GET", "/api/v1/schedules/nightly/preview?count=3")["times"]
    assert len(times) == 3 and all(t["local"].startswith(t["local"][:4]) for t in times)
    spring = ok(node, "GET", "/api/v1/schedule-preview?expression=30+2+*+*+*"
                             "&timezone=Europe/Berlin&count=400")["times"]
    assert any("spring-forward" in t["note"] for t in spring)
    assert ok(node, "DELETE", "/api/v1/schedules/nightly") == {}
    refused(node, 404, "NOT_FOUND", "DELETE", "/api/v1/schedules/nightly")

    dead = [ok(node, "POST", "/api/v1/jobs", {"command": "exit 1", "max_retries": 0,
                                              "queue": q})["id"] for q in ("default", "default")]
    for job_id in dead:
        final(node, job_id)
    listed = ok(node, "GET", "/api/v1/dead-letters?limit=10")
    assert {j["id"] for j in listed["jobs"]} == set(dead)
    assert all(j["dead_lettered"] for j in listed["jobs"])
    assert ok(node, "POST", "/api/v1/dead-letters/requeue", {"ids": [dead[0]]}) == {
        "ids": [dead[0]]}
    final(node, dead[0])
    assert ok(node, "POST", "/api/v1/dead-letters/purge", {"ids": [dead[1]]}) == {
        "purged": "1"}                                   # int64: a string, as protobuf says

    cluster = ok(node, "GET", "/api/v1/cluster")
    assert cluster["single_node"] is True and cluster["leader"] == node.node_id
    assert int(cluster["fencing_token"]) >= 1

    # Jobs that ended per minute: the last hour, oldest first, every minute listed.
    minutes = ok(node, "GET", "/api/v1/activity")["minutes"]
    assert len(minutes) == 60 and minutes == sorted(minutes, key=lambda m: m["minute"])
    ended = {k: sum(int(m[k]) for m in minutes) for k in ("succeeded", "failed", "cancelled")}
    assert ended["succeeded"] >= 1 and ended["failed"] == 2, ended
    assert len(ok(node, "GET", "/api/v1/activity?minutes=5")["minutes"]) == 5
    assert "120" in refused(node, 400, "INVALID_ARGUMENT", "GET", "/api/v1/activity?minutes=121")
    roles = {c["role"] for n in cluster["nodes"] for c in n["children"]}
    assert {"server", "worker", "web"} <= roles


def test_watch_streams_events_until_the_job_is_final(node):
    job_id = ok(node, "POST", "/api/v1/jobs",
                {"command": "echo one; sleep 0.3; echo two"})["id"]
    request = urllib.request.Request(f"{node.web_url}/api/v1/jobs/{job_id}/watch")
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        assert reply.headers["Cache-Control"] == "no-store"
        text = reply.read().decode()
    events = [json.loads(line[len("data: "):]) for line in text.splitlines()
              if line.startswith("data: ")]
    assert events[0]["kind"] == "STATE"
    assert events[-1]["kind"] == "STATE" and events[-1]["status"] == "SUCCEEDED"
    output = b"".join(base64.b64decode(e["output"]) for e in events if e["kind"] == "OUTPUT")
    assert output == b"one\ntwo\n"
    refused(node, 404, "NOT_FOUND", "GET", "/api/v1/jobs/no-such-job/watch")


def test_tokens_are_the_apis(dtsd_factory, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    node = dtsd_factory(merged(FAST, WEB, {"server": {"tokens_file": str(tokens),
                                                      "processes": 1},
                                           "worker": {"processes": 1}}))
    reader = add_token(node, "reader", "read")
    submitter = add_token(node, "ci-bot", "submit")

    message = refused(node, 401, "UNAUTHENTICATED", "GET", "/api/v1/jobs")
    assert "Bearer" in message
    assert call(node, "GET", "/api/v1/jobs")[2]["WWW-Authenticate"].startswith("Bearer")
    refused(node, 401, "UNAUTHENTICATED", "GET", "/api/v1/jobs", token="dtsd_not-a-token")
    refused(node, 401, "UNAUTHENTICATED", "POST", "/api/v1/jobs", {"command": "true"})
    # A local token is good on this host's sockets only, never relayed from HTTP.
    message = refused(node, 401, "UNAUTHENTICATED", "GET", "/api/v1/jobs",
                      token="dtsdl_e30.AAAA")
    assert "local token" in message

    assert ok(node, "GET", "/api/v1/jobs", token=reader) == {"jobs": [], "next_page_token": ""}
    message = refused(node, 403, "PERMISSION_DENIED", "POST", "/api/v1/jobs",
                      {"command": "true"}, token=reader)
    assert "submit" in message

    job_id = ok(node, "POST", "/api/v1/jobs", {"command": "echo $SECRET",
                                               "env": {"SECRET": "s3"}}, token=submitter)["id"]
    job = final(node, job_id, token=submitter)
    # The API recorded the token's name as the submitter, and audited it.
    assert job["submitted_by"].startswith("token:ci-bot@"), job["submitted_by"]
    assert job["spec"]["env"] == {"SECRET": "s3"}
    assert ok(node, "GET", f"/api/v1/jobs/{job_id}", token=reader)["spec"]["env"] == {
        "SECRET": ""}                                    # the API hides it from others
    assert re.search(rf"submit by token:ci-bot@\S*: 1 job: {job_id}",
                     node.log_path.read_text())
    refused(node, 403, "PERMISSION_DENIED", "POST", f"/api/v1/jobs/{job_id}/retry",
            token=reader)
    # The document describing the API needs no token.
    assert call(node, "GET", "/api/v1/openapi.json")[0] == 200


def test_the_openapi_document_matches_the_routes(node):
    document = ok(node, "GET", "/api/v1/openapi.json")
    assert document["openapi"].startswith("3.0")
    assert document["components"]["securitySchemes"]["bearer"] == {"type": "http",
                                                                    "scheme": "bearer"}
    documented = {(method.upper(), path) for path, operations in document["paths"].items()
                  for method in operations}

    # The routes the app serves: every one documented, every documented one served.
    cfg = configmod.parse("", "t.ini", env={})
    app = aioweb.Application()
    httpapi.HttpApi(cfg).add_routes(app)
    served = {(route.method, route.resource.canonical) for route in app.router.routes()
              if route.resource is not None and route.method != "HEAD"}
    assert served == documented

    schemas = document["components"]["schemas"]
    for method, path in sorted(documented):
        operation = document["paths"][path][method.lower()]
        for parameter in operation.get("parameters", []):
            assert parameter["in"] in ("path", "query"), parameter
            if parameter["in"] == "path":
                assert "{" + parameter["name"] + "}" in path
        for response in operation["responses"].values():
            for content in response.get("content", {}).values():
                for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"',
                                      json.dumps(content)):
                    assert ref in schemas, ref
        # Each served for real: the path resolves and the method is allowed (the API may
        # still refuse the made-up arguments).
        concrete = re.sub(r"{\w+}", "x", path)
        if path.endswith("/watch"):
            continue
        status, answer, _ = call(node, method, concrete,
                                 {} if method != "GET" else None)
        assert status not in (405, 415), (method, path, answer)
        if status == 404:
            assert "no route" not in answer["error"]["message"], (method, path)
    # Every field of JobSpec is in its schema, with protobuf's names.
    spec = schemas["dtsd.v1.JobSpec"]["properties"]
    assert set(spec) == {field.name for field in pb.JobSpec.DESCRIPTOR.fields}
    assert {"command", "env", "run_at", "limits", "notify", "notify_on"} <= set(spec)
    assert spec["run_at"] == {"type": "string", "format": "date-time"}
    assert spec["env"]["additionalProperties"] == {"type": "string"}


def test_every_rpc_of_the_scheduler_has_a_route():
    mapped = {r.rpc for r in httpapi.ROUTES} | {r.batch for r in httpapi.ROUTES if r.batch}
    assert mapped == set(httpapi.SERVICE.methods_by_name)
    streams = {r.rpc for r in httpapi.ROUTES if r.stream}
    assert streams == {m.name for m in httpapi.SERVICE.methods if m.server_streaming}


def test_an_exposed_web_listener_with_an_anonymous_role_is_refused():
    # The web child relays callers without a token to the API, which gives them
    # [server] anonymous_role: on another host's reach that is as open as the gRPC port.
    text = ("[server]\ntokens_file = t\ntls_cert = c\ntls_key = k\nanonymous_role = read\n"
            "[web]\nlisten = 0.0.0.0:8080\n")
    error, _ = configmod.server_exposure(configmod.parse(text, "t.ini", env={}))
    assert error and "[web] listen = 0.0.0.0:8080" in error and "anonymous_role" in error
    safe = text.replace("anonymous_role = read\n", "")
    assert configmod.server_exposure(configmod.parse(safe, "t.ini", env={})) == (None, None)


def test_a_dead_socket_is_skipped_for_another(node, tmp_path):
    # A socket nobody listens on (a server child just killed, before the master removes
    # its socket): the call moves on to a live one, as dtsctl's does.
    runtime_dir = node.sections["dtsd"]["runtime_dir"]
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(os.path.join(runtime_dir, "api-1.sock"))        # bound, never listening
    try:
        for _ in range(6):                                      # each start of the rotation
            assert ok(node, "GET", "/api/v1/cluster")["single_node"] is True
    finally:
        dead.close()
        os.unlink(os.path.join(runtime_dir, "api-1.sock"))


def test_a_watch_holds_one_api_stream_and_gives_it_back_when_the_client_goes(dtsd_factory):
    # Every HTTP watcher shares the local socket's per-peer cap: here, one stream.
    node = dtsd_factory(merged(FAST, WEB, {"server": {"processes": 1,
                                                      "max_streams_per_peer": 1},
                                           "worker": {"processes": 1}}))
    job_id = ok(node, "POST", "/api/v1/jobs", {"command": "echo started; sleep 60"})["id"]
    url = f"{node.web_url}/api/v1/jobs/{job_id}/watch"
    first = urllib.request.urlopen(url, timeout=30)
    assert first.readline().startswith(b"data: ")
    message = refused(node, 429, "RESOURCE_EXHAUSTED", "GET", f"/api/v1/jobs/{job_id}/watch")
    assert "max_streams_per_peer" in message
    first.close()
    # The web child notices at once (aiohttp 3.8 cancels the handler) or at its next
    # keep-alive write (newer aiohttp), and ends the API stream.

    def watch_again():
        with urllib.request.urlopen(url, timeout=30) as second:
            return second.readline().startswith(b"data: ")
    assert wait_for(watch_again, timeout=httpapi.KEEPALIVE + 10, interval=0.5)
    assert ok(node, "POST", f"/api/v1/jobs/{job_id}/cancel")["status"] == "CANCELLED"
