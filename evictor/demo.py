"""``evictor demo``: evict a built-in container to disk and bring it back.

Everything lives under STATE_DIR/demo (its own LXC path and image store), so the
demo never touches the operator's containers or images.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from evictor import checkpoint, restore, testbed
from evictor.config import Config
from evictor.engine import Engine
from evictor.monitor import read_meminfo
from evictor.units import format_bytes

DEMO_CONTAINER = "evictor-demo"


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run(*, state_dir: Path, memory_mib: int) -> int:
    demo_dir = state_dir / "demo"
    engine = Engine(Config(lxc_path=demo_dir / "lxc", state_dir=demo_dir))
    runtime, store = engine.runtime, engine.store
    if runtime.exists(DEMO_CONTAINER):
        runtime.destroy(DEMO_CONTAINER)  # left behind by an interrupted demo
    shutil.rmtree(demo_dir, ignore_errors=True)
    runtime.lxc_path.mkdir(parents=True, mode=0o700)
    try:
        _say(
            f"creating container {DEMO_CONTAINER}: its init runs a workload holding"
            f" {memory_mib} MiB of patterned memory and counting once a second"
        )
        testbed.create_workload_container(runtime, DEMO_CONTAINER, memory_mib=memory_mib)
        runtime.start(DEMO_CONTAINER)
        before = testbed.wait_for_counter(runtime, DEMO_CONTAINER, above=2)
        usage = runtime.memory_usage_bytes(DEMO_CONTAINER) or 0
        _say(
            f"running: cgroup memory {format_bytes(usage)}, counter {before.counter},"
            f" process incarnation {before.incarnation}"
        )

        meminfo_before = read_meminfo()
        eviction = checkpoint.evict(runtime, store, engine.journal, DEMO_CONTAINER, reason="demo")
        meminfo_after = read_meminfo()
        frozen_at = testbed.read_status(runtime, DEMO_CONTAINER) or before
        _say(
            f"evicted in {eviction.duration_seconds:.2f} s: state"
            f" {runtime.state(DEMO_CONTAINER).value}, image"
            f" {format_bytes(eviction.manifest.image_bytes)} in {store.path(DEMO_CONTAINER)}"
            f" (0700), CRIU froze it for"
            f" {eviction.manifest.dump_stats.frozen_time_us / 1e6:.2f} s"
        )
        _say(
            f"host MemFree {format_bytes(meminfo_after['MemFree'] - meminfo_before['MemFree'])}"
            f" more, page cache"
            f" {format_bytes(meminfo_after['Cached'] - meminfo_before['Cached'])} more:"
            " the memory is free, not parked in the page cache"
        )
        time.sleep(3)
        _say(f"3 s later its counter is still {frozen_at.counter}: nothing runs")

        restoration = restore.restore(runtime, store, engine.journal, DEMO_CONTAINER)
        after = testbed.wait_for_counter(runtime, DEMO_CONTAINER, above=frozen_at.counter)
        continued = after.incarnation == before.incarnation
        _say(
            f"restored in {restoration.duration_seconds:.2f} s: state"
            f" {runtime.state(DEMO_CONTAINER).value}, counter {after.counter}"
            f" ({'same process, continued' if continued else 'RESTARTED'}),"
            f" memory pattern errors {after.errors}, image removed:"
            f" {not store.path(DEMO_CONTAINER).exists()}"
        )
        return 0 if continued and after.errors == 0 else 1
    finally:
        if runtime.exists(DEMO_CONTAINER):
            runtime.destroy(DEMO_CONTAINER)
        shutil.rmtree(demo_dir, ignore_errors=True)
        _say("demo container removed")
