"""Cost of one plan (10,000 synthetic containers), and of one monitor sample and one
whole daemon tick (sample, plan, metrics; nothing to do) with 10, 50 and 100 real
containers.

The sample is compared, in the same run, with ``lxc-ls --fancy`` (the raw tool an
operator would poll for the same containers' state and memory). The tick is also
given in CPU time: at a 1 s interval, 1 ms of CPU per tick is 0.1% of a core.

    .venv/bin/python -m bench.bench_planning
"""

from __future__ import annotations

import argparse
import random
import subprocess
import time

from bench.fleet import BENCH_ROOT, fleet, median_seconds
from evictor.config import Config, parse_config
from evictor.daemon import Daemon
from evictor.engine import Engine
from evictor.images import ImageStore
from evictor.metrics import Metrics
from evictor.model import ContainerSample, ContainerState, History, HostSample, Pressure, Priority
from evictor.monitor import Monitor
from evictor.ranking import Plan, plan

MIB = 1 << 20


def bench_sample_and_tick(count: int, runs: int) -> None:
    with fleet(count) as runtime:
        monitor = Monitor(runtime, ImageStore(runtime.lxc_path.parent / "images"))
        assert len(monitor.sample().containers) == count
        ours = median_seconds(monitor.sample, runs)
        raw = median_seconds(
            lambda: subprocess.run(
                ["lxc-ls", "-P", str(runtime.lxc_path), "--fancy", "-F", "NAME,STATE,PID,RAM"],
                capture_output=True,
                check=True,
            ),
            runs,
        )
        (BENCH_ROOT / "state").mkdir(mode=0o700)
        engine = Engine(Config(lxc_path=runtime.lxc_path, state_dir=BENCH_ROOT / "state"))
        daemon = Daemon(engine, Metrics())
        daemon.tick()
        tick = median_seconds(daemon.tick, runs)
        cpu_started = time.process_time()
        for _ in range(runs):
            daemon.tick()
        tick_cpu = (time.process_time() - cpu_started) / runs
        engine.close()
    print(
        f"| sample, {count} containers | {ours * 1000:.1f} ms | lxc-ls --fancy"
        f" {raw * 1000:.1f} ms | {ours / raw:.2f}x |"
    )
    print(
        f"| daemon tick, {count} containers | {tick * 1000:.1f} ms ({tick_cpu * 1000:.1f} ms"
        f" CPU: {tick_cpu * 100:.2f}% of a core at a 1 s interval) | - | - |"
    )


def synthetic_fleet(
    count: int,
) -> tuple[list[ContainerSample], dict[str, Priority], dict[str, History]]:
    rng = random.Random(42)
    containers = []
    for i in range(count):
        name = f"c{i:05d}"
        if rng.random() < 0.8:
            containers.append(
                ContainerSample(
                    name=name,
                    state=ContainerState.RUNNING,
                    usage_bytes=rng.randrange(1, 4096) * MIB,
                    pressure=Pressure(some_avg10=rng.random() * 20),
                )
            )
        else:
            containers.append(
                ContainerSample(
                    name=name,
                    state=ContainerState.STOPPED,
                    evicted=True,
                    evicted_usage_bytes=rng.randrange(1, 4096) * MIB,
                )
            )
    priorities = {
        c.name: Priority(value=rng.randrange(0, 200), protected=rng.random() < 0.1, source="bench")
        for c in containers
    }
    histories = {
        c.name: History(eviction_times=(1000.0,), last_restored_at=1500.0) for c in containers[::7]
    }
    return containers, priorities, histories


def bench_plan(count: int, runs: int) -> None:
    containers, priorities, histories = synthetic_fleet(count)
    host = HostSample(
        total_bytes=16 << 40,
        available_bytes=60 << 30,
        free_bytes=0,
        cached_bytes=0,
        swap_total_bytes=0,
        swap_free_bytes=0,
        pressure=None,
    )
    watermarks = {
        "critical_watermark": "32GiB",
        "low_watermark": "64GiB",
        "high_watermark": "72GiB",
    }
    scenarios = {
        "MemAvailable 4 GiB under the low watermark": parse_config({"triggers": watermarks}),
        "worst case: a budget half the fleet's usage": parse_config(
            {"triggers": {**watermarks, "budget": "8TiB"}}
        ),
    }
    for label, config in scenarios.items():

        def one(config: Config = config) -> Plan:
            return plan(
                host=host,
                containers=containers,
                priorities=priorities,
                histories=histories,
                config=config,
                now=2000.0,
                last_pressure_at=None,
            )

        evictions = len(one().evictions)
        assert evictions > 0
        print(
            f"| plan, {count} synthetic containers, {label} ({evictions} evictions) |"
            f" {median_seconds(one, runs) * 1000:.1f} ms | - | goal < 20 ms |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    print("| what | evictor (median) | raw tool (median) | ratio |")
    print("| --- | --- | --- | --- |")
    bench_plan(10_000, args.runs)
    for count in (10, 50, 100):
        bench_sample_and_tick(count, args.runs)


if __name__ == "__main__":
    main()
