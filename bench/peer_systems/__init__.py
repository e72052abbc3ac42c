"""The peer systems of bench/peers.py: the code that runs in the peers' venv (.venv-peers).

Each system runs the same job (`/bin/sh -c true`, output captured) and records it the same
way (job.record), in a Redis of its own that is not the broker. bench/peers.py imports only
`job` from here, with Debian's Python, to read those records back.
"""
