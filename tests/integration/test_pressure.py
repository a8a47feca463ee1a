"""Real memory pressure, end to end: each trigger fires for real, and the daemon
evicts before the OOM killer has to act.

A ballast outside any container (evictor.tools.pressure: bounded, oom_score_adj
1000, always released) takes most of the host's memory; low-priority workload
containers hold some of the rest; then a protected container needs more than is
left. Without the daemon the OOM killer fires (so the scenario is real); with
it, the lowest-ranked containers are evicted, the OOM killer never fires, and
once the ballast is gone they come back with their memory intact.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from evictor.journal import EventKind, Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerState
from evictor.tools import testbed
from evictor.tools.pressure import Ballast, oom_kills, wait_for

from .conftest import GIB, MIB, DaemonProcess, WorkloadFactory, free_port, wait_until, write_config


def spike_filled(runtime: LxcRuntime, name: str) -> bool:
    """memhog writes its first status once its memory is filled."""
    return testbed.read_status(runtime, name) is not None


# The PSI tests: watermarks far below what MemAvailable falls to, so that only PSI fires.
PSI_SCENARIO_TRIGGERS: dict[str, object] = {
    "low_watermark": "1%",
    "high_watermark": "2%",
    "critical_watermark": "0.5%",
    "min_reclaim": "256MiB",
    "predictive": False,
}


def add_page_cache_readers(runtime: LxcRuntime, name: str, *, file_bytes: int, count: int) -> None:
    """Make ``name`` (not started) read a file larger than the page cache left, over
    and over, with ``count`` readers: it stalls on memory (refaults, reclaim), which
    its PSI and the host's show."""
    rootfs = runtime.lxc_path / name / "rootfs"
    subprocess.run(["fallocate", "-l", str(file_bytes), str(rootfs / "big")], check=True)
    with open(rootfs / "etc/inittab", "a") as inittab:
        for _ in range(count):
            inittab.write("::respawn:/bin/sh -c 'cat /big > /dev/null'\n")


def evicted(state: Path, name: str) -> bool:
    journal = Journal(state / "journal.db")
    try:
        return any(e.kind is EventKind.EVICTED for e in journal.events(container=name))
    finally:
        journal.close()


def test_without_the_daemon_a_spike_meets_the_oom_killer(
    runtime: LxcRuntime, workload: WorkloadFactory
) -> None:
    """The scenario of the next test, with nobody acting: the proof that it is real."""
    lows = [workload(memory_mib=1024) for _ in range(2)]
    spike = workload(memory_mib=4096, start=False, fill_rate_mib_per_second=256)
    with Ballast(leave_bytes=3 * GIB) as ballast:
        kills = oom_kills()
        runtime.start(spike)
        assert wait_for(lambda: oom_kills() > kills, timeout_seconds=60)
        # Its oom_score_adj made the ballast the one, and only it.
        assert wait_for(lambda: ballast.killed_by_the_oom_killer, timeout_seconds=10)
        assert wait_for(lambda: spike_filled(runtime, spike), timeout_seconds=30)
        assert oom_kills() == kills + 1
    assert all(runtime.state(n) is ContainerState.RUNNING for n in lows)


