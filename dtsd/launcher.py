"""The job launcher: the one process that starts jobs, and the only one that holds privilege.

Each worker starts one launcher (`python3 -m dtsd.launcher`) before its first thread, then
drops every capability it has, so the process that talks to PostgreSQL and Redis holds none.
The launcher is single-threaded: it forks each job and builds the box in the child, in
Python, between fork and exec, where a threaded worker could not (no `preexec_fn`, and no
helper programs such as setpriv or prlimit, whose dynamic loader would read the job's
LD_PRELOAD while still privileged). The job's environment is used by its own `execve` alone.

A launcher owns `concurrency` **slots**. Boxed (the worker may switch users), each slot is a
uid, with a gid of the same number, of its own, from `[worker] job_uids`, that nothing else
on the host uses: two jobs running at once are two users, so neither can signal, trace or
read the other's processes (/proc/PID/environ, /proc/PID/mem) or its private files, and a
slot's uid tells exactly which processes its job started, however they forked or `setsid`ed.
Unboxed (no privilege to switch: a checkout run as a normal user), jobs run as the worker's
user and end with their process group, as they did before the launcher.

The child of a boxed job, between fork and exec: its own session; stdin from /dev/null,
stdout and stderr to the worker's pipe; default dispositions for the signals the launcher
ignores; the slot's groups, gid and uid (`setgroups`, `setresgid`, `setresuid`) and every
capability set emptied (between non-zero uids the kernel would keep the permitted set);
then, as the job's user: the slot's temporary directory emptied (or made, 0700) and what the
slot's previous job left at the top of /tmp, /var/tmp and /dev/shm removed; the resource
limits, soft = hard; the umask; the working directory; every other descriptor closed; `execve`.

Ending an attempt: the launcher is a child subreaper, so whatever a job leaves running (a
daemon, a double fork, a `setsid` child) is reparented to it, never to init. Once the shell
has exited, the job left nothing behind exactly when none of the launcher's own children is
of the slot's uid, which one read of its /proc `children` file tells; only otherwise is a
sweeper forked, which becomes the slot's uid, holds nothing else, and `kill(-1, SIGKILL)`s:
as an unprivileged user that reaches that user's processes and no one else's.

Slots are `flock`ed in `<runtime_dir>/slots/<uid>` for the launcher's life, so launchers of
one master (a worker replaced by a reload runs beside its successor) never share a uid; each
slot is swept before its first job, and when the worker goes. The master sweeps unlocked
slots after a worker died, in case its launcher died too (`--sweep RUNTIME_DIR`).

Protocol, over a unix stream socket: each message is a 4-byte length and a JSON object; a
spawn request carries the write end of the job's output pipe (SCM_RIGHTS). JSON, not pickle:
the launcher trusts nothing it is sent and checks every field.

    -> {"op": "spawn", "id": N, "slot": K, "argv": [...], "env": {...}, "cwd": "...",
        "limits": [[RLIMIT, soft, hard], ...]}             + fd
    -> {"op": "signal", "slot": K, "signal": S}      every process of the slot's job (held
                                                     back till the shell is exec'd)
    <- {"op": "exited", "slot": K, "id": N, "code": C}   the shell of spawn N ended: C >= 0
                                                     its exit status, -S death by signal S
    <- {"op": "failed", "id": N, "error": "..."}     spawn N never ran its shell (sent
                                                     once its child is gone, if it had one)
    -> {"op": "release", "slot": K}                  the attempt is over: kill what is left;
                                                     the slot's next spawn waits for that, and
                                                     for every signaller of the slot's uid
End of file on the socket (the worker stopped or died) ends every job; then the launcher exits.
This module imports no thread machinery: a fork of a process that never had threads is safe.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import gc
import json
import os
import resource
import select
import signal
import socket
import stat as stat_module
import struct
import sys
import time
from typing import Any, Callable, Mapping, Sequence

# --- privileges (prctl and capset through libc: the stdlib has neither) ----------------------

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_KILL, CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 5, 6, 7, 8
SWITCH_CAPS = {CAP_SETUID: "CAP_SETUID", CAP_SETGID: "CAP_SETGID"}
_CAP_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


# Built once, so that a forked child empties its sets with one call and checks with another.
_capset, _capget = _libc.capset, _libc.capget
_HEADER_V3 = _CapHeader(_CAP_VERSION_3, 0)
_NO_CAPS = (_CapData * 2)()
_READ_BACK = (_CapData * 2)()


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0),
           f"prctl({option})")


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd, CapAmb of a process (of its main thread), as bit masks."""
    caps = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Cap"):
                name, _, value = line.partition(":")
                caps[name] = int(value, 16)
    return caps


