"""Eviction and restore: evictor against the raw tools and the disk, side by side,
timed the same way: each side's commands by their wall time, as an operator
runs them.

For each size, on the same container and filesystem, with an ``evictor run``
daemon serving the config (one that never acts on its own), a round that is not
counted (the warm-up), then ``--runs`` rounds of:
  - ``evictor evict`` (dump, seal: fdatasync + XXH3 + drop from the page cache,
    manifest), then ``evictor restore`` (verify, restore, wait for RUNNING,
    remove the image), run by the daemon's command server; the journal gives the
    in-process figures (to RUNNING);
  - the same two commands in their own process, as without a daemon (they name
    the state directory again, so that no daemon serves them);
  - raw: ``lxc-checkpoint -s`` (the bare dump, which leaves the image in the page
    cache), then flushing and dropping the image (the fair baseline: the least the
    raw tools must do to really free the memory), then ``lxc-checkpoint -r -d``
    followed by the same wait for RUNNING evictor uses (LxcRuntime.wait_for_state).
The sides (the raw tools twice: the second is the control) take turns at going
first, each on a settled disk (``Rounds.settle``). Medians, and the ratio of
each round's pair: median and worst. ``dd`` writes as many bytes with ``conv=fdatasync`` once per
size; memory freed (free memory, MemFree plus the per-CPU free lists, and Cached,
2 s after) is read in the first round. ``--per-round`` prints each round's times too, and
the CPU time the host took from the machine during each side (steal).

    .venv/bin/python -m bench.bench_evict [--sizes-mib 16 64 256 1024 4096] [--runs 5]
        [--per-round]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil

from bench.fleet import BENCH_ROOT, fleet, flush_and_drop, start_daemon, timed
from evictor.images import ImageStore
from evictor.journal import EventKind, Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerState
from evictor.monitor import read_free_bytes, read_meminfo
from evictor.tools import testbed

MIB = 1 << 20
EVICTOR = Path(sys.executable).with_name("evictor")  # the installed command
EVICTOR_PACKAGE = Path(__file__).resolve().parent.parent / "evictor"


def dd_seconds(target: Path, megabytes: float) -> float:
    """dd writing as many bytes as the image, with fdatasync, on the same filesystem."""
    argv = [
        "dd",
        "if=/dev/zero",
        f"of={target}",
        "bs=1M",
        f"count={int(megabytes * 1e6 / MIB)}",
        "conv=fdatasync",
    ]
    seconds = timed(subprocess.run, argv, capture_output=True, check=True)
    target.unlink()
    return seconds


def command(argv: Sequence[str]) -> float:
    """Wall seconds of one command, which must succeed. Its output goes to a file: a
    restored container's monitor inherits it, and would hold a pipe open."""
    with tempfile.TemporaryFile(mode="w+") as output:
        started = time.perf_counter()
        returncode = subprocess.call(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
        seconds = time.perf_counter() - started
        if returncode != 0:
            output.seek(0)
            raise SystemExit(f"{argv[0]} failed: {output.read().strip()}")
    return seconds


def until_answers(runtime: LxcRuntime, name: str, counter: int) -> float:
    started = time.perf_counter()
    testbed.wait_for_counter(runtime, name, above=counter, timeout_seconds=60)
    return time.perf_counter() - started


def memory_now() -> tuple[int, int]:
    """(free bytes, page cache bytes)."""
    return read_free_bytes(), read_meminfo()["Cached"]


def freed_fraction(before: tuple[int, int], usage_bytes: int) -> tuple[float, float]:
    time.sleep(2)
    after = memory_now()
    return (after[0] - before[0]) / usage_bytes, (after[1] - before[1]) / usage_bytes


@contextlib.contextmanager
def serving(config: Path) -> Iterator[None]:
    """``evictor run`` on ``config``, until the block ends."""
    log_path = config.with_name("daemon.log")
    daemon = start_daemon(config, log_path)
    try:
        deadline = time.monotonic() + 60
        while "running: a tick" not in log_path.read_text():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not start: {log_path.read_text()}")
            time.sleep(0.1)
        yield
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


class Rounds:
    def __init__(self, runtime: LxcRuntime, name: str) -> None:
        self.runtime, self.name = runtime, name
        self.values: dict[str, list[float]] = {}
        self.orders: list[list[str]] = []  # each round's sides, in the order they ran
        self.config = BENCH_ROOT / "evictor.toml"
        self.state = BENCH_ROOT / "state"
        # The daemon ticks rarely and restores nothing (a restore would need a TiB
        # free): it only serves the commands.
        self.config.write_text(
            f'lxc_path = "{runtime.lxc_path}"\nstate_dir = "{self.state}"\n'
            'interval_seconds = 10\n[restore]\nmargin = "1TiB"\n'
            "[metrics]\nenabled = false\n"
        )
        self.raw_dir = BENCH_ROOT / "raw"
        self.lxc = ("-P", str(runtime.lxc_path), "-n", name)

    def settle(self) -> None:
        """Let the disk settle before a side: a restore's image, set aside, is removed
        in the background (off evictor's path to RUNNING), and whichever side came
        next would pay for that removal's I/O; then write back anything dirty."""
        store = ImageStore(self.state / "images")
        deadline = time.monotonic() + 120
        while store.set_aside_paths():
            if time.monotonic() > deadline:
                raise SystemExit(f"images set aside in {store.root} were not removed")
            time.sleep(0.05)
        os.sync()

    def run_side(self, side: Callable[..., None], *, measure_memory: bool) -> None:
        """One side, on a settled disk; the CPU time the host took from this machine
        meanwhile (steal, summed over its CPUs) is kept beside the side's times."""
        self.settle()
        stolen_before = psutil.cpu_times().steal
        side(measure_memory=measure_memory)
        self.add(f"{side.__name__}_steal_s", psutil.cpu_times().steal - stolen_before)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float:
        return statistics.median(self.values[key])

    def ratios(self, ours: str, raw: str) -> tuple[float, float]:
        """Median and worst of each round's ours/raw."""
        pairs = [a / b for a, b in zip(self.values[ours], self.values[raw], strict=True)]
        return statistics.median(pairs), max(pairs)

    def per_round(self, size_mib: int) -> list[str]:
        """Each round's times, in seconds, after the order its sides ran in."""
        return [
            f"{size_mib} MiB, round {index + 1} ({' > '.join(order)}): "
            + ", ".join(
                f"{key.removesuffix('_s')} {values[index]:.2f}"
                for key, values in self.values.items()
                if key.endswith("_s")
            )
            for index, order in enumerate(self.orders)
        ]

    def evictor(self, action: str, *, served: bool) -> float:
        own = () if served else ("--state-dir", str(self.state))  # not the daemon's
        return command([str(EVICTOR), "-c", str(self.config), *own, action, self.name])

    def last_event(self, kind: EventKind) -> float:
        journal = Journal(self.state / "journal.db")
        try:
            events = [e for e in journal.events(container=self.name) if e.kind is kind]
        finally:
            journal.close()
        return events[-1].duration_seconds or 0.0

    def served(self, *, measure_memory: bool) -> None:
        usage = self.runtime.memory_usage_bytes(self.name) or 1
        status = testbed.wait_for_counter(self.runtime, self.name, above=0)
        before = memory_now()
        self.add("evict_cli_s", self.evictor("evict", served=True))
        self.add("evict_s", self.last_event(EventKind.EVICTED))
        if measure_memory:
            free, cached = freed_fraction(before, usage)
            self.add("evict_freed", free)
            self.add("evict_cached", cached)
        frozen_counter = (testbed.read_status(self.runtime, self.name) or status).counter
        self.add("restore_cli_s", self.evictor("restore", served=True))
        self.add("restore_s", self.last_event(EventKind.RESTORED))
        self.add("restore_answer_s", until_answers(self.runtime, self.name, frozen_counter))

    def own_process(self, *, measure_memory: bool) -> None:
        testbed.wait_for_counter(self.runtime, self.name, above=0)
        self.add("evict_own_s", self.evictor("evict", served=False))
        self.add("restore_own_s", self.evictor("restore", served=False))

    def raw(self, *, measure_memory: bool, side: str = "raw") -> None:
        """The raw tools' round; ``side`` names its figures (``raw_again`` for the
        control: the raw tools measured against themselves)."""
        shutil.rmtree(self.raw_dir, ignore_errors=True)
        self.raw_dir.mkdir(mode=0o700)
        usage = self.runtime.memory_usage_bytes(self.name) or 1
        status = testbed.wait_for_counter(self.runtime, self.name, above=0)
        before = memory_now()
        bare = command(["lxc-checkpoint", *self.lxc, "-D", str(self.raw_dir), "-s"])
        if measure_memory:
            _, cached_bare = freed_fraction(before, usage)
            self.add(f"{side}_dump_cached", cached_bare)
        self.add(f"{side}_dump_s", bare)
        self.add(f"{side}_fair_s", bare + timed(flush_and_drop, self.raw_dir))
        self.add("image_mb", sum(f.stat().st_size for f in self.raw_dir.iterdir()) / 1e6)
        frozen_counter = (testbed.read_status(self.runtime, self.name) or status).counter
        started = time.perf_counter()
        command(["lxc-checkpoint", *self.lxc, "-D", str(self.raw_dir), "-r", "-d"])
        if not self.runtime.wait_for_state(self.name, ContainerState.RUNNING, 60):
            raise SystemExit(f"{self.name}: not RUNNING after lxc-checkpoint -r")
        self.add(f"{side}_restore_s", time.perf_counter() - started)
        self.add(f"{side}_restore_answer_s", until_answers(self.runtime, self.name, frozen_counter))
        shutil.rmtree(self.raw_dir)

    def raw_again(self, *, measure_memory: bool) -> None:
        self.raw(measure_memory=False, side="raw_again")


def one_size(size_mib: int, runs: int) -> tuple[list[str], list[str]]:
    """The table's rows for one size, and each round's times."""
    with fleet(1, memory_mib=size_mib, prefix=f"evb{size_mib}") as runtime:
        (name,) = runtime.names()
        rounds = Rounds(runtime, name)
        with serving(rounds.config):
            sides = [rounds.served, rounds.own_process, rounds.raw, rounds.raw_again]
            # A round first that is not counted: this machine's virtual disk reads
            # back what was just written, where nothing was read before, two to six
            # times slower, and the side that came first in the first round paid for
            # it alone (docs/benchmarks.md).
            for side in sides:
                rounds.run_side(side, measure_memory=False)
            rounds.values.clear()
            for round_ in range(runs):
                # Rotate who goes first, so none always follows another's I/O.
                turn = round_ % len(sides)
                order = sides[turn:] + sides[:turn]
                rounds.orders.append([side.__name__ for side in order])
                for side in order:
                    rounds.run_side(side, measure_memory=round_ == 0)
        dd = dd_seconds(BENCH_ROOT / "dd.bin", rounds.median("image_mb"))
    m = rounds.median
    image_mb = m("image_mb")
    evict_cli, evict_cli_worst = rounds.ratios("evict_cli_s", "raw_fair_s")
    evict_in, evict_in_worst = rounds.ratios("evict_s", "raw_fair_s")
    evict_own, evict_own_worst = rounds.ratios("evict_own_s", "raw_fair_s")
    restore_cli, restore_cli_worst = rounds.ratios("restore_cli_s", "raw_restore_s")
    restore_in, restore_in_worst = rounds.ratios("restore_s", "raw_restore_s")
    restore_own, restore_own_worst = rounds.ratios("restore_own_s", "raw_restore_s")
    evict_control, evict_control_worst = rounds.ratios("raw_again_fair_s", "raw_fair_s")
    restore_control, restore_control_worst = rounds.ratios("raw_again_restore_s", "raw_restore_s")
    rows = [
        f"| {size_mib} MiB | evict | command {m('evict_cli_s'):.2f} s (own process"
        f" {m('evict_own_s'):.2f} s), in-process"
        f" {m('evict_s'):.2f} s ({image_mb / m('evict_s'):.0f} MB/s) |"
        f" fair (lxc-checkpoint -s + flush + drop) {m('raw_fair_s'):.2f} s;"
        f" bare dump {m('raw_dump_s'):.2f} s; dd {dd:.2f} s ({image_mb / dd:.0f} MB/s) |"
        f" command {evict_cli:.2f}x fair (worst {evict_cli_worst:.2f}x), in-process"
        f" {evict_in:.2f}x (worst {evict_in_worst:.2f}x), own process {evict_own:.2f}x"
        f" (worst {evict_own_worst:.2f}x); command"
        f" {m('evict_cli_s') - m('raw_fair_s'):+.2f} s, own process"
        f" {m('evict_own_s') - m('raw_fair_s'):+.2f} s; control: raw again"
        f" {evict_control:.2f}x (worst {evict_control_worst:.2f}x) |",
        f"| {size_mib} MiB | memory freed | free memory +{m('evict_freed'):.0%} of usage,"
        f" page cache {m('evict_cached'):+.0%} | bare dump leaves page cache"
        f" {m('raw_dump_cached'):+.0%} of usage | - |",
        f"| {size_mib} MiB | restore | command {m('restore_cli_s'):.2f} s (own process"
        f" {m('restore_own_s'):.2f} s), in-process {m('restore_s'):.2f} s to RUNNING;"
        f" answers after {m('restore_answer_s'):.2f} s more | lxc-checkpoint -r -d + wait"
        f" for RUNNING {m('raw_restore_s'):.2f} s; answers after"
        f" {m('raw_restore_answer_s'):.2f} s more |"
        f" command {restore_cli:.2f}x (worst {restore_cli_worst:.2f}x), in-process"
        f" {restore_in:.2f}x (worst {restore_in_worst:.2f}x), own process"
        f" {restore_own:.2f}x (worst {restore_own_worst:.2f}x); command"
        f" {m('restore_cli_s') - m('raw_restore_s'):+.2f} s, own process"
        f" {m('restore_own_s') - m('raw_restore_s'):+.2f} s; control: raw again"
        f" {restore_control:.2f}x (worst {restore_control_worst:.2f}x) |",
    ]
    return rows, rounds.per_round(size_mib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--per-round", action="store_true", help="after the table, each round's times"
    )
    args = parser.parse_args()
    # Byte-compiled, as an installed evictor is (pip compiles it; a CLI that compiles
    # its modules at every start, under PYTHONDONTWRITEBYTECODE, is slower).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(EVICTOR_PACKAGE)], check=True)
    print(f"{args.runs} rounds a size")
    print("| size | what | evictor (median) | raw tools, same run (median) | ratio, per round |")
    print("| --- | --- | --- | --- | --- |")
    per_round: list[str] = []
    for size in args.sizes_mib:
        rows, times = one_size(size, args.runs)
        print(*rows, sep="\n", flush=True)
        per_round += times
    if args.per_round:
        print("\nEach round's times, in seconds:", *per_round, sep="\n")


if __name__ == "__main__":
    main()
