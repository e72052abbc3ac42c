from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

ALLOW: OverlapPolicy
CANCELLED: JobStatus
DESCRIPTOR: _descriptor.FileDescriptor
FAILED: JobStatus
FORBID: OverlapPolicy
JOB_STATUS_UNSPECIFIED: JobStatus
MISFIRE_UNSPECIFIED: MisfirePolicy
OVERLAP_UNSPECIFIED: OverlapPolicy
PENDING: JobStatus
REPLACE: OverlapPolicy
RUNNING: JobStatus
RUN_ALL: MisfirePolicy
RUN_ONCE: MisfirePolicy
SKIP: MisfirePolicy
SUCCEEDED: JobStatus

class ActivityMinute(_message.Message):
    __slots__ = ["cancelled", "failed", "minute", "succeeded"]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    MINUTE_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    cancelled: int
    failed: int
    minute: _timestamp_pb2.Timestamp
    succeeded: int
    def __init__(self, minute: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., succeeded: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ["error", "exit_code", "finished_at", "number", "output", "output_truncated", "started_at", "worker"]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    error: str
    exit_code: int
    finished_at: _timestamp_pb2.Timestamp
    number: int
    output: bytes
    output_truncated: bool
    started_at: _timestamp_pb2.Timestamp
    worker: str
    def __init__(self, number: _Optional[int] = ..., worker: _Optional[str] = ..., started_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., exit_code: _Optional[int] = ..., output: _Optional[bytes] = ..., output_truncated: bool = ..., error: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ["id"]
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ["previous_status", "status"]
    PREVIOUS_STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    previous_status: JobStatus
    status: JobStatus
    def __init__(self, previous_status: _Optional[_Union[JobStatus, str]] = ..., status: _Optional[_Union[JobStatus, str]] = ...) -> None: ...

class ChildProcess(_message.Message):
    __slots__ = ["index", "pid", "restarts", "role", "state", "uptime_seconds"]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    pid: int
    restarts: int
    role: str
    state: str
    uptime_seconds: float
    def __init__(self, role: _Optional[str] = ..., index: _Optional[int] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., restarts: _Optional[int] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class ClusterStatusResponse(_message.Message):
    __slots__ = ["cluster", "dead_lettered", "fencing_token", "job_counts", "leader", "nodes", "queues", "server_node", "single_node", "workers"]
    class JobCountsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    JOB_COUNTS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    SERVER_NODE_FIELD_NUMBER: _ClassVar[int]
    SINGLE_NODE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    dead_lettered: int
    fencing_token: int
    job_counts: _containers.ScalarMap[str, int]
    leader: str
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    queues: _containers.RepeatedCompositeFieldContainer[QueueDepth]
    server_node: str
    single_node: bool
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, cluster: _Optional[str] = ..., single_node: bool = ..., leader: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., queues: _Optional[_Iterable[_Union[QueueDepth, _Mapping]]] = ..., job_counts: _Optional[_Mapping[str, int]] = ..., dead_lettered: _Optional[int] = ..., server_node: _Optional[str] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class CreateScheduleRequest(_message.Message):
    __slots__ = ["schedule"]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    schedule: Schedule
    def __init__(self, schedule: _Optional[_Union[Schedule, _Mapping]] = ...) -> None: ...

class DeleteScheduleResponse(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class FireTime(_message.Message):
    __slots__ = ["at", "local", "note"]
    AT_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    local: str
    note: str
    def __init__(self, at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., local: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ["id", "include_attempts"]
    ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    include_attempts: bool
    def __init__(self, id: _Optional[str] = ..., include_attempts: bool = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ["attempt_history", "attempts", "created_at", "dead_lettered", "env_hidden", "error", "exit_code", "finished_at", "fire_time", "id", "output", "output_truncated", "schedule_id", "spec", "started_at", "status", "submitted_by", "updated_at", "worker"]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_HISTORY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    ENV_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    FIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_BY_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    attempt_history: _containers.RepeatedCompositeFieldContainer[Attempt]
    attempts: int
    created_at: _timestamp_pb2.Timestamp
    dead_lettered: bool
    env_hidden: bool
    error: str
    exit_code: int
    finished_at: _timestamp_pb2.Timestamp
    fire_time: _timestamp_pb2.Timestamp
    id: str
    output: bytes
    output_truncated: bool
    schedule_id: int
    spec: JobSpec
    started_at: _timestamp_pb2.Timestamp
    status: JobStatus
    submitted_by: str
    updated_at: _timestamp_pb2.Timestamp
    worker: str
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., status: _Optional[_Union[JobStatus, str]] = ..., attempts: _Optional[int] = ..., exit_code: _Optional[int] = ..., output: _Optional[bytes] = ..., output_truncated: bool = ..., error: _Optional[str] = ..., dead_lettered: bool = ..., worker: _Optional[str] = ..., submitted_by: _Optional[str] = ..., created_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., attempt_history: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., schedule_id: _Optional[int] = ..., fire_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., env_hidden: bool = ...) -> None: ...

class JobActivityRequest(_message.Message):
    __slots__ = ["minutes"]
    MINUTES_FIELD_NUMBER: _ClassVar[int]
    minutes: int
    def __init__(self, minutes: _Optional[int] = ...) -> None: ...

class JobActivityResponse(_message.Message):
    __slots__ = ["minutes"]
    MINUTES_FIELD_NUMBER: _ClassVar[int]
    minutes: _containers.RepeatedCompositeFieldContainer[ActivityMinute]
    def __init__(self, minutes: _Optional[_Iterable[_Union[ActivityMinute, _Mapping]]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ["attempt", "error", "exit_code", "kind", "offset", "output", "status"]
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = []
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KIND_UNSPECIFIED: JobEvent.Kind
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    OUTPUT: JobEvent.Kind
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STATE: JobEvent.Kind
    STATUS_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    error: str
    exit_code: int
    kind: JobEvent.Kind
    offset: int
    output: bytes
    status: JobStatus
    def __init__(self, kind: _Optional[_Union[JobEvent.Kind, str]] = ..., status: _Optional[_Union[JobStatus, str]] = ..., attempt: _Optional[int] = ..., output: _Optional[bytes] = ..., offset: _Optional[int] = ..., exit_code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ["command", "cwd", "env", "id", "idempotency_key", "limits", "max_retries", "name", "notify", "notify_on", "priority", "queue", "run_at", "timeout_seconds"]
    class EnvEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NOTIFY_FIELD_NUMBER: _ClassVar[int]
    NOTIFY_ON_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    RUN_AT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    command: str
    cwd: str
    env: _containers.ScalarMap[str, str]
    id: str
    idempotency_key: str
    limits: ResourceLimits
    max_retries: int
    name: str
    notify: _containers.RepeatedScalarFieldContainer[str]
    notify_on: _containers.RepeatedScalarFieldContainer[str]
    priority: int
    queue: str
    run_at: _timestamp_pb2.Timestamp
    timeout_seconds: float
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., command: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., cwd: _Optional[str] = ..., queue: _Optional[str] = ..., priority: _Optional[int] = ..., max_retries: _Optional[int] = ..., timeout_seconds: _Optional[float] = ..., run_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., limits: _Optional[_Union[ResourceLimits, _Mapping]] = ..., notify: _Optional[_Iterable[str]] = ..., notify_on: _Optional[_Iterable[str]] = ...) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ["page_size", "page_token", "queue"]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    queue: str
    def __init__(self, queue: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ["created_after", "created_before", "dead_lettered", "name", "page_size", "page_token", "queue", "schedule", "statuses"]
    CREATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    created_after: _timestamp_pb2.Timestamp
    created_before: _timestamp_pb2.Timestamp
    dead_lettered: bool
    name: str
    page_size: int
    page_token: str
    queue: str
    schedule: str
    statuses: _containers.RepeatedScalarFieldContainer[JobStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[JobStatus, str]]] = ..., queue: _Optional[str] = ..., name: _Optional[str] = ..., created_after: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., created_before: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., dead_lettered: bool = ..., schedule: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ["jobs", "next_page_token"]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListSchedulesRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class ListSchedulesResponse(_message.Message):
    __slots__ = ["schedules"]
    SCHEDULES_FIELD_NUMBER: _ClassVar[int]
    schedules: _containers.RepeatedCompositeFieldContainer[Schedule]
    def __init__(self, schedules: _Optional[_Iterable[_Union[Schedule, _Mapping]]] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ["children", "leader", "node_id", "seen_at", "started_at", "state", "unreachable", "version"]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEEN_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    children: _containers.RepeatedCompositeFieldContainer[ChildProcess]
    leader: bool
    node_id: str
    seen_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    state: str
    unreachable: _containers.RepeatedCompositeFieldContainer[StoreOutage]
    version: str
    def __init__(self, node_id: _Optional[str] = ..., version: _Optional[str] = ..., leader: bool = ..., children: _Optional[_Iterable[_Union[ChildProcess, _Mapping]]] = ..., started_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., seen_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[str] = ..., unreachable: _Optional[_Iterable[_Union[StoreOutage, _Mapping]]] = ...) -> None: ...

class PreviewScheduleRequest(_message.Message):
    __slots__ = ["count", "expression", "name", "timezone"]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    count: int
    expression: str
    name: str
    timezone: str
    def __init__(self, name: _Optional[str] = ..., expression: _Optional[str] = ..., timezone: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class PreviewScheduleResponse(_message.Message):
    __slots__ = ["times"]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    times: _containers.RepeatedCompositeFieldContainer[FireTime]
    def __init__(self, times: _Optional[_Iterable[_Union[FireTime, _Mapping]]] = ...) -> None: ...

class PurgeDeadLettersRequest(_message.Message):
    __slots__ = ["ids", "queue"]
    IDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    queue: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., queue: _Optional[str] = ...) -> None: ...

class PurgeDeadLettersResponse(_message.Message):
    __slots__ = ["purged"]
    PURGED_FIELD_NUMBER: _ClassVar[int]
    purged: int
    def __init__(self, purged: _Optional[int] = ...) -> None: ...

class QueueDepth(_message.Message):
    __slots__ = ["delayed", "pending", "queue", "ready_by_priority", "running"]
    class ReadyByPriorityEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    DELAYED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    READY_BY_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    delayed: int
    pending: int
    queue: str
    ready_by_priority: _containers.ScalarMap[int, int]
    running: int
    def __init__(self, queue: _Optional[str] = ..., pending: _Optional[int] = ..., delayed: _Optional[int] = ..., running: _Optional[int] = ..., ready_by_priority: _Optional[_Mapping[int, int]] = ...) -> None: ...

class RequeueDeadLettersRequest(_message.Message):
    __slots__ = ["all", "ids", "queue"]
    ALL_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    all: bool
    ids: _containers.RepeatedScalarFieldContainer[str]
    queue: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., all: bool = ..., queue: _Optional[str] = ...) -> None: ...

class RequeueDeadLettersResponse(_message.Message):
    __slots__ = ["ids"]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ResourceLimits(_message.Message):
    __slots__ = ["cpu_seconds", "file_size_bytes", "memory_bytes", "open_files", "processes"]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPEN_FILES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    cpu_seconds: int
    file_size_bytes: int
    memory_bytes: int
    open_files: int
    processes: int
    def __init__(self, processes: _Optional[int] = ..., open_files: _Optional[int] = ..., file_size_bytes: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., cpu_seconds: _Optional[int] = ...) -> None: ...

class RetryJobRequest(_message.Message):
    __slots__ = ["id"]
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RetryJobResponse(_message.Message):
    __slots__ = ["job"]
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class Schedule(_message.Message):
    __slots__ = ["catchup_window_seconds", "created_at", "env_hidden", "expression", "id", "job", "last_fire_time", "last_job_id", "misfire", "name", "next_fire_time", "overlap", "paused", "timezone", "updated_at"]
    CATCHUP_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ENV_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    LAST_FIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MISFIRE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    catchup_window_seconds: float
    created_at: _timestamp_pb2.Timestamp
    env_hidden: bool
    expression: str
    id: int
    job: JobSpec
    last_fire_time: _timestamp_pb2.Timestamp
    last_job_id: str
    misfire: MisfirePolicy
    name: str
    next_fire_time: _timestamp_pb2.Timestamp
    overlap: OverlapPolicy
    paused: bool
    timezone: str
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., expression: _Optional[str] = ..., timezone: _Optional[str] = ..., overlap: _Optional[_Union[OverlapPolicy, str]] = ..., misfire: _Optional[_Union[MisfirePolicy, str]] = ..., catchup_window_seconds: _Optional[float] = ..., job: _Optional[_Union[JobSpec, _Mapping]] = ..., paused: bool = ..., next_fire_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., last_fire_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., last_job_id: _Optional[str] = ..., created_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., env_hidden: bool = ...) -> None: ...

class ScheduleRef(_message.Message):
    __slots__ = ["name"]
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class StoreOutage(_message.Message):
    __slots__ = ["since", "store"]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    since: _timestamp_pb2.Timestamp
    store: str
    def __init__(self, store: _Optional[str] = ..., since: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ["job"]
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: JobSpec
    def __init__(self, job: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ["created", "id", "queue_unserved"]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_UNSERVED_FIELD_NUMBER: _ClassVar[int]
    created: bool
    id: str
    queue_unserved: bool
    def __init__(self, id: _Optional[str] = ..., created: bool = ..., queue_unserved: bool = ...) -> None: ...

class SubmitJobsRequest(_message.Message):
    __slots__ = ["jobs"]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobSpec]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobSpec, _Mapping]]] = ...) -> None: ...

class SubmitJobsResponse(_message.Message):
    __slots__ = ["jobs"]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[SubmitJobResponse]
    def __init__(self, jobs: _Optional[_Iterable[_Union[SubmitJobResponse, _Mapping]]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ["id"]
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ["concurrency", "id", "node_id", "pid", "queues", "running", "seen_at"]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    SEEN_AT_FIELD_NUMBER: _ClassVar[int]
    concurrency: int
    id: str
    node_id: str
    pid: int
    queues: _containers.RepeatedScalarFieldContainer[str]
    running: int
    seen_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., node_id: _Optional[str] = ..., pid: _Optional[int] = ..., queues: _Optional[_Iterable[str]] = ..., concurrency: _Optional[int] = ..., running: _Optional[int] = ..., seen_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class JobStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class OverlapPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class MisfirePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []
