"""The HTTP JSON API under /api/v1/: the `dtsd.v1.Scheduler` RPCs as resources.

One authority: every route is one call of the gRPC API on this node's local sockets
(`<runtime_dir>/api-<pid>.sock`), carrying the caller's `Authorization: Bearer` token as
`authorization` metadata exactly as dtsctl sends it, so validation, roles, the audit line
and the submitter's identity are the API's. A request without a token is a call without
one: the API applies `[server] anonymous_role` or answers UNAUTHENTICATED. The web child
never calls an address a client names, and never invents an identity.

Messages are mapped with protobuf's own JSON mapping (`google.protobuf.json_format`, proto
field names, enums by name, int64 as strings, bytes as base64); fields without presence
are always printed, so a client sees `"created": false` rather than nothing. Request
bodies and query strings are parsed into the request message with unknown fields refused,
so a typo is a 400 naming the field.

The route table `ROUTES` is the single description of the API: the handlers and the
OpenAPI document at /api/v1/openapi.json (schemas generated from the descriptors) both
come from it, and a test checks that every RPC of the service has a route.

Browser rules: responses are JSON only, with `Cache-Control: no-store` and
`X-Content-Type-Options: nosniff`; a state change wants `Content-Type: application/json`
(415 otherwise), which a cross-site form cannot send, and the API answers no CORS
preflight and sends no CORS header, so a page of another origin cannot make one either.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import inspect
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from . import __version__, auth, identity
from .config import Config
from .dtsdpb import pb, pb_grpc

log = logging.getLogger("dtsd.httpapi")

PREFIX = "/api/v1"
JSON = "application/json"
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
CALL_TIMEOUT = 10.0            # seconds a unary call may take (dtsd.client.DEFAULT_TIMEOUT)
MAX_RECEIVE_MESSAGE = 64 * 1024 * 1024   # what the API may answer (a page of jobs with output)
KEEPALIVE = 15.0               # seconds between comments on a quiet event stream
SERVICE = pb.DESCRIPTOR.services_by_name["Scheduler"]
_TOKEN = re.compile(r"^[\x21-\x7e]+\Z")      # visible ASCII: what gRPC metadata carries
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="dtsd"'}     # with every 401


class Code(str, enum.Enum):
    """`error.code` of an answer that did not come from the API (those carry the gRPC
    status name): what went wrong on the HTTP side."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"            # bad JSON, bad query parameter
    UNAUTHENTICATED = "UNAUTHENTICATED"              # a malformed Authorization header
    NOT_FOUND = "NOT_FOUND"                          # no such route (or schedule)
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"


