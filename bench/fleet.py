"""Real workload containers for benchmarks, in their own LXC path, always cleaned up."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from evictor.lxc_runtime import LxcRuntime
from evictor.tools import testbed

BENCH_ROOT = Path("/var/tmp/evictor-bench")


@contextlib.contextmanager
def fleet(count: int, *, memory_mib: int = 1, prefix: str = "evb") -> Iterator[LxcRuntime]:
    """Start ``count`` workload containers; destroy them (and leftovers) afterwards."""
    runtime = LxcRuntime(BENCH_ROOT / "lxc")
    for name in runtime.names():
        runtime.destroy(name)
    shutil.rmtree(BENCH_ROOT, ignore_errors=True)
    runtime.lxc_path.mkdir(parents=True, mode=0o700)
    names = [f"{prefix}-{i:03d}" for i in range(count)]
    try:
        for name in names:
            testbed.create_workload_container(runtime, name, memory_mib=memory_mib)
            runtime.start(name)
        for name in names:
            testbed.wait_for_counter(runtime, name, above=0)
        yield runtime
    finally:
        for name in runtime.names():
            runtime.destroy(name)
        shutil.rmtree(BENCH_ROOT, ignore_errors=True)


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``evictor run`` on ``config``, its output in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "evictor.cli", "-c", str(config), "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def free_port() -> int:
    """A TCP port on localhost free now, for a daemon's metrics."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def timed(action: Callable[..., object], *args: object, **kwargs: object) -> float:
    """Seconds ``action(*args, **kwargs)`` takes."""
    started = time.perf_counter()
    action(*args, **kwargs)
    return time.perf_counter() - started


def flush_and_drop(path: Path) -> None:
    """Write a file back to disk and drop it from the page cache (a directory: each file)."""
    for file_path in sorted(path.iterdir()) if path.is_dir() else [path]:
        with open(file_path, "rb") as image_file:
            os.fdatasync(image_file.fileno())
            os.posix_fadvise(image_file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def median_seconds(action: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
