"""The ``evictor`` command's front: run the command in the daemon's command server
when a daemon serves this config, else here.

Starting CPython and importing evictor costs about 0.2 s, twice the fixed cost
allowed over the raw tools. The daemon keeps a process with evictor imported
(:mod:`evictor.command_server`) that forks a child per command: the child takes
this process's stdin, stdout and stderr, its working directory, environment and
umask, and runs :func:`evictor.cli.main` on its arguments exactly as this process
would. SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to this process go to the child, and its
exit status becomes this process's.

A command runs here instead when no daemon serves the config it names (none
running, or a different config or override), when the daemon runs other code
(upgraded and not yet restarted), when it is not one of :data:`SERVED_COMMANDS`,
and for an argument list this front does not parse (argparse judges it then).
"""

from __future__ import annotations

# The C modules under socket and signal: those two build enums at import, which
# costs 17 ms here, a fifth of this front's whole start-up.
import _signal  # type: ignore[import-not-found]
import _socket
import os
import struct
import sys

from evictor.paths import code_stamp, command_key, command_socket_path

# Global options that take a value, and the long names argparse knows them by.
_VALUED_OPTIONS = {"-c": "config", "--config": "config", "-P": "lxcpath", "--lxcpath": "lxcpath"}
_VALUED_OPTIONS["--state-dir"] = "state_dir"
_FLAG_OPTIONS = ("-v", "--verbose")
# The commands a daemon runs: its own operations and the queries. The rest run
# here: the daemon and the demo, and check, prepare and check-config, which read
# or write files (a container's rootfs, any config) where the daemon's service
# sandbox might not let them, and whose start-up cost is small beside their work.
SERVED_COMMANDS = (
    "evict",
    "restore",
    "discard",
    "drain",
    "resume",
    "make-room",
    "label",
    "list",
    "status",
    "plan",
)
FORWARDED_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)


def served_key(argv: list[str]) -> tuple[str, bool] | None:
    """The daemon key the arguments name, and whether they ask for details (-v);
    None if the command runs here."""
    values: dict[str, str] = {}
    verbose = False
    index = 0
    while index < len(argv):
        argument = argv[index]
        if argument in _FLAG_OPTIONS:
            verbose = True
            index += 1
            continue
        name, has_value, value = argument.partition("=")
        if name in _VALUED_OPTIONS and name.startswith("--") and has_value:
            values[_VALUED_OPTIONS[name]] = value
            index += 1
            continue
        if argument in _VALUED_OPTIONS and index + 1 < len(argv):
            values[_VALUED_OPTIONS[argument]] = argv[index + 1]
            index += 2
            continue
        if argument not in SERVED_COMMANDS:
            return None  # or help, an abbreviation, a typo: argparse's to judge
        key = command_key(values.get("config"), values.get("lxcpath"), values.get("state_dir"))
        return key, verbose
    return None


def encode_request(key: str, argv: list[str]) -> bytes:
    """NUL-separated fields (arguments and the environment cannot hold a NUL):
    stamp, key's three parts, cwd, umask, argument count, arguments, environment."""
    umask = os.umask(0)
    os.umask(umask)
    fields = [code_stamp(), key, os.getcwd(), str(umask), str(len(argv)), *argv]
    head = "\0".join(fields).encode(errors="surrogateescape")
    environment = b"\0".join(k + b"=" + v for k, v in os.environb.items())
    return head + b"\0" + environment


def run_served(key: str, argv: list[str], *, verbose: bool = False) -> int | None:
    """Run the command in the daemon's command server and return its exit status;
    None if no server takes it (the caller runs it here)."""
    child = 0  # the command's pid, once the server has said it
    pending: list[int] = []  # signals that came before that

    def forward(signum: int, frame: object) -> None:
        if not child:
            pending.append(signum)
            return
        # Not contextlib.suppress: importing contextlib would cost this process 7 ms.
        try:  # noqa: SIM105
            os.kill(child, signum)
        except ProcessLookupError:
            pass  # it has just ended: its status is on the way

    previous = {signum: _signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    reply = b""
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)  # a closed stdio cannot be handed over
        server = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        server.connect(command_socket_path(key))
        server.sendmsg(
            [encode_request(key, argv)],
            [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("3i", 0, 1, 2))],
        )
        reply = server.recv(4096)
    except OSError:
        pass
    if not reply.startswith(b"pid "):
        # Not served (no server, other code, another config): run here, as if the
        # signals that came meanwhile came now.
        for signum, handler in previous.items():
            _signal.signal(signum, handler)
        for signum in pending:
            os.kill(os.getpid(), signum)
        return None
    child = int(reply[4:])
    if verbose:
        print(f"evictor: run by the daemon's command server as pid {child}", file=sys.stderr)
    for signum in pending:
        forward(signum, None)
    try:
        reply = server.recv(4096)
    except OSError:
        reply = b""
    if reply.startswith(b"exit "):
        return int(reply[5:])
    print(
        f"evictor: lost the daemon's command server while pid {child} ran the command",
        file=sys.stderr,
    )
    return 1


def main() -> int:
    argv = sys.argv[1:]
    served = served_key(argv)
    if served is not None:
        key, verbose = served
        status = run_served(key, argv, verbose=verbose)
        if status is not None:
            # The command ran in the daemon's child: this process has nothing left to
            # do but its interpreter's tear-down (3 ms of a served command's 40).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    from evictor.cli import main as run_here

    return run_here(argv)
