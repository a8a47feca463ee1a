"""Read host memory figures from procfs (the root is an argument, for fixtures)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_PROC_ROOT = Path("/proc")


def parse_meminfo(text: str) -> dict[str, int]:
    """Parse /proc/meminfo into {field: bytes} (the kernel reports kB = KiB)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        value = int(parts[0])
        fields[key.strip()] = value * 1024 if len(parts) > 1 and parts[1] == "kB" else value
    return fields


def read_meminfo(proc_root: Path = DEFAULT_PROC_ROOT) -> dict[str, int]:
    return parse_meminfo((proc_root / "meminfo").read_text())
