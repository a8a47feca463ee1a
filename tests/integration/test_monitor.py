"""The monitor's figures against the kernel's own files and `free -b`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from evictor import cgroups
from evictor import monitor as monitor_module
from evictor.images import ImageStore
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerSample, ContainerState
from evictor.monitor import Monitor, read_per_cpu_free_bytes, sample_host

from .conftest import MIB, WorkloadFactory

# The host moves on its own between two reads: both are taken within
# milliseconds, and 64 MiB is far below any figure evictor acts on.
TOLERANCE_BYTES = 64 * MIB


def free_b() -> dict[str, int]:
    lines = subprocess.run(
        ["free", "-b"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    mem = lines[1].split()
    swap = lines[2].split()
    return {
        "total": int(mem[1]),
        "free": int(mem[3]),
        "available": int(mem[6]),
        "swap_total": int(swap[1]),
        "swap_free": int(swap[3]),
    }


def test_host_figures_agree_with_free() -> None:
    """``free`` reports MemAvailable and MemFree; evictor adds the per-CPU free lists."""
    host = sample_host()
    free = free_b()
    per_cpu = read_per_cpu_free_bytes()
    assert host.total_bytes == free["total"]
    assert abs(host.available_bytes - (free["available"] + per_cpu)) < TOLERANCE_BYTES
    assert abs(host.free_bytes - (free["free"] + per_cpu)) < TOLERANCE_BYTES
    assert host.swap_total_bytes == free["swap_total"]
    assert host.pressure is not None  # /proc/pressure/memory exists on our kernels
    text = Path("/proc/pressure/memory").read_text()
    assert text.startswith("some avg10=")


def test_container_figures_agree_with_its_cgroup(
    runtime: LxcRuntime, workload: WorkloadFactory, tmp_path: Path
) -> None:
    name = workload(memory_mib=128)
    idle = workload(start=False)
    sample = {c.name: c for c in Monitor(runtime, ImageStore(tmp_path)).sample().containers}
    running = sample[name]
    assert running.state is ContainerState.RUNNING
    # The kernel's files for the container's memory cgroup, read directly.
    memory_dir = Path(f"/sys/fs/cgroup/memory/lxc.payload.{name}")
    unified = Path(f"/sys/fs/cgroup/lxc.payload.{name}")
    if memory_dir.is_dir():
        usage = int((memory_dir / "memory.usage_in_bytes").read_text())
        stat = cgroups.parse_flat_keyed((memory_dir / "memory.stat").read_text())
        anon, inactive_file = stat["total_rss"], stat["total_inactive_file"]
        pressure_file = Path(f"/sys/fs/cgroup/unified/lxc.payload.{name}/memory.pressure")
    else:
        usage = int((unified / "memory.current").read_text())
        stat = cgroups.parse_flat_keyed((unified / "memory.stat").read_text())
        anon, inactive_file = stat["anon"], stat["inactive_file"]
        pressure_file = unified / "memory.pressure"
    assert abs(running.usage_bytes - usage) < 4 * MIB
    assert abs(running.anon_bytes - anon) < 4 * MIB
    assert running.anon_bytes >= 128 * MIB  # the workload's pattern
    assert abs(running.working_set_bytes - (usage - inactive_file)) < 4 * MIB
    assert running.limit_bytes is None
    assert running.pressure is not None and pressure_file.exists()
    assert sample[idle].state is ContainerState.STOPPED and sample[idle].usage_bytes == 0


class _CountingRuntime(LxcRuntime):
    """The real runtime, counting the state queries it answers per container."""

    def __init__(self, lxc_path: Path) -> None:
        super().__init__(lxc_path)
        self.asked: dict[str, int] = {}

    def state_and_pid(self, name: str) -> tuple[ContainerState, int | None]:
        self.asked[name] = self.asked.get(name, 0) + 1
        return super().state_and_pid(name)


def _tick(monitor: Monitor, name: str, **options: object) -> ContainerSample:
    return {c.name: c for c in monitor.sample(detail=False, **options).containers}[name]  # type: ignore[arg-type]


def test_ticks_follow_a_container_without_asking_lxc(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tick reads a running container's cgroup through files kept open and learns
    that its init ended from a pidfd; LXC is asked again only then."""
    name = workload(memory_mib=32)
    counting = _CountingRuntime(runtime.lxc_path)
    monitor = Monitor(counting, ImageStore(tmp_path))
    fds_before = len(os.listdir("/proc/self/fd"))
    first = _tick(monitor, name)
    assert first.state is ContainerState.RUNNING and first.usage_bytes >= 32 * MIB
    assert first.pressure is not None
    asked = counting.asked[name]
    later = _tick(monitor, name, wants_pressure=lambda _: False)
    assert later.state is ContainerState.RUNNING and later.usage_bytes >= 32 * MIB
    assert later.pressure is None  # not wanted: not read
    subprocess.run(["lxc-freeze", "-P", str(runtime.lxc_path), "-n", name], check=True)
    assert _tick(monitor, name).state is ContainerState.FROZEN
    subprocess.run(["lxc-unfreeze", "-P", str(runtime.lxc_path), "-n", name], check=True)
    assert _tick(monitor, name).state is ContainerState.RUNNING
    assert counting.asked[name] == asked  # three ticks, no question to LXC

    runtime.stop(name)
    assert _tick(monitor, name).state is ContainerState.STOPPED
    runtime.start(name)
    restarted = _tick(monitor, name)  # a new init, found through LXC
    assert restarted.state is ContainerState.RUNNING and restarted.usage_bytes > 0
    assert counting.asked[name] == asked + 2
    monitor.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before

    # Beyond the watched many, a container is asked of LXC at every tick, as before.
    monkeypatch.setattr(monitor_module, "MAX_WATCHED_INITS", 0)
    unwatched = Monitor(counting, ImageStore(tmp_path))
    for _ in range(2):
        assert _tick(unwatched, name).usage_bytes > 0
    assert counting.asked[name] == asked + 4
