"""A userspace TCP proxy between dtsd and one of its stores, whose link the test degrades.

    proxy = FaultyLink(("127.0.0.1", postgres.port)).start()
    dsn = postgres.dsn(db).replace(str(postgres.port), str(proxy.port))
    proxy.blackhole()       # bytes stop moving both ways; connections stay open, no reset
    proxy.heal()
    proxy.delay(0.2)        # each chunk waits 200 ms each way
    proxy.drop_every(2.0)   # every connection is cut (RST) after 2 s of life

Threads, one pair per connection: the suite runs a handful at a time. A blackholed link
accepts new connections and holds them silent too, as a stalled middlebox would: the
kernels on both sides keep acknowledging, so only a client's own deadline can notice.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time


class FaultyLink:
    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.flowing = threading.Event()
        self.flowing.set()
        self.latency = 0.0
        self.lifetime: float | None = None
        self.connections: list[tuple[socket.socket, socket.socket, float]] = []
        self.accepted = 0
        self.cut = 0
        self.closed = False

    # --- what the test does ---------------------------------------------------------------

    def start(self) -> "FaultyLink":
        self.listener.listen(128)
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()
        threading.Thread(target=self._reaper, name="proxy-reaper", daemon=True).start()
        return self

    def blackhole(self) -> None:
        self.flowing.clear()

    def heal(self) -> None:
        self.latency = 0.0
        self.lifetime = None
        self.flowing.set()

    def delay(self, seconds: float) -> None:
        self.latency = seconds

    def drop_every(self, seconds: float | None) -> None:
        self.lifetime = seconds

    def reset_all(self) -> None:
        """Cut every open connection with a RST."""
        with self.lock:
            victims, self.connections = self.connections, []
        for client, upstream, _ in victims:
            self._reset(client, upstream)

    def close(self) -> None:
        self.closed = True
        self.flowing.set()
        self.listener.close()
        self.reset_all()

    # --- inside ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        self.flowing.wait()      # a blackholed link leaves new connections hanging too
        try:
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            self._reset(client)
            return
        with self.lock:
            self.connections.append((client, upstream, time.monotonic()))
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                readable, _, _ = select.select([source], [], [], 0.5)
                if not readable:
                    if source.fileno() < 0:
                        return
                    continue
                data = source.recv(65536)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                self.flowing.wait()
                if self.latency:
                    time.sleep(self.latency)
                self.flowing.wait()
                sink.sendall(data)
        except (OSError, ValueError):
            self._reset(source, sink)

    def _reaper(self) -> None:
        while not self.closed:
            time.sleep(0.1)
            if self.lifetime is None:
                continue
            now = time.monotonic()
            with self.lock:
                old = [c for c in self.connections if now - c[2] >= self.lifetime]
                self.connections = [c for c in self.connections if c not in old]
            for client, upstream, _ in old:
                self.cut += 1
                self._reset(client, upstream)

    @staticmethod
    def _reset(*sockets: socket.socket) -> None:
        for sock in sockets:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass
