"""dtsd: a distributed task scheduler daemon for Debian hosts.

A master process supervises gRPC API servers, workers and a coordinator; PostgreSQL
keeps the record of every job, Redis carries job ids to workers, etcd elects a leader.
"""

__version__ = "0.1.0"