# gRPC status -> HTTP status; anything else is 500.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class Refusal(Exception):
    """An answer other than 200: HTTP status, error code, message (and extra headers)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> "Refusal":
        code = exc.code()
        headers = (CHALLENGE
                   if code == grpc.StatusCode.UNAUTHENTICATED else None)
        return cls(HTTP_STATUS.get(code, 500), code.name, exc.details() or code.name, headers)

    def response(self) -> web.Response:
        return error_response(self.status, self.code, self.message, self.headers)


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status,
                             headers={**HEADERS, **(headers or {})})


# --- protobuf <-> JSON --------------------------------------------------------------------

# protobuf 4.21 (Debian 12) says including_default_value_fields; 5.26 and later renamed it.
_ALWAYS_PRINT = ("always_print_fields_with_no_presence"
                 if "always_print_fields_with_no_presence"
                 in inspect.signature(json_format.MessageToDict).parameters
                 else "including_default_value_fields")


def repeated(descriptor: FieldDescriptor) -> bool:
    """protobuf 4.21 has only `label`; the newest has only `is_repeated`."""
    if hasattr(descriptor, "is_repeated"):
        return descriptor.is_repeated
    return descriptor.label == FieldDescriptor.LABEL_REPEATED


def to_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     **{_ALWAYS_PRINT: True})


def parse(value: Any, message_class, where: str):
    """`value` (decoded JSON) as a `message_class`; a 400 naming the field otherwise."""
    if not isinstance(value, dict):
        raise Refusal(400, Code.INVALID_ARGUMENT.value,
                      f"{where}: expected a JSON object, not {type(value).__name__}")
    try:
        return json_format.ParseDict(value, message_class(), ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        # The first line names the field; the rest lists the fields in camelCase, which
        # this API does not use.
        raise Refusal(400, Code.INVALID_ARGUMENT.value,
                      f"{where}: {str(exc).splitlines()[0]}") from None


def message_class(descriptor: Descriptor):
    return getattr(pb, descriptor.name)


# --- the routes ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """`method path` calls `rpc`. Path parameters ({id}, {name}) fill request fields of the
    same name; `body` says where the JSON body goes ("" the whole request, a field name
    that field, None no body); the other request fields are query parameters (GET only),
    under `aliases` names where REST has a usual one. `batch`: a body with a `jobs` array
    calls this RPC instead, with the body as its request."""

    method: str
    path: str
    rpc: str
    summary: str
    body: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    batch: str | None = None
    stream: bool = False

    @property
    def path_fields(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.path)

    @property
    def request(self) -> Descriptor:
        return SERVICE.methods_by_name[self.rpc].input_type

    @property
    def response(self) -> Descriptor:
        return SERVICE.methods_by_name[self.rpc].output_type

    @property
    def query_fields(self) -> dict[str, FieldDescriptor]:
        """{query parameter: request field}, for GET routes."""
        if self.method != "GET":
            return {}
        fields = {f.name: f for f in self.request.fields
                  if f.name not in self.path_fields and f.name != self.body}
        alias = {name: alias for alias, name in self.aliases.items()}
        return {alias.get(name, name): f for name, f in fields.items()}


LIST = {"status": "statuses", "limit": "page_size"}

ROUTES = [
    Route("POST", "/jobs", "SubmitJob", "Submit a job (a JobSpec), or a batch in one "
          "transaction ({\"jobs\": [JobSpec, ...]})", body="job", batch="SubmitJobs"),
    Route("GET", "/jobs", "ListJobs", "List jobs, newest first, paged", aliases=LIST),
    Route("GET", "/jobs/{id}", "GetJob", "One job (with attempt history on request)"),
    Route("POST", "/jobs/{id}/cancel", "CancelJob", "Cancel a job", body=""),
    Route("POST", "/jobs/{id}/retry", "RetryJob",
          "Run a FAILED or CANCELLED job again with a fresh retry budget", body=""),
    Route("GET", "/jobs/{id}/watch", "WatchJob", "Server-sent events: the job's state "
          "(its output first when it is final already), then output chunks and state "
          "changes, ending with the final state", stream=True),
    Route("GET", "/dead-letters", "ListDeadLetters", "List dead-lettered jobs",
          aliases={"limit": "page_size"}),
    Route("POST", "/dead-letters/requeue", "RequeueDeadLetters",
          "Requeue dead-lettered jobs (ids, or all of a queue)", body=""),
    Route("POST", "/dead-letters/purge", "PurgeDeadLetters",
          "Remove jobs from the dead-letter queue (no ids: all, of queue if set)", body=""),
    Route("GET", "/cluster", "ClusterStatus", "Nodes, leader, workers, queue depths, counts"),
    Route("GET", "/activity", "JobActivity",
          "Jobs that ended per minute (succeeded, failed, cancelled), oldest first"),
    Route("GET", "/schedules", "ListSchedules", "List cron schedules"),
    Route("POST", "/schedules", "CreateSchedule", "Create a cron schedule", body="schedule"),
    Route("GET", "/schedules/{name}", "ListSchedules",
          "One schedule (from ListSchedules: the API has no GetSchedule)"),
    Route("DELETE", "/schedules/{name}", "DeleteSchedule", "Delete a schedule", body=""),
    Route("POST", "/schedules/{name}/pause", "PauseSchedule", "Pause a schedule", body=""),
    Route("POST", "/schedules/{name}/resume", "ResumeSchedule", "Resume a schedule", body=""),
    Route("POST", "/schedules/{name}/trigger", "TriggerSchedule",
          "Fire a schedule now, outside its slots", body=""),
    Route("GET", "/schedules/{name}/preview", "PreviewSchedule",
          "The next fire times of a schedule, with DST notes"),
    Route("GET", "/schedule-preview", "PreviewSchedule",
          "The next fire times of an expression in a time zone, with DST notes"),
]


# --- calling the API ----------------------------------------------------------------------

class Channels:
    """grpc.aio channels to this node's local API sockets, one per socket, made on first
    use (in the running loop) and closed when their socket is gone. A call tries the
    sockets in turn from a rotating start, moving on only on UNAVAILABLE (a server child
    that stopped or cannot reach a store): any other answer may mean the call was received."""

    def __init__(self, runtime_dir: str, max_message: int):
        self.runtime_dir = runtime_dir
        self.max_message = max_message
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._next = 0

    def _rotation(self) -> list[str]:
        try:
            paths = identity.api_sockets(self.runtime_dir)
        except OSError as exc:
            raise Refusal(503, grpc.StatusCode.UNAVAILABLE.name,
                          f"cannot list {self.runtime_dir}: {exc.strerror}") from None
        for gone in set(self._channels) - set(paths):
            asyncio.ensure_future(self._channels.pop(gone).close())
        if not paths:
            raise Refusal(503, grpc.StatusCode.UNAVAILABLE.name,
                          "no API server child serves on this node (starting, or "
                          "[server] processes = 0)")
        self._next = (self._next + 1) % len(paths)
        return paths[self._next:] + paths[:self._next]

    def stub(self, path: str) -> pb_grpc.SchedulerStub:
        channel = self._channels.get(path)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                f"unix:{path}", options=[("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE),
                                         ("grpc.max_send_message_length", self.max_message)])
            self._channels[path] = channel
        return pb_grpc.SchedulerStub(channel)

    async def call(self, rpc: str, request, metadata) -> Any:
        error: grpc.RpcError | None = None
        for path in self._rotation():
            try:
                return await getattr(self.stub(path), rpc)(request, timeout=CALL_TIMEOUT,
                                                          metadata=metadata)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                error = exc
        assert error is not None
        raise error

    async def stream(self, rpc: str, request, metadata):
        """(the call, its first message): fail-over only until the first message."""
        error: grpc.RpcError | None = None
        for path in self._rotation():
            call = getattr(self.stub(path), rpc)(request, metadata=metadata)
            try:
                first = await call.read()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                error = exc
                continue
            return call, first
        assert error is not None
        raise error

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()


def credentials(request: web.Request) -> tuple[tuple[str, str], ...] | None:
    """The metadata dtsctl would send for this caller's token: none without one.

    A local token (`dtsdl_...`) is refused here: the API accepts it only from a caller the
    kernel identified on a local socket, and relaying it from HTTP would accept it from
    anywhere the listener reaches."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    token = auth.bearer_secret(header.strip())
    if not _TOKEN.match(token):
        raise Refusal(401, Code.UNAUTHENTICATED.value,
                      "send 'Authorization: Bearer TOKEN' with a token from `dtsd token add`",
                      CHALLENGE)
    if identity.is_local_token(token):
        raise Refusal(401, Code.UNAUTHENTICATED.value,
                      "a local token is accepted only on this host's local API sockets, "
                      "never over HTTP: send a token of the tokens file", CHALLENGE)
    return (("authorization", f"Bearer {token}"),)


