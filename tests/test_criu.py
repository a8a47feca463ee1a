from __future__ import annotations

import struct
from pathlib import Path

import pytest

from evictor import criu


def test_log_errors_keeps_the_reason_and_drops_noise(fixtures: Path) -> None:
    text = (fixtures / "criu/dump-failed-tty.log").read_text()
    assert criu.log_errors(text) == (
        "Error (criu/tty.c:410): tty: Found slave peer index 0 without correspond master peer",
    )


def test_log_errors_of_a_successful_restore_is_empty(fixtures: Path) -> None:
    assert criu.log_errors((fixtures / "criu/restore-ok.log").read_text()) == ()


def test_log_errors_keeps_the_last_lines() -> None:
    text = "\n".join(f"Error (x.c:{n}): reason {n}" for n in range(5)) + "\nWarn (y): w\n"
    assert criu.log_errors(text, most=2) == ("Error (x.c:3): reason 3", "Error (x.c:4): reason 4")


def test_dump_stats_from_a_real_dump(fixtures: Path) -> None:
    stats = criu.parse_dump_stats((fixtures / "criu/stats-dump").read_bytes())
    assert stats == criu.DumpStats(
        freezing_time_us=806,
        frozen_time_us=344256,
        memdump_time_us=168288,
        memwrite_time_us=161449,
        pages_scanned=16430,
        pages_written=16416,
    )


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x00" * 12, struct.pack("<III", 0x55105940, 0x57093306, 4) + b"\x0a\x02\x08"],
    ids=["empty", "wrong-magic", "truncated"],
)
def test_malformed_stats_are_rejected(raw: bytes) -> None:
    with pytest.raises(criu.StatsFormatError):
        criu.parse_dump_stats(raw)


def test_restore_stats_are_not_dump_stats(fixtures: Path) -> None:
    with pytest.raises(criu.StatsFormatError, match="missing"):
        criu.parse_dump_stats((fixtures / "criu/stats-restore").read_bytes())
