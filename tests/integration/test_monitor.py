"""The monitor's figures against the kernel's own files and `free -b`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from evictor import cgroups
from evictor.images import ImageStore
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerState
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