# --- the handlers -------------------------------------------------------------------------

def query_value(name: str, descriptor: FieldDescriptor, values: list[str]) -> Any:
    """Query strings are text: repeated fields take repeated or comma-separated values,
    booleans `true`/`false`; json_format checks the rest (numbers, enums, timestamps)."""
    if repeated(descriptor):
        return [item for value in values for item in value.split(",") if item]
    if len(values) > 1:
        raise Refusal(400, Code.INVALID_ARGUMENT.value, f"query parameter {name} given twice")
    value = values[0]
    if descriptor.type == FieldDescriptor.TYPE_BOOL:
        if value not in ("true", "false"):
            raise Refusal(400, Code.INVALID_ARGUMENT.value,
                          f"query parameter {name}: true or false, not {value[:40]!r}")
        return value == "true"
    return value


class HttpApi:
    """The handlers of ROUTES, calling the API through `channels`."""

    def __init__(self, cfg: Config):
        self.max_body = cfg.get("server", "max_message_size")
        self.channels = Channels(cfg.get("dtsd", "runtime_dir"), self.max_body)

    def add_routes(self, app: web.Application) -> None:
        for route in ROUTES:
            handler = self._watch if route.stream else self._unary
            app.router.add_route(route.method, PREFIX + route.path, self._bind(handler, route))
        app.router.add_get(PREFIX + "/openapi.json", self.openapi, allow_head=False)
        app.on_cleanup.append(lambda app: self.channels.close())

    @staticmethod
    def _bind(handler, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                response = await handler(request, route)
            except Refusal as refusal:
                response = refusal.response()
            except grpc.RpcError as exc:
                response = Refusal.from_rpc(exc).response()
            if request.method != "GET":
                # The API's audit line names the caller as seen on its local socket
                # (`token:NAME@unix:`); this one adds where the HTTP request came from.
                log.info("%s %s from %s: %d", request.method, request.path,
                         request.remote, response.status)
            return response
        return handle

    async def _request(self, request: web.Request, route: Route) -> tuple[str, Any]:
        """(the RPC to call, its request message) from the path, query string and body."""
        values: dict[str, Any] = {name: request.match_info[name] for name in route.path_fields
                                  if name in {f.name for f in route.request.fields}}
        query = route.query_fields
        for name in set(request.query):
            if name not in query:
                allowed = ", ".join(sorted(query)) or "none"
                raise Refusal(400, Code.INVALID_ARGUMENT.value,
                              f"unknown query parameter {name[:40]!r} (this route takes: "
                              f"{allowed})")
            values[query[name].name] = query_value(name, query[name], request.query.getall(name))
        rpc = route.rpc
        if route.body is not None:
            body = await self._body(request)
            if route.batch and isinstance(body, dict) and "jobs" in body:
                rpc, values = route.batch, body
            elif route.body:
                values[route.body] = body
            elif body is not None:
                if not isinstance(body, dict):
                    raise Refusal(400, Code.INVALID_ARGUMENT.value,
                                  "body: expected a JSON object")
                clash = set(body) & set(values)
                if clash:
                    raise Refusal(400, Code.INVALID_ARGUMENT.value,
                                  f"body: {sorted(clash)[0]} is given by the path")
                values.update(body)
        request_class = message_class(SERVICE.methods_by_name[rpc].input_type)
        return rpc, parse(values, request_class, "request" if route.body == "" else "body")

    async def _body(self, request: web.Request) -> Any:
        if request.content_type != JSON:
            raise Refusal(415, Code.UNSUPPORTED_MEDIA_TYPE.value,
                          f"{request.method} wants Content-Type: {JSON}")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Refusal(413, Code.PAYLOAD_TOO_LARGE.value,
                          f"the body is larger than {self.max_body} bytes "
                          "([server] max_message_size)") from None
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except UnicodeDecodeError:
            raise Refusal(400, Code.INVALID_ARGUMENT.value, "body: not UTF-8") from None
        except json.JSONDecodeError as exc:
            raise Refusal(400, Code.INVALID_ARGUMENT.value,
                          f"body: bad JSON: {exc.msg} at line {exc.lineno} column "
                          f"{exc.colno}") from None

    async def _unary(self, request: web.Request, route: Route) -> web.Response:
        metadata = credentials(request)
        rpc, message = await self._request(request, route)
        answer = await self.channels.call(rpc, message, metadata)
        if route.rpc == "ListSchedules" and "name" in route.path_fields:
            name = request.match_info["name"]
            found = [s for s in answer.schedules if s.name == name]
            if not found:
                raise Refusal(404, grpc.StatusCode.NOT_FOUND.name, f"no schedule named {name!r}")
            answer = found[0]
        return web.json_response(to_dict(answer), headers=HEADERS)

    async def _watch(self, request: web.Request, route: Route) -> web.StreamResponse:
        """Server-sent events, one JSON JobEvent per `data:` line. An error before the
        first event is an ordinary JSON error; after it, an `error` event ends the stream."""
        metadata = credentials(request)
        _, message = await self._request(request, route)
        call, first = await self.channels.stream(route.rpc, message, metadata)
        response = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream"})
        try:
            await response.prepare(request)
            async with contextlib.aclosing(relay(call, first)) as events:
                async for kind, item in events:
                    if kind == "message":
                        await response.write(f"data: {json.dumps(to_dict(item))}\n\n".encode())
                    elif kind == "error":
                        refusal = Refusal.from_rpc(item)
                        error = {"error": {"code": refusal.code, "message": refusal.message}}
                        await response.write(f"event: error\ndata: {json.dumps(error)}\n\n"
                                             .encode())
                    else:
                        await response.write(b": keepalive\n\n")   # notices a gone client
            await response.write_eof()
        except ConnectionResetError:
            pass                                    # the client went away: stop watching
        return response

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi(), headers=HEADERS)


