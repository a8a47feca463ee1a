"""Real memory pressure, for the pressure tests and benchmarks: a ballast that
takes most of the host's memory, and the OOM killer's count.

The ballast is a host process outside any container holding anonymous memory,
with oom_score_adj 1000, so that an OOM kill takes it first (and /proc/vmstat
counts it). It is bounded (it takes what it is asked for, never more than the
host has available less a floor) and always released: killed on leaving its
``with`` block, whatever happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from evictor.errors import EvictorError
from evictor.monitor import read_meminfo

MIB = 1 << 20
# Never leave the host less than this available: the tests' own processes,
# LXC and CRIU must go on running.
FLOOR_BYTES = 768 * MIB
_CHUNK_BYTES = 64 * MIB

# The ballast's own program: allocate, touch every page, say so, then wait. Private
# memory: the OOM killer's reaper frees it at once (a shared mapping it cannot,
# and the next victim would be another process).
_BALLAST = f"""
import mmap, sys, time
size = int(sys.argv[1])
memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
chunk = b"\\x5a" * {_CHUNK_BYTES}
for offset in range(0, size - size % len(chunk), len(chunk)):
    memory.write(chunk)
memory.write(b"\\x5a" * (size % len(chunk)))
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def oom_kills(proc_root: Path = Path("/proc")) -> int:
    """How many processes the OOM killer has killed since boot."""
    for line in (proc_root / "vmstat").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    raise EvictorError("no oom_kill count in /proc/vmstat")


def available_bytes() -> int:
    """MemAvailable, as the kernel counts it."""
    return read_meminfo()["MemAvailable"]


def _oom_first() -> None:
    """In the ballast's child: it is the OOM killer's first choice."""
    with open("/proc/self/oom_score_adj", "w") as adj:
        adj.write("1000")


class Ballast:
    """Take memory until MemAvailable is about ``leave_bytes`` (or take ``size_bytes``)."""

    def __init__(self, *, leave_bytes: int | None = None, size_bytes: int | None = None) -> None:
        if (leave_bytes is None) == (size_bytes is None):
            raise EvictorError("a ballast takes leave_bytes or size_bytes")
        self.leave_bytes = leave_bytes
        self.size_bytes = size_bytes
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Ballast:
        available = available_bytes()
        wanted = self.size_bytes if self.leave_bytes is None else available - self.leave_bytes
        assert wanted is not None
        size = min(wanted, available - FLOOR_BYTES)
        if size <= 0:
            raise EvictorError(f"no room for a ballast: {available // MIB} MiB available")
        self.size_bytes = size
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BALLAST, str(size)],
            stdout=subprocess.PIPE,
            preexec_fn=_oom_first,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != b"ready":
            self.release()
            raise EvictorError("the ballast did not fill its memory")
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def killed_by_the_oom_killer(self) -> bool:
        return self.process is not None and self.process.poll() == -signal.SIGKILL

    def release(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def wait_for(
    condition: Callable[[], bool], timeout_seconds: float, poll_seconds: float = 0.05
) -> bool:
    """Poll ``condition`` until it is true or the time is up."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_seconds)
    return False