def holds(cap: int, caps: Mapping[str, int] | None = None) -> bool:
    return bool((caps or capabilities())["CapEff"] >> cap & 1)


def can_switch_users(caps: Mapping[str, int] | None = None) -> bool:
    caps = caps or capabilities()
    return all(holds(cap, caps) for cap in SWITCH_CAPS)


def capset(effective: int, permitted: int, inheritable: int = 0) -> None:
    """Set the calling thread's three capability sets (64-bit masks)."""
    data = (_CapData * 2)(
        _CapData(effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF),
        _CapData(effective >> 32, permitted >> 32, inheritable >> 32))
    _check(_capset(ctypes.byref(_HEADER_V3), data), "capset")


def drop_all_caps() -> None:
    """Empty the calling thread's effective, permitted and inheritable sets, and prove it."""
    _check(_capset(ctypes.byref(_HEADER_V3), _NO_CAPS), "capset")
    _check(_capget(ctypes.byref(_HEADER_V3), _READ_BACK), "capget")
    if any(d.effective or d.permitted or d.inheritable for d in _READ_BACK):
        raise PermissionError("capabilities are left after emptying them")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 40


def keep_only(keep: Sequence[int] = ()) -> None:
    """Shed every privilege of the calling thread but the capabilities `keep` (effective and
    permitted), and set no_new_privs. Call it while the process has a single thread:
    capability sets are per thread, and the threads started later inherit the caller's.

    The bounding set is emptied entirely (it only limits what an execve could grant, and no
    execve of ours may grant anything), and so are the ambient and inheritable sets, so no
    program this process starts can inherit a capability.
    """
    caps = capabilities()
    if caps["CapBnd"] and holds(CAP_SETPCAP, caps):
        for cap in range(_last_cap() + 1):
            if caps["CapBnd"] >> cap & 1:
                prctl(PR_CAPBSET_DROP, cap)
    if caps["CapAmb"]:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    mask = 0
    for cap in keep:
        mask |= (caps["CapPrm"] >> cap & 1) << cap
    if caps["CapPrm"] != mask or caps["CapEff"] != mask or caps["CapInh"]:
        capset(mask, mask, 0)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


# --- what a job may be given ------------------------------------------------------------------

LIMIT_NAMES = {resource.RLIMIT_NPROC: "processes", resource.RLIMIT_NOFILE: "open_files",
               resource.RLIMIT_FSIZE: "file_size", resource.RLIMIT_AS: "memory",
               resource.RLIMIT_CPU: "cpu_time"}
TMP_AREAS = ("/tmp", "/var/tmp", "/dev/shm")   # a slot's files at their top are removed
TRUST_AGE_NS = 20_000_000    # an mtime this old proves no later change (timestamps are coarse)
# glibc's own signals (SIGCANCEL, SIGSETXID): its sigaction refuses to change them.
_LIBC_RESERVED = frozenset(range(32, 34))


def ignored_signals() -> tuple[int, ...]:
    """Every signal this process ignores, as the kernel says (`SigIgn`). An exec keeps an
    ignored disposition, so a job would inherit each: Python's own (SIGPIPE, SIGXFSZ), the
    launcher's SIGINT (Ctrl-C is the master's), and whatever dtsd was started with (nohup
    ignores SIGHUP, some supervisors more). glibc's two reserved signals cannot be reset
    through it, and every glibc program installs its own handlers for them when it needs
    them."""
    with open("/proc/self/status", encoding="ascii") as handle:
        mask = next(int(line.split()[1], 16) for line in handle if line.startswith("SigIgn:"))
    return tuple(n for n in range(1, signal.NSIG)
                 if mask >> (n - 1) & 1 and n not in _LIBC_RESERVED)


