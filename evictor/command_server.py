"""The daemon's command server: a process with evictor imported that runs each
``evictor`` command (:mod:`evictor.client`) in a child forked for it.

The daemon forks it once at start, while it has one thread and before it opens
its journal, so that each child starts from a clean copy: no lock, connection or
thread of the daemon's. A child is what ``evictor`` would have been, less the
start-up: it takes the command's stdin, stdout and stderr, working directory,
environment and umask, and runs :func:`evictor.cli.main`. The server reports its
pid at once and its exit status at the end.

Only the daemon's own user (root) is served: the socket is in a root-only
directory, and the peer's uid is checked too. When the daemon stops, the server
takes no new command, waits for those under way, then exits; the daemon waits
for it. It also goes if the daemon is killed (its pipe closes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import logging
import os
import select
import signal
import socket
import stat
import struct
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import NoReturn

from evictor.paths import (
    COMMAND_SOCKET_DIR,
    KEY_FIELDS,
    MAX_REQUEST_BYTES,
    code_stamp,
    command_socket_path,
)

log = logging.getLogger(__name__)

_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_STDIO = 3


@dataclasses.dataclass(frozen=True)
class Commands:
    """What a daemon serves: the key that names it to commands
    (:func:`evictor.paths.command_key`), and the command line's entry point
    (:func:`evictor.cli.main`, whose parser the daemon has built already)."""

    key: str
    main: Callable[[list[str]], int]


class CommandServer:
    """The daemon's handle on its command server: :meth:`stop` ends it."""

    def __init__(self, pid: int, stop_fd: int) -> None:
        self.pid, self._stop_fd = pid, stop_fd

    def stop(self) -> None:
        """Take no new command; wait for those under way, and for the server."""
        os.close(self._stop_fd)
        os.waitpid(self.pid, 0)


def start(commands: Commands, *, close_fds: Iterable[int] = ()) -> CommandServer | None:
    """Fork the server; None (logged) if its socket cannot be made: commands then
    run in their own process, as without a daemon."""
    path = command_socket_path(commands.key)
    try:
        listener = _listen(path)
    except OSError as error:
        log.warning("no command server (commands start their own process): %s", error)
        return None
    stop_read, stop_write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        # Not the daemon's wakeup fd: a command's SIGINT handler would write the
        # signal into the daemon's pipe, and the daemon would stop as if its own
        # Ctrl-C had come. Dropped before close_fds (the daemon's pipe among them).
        signal.set_wakeup_fd(-1)
        os.close(stop_write)
        for fd in close_fds:
            os.close(fd)
        _serve(listener, stop_read, commands, path)
    os.close(stop_read)
    listener.close()
    log.info("command server %d at %s", pid, path)
    return CommandServer(pid, stop_write)


def _listen(path: str) -> socket.socket:
    """Bind the socket afresh. The daemon lock is held, so a socket already there
    is a dead daemon's."""
    os.makedirs(COMMAND_SOCKET_DIR, mode=0o700, exist_ok=True)
    status = os.stat(COMMAND_SOCKET_DIR)
    if status.st_uid != os.geteuid() or status.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{COMMAND_SOCKET_DIR} is not private to uid {os.geteuid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(16)
    return listener


def _serve(listener: socket.socket, stop_fd: int, commands: Commands, path: str) -> NoReturn:
    # The server follows the daemon (its pipe), not signals: SIGINT at a terminal
    # reaches the whole process group, and `pkill -f "evictor run"` (SIGTERM, or
    # SIGHUP for a reload) matches this process too, whose command line is the
    # daemon's. The daemon then stops, or reloads, and this server with it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    _import_what_the_engine_imports_on_first_use()
    # What the children share with the server is never collected: a collection
    # would touch, and so copy, every page of it in each child.
    gc.freeze()
    stamp = code_stamp()
    bound = os.stat(path).st_ino
    running: dict[int, tuple[int, socket.socket]] = {}  # pidfd: (pid, its command's socket)
    accepting = True
    try:
        while accepting or running:
            watched = [*running, *((listener, stop_fd) if accepting else ())]
            for ready in select.select(watched, [], [])[0]:
                if ready == stop_fd:
                    accepting = False
                    listener.close()
                    _unlink_if_same(path, bound)
                elif ready is listener:
                    if accepting:
                        _accept(listener, commands, stamp, running)
                else:
                    _report_exit(ready, running)
    except BaseException:
        log.exception("command server failed")
        os._exit(1)
    os._exit(0)


def _unlink_if_same(path: str, inode: int) -> None:
    """Remove the socket, unless a daemon started since has bound its own there."""
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)