async def relay(call, first, keepalive: float = KEEPALIVE):
    """A server stream's messages as ("message", msg), ("keepalive", None) after each
    `keepalive` quiet seconds, and ("error", grpc.RpcError) if it fails (not when it was
    cancelled); then it ends, and the call is cancelled when the caller stops iterating.
    `first` is the message `Channels.stream` read. A task of its own reads the call:
    cancelling a grpc.aio read() on a timeout would cancel the whole call."""
    if first is grpc.aio.EOF:
        return
    items: asyncio.Queue = asyncio.Queue()

    async def read() -> None:
        try:
            while True:
                item = await call.read()           # not `async for`: read() took the first
                if item is grpc.aio.EOF:
                    break
                items.put_nowait(("message", item))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                items.put_nowait(("error", exc))
        finally:
            items.put_nowait(("end", None))

    reader = asyncio.ensure_future(read())
    try:
        yield "message", first
        while True:
            try:
                kind, item = await asyncio.wait_for(items.get(), keepalive)
            except asyncio.TimeoutError:
                yield "keepalive", None
                continue
            if kind == "end":
                return
            yield kind, item
    finally:
        call.cancel()
        reader.cancel()


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Under /api/: no route, a wrong method and the like are JSON errors too, and every
    answer carries HEADERS."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: Code.NOT_FOUND, 405: Code.METHOD_NOT_ALLOWED,
                413: Code.PAYLOAD_TOO_LARGE}.get(exc.status, Code.INVALID_ARGUMENT)
        message = {404: f"no route {request.path[:200]!r} (see {PREFIX}/openapi.json)",
                   405: f"{request.method[:20]} is not allowed here"}.get(exc.status, exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return error_response(exc.status, code.value, message, headers)
    except Exception:   # noqa: BLE001 - a bug: logged with its traceback, answered as JSON
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, grpc.StatusCode.INTERNAL.name,
                              "the web child failed to answer (see its log)")


