from __future__ import annotations

import subprocess
from pathlib import Path

from evictor.monitor import (
    parse_meminfo,
    parse_zoneinfo_per_cpu_pages,
    read_meminfo,
    read_per_cpu_free_bytes,
)

MEMINFO = """MemTotal:       24570452 kB
MemFree:        23862140 kB
MemAvailable:   24014076 kB
Cached:           337604 kB
HugePages_Total:       0
"""


def test_parse_meminfo_converts_kib_to_bytes() -> None:
    fields = parse_meminfo(MEMINFO)
    assert fields["MemTotal"] == 24570452 * 1024
    assert fields["Cached"] == 337604 * 1024
    assert fields["HugePages_Total"] == 0


def test_read_meminfo_agrees_with_free() -> None:
    """MemTotal as `free -b` reports it (it reads the same file)."""
    total = int(
        subprocess.run(["free", "-b"], capture_output=True, text=True, check=True)
        .stdout.splitlines()[1]
        .split()[1]
    )
    assert read_meminfo()["MemTotal"] == total


# The shape of /proc/zoneinfo on kernel 6.18 (abridged): one pageset per CPU per zone.
ZONEINFO = """Node 0, zone      DMA
  per-node stats
      nr_inactive_anon 2040
  pages free     3840
        nr_free_pages 3840
  pagesets
    cpu: 0
              count:    0
              high:     0
              batch:    1
  vm stats threshold: 8
Node 0, zone   Normal
  pages free     5826304
  pagesets
    cpu: 0
              count:    103256
              high:     103598
              batch:    63
    cpu: 1
              count:    22106
              high:     28982
              batch:    63
"""


def test_per_cpu_free_pages_are_the_pagesets_counts() -> None:
    assert parse_zoneinfo_per_cpu_pages(ZONEINFO) == 103256 + 22106


def test_per_cpu_free_bytes_without_zoneinfo_is_zero(tmp_path: Path) -> None:
    assert read_per_cpu_free_bytes(tmp_path) == 0


def test_per_cpu_free_bytes_read_from_the_kernel() -> None:
    pages = parse_zoneinfo_per_cpu_pages(Path("/proc/zoneinfo").read_text())
    assert read_per_cpu_free_bytes() % 4096 == 0
    assert abs(read_per_cpu_free_bytes() - pages * 4096) < 64 << 20  # moves between reads
