"""LxcRuntime.wait_for_tools against stand-ins: real processes named criu and
lxc-checkpoint that sleep with the image directory among their arguments, as the
tools an interrupted evictor leaves do. The real tools killed at such moments
are in tests/integration/test_faults.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from evictor.lxc_runtime import LxcRuntime

StandIn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[StandIn]:
    """Start a process named ``tool`` with ``arguments`` that ends after ``seconds``."""
    started: list[subprocess.Popen[bytes]] = []

    def start(tool: str, *arguments: str, seconds: float = 30.0) -> subprocess.Popen[bytes]:
        code = f"import time; time.sleep({seconds})"
        process = subprocess.Popen([tool, "-c", code, *arguments], executable=sys.executable)
        started.append(process)
        cmdline = Path(f"/proc/{process.pid}/cmdline")
        deadline = time.monotonic() + 10
        while not cmdline.read_bytes().startswith(tool.encode() + b"\0"):  # until it has run
            assert time.monotonic() < deadline, f"{tool} did not start"
            time.sleep(0.005)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def seconds_waited(
    runtime: LxcRuntime,
    image_dir: Path,
    *,
    seconds: float = 30.0,
    orphan_grace_seconds: float = 0.0,
    kill_at_end: bool = True,
) -> float:
    started = time.monotonic()
    runtime.wait_for_tools(
        image_dir,
        seconds=seconds,
        orphan_grace_seconds=orphan_grace_seconds,
        kill_at_end=kill_at_end,
    )
    return time.monotonic() - started


def test_a_restore_no_lxc_checkpoint_drives_is_killed_after_the_grace(
    stand_in: StandIn, tmp_path: Path
) -> None:
    runtime = LxcRuntime(tmp_path)
    criu = stand_in("criu", "restore", "-D", str(tmp_path))
    seconds = seconds_waited(runtime, tmp_path, orphan_grace_seconds=0.3, kill_at_end=False)
    assert criu.wait(timeout=5) < 0
    assert 0.3 <= seconds < 5


def test_a_dump_without_its_lxc_checkpoint_is_waited_for_and_not_killed(
    stand_in: StandIn, tmp_path: Path
) -> None:
    runtime = LxcRuntime(tmp_path)
    criu = stand_in("criu", "dump", "-D", str(tmp_path), seconds=1.0)
    seconds = seconds_waited(runtime, tmp_path)
    assert criu.wait(timeout=5) == 0, "a dump completes on its own"
    assert 1.0 <= seconds < 5


@pytest.mark.parametrize("kill_at_end", [True, False])
def test_a_restore_its_lxc_checkpoint_drives_is_left_to_the_end(
    stand_in: StandIn, tmp_path: Path, kill_at_end: bool
) -> None:
    runtime = LxcRuntime(tmp_path)
    driver = stand_in("lxc-checkpoint", "-r", "-D", str(tmp_path))
    criu = stand_in("criu", "restore", "-D", str(tmp_path))
    seconds = seconds_waited(runtime, tmp_path, seconds=0.5, kill_at_end=kill_at_end)
    assert 0.5 <= seconds < 5
    if kill_at_end:  # and gone by the time the wait returns
        assert driver.poll() == criu.poll() == -signal.SIGKILL
    else:
        assert driver.poll() is None and criu.poll() is None


def test_tools_on_another_image_are_not_waited_for(stand_in: StandIn, tmp_path: Path) -> None:
    runtime = LxcRuntime(tmp_path)
    other = stand_in("criu", "restore", "-D", str(tmp_path / "other"))
    seconds = seconds_waited(runtime, tmp_path / "mine")
    assert seconds < 0.5 and other.poll() is None