# --- framing ----------------------------------------------------------------------------------

_HEADER = struct.Struct(">I")
MAX_MESSAGE = 16 << 20


def send_message(sock: socket.socket, message: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    buffers = [_HEADER.pack(len(data)), data]
    ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
    sent = sock.sendmsg(buffers, ancillary)
    total = _HEADER.size + len(data)
    if sent < total:        # a signal cut a large message short: the rest carries no fd
        sock.sendall((buffers[0] + data)[sent:])


class Reader:
    """Whole messages out of a stream socket, and the descriptors that came with them, in order."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()
        self.fds: list[int] = []

    def read(self) -> list[dict[str, Any]] | None:
        """What one recvmsg brought, as complete messages; None at end of file."""
        data, ancdata, _, _ = self.sock.recvmsg(256 * 1024, socket.CMSG_SPACE(16 * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    os.set_inheritable(fd, False)
                self.fds.extend(fds)
        if not data:
            return None
        self.buffer += data
        messages = []
        while len(self.buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buffer)
            if size > MAX_MESSAGE:
                raise ValueError(f"message of {size} bytes")
            if len(self.buffer) < _HEADER.size + size:
                break
            raw = bytes(self.buffer[_HEADER.size:_HEADER.size + size])
            del self.buffer[:_HEADER.size + size]
            messages.append(json.loads(raw))
        return messages

    def take_fd(self) -> int:
        if not self.fds:
            raise ValueError("a spawn request came without its output descriptor")
        return self.fds.pop(0)


# --- what runs as a slot's user ---------------------------------------------------------------

def become(uid: int, gid: int, groups: Sequence[int]) -> None:
    """Turn this (forked, single-threaded) process into uid:gid with `groups` and nothing else."""
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    drop_all_caps()
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PermissionError(f"could not become uid {uid} gid {gid}")


def _remove(path: str, is_dir: bool) -> None:
    """rm -rf as the owner, who may first have to give itself back access to its own dirs."""
    if not is_dir:
        os.unlink(path)
        return
    import shutil

    def retry(function, failed_path, _info):
        try:
            os.chmod(os.path.dirname(failed_path), 0o700)
            if os.path.isdir(failed_path) and not os.path.islink(failed_path):
                os.chmod(failed_path, 0o700)
            function(failed_path)
        except OSError:
            pass
    shutil.rmtree(path, onerror=retry)


def clean_tmp(uid: int, areas: Sequence[str] = TMP_AREAS, keep: str = "") -> None:
    """Remove every top-level entry `uid` owns in `areas` but `keep`. Runs as `uid`, never
    with privilege, so nothing it follows can reach anyone else's files."""
    for area in areas:
        try:
            entries = list(os.scandir(area))
        except OSError:
            continue
        for entry in entries:
            if entry.path == keep:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if st.st_uid == uid:
                    _remove(entry.path, stat_module.S_ISDIR(st.st_mode))
            except OSError:
                continue


def fresh_dir(path: str, uid: int) -> None:
    """Make `path` an empty directory of `uid`'s own, mode 0700, whatever a previous job of
    the same uid made of it (a symlink, a file, a setgid or group-writable directory)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, 0o700)
        return
    if not stat_module.S_ISDIR(st.st_mode):
        os.unlink(path)
        os.mkdir(path, 0o700)
        return
    if stat_module.S_IMODE(st.st_mode) != 0o700 or st.st_gid != uid:
        os.chmod(path, 0o700)
        os.chown(path, -1, uid)
    for entry in os.scandir(path):
        _remove(entry.path, entry.is_dir(follow_symlinks=False))


def _kill_all(sig: int) -> None:
    try:
        os.kill(-1, sig)
    except ProcessLookupError:
        pass


def sweep(uid: int, sig: int = signal.SIGKILL, clean: bool = False, tmpdir: str = "") -> None:
    """In a forked child: become `uid`, signal every process of it; with `clean`, remove its
    files from the temporary areas and leave `tmpdir` (if given) a fresh empty directory."""
    become(uid, uid, [])
    _kill_all(sig)
    if sig == signal.SIGKILL:
        # kill(-1) holds the task list while it signals, so no fork slips through; the second
        # pass is cheap insurance.
        _kill_all(sig)
    if clean:
        clean_tmp(uid, keep=tmpdir)
        if tmpdir:
            fresh_dir(tmpdir, uid)


def fork_as(body: Callable[[], None]) -> int:
    """Fork a child that runs `body` (which must become its uid first) and exits; its pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            gc.disable()
            body()
        except BaseException:   # noqa: BLE001 - never back into the caller's loop
            code = 1
        os._exit(code)
    return pid


# --- the launcher process ---------------------------------------------------------------------

EXIT_SPAWN_FAILED = 127     # how a child that could not exec the job's shell exits


class Slot:
    """One job at a time. Boxed: a uid of its own; unboxed (uid None): the launcher's user."""

    def __init__(self, index: int, uid: int | None, lock_fd: int | None = None,
                 tmpdir: str = ""):
        self.index = index
        self.uid = uid
        self.lock_fd = lock_fd
        self.tmpdir = tmpdir                 # the slot's private TMPDIR (boxed)
        self.pid: int | None = None          # the job's shell (unboxed: until reaped)
        self.pidfd: int | None = None        # unboxed: how the shell's exit is seen
        self.running = False                 # the shell has not exited
        self.released = True                 # the worker is done with the attempt
        self.sweeper: int | None = None      # a child killing what the job left
        self.signalling = 0                  # children of the slot's uid sending it a signal
        self.waiting: tuple[dict, int] | None = None   # a spawn waiting for the slot
        self.request_id: Any = None          # the spawn request of the current job
        self.status_fd: int | None = None    # the child's report: EOF at exec, or an error
        self.status = bytearray()
        self.held: list[int] = []            # signals asked for before the shell was exec'd
        self.area_mtimes: tuple[int, ...] | None = None  # TMP_AREAS' mtimes before the last job

    @property
    def busy(self) -> bool:
        return (not self.released or self.running or self.sweeper is not None
                or self.signalling > 0 or (self.uid is None and self.pid is not None))


class LauncherProcess:
    """The launcher's loop: requests from the worker, and the ends of its children."""

    def __init__(self, sock: socket.socket, *, runtime_dir: str, concurrency: int,
                 uids: tuple[int, int] | None, groups: Sequence[int] = (),
                 umask: int = 0o027, tmp_root: str = "/tmp"):
        self.sock = sock
        self.runtime_dir = runtime_dir
        self.concurrency = concurrency
        self.uids = uids
        self.groups = list(groups)
        self.umask = umask
        self.tmp_root = tmp_root
        self.boxed = uids is not None
        self.reader = Reader(sock)
        self.slots: list[Slot] = []
        self.poller = select.poll()
        self.shells: dict[int, Slot] = {}               # boxed: pid -> slot
        self.sweepers: dict[int, Slot] = {}             # pid -> slot being swept
        self.signallers: dict[int, Slot] = {}           # a child sending a signal -> slot
        self.pidfds: dict[int, Slot] = {}               # unboxed: pidfd -> slot
        self.status_fds: dict[int, Slot] = {}           # a spawning child's report -> slot
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        # Read after main() ignored SIGINT; reset in each job's child before its exec.
        self.ignored = ignored_signals()
        self.children_file = f"/proc/self/task/{os.getpid()}/children"
        self.wake_r = -1
        self.stopping = False

    # --- boot ---------------------------------------------------------------------------

    def acquire_slots(self) -> None:
        count = self.concurrency
        if not self.boxed:
            self.slots = [Slot(i, None) for i in range(count)]
            return
        first, last = self.uids
        directory = os.path.join(self.runtime_dir, "slots")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        token = os.urandom(6).hex()             # the TMPDIR names cannot be guessed
        # The lowest free uids first: those have names (the package's slot users).
        for uid in range(first, last + 1):
            if len(self.slots) == count:
                break
            fd = os.open(os.path.join(directory, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            tmpdir = os.path.join(self.tmp_root, f"dtsd-job.{uid}.{token}")
            self.slots.append(Slot(len(self.slots), uid, lock_fd=fd, tmpdir=tmpdir))
        if len(self.slots) < count:
            raise RuntimeError(f"[worker] job_uids {first}-{last}: only {len(self.slots)} of the "
                               f"{count} uids this worker needs are free (other workers hold the "
                               "rest); widen the range")
        self.sweep_all()      # whatever a crashed predecessor left goes before the first job

    def sweep_all(self) -> None:
        """Kill every process of every slot and remove their files; wait for it (rare paths)."""
        pids = [fork_as(lambda s=s: sweep(s.uid, clean=True, tmpdir=s.tmpdir))
                for s in self.slots]
        for pid in pids:
            os.waitpid(pid, 0)

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        self.poller.register(self.sock, select.POLLIN)
        if self.boxed:
            prctl(PR_SET_CHILD_SUBREAPER, 1)
            self.wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            signal.set_wakeup_fd(wake_w)
            signal.signal(signal.SIGCHLD, lambda *_: None)
            self.poller.register(self.wake_r, select.POLLIN)
        gc.freeze()      # what exists now is never collected: a forked child touches less
        while not self.stopping:
            for fd, _ in self.poller.poll():
                if fd == self.sock.fileno():
                    self.on_socket()
                elif fd == self.wake_r:
                    _drain(self.wake_r)
                    self.reap()
                elif fd in self.status_fds:
                    self.on_status(fd)
                elif fd in self.pidfds:
                    self.on_pidfd(fd)
        self.shutdown()
        return 0

    def on_socket(self) -> None:
        try:
            messages = self.reader.read()
        except (OSError, ValueError) as exc:
            print(f"dtsd launcher: bad request stream: {exc}", file=sys.stderr)
            messages = None
        if messages is None:         # the worker is gone: end every job, then exit
            self.stopping = True
            return
        for message in messages:
            try:
                self.handle(message)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                print(f"dtsd launcher: refused a malformed request: {exc}", file=sys.stderr)

    def handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "spawn":
            fd = self.reader.take_fd()
            slot = self._slot(message["slot"])
            if not slot.released or slot.waiting is not None:
                os.close(fd)
                self.reply({"op": "failed", "id": message["id"],
                            "error": f"slot {slot.index} is already running a job"})
            elif slot.busy:
                slot.waiting = (message, fd)     # what the last job left is being swept
            else:
                self.spawn(slot, message, fd)
        elif op == "signal":
            slot = self._slot(message["slot"])
            sig = int(message["signal"])
            if sig not in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP):
                raise ValueError(f"signal {sig} is not one a job is stopped with")
            self.signal(slot, sig)
        elif op == "release":
            self.release(self._slot(message["slot"]))
        else:
            raise ValueError(f"unknown op {op!r}")

    def _slot(self, index: Any) -> Slot:
        if not isinstance(index, int) or not 0 <= index < len(self.slots):
            raise ValueError(f"no slot {index!r}")
        return self.slots[index]

    def reply(self, message: dict[str, Any]) -> None:
        try:
            send_message(self.sock, message)
        except OSError:
            pass        # the worker is gone; end of file follows

    # --- starting a job -------------------------------------------------------------------

    def spawn(self, slot: Slot, request: dict[str, Any], out_fd: int) -> None:
        try:
            argv, env, cwd, limits = _checked(request)
        except (KeyError, TypeError, ValueError) as exc:
            os.close(out_fd)
            self.reply({"op": "failed", "id": request.get("id"), "error": f"bad request: {exc}"})
            return
        clean = True
        if slot.uid is not None:
            env.setdefault("TMPDIR", slot.tmpdir)
            # The areas need no look if none changed since before the slot's last job
            # started, as recorded then (an mtime trusted only once it is old enough).
            now, mtimes = _area_mtimes()
            clean = slot.area_mtimes is None or mtimes != slot.area_mtimes
            slot.area_mtimes = mtimes if all(now - m > TRUST_AGE_NS for m in mtimes) else None
        status_r, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        pid = os.fork()
        if pid == 0:
            try:
                gc.disable()
                os.close(status_r)
                self._exec(slot, argv, env, cwd, limits, out_fd, status_w, clean)
            except BaseException as exc:  # noqa: BLE001 - report, never return to the loop
                try:
                    os.write(status_w, (str(exc) or type(exc).__name__).encode(
                        "utf-8", "replace")[:4000])
                finally:
                    os._exit(EXIT_SPAWN_FAILED)
        os.close(out_fd)
        os.close(status_w)
        slot.pid, slot.running, slot.released = pid, True, False
        slot.request_id = request["id"]
        # The child reports on its own time (it may have a previous job's files to remove),
        # and nobody waits for it: the report is read when the shell ends, and only a
        # signal asked for before it (`signal`) makes the loop watch for it. So a job costs
        # the loop no wake-up and the worker no message between its spawn and its end.
        slot.status_fd, slot.status, slot.held = status_r, bytearray(), []
        self.status_fds[status_r] = slot
        if self.boxed:
            self.shells[pid] = slot
        else:
            slot.pidfd = os.pidfd_open(pid)
            self.pidfds[slot.pidfd] = slot
            self.poller.register(slot.pidfd, select.POLLIN)

    def on_status(self, fd: int) -> None:
        """The child of a slot with signals held back reports (it exec'd, or failed)."""
        slot = self.status_fds[fd]
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if data:
            slot.status += data
            return
        self._spawned(slot)
        held, slot.held = slot.held, []
        if not slot.status:
            for sig in held:
                self.signal(slot, sig)

    def _spawned(self, slot: Slot) -> None:
        """Read the child's whole report: nothing if it exec'd the shell, else its error.
        Called once the child is known to be past its exec (EOF) or gone."""
        fd, slot.status_fd = slot.status_fd, None
        if fd is None:
            return
        try:
            slot.status += _read_all(fd)
        except BlockingIOError:       # cannot be, past the exec; a report cut short is kept
            pass
        if slot.held:
            self.poller.unregister(fd)
        del self.status_fds[fd]
        os.close(fd)
        if slot.status:
            slot.area_mtimes = None

    def _ended(self, slot: Slot, code: int) -> None:
        """The slot's shell (or the child that could not become it) is gone: say how."""
        self._spawned(slot)
        slot.held = []
        slot.running = False
        if slot.status:
            self.reply({"op": "failed", "id": slot.request_id,
                        "error": slot.status.decode("utf-8", "replace")})
        else:
            self.reply({"op": "exited", "slot": slot.index, "id": slot.request_id,
                        "code": code})

    def _exec(self, slot: Slot, argv: list[str], env: dict[str, str], cwd: str,
              limits: list[tuple[int, int, int]], out_fd: int, status_w: int,
              clean: bool) -> None:
        """In the forked child: build the job's box, then exec its shell. Never returns."""
        os.setsid()
        os.dup2(self.devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        for sig in self.ignored:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        if slot.uid is not None:
            become(slot.uid, slot.uid, self.groups)
            # What the slot's previous job left, removed before this one can run anything.
            if clean:
                clean_tmp(slot.uid, keep=slot.tmpdir)
            fresh_dir(slot.tmpdir, slot.uid)
        for which, soft, hard in limits:
            try:
                resource.setrlimit(which, (soft, hard))
            except (ValueError, OSError) as exc:
                raise OSError(f"cannot set the limit {LIMIT_NAMES.get(which, which)} to "
                              f"{soft}: {exc}") from None
        os.umask(self.umask)
        try:
            os.chdir(cwd)
        except OSError as exc:
            raise OSError(f"cannot enter the working directory {cwd!r} as the job's user: "
                          f"{exc.strerror}") from None
        os.closerange(3, status_w)
        os.closerange(status_w + 1, 65536)
        try:
            os.execve(argv[0], argv, env)
        except OSError as exc:
            raise OSError(f"cannot run {argv[0]}: {exc.strerror}") from None

    # --- signalling, ending and reaping ---------------------------------------------------

    def signal(self, slot: Slot, sig: int) -> None:
        if slot.released or not slot.running:
            return
        if slot.status_fd is not None:
            # Its child may not be the slot's user yet (or have a session to signal):
            # held back till it exec'd, then sent; dropped if it could not.
            if not slot.held:
                self.poller.register(slot.status_fd, select.POLLIN)
            if sig not in slot.held:     # each signal once: the list stays bounded
                slot.held.append(sig)
            return
        if slot.uid is None:
            _killpg(slot.pid, sig)
            return
        uid = slot.uid
        # Its kill(-1) would reach the slot's next job: that waits till this child is reaped.
        self.signallers[fork_as(lambda: sweep(uid, sig))] = slot
        slot.signalling += 1

    def release(self, slot: Slot) -> None:
        """The attempt is over: kill whatever is left of it; then the slot takes the next job."""
        if slot.released:
            return
        slot.released = True
        if slot.uid is None:
            _killpg(slot.pid, signal.SIGKILL)   # the unreaped shell keeps its group's id ours
            if not slot.running:
                self._reap_unboxed(slot)
            return
        self.reap()
        if slot.running or self.leftovers(slot):
            uid = slot.uid
            pid = fork_as(lambda: sweep(uid))
            slot.sweeper = pid
            self.sweepers[pid] = slot
        self._next(slot)

    def leftovers(self, slot: Slot) -> bool:
        """Whether anything of `slot`'s job may still run once its shell has exited: a child
        of the launcher that is no shell or helper of ours and is, or may be, of that uid."""
        try:
            with open(self.children_file, encoding="ascii") as handle:
                pids = handle.read().split()
        except OSError:
            return True             # no way to tell: sweep
        for text in pids:
            pid = int(text)
            if pid in self.shells or pid in self.sweepers or pid in self.signallers:
                continue
            try:
                if os.stat(f"/proc/{pid}").st_uid != slot.uid:
                    continue        # another slot's: its own release deals with it
            except OSError:
                pass                # hidden (hidepid): it may be ours
            return True
        return False

    def reap(self) -> None:
        """Boxed: collect every child that ended (shells, sweepers, helpers, orphans)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.shells.pop(pid, None)
            if slot is not None:
                slot.pid = None
                self._ended(slot, os.waitstatus_to_exitcode(status))
                self._next(slot)
                continue
            slot = self.sweepers.pop(pid, None)
            if slot is not None:
                slot.sweeper = None
                self._next(slot)
                continue
            slot = self.signallers.pop(pid, None)
            if slot is not None:
                slot.signalling -= 1
                self._next(slot)
            # else an orphan of some job: nothing to do

    def on_pidfd(self, pidfd: int) -> None:
        """Unboxed: the shell ended. Its status is read, but it stays unreaped till release."""
        slot = self.pidfds[pidfd]
        self.poller.unregister(pidfd)
        info = os.waitid(os.P_PID, slot.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        self._ended(slot, _exit_code(info))
        if slot.released:
            self._reap_unboxed(slot)

    def _reap_unboxed(self, slot: Slot) -> None:
        os.waitpid(slot.pid, 0)
        self.pidfds.pop(slot.pidfd, None)
        os.close(slot.pidfd)
        slot.pid = slot.pidfd = None
        self._next(slot)

    def _next(self, slot: Slot) -> None:
        """Start the spawn that waited for `slot`, once it is free."""
        if slot.waiting is not None and not slot.busy:
            request, fd = slot.waiting
            slot.waiting = None
            self.spawn(slot, request, fd)

    def shutdown(self) -> None:
        """The worker is gone: every job of every slot ends, and the slots are cleaned."""
        for slot in self.slots:
            if slot.waiting is not None:
                os.close(slot.waiting[1])
                slot.waiting = None
            if slot.uid is None and slot.pid is not None:
                _killpg(slot.pid, signal.SIGKILL)
        if self.boxed:
            self.sweep_all()
            for slot in self.slots:     # the private TMPDIRs go too
                uid, tmpdir = slot.uid, slot.tmpdir
                os.waitpid(fork_as(lambda: (become(uid, uid, []),
                                            _remove(tmpdir, True))), 0)
            while self.shells or self.sweepers or self.signallers:
                try:
                    pid, _ = os.waitpid(-1, 0)
                except ChildProcessError:
                    break
                self.shells.pop(pid, None)
                self.sweepers.pop(pid, None)
                self.signallers.pop(pid, None)
        else:
            for slot in self.slots:
                if slot.pid is not None:
                    os.waitpid(slot.pid, 0)


def _area_mtimes() -> tuple[int, tuple[int, ...]]:
    """(now, the mtimes of TMP_AREAS), in ns; a missing area counts as 0 (never changes)."""
    now = time.time_ns()
    mtimes = []
    for area in TMP_AREAS:
        try:
            mtimes.append(os.stat(area).st_mtime_ns)
        except OSError:
            mtimes.append(0)
    return now, tuple(mtimes)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _checked(request: dict[str, Any]) -> tuple[list[str], dict[str, str], str,
                                                 list[tuple[int, int, int]]]:
    """The fields of a spawn request, or ValueError: the launcher believes no sender."""
    argv, env, cwd = request["argv"], request["env"], request["cwd"]
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) and "\0" not in a
                                                    for a in argv)):
        raise ValueError("argv must be a non-empty list of strings without NUL")
    if not os.path.isabs(argv[0]):
        raise ValueError("argv[0] must be an absolute path")
    if not (isinstance(env, dict) and all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k
            and "\0" not in k and "\0" not in v for k, v in env.items())):
        raise ValueError("env must map names without '=' or NUL to strings without NUL")
    if not (isinstance(cwd, str) and cwd and "\0" not in cwd):
        raise ValueError("cwd must be a path")
    limits = []
    for item in request.get("limits", ()):
        which, soft, hard = item
        if which not in LIMIT_NAMES or not (isinstance(soft, int) and isinstance(hard, int)
                                            and 0 <= soft <= hard):
            raise ValueError(f"bad limit {item!r}")
        limits.append((which, soft, hard))
    return argv, dict(env), cwd, limits


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _exit_code(info: os.waitid_result | None) -> int:
    if info is None:
        return -signal.SIGKILL
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status


def sweep_free_slots(runtime_dir: str) -> list[int]:
    """For the master, after a worker died: every slot no live launcher holds is swept (its
    processes killed, its temporary files removed). Returns the uids swept."""
    directory = os.path.join(runtime_dir, "slots")
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    swept = []
    for name in names:
        if not name.isdigit():
            continue
        uid = int(name)
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            os.waitpid(fork_as(lambda: sweep(uid, clean=True)), 0)
            swept.append(uid)
        finally:
            os.close(fd)
    return swept


# --- entry point --------------------------------------------------------------------------------

def _parse(argv: Sequence[str]):
    import argparse
    parser = argparse.ArgumentParser(prog="dtsd-launcher")
    parser.add_argument("--fd", type=int)
    parser.add_argument("--runtime-dir")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--uids", default="", help="FIRST-LAST: boxed, a uid per slot")
    parser.add_argument("--groups", default="")
    parser.add_argument("--umask", default="0o027")
    parser.add_argument("--tmp-root", default="/tmp")
    parser.add_argument("--sweep", metavar="RUNTIME_DIR", default=None,
                        help="sweep the slots no launcher holds, then exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the master's to act on
    if args.sweep:
        print(" ".join(map(str, sweep_free_slots(args.sweep))))    # the uids swept
        return 0
    sock = socket.socket(fileno=args.fd)
    uids = None
    if args.uids:
        first, _, last = args.uids.partition("-")
        uids = (int(first), int(last))
    try:
        if uids is not None:
            keep_only((CAP_SETUID, CAP_SETGID))
            if not can_switch_users():
                raise RuntimeError("the launcher lacks CAP_SETUID and CAP_SETGID")
        else:
            keep_only(())
        launcher = LauncherProcess(
            sock, runtime_dir=args.runtime_dir, concurrency=args.concurrency, uids=uids,
            groups=[int(g) for g in args.groups.split(",") if g], umask=int(args.umask, 0),
            tmp_root=args.tmp_root)
        launcher.acquire_slots()
    except (OSError, RuntimeError) as exc:
        send_message(sock, {"op": "error", "error": str(exc)})
        return 1
    send_message(sock, {"op": "ready", "uids": [s.uid for s in launcher.slots],
                        "tmpdirs": [s.tmpdir for s in launcher.slots]})
    # The worker decides; a TERM from anyone else ends the jobs as an end of file would.
    signal.signal(signal.SIGTERM, lambda *_: sock.shutdown(socket.SHUT_RD))
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
