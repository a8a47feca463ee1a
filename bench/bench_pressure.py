"""Real memory pressure: which spikes the daemon absorbs before the OOM killer acts.

Each point: low-priority workload containers (``--lows`` of ``--low-mib``), a
ballast outside any container (oom_score_adj 1000, released after the point)
leaving ``--available-gib`` available, the daemon (watermarks 10/15/5 %, a
0.5 s tick, a policy), then a protected container that fills ``spike`` GiB at
``rate`` MiB/s. Recorded: whether the OOM killer fired (/proc/vmstat
oom_kill), how long the spike took to fill, each eviction's duration (from the
journal), and how long the spike stalled on memory (its cgroup's PSI ``some``
total, over the spike). A point is run with every policy in turn, reactive
first; everything is put back between points.

    .venv/bin/python -m bench.bench_pressure --spikes-gib 4 5 --rates 256 512 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from bench.fleet import BENCH_ROOT
from evictor import cgroups
from evictor.journal import EventKind, Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.tools import testbed
from evictor.tools.pressure import Ballast, available_bytes, oom_kills, wait_for

MIB = 1 << 20
GIB = 1 << 30
SPIKE = "evb-spike"
POLICIES = {"reactive": {"predictive": False}, "predictive": {"predictive": True}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Point:
    policy: str
    spike_gib: float
    rate_mib_per_second: int
    oom_kill: bool
    fill_seconds: float | None  # None: it never filled (killed)
    evictions: int
    eviction_seconds: tuple[float, ...]
    stall_seconds: float  # the spike's cgroup PSI some, over the spike


def write_config(path: Path, lxc_path: Path, state: Path, policy: Mapping[str, object]) -> None:
    path.write_text(
        f'lxc_path = "{lxc_path}"\nstate_dir = "{state}"\ninterval_seconds = 0.5\n'
        '[triggers]\nlow_watermark = "10%"\nhigh_watermark = "15%"\n'
        'critical_watermark = "5%"\nmin_reclaim = "128MiB"\nimportant_psi_some_avg10 = "off"\n'
        f"predictive = {str(policy['predictive']).lower()}\n"
        "[restore]\nstable_seconds = 3600\n"
        f'[[priorities.rules]]\nmatch = "{SPIKE}"\npriority = 100\nprotect = true\n'
        f"[metrics]\nenabled = false\n"
    )


def spike_stall_seconds(runtime: LxcRuntime) -> float:
    cgroup = runtime.memory_cgroup(SPIKE)
    if cgroup is None or cgroup.unified_path is None:
        return 0.0
    text = cgroups.read_text(cgroup.unified_path / "memory.pressure")
    return int(text.split("total=")[1].split()[0]) / 1e6


def run_point(
    runtime: LxcRuntime,
    work: Path,
    policy: str,
    *,
    lows: int,
    low_mib: int,
    available_gib: float,
    spike_gib: float,
    rate: int,
) -> Point:
    for name in runtime.names():
        runtime.destroy(name)
    names = [f"evb-low-{i}" for i in range(lows)]
    for i, name in enumerate(names):
        testbed.create_workload_container(runtime, name, memory_mib=low_mib, seed=i + 1)
        runtime.start(name)
    for name in names:
        testbed.wait_for_counter(runtime, name, above=0)
    testbed.create_workload_container(
        runtime, SPIKE, memory_mib=int(spike_gib * 1024), fill_rate_mib_per_second=rate
    )
    state = work / f"state-{policy}-{spike_gib}-{rate}"
    shutil.rmtree(state, ignore_errors=True)
    config = work / "evictor.toml"
    write_config(config, runtime.lxc_path, state, POLICIES[policy])
    log = open(work / f"daemon-{policy}-{spike_gib}-{rate}.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen(
        [sys.executable, "-m", "evictor.cli", "-c", str(config), "run"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(2)
        with Ballast(leave_bytes=int(available_gib * GIB)) as ballast:
            kills = oom_kills()
            started = time.monotonic()
            runtime.start(SPIKE)
            stall_before = spike_stall_seconds(runtime)
            filled = wait_for(
                lambda: testbed.read_status(runtime, SPIKE) is not None or not ballast.alive,
                timeout_seconds=spike_gib * 1024 / rate + 60,
            )
            fill_seconds = time.monotonic() - started if filled and ballast.alive else None
            stall = spike_stall_seconds(runtime) - stall_before
            oom = oom_kills() > kills
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()
        log.close()
    journal = Journal(state / "journal.db")
    done = [e for e in journal.events() if e.kind is EventKind.EVICTED]
    journal.close()
    shutil.rmtree(state)  # its images: gigabytes a point
    return Point(
        policy=policy,
        spike_gib=spike_gib,
        rate_mib_per_second=rate,
        oom_kill=oom,
        fill_seconds=fill_seconds,
        evictions=len(done),
        eviction_seconds=tuple(e.duration_seconds or 0.0 for e in done),
        stall_seconds=stall,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lows", type=int, default=4)
    parser.add_argument("--low-mib", type=int, default=1024)
    parser.add_argument("--available-gib", type=float, default=3.0)
    parser.add_argument("--spikes-gib", type=float, nargs="+", default=[4.0, 5.0])
    parser.add_argument("--rates", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    runtime = LxcRuntime(BENCH_ROOT / "pressure" / "lxc")
    work = BENCH_ROOT / "pressure"
    runtime.lxc_path.mkdir(parents=True, exist_ok=True)
    print(
        f"host: {available_bytes() / GIB:.1f} GiB available before the ballast;"
        f" {args.lows} x {args.low_mib} MiB low-priority containers;"
        f" {args.available_gib:g} GiB left available by the ballast"
    )
    print("| spike | rate | policy | OOM kill | filled in | evictions (s) | spike stalled |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    try:
        for spike in args.spikes_gib:
            for rate in args.rates:
                for _ in range(args.runs):
                    for policy in args.policies:
                        point = run_point(
                            runtime,
                            work,
                            policy,
                            lows=args.lows,
                            low_mib=args.low_mib,
                            available_gib=args.available_gib,
                            spike_gib=spike,
                            rate=rate,
                        )
                        durations = ", ".join(f"{s:.1f}" for s in point.eviction_seconds)
                        filled = (
                            f"{point.fill_seconds:.1f} s" if point.fill_seconds is not None else "-"
                        )
                        median = (
                            f" (median {statistics.median(point.eviction_seconds):.1f})"
                            if point.eviction_seconds
                            else ""
                        )
                        print(
                            f"| {spike:g} GiB | {rate} MiB/s | {policy} |"
                            f" {'**yes**' if point.oom_kill else 'no'} | {filled} |"
                            f" {point.evictions}: {durations}{median} |"
                            f" {point.stall_seconds:.2f} s |",
                            flush=True,
                        )
    finally:
        for name in runtime.names():
            runtime.destroy(name)


if __name__ == "__main__":
    main()