# --- OpenAPI ------------------------------------------------------------------------------

_SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    # The proto3 JSON mapping prints 64-bit integers as strings (numbers are accepted).
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
TIMESTAMP = "google.protobuf.Timestamp"


def _ref(descriptor: Descriptor) -> dict:
    return {"$ref": f"#/components/schemas/{descriptor.full_name}"}


def field_schema(descriptor: FieldDescriptor, schemas: dict) -> dict:
    if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
        value = descriptor.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _single(value, schemas)}
    single = _single(descriptor, schemas)
    if repeated(descriptor):
        return {"type": "array", "items": single}
    return single


def _single(descriptor: FieldDescriptor, schemas: dict) -> dict:
    if descriptor.type == FieldDescriptor.TYPE_ENUM:
        return {"type": "string", "enum": [v.name for v in descriptor.enum_type.values]}
    if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
        if descriptor.message_type.full_name == TIMESTAMP:
            return {"type": "string", "format": "date-time"}
        message_schema(descriptor.message_type, schemas)
        return _ref(descriptor.message_type)
    return dict(_SCALARS[descriptor.type])


def message_schema(descriptor: Descriptor, schemas: dict) -> dict:
    """Adds `descriptor` (and every message it uses) to `schemas`; returns its $ref."""
    if descriptor.full_name not in schemas:
        schemas[descriptor.full_name] = {}      # recursion guard
        schemas[descriptor.full_name] = {
            "type": "object", "additionalProperties": False,
            "properties": {f.name: field_schema(f, schemas) for f in descriptor.fields}}
    return _ref(descriptor)


ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string", "description": "the gRPC status name, or an HTTP-side "
                                                  "code: " + ", ".join(c.value for c in Code)},
        "message": {"type": "string"}}}}}
