"""The daemon's own cost and reaction, against its goals (issue 6):

- idle RSS (goal < 60 MB) and idle CPU (goals: < 1% of a core at a 1 s interval
  with 10 real containers, < 0.5% with 100; issue 14) and no pressure, over 30 s;
- reaction: from the moment the containers' usage crosses the budget (polled
  every 10 ms from their cgroups) to the start of the dump (the journal's
  EVICTING time), goal at most the tick interval + 0.5 s; median of 5.

    .venv/bin/python -m bench.bench_daemon
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.fleet import fleet, free_port, start_daemon
from evictor.journal import Journal
from evictor.model import Managed
from evictor.tools import testbed

MIB = 1 << 20
INTERVAL_SECONDS = 1.0


def write_config(path: Path, lxc_path: Path, state: Path, budget: str) -> None:
    path.write_text(
        f'lxc_path = "{lxc_path}"\nstate_dir = "{state}"\n'
        f"interval_seconds = {INTERVAL_SECONDS}\n"
        f'[triggers]\nbudget = "{budget}"\nmin_reclaim = "1MiB"\n'
        '[restore]\nstable_seconds = 0\nmargin = "1MiB"\n'
        "[antithrash]\ncooldown_seconds = 0\n"
        f"[metrics]\nport = {free_port()}\n"
    )


def idle(count: int, work: Path) -> None:
    """The idle daemon's RSS and CPU over 30 s, with ``count`` containers."""
    with fleet(count, memory_mib=4) as runtime:
        config = work / f"idle-{count}.toml"
        write_config(config, runtime.lxc_path, work / f"idle-{count}-state", "64GiB")
        daemon = start_daemon(config, work / f"idle-{count}.log")
        time.sleep(5)
        process = psutil.Process(daemon.pid)
        cpu_before = sum(process.cpu_times()[:2])
        time.sleep(30)
        cpu_seconds = sum(process.cpu_times()[:2]) - cpu_before
        rss_mb = process.memory_info().rss / 1e6
        daemon.terminate()
        daemon.wait()
    print(
        f"| idle, {count} containers, {INTERVAL_SECONDS:g} s interval | RSS {rss_mb:.1f} MB"
        f" (goal < 60 MB) | CPU {cpu_seconds / 30 * 100:.2f}% of a core"
        f" (goal < {1 if count <= 10 else 0.5}%) |"
    )


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="evictor-bench-"))
    idle(100, work)
    idle(10, work)
    with fleet(10, memory_mib=4) as runtime:
        reactions = []
        names = runtime.names()
        for round_ in range(5):
            spike = f"evb-spike-{round_}"
            testbed.create_workload_container(runtime, spike, memory_mib=64)
            used = sum(runtime.memory_usage_bytes(n) or 0 for n in names)
            budget = used + 32 * MIB
            state = work / f"react-{round_}"
            config = work / f"react-{round_}.toml"
            write_config(config, runtime.lxc_path, state, str(budget))
            daemon = start_daemon(config, work / f"react-{round_}.log")
            time.sleep(3)
            runtime.start(spike)
            while sum(runtime.memory_usage_bytes(n) or 0 for n in (*names, spike)) <= budget:
                time.sleep(0.01)
            crossed = time.time()
            journal = Journal(state / "journal.db")
            deadline = time.monotonic() + 30
            while not any(
                m.state in (Managed.EVICTING, Managed.EVICTED) for m in journal.managed().values()
            ):
                assert time.monotonic() < deadline, (work / f"react-{round_}.log").read_text()
                time.sleep(0.01)
            started = min(m.updated_at for m in journal.managed().values())
            reactions.append(started - crossed)
            daemon.terminate()
            daemon.wait()
            for name in runtime.names():  # put everything back as it was
                if runtime.state(name).value == "STOPPED" and (state / "images" / name).exists():
                    subprocess.run(
                        [sys.executable, "-m", "evictor.cli", "-c", str(config), "restore", name],
                        check=True,
                        capture_output=True,
                    )
            runtime.destroy(spike)
        print(
            f"| reaction, budget crossed -> dump started | median"
            f" {statistics.median(reactions):.2f} s, max {max(reactions):.2f} s |"
            f" goal <= {INTERVAL_SECONDS + 0.5:.1f} s |"
        )


if __name__ == "__main__":
    main()
