from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Job(_message.Message):
    __slots__ = ["command", "created_at", "id"]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    command: str
    created_at: int
    id: str
    def __init__(self, id: _Optional[str] = ..., command: _Optional[str] = ..., created_at: _Optional[int] = ...) -> None: ...

class JobId(_message.Message):
    __slots__ = ["id"]
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class JobResponse(_message.Message):
    __slots__ = ["job_id", "message", "success"]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    message: str
    success: bool
    def __init__(self, job_id: _Optional[str] = ..., success: bool = ..., message: _Optional[str] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ["created_at", "id", "output", "status", "updated_at"]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    created_at: int
    id: str
    output: str
    status: str
    updated_at: int
    def __init__(self, id: _Optional[str] = ..., status: _Optional[str] = ..., output: _Optional[str] = ..., created_at: _Optional[int] = ..., updated_at: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ["command", "id", "name", "schedule_time"]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_TIME_FIELD_NUMBER: _ClassVar[int]
    command: str
    id: str
    name: str
    schedule_time: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., command: _Optional[str] = ..., schedule_time: _Optional[int] = ...) -> None: ...

class TaskId(_message.Message):
    __slots__ = ["id"]
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class TaskResponse(_message.Message):
    __slots__ = ["message", "success", "task_id"]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    message: str
    success: bool
    task_id: str
    def __init__(self, task_id: _Optional[str] = ..., success: bool = ..., message: _Optional[str] = ...) -> None: ...

class TaskStatus(_message.Message):
    __slots__ = ["id", "result", "status"]
    ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    id: str
    result: str
    status: str
    def __init__(self, id: _Optional[str] = ..., status: _Optional[str] = ..., result: _Optional[str] = ...) -> None: ...
