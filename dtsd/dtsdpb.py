"""Short names for the generated protobuf modules (generated code lives in dtsd/v1, dtsd/seed)."""

from .seed import scheduler_pb2 as seed_pb  # noqa: F401
from .seed import scheduler_pb2_grpc as seed_pb_grpc  # noqa: F401
from .v1 import dtsd_pb2 as pb  # noqa: F401
from .v1 import dtsd_pb2_grpc as pb_grpc  # noqa: F401
