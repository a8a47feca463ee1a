"""Units: the kernel's page size; human-readable sizes and durations for the CLI."""

from __future__ import annotations

import os

# The kernel's page: the unit of /proc/zoneinfo's counts and of CRIU's page images.
PAGE_SIZE_BYTES = os.sysconf("SC_PAGE_SIZE")

_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(size_bytes: int) -> str:
    value = float(size_bytes)
    for unit in _BINARY_UNITS:
        if abs(value) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"
