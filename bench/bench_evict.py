"""Eviction and restore: evictor against the raw tools and the disk, side by side.

For each size, on the same container and filesystem, several rounds of:
  - ``evictor``: checkpoint.evict (dump, seal: fdatasync + XXH3 + drop from the
    page cache, manifest), then restore.restore (verify, restore, wait RUNNING;
    removing the image afterwards is reported apart);
  - raw: ``lxc-checkpoint -s`` (the bare dump, which leaves the image in the page
    cache), then flushing and dropping the image (the fair baseline: the least the
    raw tools must do to really free the memory), then ``lxc-checkpoint -r -d``;
  - ``dd`` writing as many bytes with ``conv=fdatasync``.
evictor and the raw tools take turns at going first.
Medians and ratios; memory freed is free memory (MemFree plus the per-CPU free
lists, monitor.py) and Cached, 2 s after the command.

    .venv/bin/python -m bench.bench_evict [--sizes-mib 256 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench.fleet import BENCH_ROOT, fleet, flush_and_drop, timed
from evictor import checkpoint, restore
from evictor.images import ImageStore
from evictor.journal import Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.monitor import read_free_bytes, read_meminfo
from evictor.tools import testbed

MIB = 1 << 20


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


def one_size(size_mib: int, runs: int) -> list[str]:
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    with fleet(1, memory_mib=size_mib, prefix=f"evb{size_mib}") as runtime:
        (name,) = runtime.names()
        store = ImageStore(BENCH_ROOT / "images")
        journal = Journal(BENCH_ROOT / "journal.db")
        raw_dir = BENCH_ROOT / "raw"

        def ours() -> None:
            usage = runtime.memory_usage_bytes(name) or 1
            status = testbed.wait_for_counter(runtime, name, above=0)
            before = memory_now()
            eviction = checkpoint.evict(runtime, store, journal, name)
            add("evict_s", eviction.duration_seconds)
            add("dump_s", eviction.manifest.dump_duration_seconds)
            add("frozen_s", eviction.manifest.dump_stats.frozen_time_us / 1e6)
            add("image_mb", eviction.manifest.image_bytes / 1e6)
            free, cached = freed_fraction(before, usage)
            add("evict_freed", free)
            add("evict_cached", cached)
            frozen_counter = (testbed.read_status(runtime, name) or status).counter
            restoration = restore.restore(runtime, store, journal, name)
            add("restore_s", restoration.duration_seconds)
            add("restore_cleanup_s", restoration.cleanup_seconds)
            add("restore_answer_s", until_answers(runtime, name, frozen_counter))

        def raw() -> None:
            shutil.rmtree(raw_dir, ignore_errors=True)
            raw_dir.mkdir(mode=0o700)
            usage = runtime.memory_usage_bytes(name) or 1
            status = testbed.wait_for_counter(runtime, name, above=0)
            before = memory_now()
            bare = timed(runtime.checkpoint, name, raw_dir)
            _, cached_bare = freed_fraction(before, usage)
            add("raw_dump_s", bare)
            add("raw_dump_cached", cached_bare)
            add("raw_fair_s", bare + timed(flush_and_drop, raw_dir))
            frozen_counter = (testbed.read_status(runtime, name) or status).counter
            add("raw_restore_s", timed(runtime.restore, name, raw_dir))
            add("raw_restore_answer_s", until_answers(runtime, name, frozen_counter))
            shutil.rmtree(raw_dir)

        for round_ in range(runs):
            # Alternate who goes first, so neither always follows dd's write.
            for side in (ours, raw) if round_ % 2 == 0 else (raw, ours):
                side()
            add("dd_s", dd_seconds(BENCH_ROOT / "dd.bin", statistics.median(rows["image_mb"])))
        journal.close()
    m = {key: statistics.median(values) for key, values in rows.items()}
    image_mb = m["image_mb"]
    return [
        f"| {size_mib} MiB | evict | {m['evict_s']:.2f} s ({image_mb / m['evict_s']:.0f} MB/s),"
        f" of which the dump {m['dump_s']:.2f} s, frozen {m['frozen_s']:.2f} s |"
        f" bare dump {m['raw_dump_s']:.2f} s; fair"
        f" (dump + flush + drop) {m['raw_fair_s']:.2f} s; dd {m['dd_s']:.2f} s"
        f" ({image_mb / m['dd_s']:.0f} MB/s) | {m['evict_s'] / m['raw_fair_s']:.2f}x fair,"
        f" {m['evict_s'] / m['raw_dump_s']:.2f}x bare; write rate"
        f" {m['dd_s'] / m['evict_s']:.2f}x dd |",
        f"| {size_mib} MiB | memory freed | free memory +{m['evict_freed']:.0%} of usage,"
        f" page cache {m['evict_cached']:+.0%} | bare dump leaves page cache"
        f" {m['raw_dump_cached']:+.0%} of usage | - |",
        f"| {size_mib} MiB | restore | {m['restore_s']:.2f} s to RUNNING, answers after"
        f" {m['restore_answer_s']:.2f} s more; then {m['restore_cleanup_s']:.2f} s removing the"
        f" image | lxc-checkpoint -r {m['raw_restore_s']:.2f} s,"
        f" answers after {m['raw_restore_answer_s']:.2f} s more |"
        f" {m['restore_s'] / m['raw_restore_s']:.2f}x |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print("| size | what | evictor (median) | raw tools, same run (median) | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for size in args.sizes_mib:
        for row in one_size(size, args.runs):
            print(row, flush=True)


if __name__ == "__main__":
    main()
