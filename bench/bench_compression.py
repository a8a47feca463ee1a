"""Would compressing images (zstd) pay? Real CRIU page images, raw against zstd.

For incompressible and compressible memory (memhog's two patterns), one
container is dumped with ``lxc-checkpoint -s``; then, on its largest page image
(the memory contents) and on the same filesystem:
  - raw, what evictor does today: flush and drop it (eviction), read it back
    from disk (what a restore reads);
  - ``zstd -T2`` at a few levels: compress it from the page cache, flush and drop
    the output (eviction), decompress it from disk (what a restore would add).
Compression wins an eviction when the disk writes slower than zstd compresses
(the break-even write rate below), and always costs the restore a decompression.

    .venv/bin/python -m bench.bench_compression [--size-mib 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
from pathlib import Path

from bench.fleet import BENCH_ROOT, fleet, flush_and_drop, timed
from evictor.tools import testbed

# zstd's fastest useful settings: "--fast=1" is level -1.
LEVELS = ("--fast=1", "-1", "-3")


def read_back(path: Path) -> None:
    with open(path, "rb", buffering=0) as image_file:
        while image_file.read(1 << 20):
            pass


def zstd(*args: str) -> None:
    subprocess.run(["zstd", "-q", "-f", *args], check=True)


def one_kind(size_mib: int, runs: int, *, compressible: bool) -> list[str]:
    kind = "compressible" if compressible else "incompressible"
    rows: dict[str, list[float]] = {}
    with fleet(0) as runtime:
        name = f"evbz-{kind[:3]}"
        testbed.create_workload_container(
            runtime, name, memory_mib=size_mib, compressible=compressible
        )
        for _ in range(runs):
            # A fresh memhog each round: its first status line comes once its memory is full.
            (runtime.lxc_path / name / "rootfs" / testbed.STATUS_PATH).unlink(missing_ok=True)
            runtime.start(name)
            testbed.wait_for_counter(runtime, name, above=0)
            image_dir = BENCH_ROOT / "image"
            image_dir.mkdir(mode=0o700)
            rows.setdefault("dump_s", []).append(timed(runtime.checkpoint, name, image_dir))
            pages = max(image_dir.glob("pages-*.img"), key=lambda p: p.stat().st_size)
            raw_bytes = pages.stat().st_size
            rows.setdefault("raw_mb", []).append(raw_bytes / 1e6)
            rows.setdefault("raw_evict_s", []).append(timed(flush_and_drop, pages))
            rows.setdefault("raw_restore_s", []).append(timed(read_back, pages))
            compressed = image_dir / "pages.zst"
            out = image_dir / "pages.out"
            for level in LEVELS:
                read_back(pages)  # in the page cache, as right after the dump
                seconds = timed(zstd, level, "-T2", str(pages), "-o", str(compressed))
                seconds += timed(flush_and_drop, compressed)
                rows.setdefault(f"z{level}_evict_s", []).append(seconds)
                rows.setdefault(f"z{level}_ratio", []).append(raw_bytes / compressed.stat().st_size)
                rows.setdefault(f"z{level}_restore_s", []).append(
                    timed(zstd, "-d", str(compressed), "-o", str(out))
                )
                out.unlink()
                compressed.unlink()
            for path in image_dir.iterdir():
                path.unlink()
            image_dir.rmdir()
    m = {key: statistics.median(values) for key, values in rows.items()}
    lines = [
        f"| {kind} | raw | 1.00 | {m['raw_evict_s']:.2f} s (flush + drop;"
        f" {m['raw_mb'] / m['raw_evict_s']:.0f} MB/s) | {m['raw_restore_s']:.2f} s (read) | - |"
    ]
    for level in LEVELS:
        evict, restore = m[f"z{level}_evict_s"], m[f"z{level}_restore_s"]
        lines.append(
            f"| {kind} | zstd {level} -T2 | {m[f'z{level}_ratio']:.2f} | {evict:.2f} s"
            f" ({evict / m['raw_evict_s']:.2f}x raw) | {restore:.2f} s"
            f" ({restore / m['raw_restore_s']:.2f}x raw) | {m['raw_mb'] / evict:.0f} MB/s |"
        )
    lines.append(f"| {kind} | (the dump itself, for scale) | - | {m['dump_s']:.2f} s | - | - |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(
        f"| memory ({args.size_mib} MiB) | how | size ratio | eviction: seal the page image |"
        " restore: get it back | break-even disk write rate |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for compressible in (False, True):
        for line in one_kind(args.size_mib, args.runs, compressible=compressible):
            print(line, flush=True)


if __name__ == "__main__":
    main()
