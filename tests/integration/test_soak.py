"""Many evict/restore cycles of one container in one daemon: nothing grows.

The daemon's budget is toggled by SIGHUP (a config reload) between one the
container does not fit and one it does, so that each cycle is a real eviction
and a real restore by the daemon's own loop. Its RSS, open descriptors and
threads, the journal's size and the files under the state directory and evictor's temporary ones
are read after a warm-up and again at the end. ``EVICTOR_SOAK_CYCLES`` sets the
count (CI: 40; docs/reliability.md records 200).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from evictor.images import ImageStore
from evictor.journal import EventKind, Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.tools import testbed

from .conftest import MIB, DaemonProcess, WorkloadFactory, free_port, wait_until, write_config

CYCLES = int(os.environ.get("EVICTOR_SOAK_CYCLES", "40"))
WARM_UP_CYCLES = 5


def leftovers(state: Path) -> set[str]:
    """Files under the state directory (the CRIU configs among them), once the images
    set aside by the last restores are deleted (in the background)."""
    wait_until(
        lambda: not ImageStore(state / "images").set_aside_paths(),
        "the restored images' removal",
    )
    return {str(p) for p in state.rglob("*")}


def test_many_cycles_in_one_daemon_leak_nothing(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    daemon: Callable[[Path], DaemonProcess],
    tmp_path: Path,
) -> None:
    name = workload(memory_mib=32)
    before = testbed.wait_for_counter(runtime, name, above=0)
    state, port = tmp_path / "state", free_port()

    def configure(budget: str) -> Path:
        return write_config(
            tmp_path / "evictor.toml",
            runtime.lxc_path,
            state,
            port,
            interval_seconds=0.2,
            triggers={"budget": budget},
        )

    running = daemon(configure("4GiB"))
    running.wait_for_log("running: a tick every")
    assert running.process is not None
    process = psutil.Process(running.process.pid)

    def cycle(number: int) -> None:
        for budget, done in (("8MiB", "checkpoint: evicted"), ("4GiB", "restore: restored")):
            configure(budget)
            process.send_signal(signal.SIGHUP)
            line = f"evictor.{done} {name}"
            wait_until(lambda: running.log().count(line) >= number, line)  # noqa: B023

    def reading() -> dict[str, object]:
        # After a few ticks, so that the monitor watches the restored container
        # (its init's pidfd and two cgroup files) at both readings.
        time.sleep(1.0)
        return {
            "rss_mib": process.memory_info().rss / MIB,
            "fds": process.num_fds(),
            "threads": process.num_threads(),
            "journal_kib": sum(p.stat().st_size for p in state.glob("journal.db*")) / 1024,
            "files": leftovers(state),
        }

    for number in range(1, WARM_UP_CYCLES + 1):
        cycle(number)
    start, started = reading(), time.monotonic()
    for number in range(WARM_UP_CYCLES + 1, CYCLES + 1):
        cycle(number)
    end, seconds = reading(), time.monotonic() - started
    print(
        f"\n{CYCLES - WARM_UP_CYCLES} cycles in {seconds:.0f} s after {WARM_UP_CYCLES} to warm up:"
        + "".join(f"\n  {key}: {start[key]} -> {end[key]}" for key in start if key != "files")
    )
    assert running.stop() == 0
    journal = Journal(state / "journal.db")
    kinds = [e.kind for e in journal.events(container=name)]
    journal.close()
    assert kinds.count(EventKind.EVICTED) == kinds.count(EventKind.RESTORED) == CYCLES
    assert EventKind.EVICT_FAILED not in kinds and EventKind.RESTORE_FAILED not in kinds
    assert end["fds"] == start["fds"] and end["threads"] == start["threads"]
    assert isinstance(end["rss_mib"], float) and isinstance(start["rss_mib"], float)
    assert end["rss_mib"] - start["rss_mib"] < 4, (start["rss_mib"], end["rss_mib"])
    assert end["files"] == start["files"], end["files"] ^ start["files"]  # type: ignore[operator]
    testbed.wait_alive(runtime, name, original=before)
