"""Load: oscillating pressure for a minute, and 50 real containers under a budget."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from evictor.config import AntiThrash
from evictor.journal import EventKind, Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerState

from .conftest import DaemonProcess, WorkloadFactory, free_port, scrape, write_config

OSCILLATION_SECONDS = 120.0
TOGGLE_SECONDS = 3.0
POLICY = AntiThrash(
    cooldown_seconds=4, backoff_factor=2, window_seconds=300, max_cooldown_seconds=60
)


def most_evictions(policy: AntiThrash, duration_seconds: float) -> int:
    """The most evictions of one container the anti-thrash policy allows in a period:
    the first at once, each later one only after a cooldown that doubles."""
    count, elapsed = 1, 0.0
    while True:
        elapsed += min(
            policy.cooldown_seconds * policy.backoff_factor ** (count - 1),
            policy.max_cooldown_seconds,
        )
        if elapsed > duration_seconds:
            return count
        count += 1


def test_oscillating_load_stays_within_the_anti_thrash_bounds(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    daemon: Callable[[Path], DaemonProcess],
    tmp_path: Path,
) -> None:
    victim, anchor = workload(memory_mib=32), workload(memory_mib=32)
    spike = workload(memory_mib=48, start=False)
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        state,
        free_port(),
        triggers={"budget": "100MiB"},
        restore={"stable_seconds": 1},
        antithrash={
            "cooldown_seconds": POLICY.cooldown_seconds,
            "backoff_factor": POLICY.backoff_factor,
            "window_seconds": POLICY.window_seconds,
            "max_cooldown_seconds": POLICY.max_cooldown_seconds,
        },
        priorities={
            "rules": [
                {"match": anchor, "priority": 10},
                {"match": spike, "priority": 50, "protect": True},
            ]
        },
        metrics={"enabled": False},
    )
    running = daemon(config)
    running.wait_for_log("running: a tick every")
    started = time.monotonic()
    while time.monotonic() - started < OSCILLATION_SECONDS:
        if runtime.state(spike) is ContainerState.RUNNING:
            runtime.stop(spike)
        else:
            runtime.start(spike)
        time.sleep(TOGGLE_SECONDS)
    assert running.stop() == 0
    evictions: dict[str, int] = {}
    restores = 0
    for event in Journal(state / "journal.db").events():
        if event.kind is EventKind.EVICTED:
            evictions[event.container] = evictions.get(event.container, 0) + 1
        restores += event.kind is EventKind.RESTORED
    bound = most_evictions(POLICY, OSCILLATION_SECONDS)
    print(
        f"\nevictions in {OSCILLATION_SECONDS:.0f} s of pressure toggling every"
        f" {TOGGLE_SECONDS:g} s: {evictions} (anti-thrash bound per container: {bound})"
    )
    # The load made evictor work both ways: evicted, restored, and evicted again.
    assert restores >= 1 and max(evictions.values(), default=0) >= 2, (evictions, restores)
    assert spike not in evictions and set(evictions) <= {victim, anchor}
    assert all(count <= bound for count in evictions.values()), evictions


def test_fifty_containers_under_a_budget(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    daemon: Callable[[Path], DaemonProcess],
    tmp_path: Path,
) -> None:
    names = [workload(memory_mib=4) for _ in range(50)]
    used = sum(runtime.memory_usage_bytes(n) or 0 for n in names)
    budget = int(used * 0.8)  # a fifth must go
    port = free_port()
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        tmp_path / "state",
        port,
        triggers={"budget": budget},
        interval_seconds=1.0,
    )
    running = daemon(config)
    deadline = time.monotonic() + 180
    while sum(runtime.state(n) is ContainerState.STOPPED for n in names) < 8:
        assert time.monotonic() < deadline, running.log()
        time.sleep(0.5)

    def tick_totals() -> tuple[float, float]:
        metrics = scrape(port)
        return (
            metrics[("evictor_tick_duration_seconds_sum", ())],
            metrics[("evictor_tick_duration_seconds_count", ())],
        )

    time.sleep(3)  # let the evictions settle, then measure quiet ticks
    sum_before, count_before = tick_totals()
    time.sleep(10)
    sum_after, count_after = tick_totals()
    ticks = count_after - count_before
    mean_seconds = (sum_after - sum_before) / ticks
    evicted = sum(runtime.state(n) is ContainerState.STOPPED for n in names)
    print(
        f"\n50 containers, {evicted} evicted under a {budget >> 20} MiB budget:"
        f" {ticks:.0f} ticks in 10 s, mean tick {mean_seconds * 1000:.1f} ms"
    )
    assert ticks >= 8  # the daemon keeps up with its 1 s interval
    assert mean_seconds < 0.5
    assert running.stop() == 0
