"""The ``evictor`` command run by the daemon's command server: the same outcome,
output and exit status as in its own process, signals forwarded, the daemon's stop
waiting for a command under way, and its own process again when no daemon (or a
daemon with other code) serves it. A real daemon, real containers, real CRIU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from evictor import paths
from evictor.images import ImageState, ImageStore
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerState
from evictor.tools import testbed

from .conftest import DaemonProcess, WorkloadFactory, free_port, run_evictor, write_config

EVICTOR = Path(sys.executable).with_name("evictor")  # the installed command: the front
SERVED = "run by the daemon's command server as pid"


def evictor(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EVICTOR), "-c", str(config), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


@pytest.fixture
def served(
    runtime: LxcRuntime, tmp_path: Path, daemon: Callable[[Path], DaemonProcess]
) -> Iterator[tuple[Path, DaemonProcess]]:
    """A daemon that restores nothing on its own (a restore would need all of the
    host's memory free), and its config."""
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        tmp_path / "state",
        free_port(),
        restore={"margin": "1TiB"},
    )
    process = daemon(config)
    process.wait_for_log("running: a tick")
    yield config, process
    process.stop()


def test_commands_run_in_the_server_as_in_their_own_process(
    runtime: LxcRuntime, workload: WorkloadFactory, served: tuple[Path, DaemonProcess]
) -> None:
    config, _ = served
    name = workload()
    before = testbed.wait_for_counter(runtime, name, above=0)
    evicted = evictor(config, "-v", "evict", name)
    assert evicted.returncode == 0, evicted.stderr
    assert SERVED in evicted.stderr
    assert runtime.state(name) is ContainerState.STOPPED
    images = ImageStore(config.parent / "state/images")
    assert images.image_state(name) is ImageState.COMMITTED

    # Errors: the same line and exit status as the command in its own process.
    for args, status in ((("evict", "evt-nowhere"), 1), (("evict", "bad name!"), 2)):
        there, here = evictor(config, *args), run_evictor("-c", str(config), *args)
        assert (there.returncode, there.stderr, there.stdout) == (
            status,
            here.stderr,
            here.stdout,
        )
        assert there.stderr.count("\n") == 1
    listed = evictor(config, "list")
    assert listed.returncode == 0 and name in listed.stdout

    restored = evictor(config, "-v", "restore", name)
    assert restored.returncode == 0, restored.stderr
    assert SERVED in restored.stderr
    testbed.wait_alive(runtime, name, original=before)


def test_signals_reach_the_command_and_a_stop_waits_for_it(
    runtime: LxcRuntime, workload: WorkloadFactory, served: tuple[Path, DaemonProcess]
) -> None:
    config, process = served
    name = workload()
    assert evictor(config, "evict", name).returncode == 0
    images = ImageStore(config.parent / "state/images")

    # discard asks on a terminal; Ctrl-C (SIGINT to the command) interrupts it there.
    asked = _ask_discard(config, name)
    asked.process.send_signal(signal.SIGINT)
    assert asked.process.wait(timeout=30) == 130
    assert "evictor: interrupted" in asked.output()
    assert images.image_state(name) is ImageState.COMMITTED  # nothing changed
    # ... and only the command: the daemon would stop within a tick of reading it.
    time.sleep(1.0)
    assert process.process is not None and process.process.poll() is None, process.log()
    assert "received" not in process.log()

    # The server follows the daemon, not the signals that match its command line.
    daemon_process = psutil.Process(process.process.pid)
    (server,) = [c for c in daemon_process.children() if c.cmdline() == daemon_process.cmdline()]
    for signum in (signal.SIGTERM, signal.SIGHUP):
        server.send_signal(signum)
    assert SERVED in evictor(config, "-v", "list").stderr

    # A stop waits for a command under way, as for the daemon's own action.
    asked = _ask_discard(config, name)
    process.process.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    assert process.process.poll() is None, process.log()
    os.write(asked.terminal, b"n\n")
    assert asked.process.wait(timeout=30) == 0
    assert f"{name}: kept" in asked.output()
    assert process.process.wait(timeout=30) == 0
    assert images.image_state(name) is ImageState.COMMITTED
    socket_path = paths.command_socket_path(paths.command_key(str(config), None, None))
    assert not os.path.exists(socket_path)

    # With no daemon, the command runs in its own process.
    restored = evictor(config, "-v", "restore", name)
    assert restored.returncode == 0 and SERVED not in restored.stderr
    assert runtime.state(name) is ContainerState.RUNNING


def test_a_daemon_with_other_code_runs_no_command(
    runtime: LxcRuntime, workload: WorkloadFactory, served: tuple[Path, DaemonProcess]
) -> None:
    """An upgrade under a running daemon: the command runs its own (new) code."""
    config, process = served
    assert SERVED in evictor(config, "-v", "status").stderr
    module = Path(paths.__file__)
    status = module.stat()
    os.utime(module, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    try:
        listed = evictor(config, "-v", "status")
    finally:
        os.utime(module, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert listed.returncode == 0 and SERVED not in listed.stderr
    assert "the daemon runs other evictor code: restart it" in process.log()


class _Asking:
    """``evictor discard`` at its question, on a terminal of the test's (CPython
    asks on stderr when stdin is a terminal)."""

    def __init__(self, process: subprocess.Popen[bytes], terminal: int) -> None:
        self.process, self.terminal = process, terminal

    def output(self) -> str:
        return os.read(self.terminal, 65536).decode(errors="replace")


def _ask_discard(config: Path, name: str) -> _Asking:
    terminal, its_side = os.openpty()
    process = subprocess.Popen(
        [str(EVICTOR), "-c", str(config), "discard", name],
        stdin=its_side,
        stdout=its_side,
        stderr=its_side,
    )
    os.close(its_side)
    question = b""
    deadline = time.monotonic() + 30
    while b"[y/N]" not in question:
        assert time.monotonic() < deadline and process.poll() is None, question
        question += os.read(terminal, 4096)
    return _Asking(process, terminal)
