"""gRPC health checking and server reflection for the dtsd API server.

Debian 12 packages neither grpcio-health-checking nor grpcio-reflection, so dtsd speaks
both standard protocols itself, against stubs generated from `proto/dtsd/health` and
`proto/dtsd/reflection` (wire-identical to upstream). Load balancers, `grpc_health_probe`
and Kubernetes probes use `grpc.health.v1.Health`; `grpcurl` and `grpc_cli` discover the
API through `grpc.reflection.v1alpha.ServerReflection` without a copy of the protos.

Promises:
    * Health: `Check` answers the last status set for a service, or NOT_FOUND;
      `Watch` sends the current status at once, then every change, until the call ends.
      A watcher that falls behind sees the latest status, not every intermediate one.
      After `enter_graceful_shutdown()` every service reads NOT_SERVING for good.
    * Reflection: every file answer lists the requested file first, followed by all of its
      transitive imports, each once, so a client that treats the first entry as "the
      answer" (older grpcurl) and one that builds a pool from the whole list both work.

The sync `grpc.server` runs each `Watch` (and each reflection stream) on a pool thread
for as long as the client keeps it open. dtsd's server counts both against its stream
caps, tightest for these two since they need no credentials (dtsd/streams.py).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Iterable, Iterator, Optional

import grpc
from google.protobuf import descriptor_pool

# Imported for their side effect: they register the API's descriptors in the default pool,
# which is what reflection serves. Without them a service would be listed but not found.
import dtsd.seed.scheduler_pb2  # noqa: F401
import dtsd.v1.dtsd_pb2  # noqa: F401
from dtsd.health import health_pb2, health_pb2_grpc
from dtsd.reflection import reflection_pb2, reflection_pb2_grpc

ServingStatus = health_pb2.HealthCheckResponse.ServingStatus

#: The service name that stands for the server as a whole in the health protocol.
OVERALL = ""

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICE_NAME = (
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name)


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Serving status per service name, safe to update from any thread.

    The overall status (`OVERALL`, the empty name) starts SERVING, as in the reference
    implementations; every other name is unknown until `set` names it.
    """

    #: How often a blocked `Watch` re-checks that its call is still alive. Normally the
    #: call's termination callback wakes it at once; this is the safety net.
    WATCH_POLL_SECONDS = 1.0

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._statuses: dict[str, int] = {OVERALL: ServingStatus.Value("SERVING")}
        self._shutting_down = False

    def set(self, service: str, status: int) -> None:
        """Record `status` for `service` and wake its watchers; ignored once shutting down.

        Raises:
            ValueError: `status` is not a `HealthCheckResponse.ServingStatus` value.
        """
        if status not in ServingStatus.values():
            raise ValueError(f"not a HealthCheckResponse.ServingStatus value: {status!r}")
        with self._changed:
            if self._shutting_down:
                return
            self._statuses[service] = status
            self._changed.notify_all()

    def status(self, service: str) -> Optional[int]:
        """The status last set for `service`, or None if it was never set."""
        with self._changed:
            return self._statuses.get(service)

    def enter_graceful_shutdown(self) -> None:
        """Mark every service NOT_SERVING and ignore all later `set` calls.

        Call it before `server.stop(grace)` so that balancers and watchers move away
        while in-flight calls finish.
        """
        with self._changed:
            self._shutting_down = True
            for service in self._statuses:
                self._statuses[service] = ServingStatus.Value("NOT_SERVING")
            self._changed.notify_all()

    def Check(self, request, context):
        status = self.status(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"no health status for service {request.service!r}; "
                          "ask for \"\" (the whole server) or a served service name")
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(self, request, context) -> Iterator[health_pb2.HealthCheckResponse]:
        # An unknown service is not an error for Watch: the protocol answers
        # SERVICE_UNKNOWN and keeps the stream open, since the service may appear later.
        service = request.service
        ended = threading.Event()

        def wake_on_end() -> None:
            ended.set()
            with self._changed:
                self._changed.notify_all()

        if not context.add_callback(wake_on_end):
            return  # the call already ended

        def current() -> int:
            return self._statuses.get(service, ServingStatus.Value("SERVICE_UNKNOWN"))

        last_sent = None
        while True:
            with self._changed:
                self._changed.wait_for(lambda: ended.is_set() or current() != last_sent,
                                       timeout=self.WATCH_POLL_SECONDS)
                status = current()
            # is_active() takes gRPC's own lock, so it is asked outside ours.
            if ended.is_set() or not context.is_active():
                return
            if status != last_sent:
                last_sent = status
                yield health_pb2.HealthCheckResponse(status=status)