@pytest.mark.parametrize(
    ("predictive", "fired"),
    [(False, "below the low watermark"), (True, "falls at")],
    ids=["low-watermark", "predicted"],
)
def test_a_spike_is_met_before_the_oom_killer_and_restores_follow(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    daemon: Callable[[Path], DaemonProcess],
    tmp_path: Path,
    predictive: bool,
    fired: str,
) -> None:
    """A 4 GiB spike at 256 MiB/s where 3 GiB are left; two 1 GiB containers may go.
    The low watermark fires as MemAvailable crosses it; the predictive trigger
    before, as soon as its fall would cross it sooner than evictions take. The
    restore waits for the default stable_seconds (30 s)."""
    lows = [workload(memory_mib=1024) for _ in range(2)]
    before = {n: testbed.wait_for_counter(runtime, n, above=0) for n in lows}
    spike = workload(memory_mib=4096, start=False, fill_rate_mib_per_second=256)
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        state,
        free_port(),
        triggers={
            "low_watermark": "10%",
            "high_watermark": "15%",
            "critical_watermark": "5%",
            "min_reclaim": "128MiB",
            "predictive": predictive,
        },
        restore={"stable_seconds": 30},
        priorities={"rules": [{"match": spike, "priority": 100, "protect": True}]},
    )
    running = daemon(config)
    running.wait_for_log("running: a tick every")
    with Ballast(leave_bytes=3 * GIB) as ballast:
        kills = oom_kills()
        runtime.start(spike)
        assert wait_for(lambda: spike_filled(runtime, spike), timeout_seconds=90), running.log()
        assert oom_kills() == kills and ballast.alive
        gone = [n for n in lows if evicted(state, n)]
        assert gone, running.log()  # at least 1 GiB had to go for the spike to fit
        assert not evicted(state, spike)
        first = next(line for line in running.log().splitlines() if "evicted" in line)
        assert fired in first, first
        runtime.stop(spike)
    pressure_ended = time.monotonic()
    wait_until(
        lambda: all(runtime.state(n) is ContainerState.RUNNING for n in gone),
        "the evicted containers restored",
        timeout_seconds=120,
    )
    assert time.monotonic() - pressure_ended >= 30  # the default stable_seconds held
    for name, status in before.items():
        testbed.wait_alive(runtime, name, original=status)
    assert running.stop() == 0


def test_host_psi_evicts_the_lowest_ranked(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    daemon: Callable[[Path], DaemonProcess],
    tmp_path: Path,
) -> None:
    """A protected container reads twice more than the page cache it has left: the
    host stalls on memory (PSI), while MemAvailable stays above the watermarks."""
    low, mid = workload(memory_mib=512), workload(memory_mib=512)
    reader = workload(memory_mib=16, start=False)
    add_page_cache_readers(runtime, reader, file_bytes=4 * GIB, count=2)
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        state,
        free_port(),
        triggers={**PSI_SCENARIO_TRIGGERS, "host_psi_some_avg10": 5},
        priorities={
            "rules": [
                {"match": mid, "priority": 10},
                {"match": reader, "priority": 50, "protect": True},
            ]
        },
    )
    with Ballast(leave_bytes=1536 * MIB) as ballast:
        kills = oom_kills()
        running = daemon(config)
        runtime.start(reader)
        running.wait_for_log(f"evicted {low}", timeout_seconds=90)
        assert "host memory PSI some avg10" in running.log()
        assert oom_kills() == kills and ballast.alive
        assert runtime.state(reader) is ContainerState.RUNNING
        runtime.stop(reader)
    wait_until(lambda: runtime.state(low) is ContainerState.RUNNING, "its restore", 120)
    assert running.stop() == 0


def test_an_important_container_s_own_psi_evicts_the_lowest_ranked(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    daemon: Callable[[Path], DaemonProcess],
    tmp_path: Path,
) -> None:
    """The reader is important (priority 100): its own cgroup's PSI fires, and it is
    never the one evicted."""
    low = workload(memory_mib=512)
    reader = workload(memory_mib=16, start=False)
    add_page_cache_readers(runtime, reader, file_bytes=4 * GIB, count=2)
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        state,
        free_port(),
        triggers={**PSI_SCENARIO_TRIGGERS, "important_psi_some_avg10": 5},
        priorities={"rules": [{"match": reader, "priority": 100}]},
    )
    with Ballast(leave_bytes=1536 * MIB) as ballast:
        kills = oom_kills()
        running = daemon(config)
        runtime.start(reader)
        running.wait_for_log(f"evicted {low}", timeout_seconds=90)
        assert f"important containers stall on memory (PSI some avg10 >= 5%): {reader}" in (
            running.log()
        )
        assert oom_kills() == kills and ballast.alive
        assert runtime.state(reader) is ContainerState.RUNNING
        runtime.stop(reader)
    wait_until(lambda: runtime.state(low) is ContainerState.RUNNING, "its restore", 120)
    assert running.stop() == 0
