"""Health checking and reflection over a real in-process gRPC server and channel."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from dtsd import introspection
from dtsd.health import health_pb2, health_pb2_grpc
from dtsd.reflection import reflection_pb2, reflection_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

SERVICE_NAMES = [
    "dtsd.v1.Scheduler",
    "scheduler.JobService",
    "scheduler.TaskScheduler",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
RPC_TIMEOUT = 5.0


def start_server(max_workers=8):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    health = introspection.add_to_server(server, SERVICE_NAMES)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port != 0
    server.start()
    return server, health, grpc.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture
def served():
    server, health, channel = start_server()
    yield health, channel
    channel.close()
    server.stop(None).wait(RPC_TIMEOUT)


@pytest.fixture
def health(served):
    return served[0]


@pytest.fixture
def health_stub(served):
    return health_pb2_grpc.HealthStub(served[1])


@pytest.fixture
def reflect(served):
    """Send reflection requests on one stream; returns the responses in order."""
    stub = reflection_pb2_grpc.ServerReflectionStub(served[1])

    def ask(*requests):
        return list(stub.ServerReflectionInfo(iter(requests), timeout=RPC_TIMEOUT))

    return ask


def check(stub, service):
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT).status


def load_into_fresh_pool(file_descriptor_protos):
    """Build a pool from a reflection answer, adding each file after its imports."""
    pending = {}
    for raw in file_descriptor_protos:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        pending[proto.name] = raw, proto
    pool, added = descriptor_pool.DescriptorPool(), set()
    while pending:
        ready = [name for name, (_, proto) in pending.items()
                 if set(proto.dependency) <= added]
        assert ready, f"imports missing from the answer: {sorted(pending)}"
        for name in ready:
            pool.AddSerializedFile(pending.pop(name)[0])
            added.add(name)
    return pool


def file_names(response):
    return [descriptor_pb2.FileDescriptorProto.FromString(raw).name
            for raw in response.file_descriptor_response.file_descriptor_proto]


# --- health -------------------------------------------------------------------------------

def test_check_answers_the_status_last_set(health, health_stub):
    assert check(health_stub, "") == SERVING
    health.set("dtsd.v1.Scheduler", SERVING)
    assert check(health_stub, "dtsd.v1.Scheduler") == SERVING
    health.set("dtsd.v1.Scheduler", NOT_SERVING)
    assert check(health_stub, "dtsd.v1.Scheduler") == NOT_SERVING
    assert check(health_stub, "") == SERVING


def test_check_of_an_unknown_service_is_not_found(health_stub):
    with pytest.raises(grpc.RpcError) as raised:
        check(health_stub, "no.such.Service")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no.such.Service" in raised.value.details()


def test_set_rejects_a_value_that_is_not_a_serving_status(health):
    with pytest.raises(ValueError):
        health.set("dtsd.v1.Scheduler", 42)


def test_watch_sends_the_current_status_then_each_change(health, health_stub):
    health.set("dtsd.v1.Scheduler", SERVING)
    call = health_stub.Watch(health_pb2.HealthCheckRequest(service="dtsd.v1.Scheduler"),
                             timeout=RPC_TIMEOUT)
    try:
        assert next(call).status == SERVING
        threading.Thread(target=health.set, args=("dtsd.v1.Scheduler", NOT_SERVING)).start()
        assert next(call).status == NOT_SERVING
        threading.Thread(target=health.set, args=("dtsd.v1.Scheduler", SERVING)).start()
        assert next(call).status == SERVING
    finally:
        call.cancel()


def test_watch_of_an_unknown_service_waits_for_it_to_appear(health, health_stub):
    call = health_stub.Watch(health_pb2.HealthCheckRequest(service="later.Service"),
                             timeout=RPC_TIMEOUT)
    try:
        assert next(call).status == SERVICE_UNKNOWN
        health.set("later.Service", SERVING)
        assert next(call).status == SERVING
    finally:
        call.cancel()


def test_a_cancelled_watch_gives_its_thread_back():
    # With one worker thread, a Check can only run once the cancelled Watch has returned;
    # with the safety-net poll pushed past the deadline, only the end-of-call wake-up can
    # make that happen in time.
    server, health, channel = start_server(max_workers=1)
    health.WATCH_POLL_SECONDS = 60
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT)
        assert next(call).status == SERVING
        call.cancel()
        assert check(stub, "") == SERVING
    finally:
        channel.close()
        server.stop(None).wait(RPC_TIMEOUT)


def test_graceful_shutdown_turns_everything_not_serving_for_good(health, health_stub):
    health.set("dtsd.v1.Scheduler", SERVING)
    call = health_stub.Watch(health_pb2.HealthCheckRequest(service="dtsd.v1.Scheduler"),
                             timeout=RPC_TIMEOUT)
    try:
        assert next(call).status == SERVING
        health.enter_graceful_shutdown()
        assert next(call).status == NOT_SERVING
    finally:
        call.cancel()
    assert check(health_stub, "") == NOT_SERVING
    assert check(health_stub, "dtsd.v1.Scheduler") == NOT_SERVING
    health.set("dtsd.v1.Scheduler", SERVING)
    assert check(health_stub, "dtsd.v1.Scheduler") == NOT_SERVING


# --- reflection ---------------------------------------------------------------------------

def test_list_services_answers_exactly_the_served_names(reflect):
    [response] = reflect(reflection_pb2.ServerReflectionRequest(list_services="*"))
    assert [s.name for s in response.list_services_response.service] == SERVICE_NAMES
    assert response.original_request.list_services == "*"


def test_add_to_server_lists_health_and_reflection_even_if_not_named():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    introspection.add_to_server(server, ["dtsd.v1.Scheduler"])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [response] = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="*")]),
            timeout=RPC_TIMEOUT)
        assert [s.name for s in response.list_services_response.service] == [
            "dtsd.v1.Scheduler", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"]
    finally:
        channel.close()
        server.stop(None).wait(RPC_TIMEOUT)


def test_service_symbol_answers_a_loadable_file_with_its_imports(reflect):
    [response] = reflect(
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="dtsd.v1.Scheduler"))
    names = file_names(response)
    assert names[0] == "dtsd/v1/dtsd.proto"  # the answer comes first
    assert sorted(names) == ["dtsd/v1/dtsd.proto", "google/protobuf/timestamp.proto"]

    pool = load_into_fresh_pool(response.file_descriptor_response.file_descriptor_proto)
    submit = pool.FindServiceByName("dtsd.v1.Scheduler").methods_by_name["SubmitJob"]
    assert submit.input_type.full_name == "dtsd.v1.SubmitJobRequest"
    assert submit.output_type.full_name == "dtsd.v1.SubmitJobResponse"
    run_at = pool.FindMessageTypeByName("dtsd.v1.JobSpec").fields_by_name["run_at"]
    assert run_at.message_type.full_name == "google.protobuf.Timestamp"


@pytest.mark.parametrize("symbol", [
    "dtsd.v1.JobSpec",                    # message
    "dtsd.v1.Scheduler.SubmitJob",        # method
    "dtsd.v1.JobSpec.command",            # field
    "dtsd.v1.JobStatus",                  # enum
])
def test_other_symbols_of_the_api_resolve_to_its_file(reflect, symbol):
    [response] = reflect(reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
    assert file_names(response)[0] == "dtsd/v1/dtsd.proto"


@pytest.mark.parametrize("symbol, file_name", [
    ("scheduler.JobService", "dtsd/seed/scheduler.proto"),
    ("scheduler.TaskScheduler", "dtsd/seed/scheduler.proto"),
    ("grpc.health.v1.Health", "dtsd/health/health.proto"),
    ("grpc.reflection.v1alpha.ServerReflection", "dtsd/reflection/reflection.proto"),
])
def test_every_listed_service_resolves(reflect, symbol, file_name):
    [response] = reflect(reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
    assert file_names(response) == [file_name]
    pool = load_into_fresh_pool(response.file_descriptor_response.file_descriptor_proto)
    assert pool.FindServiceByName(symbol).full_name == symbol


def test_file_by_filename_answers_the_file_and_its_imports(reflect):
    [response] = reflect(
        reflection_pb2.ServerReflectionRequest(file_by_filename="dtsd/v1/dtsd.proto"))
    assert file_names(response) == ["dtsd/v1/dtsd.proto", "google/protobuf/timestamp.proto"]
    pool = load_into_fresh_pool(response.file_descriptor_response.file_descriptor_proto)
    assert pool.FindMessageTypeByName("dtsd.v1.Job").fields_by_name["output"].type == \
        descriptor_pb2.FieldDescriptorProto.TYPE_BYTES


@pytest.mark.parametrize("request_", [
    reflection_pb2.ServerReflectionRequest(file_containing_symbol="dtsd.v1.NoSuchThing"),
    reflection_pb2.ServerReflectionRequest(file_containing_symbol="dtsd.v1.Scheduler.NoSuchRpc"),
    reflection_pb2.ServerReflectionRequest(file_containing_symbol="dtsd.v1.JobSpec.no_such_field"),
    reflection_pb2.ServerReflectionRequest(file_containing_symbol=""),
    reflection_pb2.ServerReflectionRequest(file_by_filename="dtsd/v1/nope.proto"),
    reflection_pb2.ServerReflectionRequest(all_extension_numbers_of_type="no.Such"),
    reflection_pb2.ServerReflectionRequest(
        file_containing_extension=reflection_pb2.ExtensionRequest(
            containing_type="dtsd.v1.JobSpec", extension_number=100)),
])
def test_unknown_names_are_answered_not_found(reflect, request_):
    [response] = reflect(request_)
    assert response.WhichOneof("message_response") == "error_response"
    assert response.error_response.error_code == NOT_FOUND
    assert response.error_response.error_message
    assert response.original_request == request_


def test_a_request_without_a_question_is_invalid(reflect):
    [response] = reflect(reflection_pb2.ServerReflectionRequest(host="x"))
    assert response.error_response.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_extension_numbers_of_a_type_without_extensions_are_empty(reflect):
    [response] = reflect(
        reflection_pb2.ServerReflectionRequest(all_extension_numbers_of_type="dtsd.v1.JobSpec"))
    numbers = response.all_extension_numbers_response
    assert numbers.base_type_name == "dtsd.v1.JobSpec"
    assert list(numbers.extension_number) == []


def test_one_stream_answers_many_requests_in_order(reflect):
    responses = reflect(
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="nope.Nope"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="scheduler.Job"),
    )
    assert [r.WhichOneof("message_response") for r in responses] == [
        "list_services_response", "error_response", "file_descriptor_response"]
    assert file_names(responses[2]) == ["dtsd/seed/scheduler.proto"]


def test_a_service_missing_from_the_pool_is_refused_at_construction():
    with pytest.raises(ValueError, match="no.such.Service"):
        introspection.ReflectionServicer(["dtsd.v1.Scheduler", "no.such.Service"])
