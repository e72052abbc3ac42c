"""dtsd: a distributed task scheduler daemon for Debian hosts.

A master process supervises gRPC API servers, workers and a coordinator; PostgreSQL
keeps the record of every job, Redis carries job ids to workers, etcd elects a leader.
"""

import os

__version__ = "0.1.0"

# gRPC's C core writes its own lines to standard error (`E1202 ... ssl_transport_security.cc:
# Handshake failed ...`): noise on dtsctl's terminal, where dtsctl says what went wrong in
# words, and in the journal, where dtsd logs it. It reads this when it starts, so it is set
# here, before any module of the package imports grpc. An administrator's own setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
