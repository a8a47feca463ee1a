from __future__ import annotations

import subprocess

from evictor.monitor import parse_meminfo, read_meminfo

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