ERRORS = {"400": "Bad input: the message names the field", "401": "No usable token",
          "403": "The token's role is too low", "404": "No such job, schedule or route",
          "409": "ALREADY_EXISTS, or FAILED_PRECONDITION (the state does not allow it)",
          "429": "RESOURCE_EXHAUSTED: a limit of the API", "503": "UNAVAILABLE",
          "504": "DEADLINE_EXCEEDED"}


@functools.lru_cache(maxsize=1)
def openapi() -> dict:
    """The OpenAPI 3.0 document of ROUTES, with schemas from the protobuf descriptors."""
    schemas: dict[str, dict] = {"Error": ERROR_SCHEMA}

    def failure(description: str) -> dict:
        return {"description": description,
                "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}
    paths: dict[str, dict] = {}
    for route in ROUTES:
        parameters = [{"name": name, "in": "path", "required": True,
                       "schema": field_schema(route.request.fields_by_name[name], schemas)
                       if name in route.request.fields_by_name else {"type": "string"}}
                      for name in route.path_fields]
        for name, descriptor in route.query_fields.items():
            schema = field_schema(descriptor, schemas)
            parameter = {"name": name, "in": "query", "required": False, "schema": schema}
            if schema.get("type") == "array":
                parameter.update(style="form", explode=True)
            parameters.append(parameter)
        response = message_schema(route.response, schemas)
        operation: dict[str, Any] = {
            "operationId": (route.method.lower()
                            + re.sub(r"[^a-z]+", "_", route.path.lower())).rstrip("_"),
            "summary": route.summary,
            "description": f"Calls dtsd.v1.Scheduler/{route.rpc}"
                           + (f" (or {route.batch} for a body with `jobs`)" if route.batch else ""),
            "parameters": parameters,
            "responses": {"200": {"description": "OK"}}}
        if route.stream:
            operation["responses"]["200"]["content"] = {"text/event-stream": {"schema": {
                "type": "string", "description": "one `data:` line per JobEvent, as JSON: "
                + response["$ref"].rsplit("/", 1)[1]}}}
        elif route.rpc == "ListSchedules" and route.path_fields:
            operation["responses"]["200"]["content"] = {JSON: {"schema": message_schema(
                pb.Schedule.DESCRIPTOR, schemas)}}
        else:
            if route.batch:
                response = {"oneOf": [response, message_schema(
                    SERVICE.methods_by_name[route.batch].output_type, schemas)]}
            operation["responses"]["200"]["content"] = {JSON: {"schema": response}}
        for status, description in ERRORS.items():
            operation["responses"][status] = failure(description)
        if route.body is not None:
            if route.body:
                body = field_schema(route.request.fields_by_name[route.body], schemas)
            else:
                body = message_schema(route.request, schemas)
            if route.batch:
                body = {"oneOf": [body, message_schema(
                    SERVICE.methods_by_name[route.batch].input_type, schemas)]}
            operation["requestBody"] = {"required": route.body != "",
                                        "content": {JSON: {"schema": body}}}
            operation["responses"]["413"] = failure("The body is larger than [server] "
                                                    "max_message_size")
            operation["responses"]["415"] = failure(f"Content-Type is not {JSON}")
        paths.setdefault(PREFIX + route.path, {})[route.method.lower()] = operation
    paths[PREFIX + "/openapi.json"] = {"get": {
        "operationId": "get_openapi", "summary": "This document", "security": [],
        "responses": {"200": {"description": "OpenAPI 3.0", "content": {JSON: {"schema": {
            "type": "object"}}}}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "dtsd HTTP JSON API", "version": __version__,
                 "description": "The dtsd.v1.Scheduler gRPC API over HTTP: each route is one "
                                "call of the API with the caller's bearer token."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {}],
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
