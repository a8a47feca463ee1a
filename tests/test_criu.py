from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from evictor import criu
from evictor import criu as criu_module
from evictor.criu import check_criu
from evictor.errors import CriuOutputError, PreflightError


def test_log_errors_keeps_the_reason_and_drops_noise(fixtures: Path) -> None:
    text = (fixtures / "criu/dump-failed-tty.log").read_text()
    assert criu.log_errors(text) == (
        "Error (criu/tty.c:410): tty: Found slave peer index 0 without correspond master peer",
    )


def test_log_errors_of_a_successful_restore_is_empty(fixtures: Path) -> None:
    assert criu.log_errors((fixtures / "criu/restore-ok.log").read_text()) == ()


def test_log_errors_puts_the_root_cause_first() -> None:
    """CRIU's first error explains; the last is often a consequence (issue 11: a
    failed veth restore ended with "cg: cgroupd: recv req error: File exists")."""
    text = "\n".join(
        [
            "(00.004512) Warn  (criu/kerndat.c:1): something harmless",
            "(00.019870) Error (criu/libnetlink.c:54): -95 reported by netlink: Operation not"
            " supported",
            "(00.019901)      1: Error (criu/net.c:1): net: couldn't restore veth interface eth0",
            "(00.020544) Error (criu/cgroup.c:1): cg: cgroupd: recv req error: File exists",
            "(00.020600) Error (criu/cr-restore.c:1): Restoring FAILED.",
        ]
    )
    assert criu.log_errors(text, most=2) == (
        "Error (criu/libnetlink.c:54): -95 reported by netlink: Operation not supported",
        "Error (criu/net.c:1): net: couldn't restore veth interface eth0",
    )


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
    with pytest.raises(CriuOutputError):
        criu.parse_dump_stats(raw)


def test_restore_stats_are_not_dump_stats(fixtures: Path) -> None:
    with pytest.raises(CriuOutputError, match="missing"):
        criu.parse_dump_stats((fixtures / "criu/stats-restore").read_bytes())


def test_the_dumped_pids_from_a_real_dump(fixtures: Path) -> None:
    """A workload container's dump: its init (1) and memhog's two processes."""
    assert criu.parse_dumped_pids((fixtures / "criu/pstree.img").read_bytes()) == {1, 2, 3}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        struct.pack("<II", 0x55105940, 0x57093306),
        struct.pack("<III", 0x54564319, 0x50273030, 4) + b"\x08\x01",
        struct.pack("<IIH", 0x54564319, 0x50273030, 1),
        struct.pack("<III", 0x54564319, 0x50273030, 2) + b"\x10\x01",
    ],
    ids=["empty", "stats-magic", "truncated-entry", "truncated-length", "no-pid"],
)
def test_a_malformed_process_tree_is_rejected(raw: bytes) -> None:
    with pytest.raises(CriuOutputError):
        criu.parse_dumped_pids(raw)


def fake_criu(
    directory: Path, exit_status: int, *, nftables_lock: bool = True
) -> tuple[Path, Path]:
    """A stand-in ``criu`` that counts its full checks: a failing ``criu check`` cannot
    be made real. Its nftables lock is supported or not, as asked."""
    calls = directory / "calls"
    binary = directory / "criu"
    binary.write_text(
        "#!/bin/sh\n"
        f'[ "$2" = --feature ] && exit {0 if nftables_lock else 1}\n'
        f"echo run >> {calls}\necho 'Looks bad: no vdso' >&2\nexit {exit_status}\n"
    )
    binary.chmod(0o755)
    return binary, calls


def test_a_failing_criu_check_is_a_preflight_error_naming_criu_s_reason(tmp_path: Path) -> None:
    binary, _ = fake_criu(tmp_path, exit_status=1)
    with pytest.raises(PreflightError, match="'criu check' fails on this kernel: Looks bad"):
        check_criu(str(binary))
    with pytest.raises(PreflightError):  # a failure is never remembered as a pass
        check_criu(str(binary))


def test_criu_check_runs_once_per_binary(tmp_path: Path) -> None:
    binary, calls = fake_criu(tmp_path, exit_status=0)
    check_criu(str(binary))
    check_criu(str(binary))
    assert calls.read_text().count("run") == 1
    os.utime(binary, ns=(0, 0))  # replaced (upgraded) meanwhile: checked anew
    check_criu(str(binary))
    assert calls.read_text().count("run") == 2