class ReflectionServicer(reflection_pb2_grpc.ServerReflectionServicer):
    """Answers reflection requests from the process's descriptor pool.

    Args:
        service_names: the fully qualified names of the services this server serves;
            `list_services` answers exactly these, in this order.
        pool: where descriptors are looked up; the default pool, which every generated
            `_pb2` module registers into, unless a test supplies another.

    Raises:
        ValueError: a name is not a service in the pool (a typo, or its `_pb2` module
            was never imported), caught here rather than by the first grpcurl user.
    """

    def __init__(self, service_names: Iterable[str],
                 pool: Optional[descriptor_pool.DescriptorPool] = None) -> None:
        self._pool = pool if pool is not None else descriptor_pool.Default()
        self._service_names = tuple(service_names)
        for name in self._service_names:
            try:
                self._pool.FindServiceByName(name)
            except KeyError:
                raise ValueError(f"cannot reflect service {name!r}: it is not in the "
                                 f"descriptor pool (is its _pb2 module imported?)") from None

    def ServerReflectionInfo(self, request_iterator, context):
        # One answer per request, in order, for as long as the client keeps the stream open.
        for request in request_iterator:
            yield self.answer(request)

    def answer(self, request: reflection_pb2.ServerReflectionRequest
               ) -> reflection_pb2.ServerReflectionResponse:
        """The response to one reflection request; errors are answers, not RPC failures."""
        response = reflection_pb2.ServerReflectionResponse(valid_host=request.host,
                                                           original_request=request)
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                # The request's string is unused by the protocol (clients send "*").
                response.list_services_response.service.extend(
                    reflection_pb2.ServiceResponse(name=name) for name in self._service_names)
            elif kind == "file_by_filename":
                self._fill_files(response, self._pool.FindFileByName(request.file_by_filename))
            elif kind == "file_containing_symbol":
                self._fill_files(response,
                                 self._file_containing_symbol(request.file_containing_symbol))
            elif kind == "file_containing_extension":
                wanted = request.file_containing_extension
                extended = self._pool.FindMessageTypeByName(wanted.containing_type)
                extension = self._pool.FindExtensionByNumber(extended, wanted.extension_number)
                self._fill_files(response, extension.file)
            elif kind == "all_extension_numbers_of_type":
                extended = self._pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = response.all_extension_numbers_response
                numbers.base_type_name = extended.full_name
                numbers.extension_number.extend(
                    sorted(ext.number for ext in self._pool.FindAllExtensions(extended)))
            else:
                _fill_error(response, grpc.StatusCode.INVALID_ARGUMENT,
                            "the request names no question: set one of file_by_filename, "
                            "file_containing_symbol, file_containing_extension, "
                            "all_extension_numbers_of_type or list_services")
        except KeyError:
            _fill_error(response, grpc.StatusCode.NOT_FOUND,
                        f"{kind} {_describe(request, kind)!r} is not known to this server")
        return response

    def _file_containing_symbol(self, symbol: str):
        """The file declaring `symbol`, whichever protobuf implementation is running.

        The C++ pool also finds methods and fields by name; the pure-Python pool finds
        only top-level kinds, so a `Service.Method` or `Message.field` is resolved
        through its parent here. Raises KeyError when nothing declares `symbol`.
        """
        symbol = symbol.lstrip(".")  # tolerate the fully-qualified ".pkg.Name" spelling
        if not symbol:
            raise KeyError("empty symbol")
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            parent, _, member = symbol.rpartition(".")
            if not parent:
                raise
        for find, members in ((self._pool.FindServiceByName, "methods_by_name"),
                              (self._pool.FindMessageTypeByName, "fields_by_name")):
            try:
                container = find(parent)
            except KeyError:
                continue
            if member in getattr(container, members):
                return container.file
        raise KeyError(symbol)

    @staticmethod
    def _fill_files(response, file_descriptor) -> None:
        """The requested file first, then its transitive imports, each once."""
        ordered, seen = [], {file_descriptor.name}
        pending = deque([file_descriptor])
        while pending:
            current = pending.popleft()
            ordered.append(current)
            for dependency in current.dependencies:
                if dependency.name not in seen:
                    seen.add(dependency.name)
                    pending.append(dependency)
        # serialized_pb is the FileDescriptorProto exactly as protoc emitted it.
        response.file_descriptor_response.file_descriptor_proto.extend(
            descriptor.serialized_pb for descriptor in ordered)


def _fill_error(response, code: grpc.StatusCode, message: str) -> None:
    response.error_response.error_code = code.value[0]
    response.error_response.error_message = message


def _describe(request, kind: str) -> str:
    if kind == "file_containing_extension":
        wanted = request.file_containing_extension
        return f"{wanted.containing_type}({wanted.extension_number})"
    return getattr(request, kind)


def add_to_server(server: grpc.Server, service_names: Iterable[str]) -> HealthServicer:
    """Serve health checking and reflection on `server`; returns the health servicer.

    `service_names` are the API services the server serves. Health and reflection are
    added to the reflected list if missing, since this function serves them too. Only the
    overall status starts SERVING: the caller `set`s each API service as it becomes ready.
    """
    names = list(service_names)
    for own in (HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME):
        if own not in names:
            names.append(own)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        ReflectionServicer(names), server)
    return health