def _import_what_the_engine_imports_on_first_use() -> None:
    for module in ("evictor.diagnosis", "evictor.inspection"):
        importlib.import_module(module)


def _accept(
    listener: socket.socket,
    commands: Commands,
    stamp: str,
    running: dict[int, tuple[int, socket.socket]],
) -> None:
    connection, _ = listener.accept()
    connection.settimeout(5.0)  # a client that connects and says nothing is dropped
    fds: list[int] = []
    handed_over = False
    try:
        pid, uid, _gid = _PEER_CREDENTIALS.unpack(
            connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
        )
        message, ancillary, flags, _ = connection.recvmsg(
            MAX_REQUEST_BYTES, socket.CMSG_SPACE(_STDIO * 4)
        )
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"{len(data) // 4}i", data[: len(data) // 4 * 4]))
        why = refusal(
            uid=uid,
            our_uid=os.geteuid(),
            flags=flags,
            fds=fds,
            message=message,
            key=commands.key,
            stamp=stamp,
        )
        if why is not None:
            log.warning("command from pid %d refused: %s", pid, why)
            connection.send(f"refused {why}".encode())
            return
        child = os.fork()
        if child == 0:
            listener.close()
            for pidfd, (_, other) in running.items():
                os.close(pidfd)
                other.close()
            connection.close()
            _run_command(commands.main, fds, message)
        running[os.pidfd_open(child)] = (child, connection)
        handed_over = True  # reaped, and reported if the command still listens
        with contextlib.suppress(OSError):
            connection.send(f"pid {child}".encode())
    except OSError as error:
        log.warning("command dropped: %s", error)
    finally:
        for fd in fds:
            os.close(fd)
        if not handed_over:
            connection.close()


def refusal(
    *, uid: int, our_uid: int, flags: int, fds: list[int], message: bytes, key: str, stamp: str
) -> str | None:
    """Why a request is not served (None: it is)."""
    if uid != our_uid:
        return f"uid {uid} is not the daemon's"
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != _STDIO:
        return "malformed request"
    fields = message.split(b"\0", KEY_FIELDS + 1)
    if b"\0".join(fields[1 : 1 + KEY_FIELDS]).decode(errors="surrogateescape") != key:
        return "another config"
    if fields[0].decode(errors="surrogateescape") != stamp:
        return "the daemon runs other evictor code: restart it"
    return None


def _report_exit(pidfd: int, running: dict[int, tuple[int, socket.socket]]) -> None:
    pid, connection = running.pop(pidfd)
    os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with contextlib.suppress(OSError):  # the command's process may be gone
        connection.send(f"exit {code if code >= 0 else 128 - code}".encode())
    connection.close()


def _run_command(main: Callable[[list[str]], int], fds: list[int], message: bytes) -> NoReturn:
    """In the child: become the command's process and run it."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        fields = message.split(b"\0")[1 + KEY_FIELDS :]
        cwd, umask, count = os.fsdecode(fields[0]), int(fields[1]), int(fields[2])
        argv = [os.fsdecode(field) for field in fields[3 : 3 + count]]
        os.chdir(cwd)
        os.umask(umask)
        os.environb.clear()
        for entry in fields[3 + count :]:
            name, _, value = entry.partition(b"=")
            if name:
                os.environb[name] = value
        _reopen_stdio()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        logging.root.handlers.clear()  # cli.main sets up logging for the command
        sys.argv = ["evictor", *argv]
        code = main(argv)
    except SystemExit as ended:  # argparse, for --help and usage errors
        code = ended.code if isinstance(ended.code, int) else (0 if ended.code is None else 1)
        if isinstance(ended.code, str):
            print(ended.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code)


def _reopen_stdio() -> None:
    """Text streams on the new fds 0-2, buffered as CPython buffers them at start
    (line-buffered on a terminal), since the daemon's were set up for its own."""
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