def test_a_pass_is_remembered_on_disk_for_this_boot_and_binary(tmp_path: Path) -> None:
    binary, calls = fake_criu(tmp_path, exit_status=0)
    verdict, boot = tmp_path / ".criu-check", tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    check_criu(str(binary), verdict_file=verdict, boot_id_file=boot)
    criu_module._checked.clear()  # the next process
    check_criu(str(binary), verdict_file=verdict, boot_id_file=boot)
    assert calls.read_text().count("run") == 1
    boot.write_text("boot-2\n")  # rebooted, maybe into another kernel: checked anew
    check_criu(str(binary), verdict_file=verdict, boot_id_file=boot)
    assert calls.read_text().count("run") == 2
    (tmp_path / "other").mkdir()
    failing, _ = fake_criu(tmp_path / "other", exit_status=1)
    with pytest.raises(PreflightError):  # another binary's failure is not hidden by the file
        check_criu(str(failing), verdict_file=verdict, boot_id_file=boot)


@pytest.mark.skipif(shutil.which("nft") is None, reason="scripts/setup.sh installs nft")
@pytest.mark.parametrize("supported", [True, False])
def test_the_nftables_lock_is_chosen_where_criu_supports_it_and_remembered(
    tmp_path: Path, supported: bool
) -> None:
    binary, calls = fake_criu(tmp_path, exit_status=0, nftables_lock=supported)
    verdict, boot = tmp_path / ".criu-check", tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    expected = (criu_module.NFTABLES_LOCK,) if supported else ()
    assert check_criu(str(binary), verdict_file=verdict, boot_id_file=boot) == expected
    criu_module._checked.clear()  # the next process reads it from the file
    assert check_criu(str(binary), verdict_file=verdict, boot_id_file=boot) == expected
    assert calls.read_text().count("run") == 1


def test_nftables_lock_tables_are_found_among_the_container_s_own() -> None:
    listing = "table inet filter\ntable inet CRIU-3f2a9c81d0e5\ntable ip nat\ntable inet CRIU-12\n"
    assert criu_module.nftables_lock_tables(listing) == [
        ("inet", "CRIU-3f2a9c81d0e5"),
        ("inet", "CRIU-12"),
    ]
    assert criu_module.nftables_lock_tables("table inet CRIUS\ntable ip CRIU-1\n") == []


def test_a_missing_criu_is_a_preflight_error(tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match="not found: run scripts/setup"):
        check_criu(str(tmp_path / "criu"))


@pytest.mark.parametrize(
    ("lines", "persists", "unread"),
    [
        (("Error (criu/tty.c:410): tty: Found slave peer index 0",), True, False),
        (("Error (criu/files.c:1): Can't dump file 7 of that type",), True, False),
        (("Error (criu/image.c:1): Unable to write: No space left on device",), False, False),
        (("Error (criu/sk-netlink.c:77): netlink: The socket has data to read",), False, True),
        (("Error (criu/sk-queue.c:144): skqueue: Control messages in queue",), False, True),
        # the root cause is the first line: what follows is its consequence
        (("Error (criu/tty.c:410): tty: x", "netlink: The socket has data to read"), False, False),
        ((), False, False),  # CRIU killed or timed out: it logged no reason
    ],
    ids=[
        "tty",
        "unsupported fd",
        "disk full",
        "netlink data",
        "queued credentials",
        "unread after",
        "no reason",
    ],
)
def test_only_a_cause_in_the_container_persists_and_an_unread_message_passes_soon(
    lines: tuple[str, ...], persists: bool, unread: bool
) -> None:
    assert criu.cause_persists(lines) is persists
    assert criu.cause_is_unread(lines) is unread


@pytest.mark.parametrize(
    ("log_name", "summary", "gave_up"),
    [
        ("dump.log", "(01.2) Error (criu/cr-dump.c:2128): Dumping FAILED.", criu.gave_up_dump),
        (
            "restore.log",
            "(01.2) Error (criu/cr-restore.c:2324): Restoring FAILED.",
            criu.gave_up_restore,
        ),
    ],
    ids=["dump", "restore"],
)
def test_a_run_criu_gave_up_is_told_from_one_it_was_killed_in(
    tmp_path: Path, log_name: str, summary: str, gave_up: Callable[[Path], bool]
) -> None:
    log = tmp_path / log_name
    assert not gave_up(tmp_path)  # no log
    log.write_text("(00.1) Writing image inventory\n" * 2000)  # killed: no summary
    assert not gave_up(tmp_path)
    with log.open("a") as f:
        f.write(f"{summary}\n")
    assert gave_up(tmp_path)
