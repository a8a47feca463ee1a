"""What evictor reads from CRIU: its logs, its stats files, and ``criu check``.

pycriu is not on PyPI, so the two small protobuf messages of the stats files
are decoded here (see criu/images/stats.proto).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

from evictor.errors import CriuOutputError, PreflightError

# The logs LXC has CRIU write in the image directory.
DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"

# Printed on every dump and restore on machines without CAP_SYS_RESOURCE, where
# CRIU cannot raise its own RLIMIT_NOFILE; it is harmless, never the reason.
_HARMLESS_ERRORS = ("Can't setup RLIMIT_NOFILE for self",)
_SUMMARY_ERRORS = ("Dumping FAILED.", "Restoring FAILED.")
_LOG_TAIL_BYTES = 16 << 10  # CRIU's last lines, its summary among them
# A message the container had not read when its tasks were frozen: gone once it
# has run a moment.
_UNREAD_CAUSES = (
    # a netlink socket with unread messages (networkd just got a DHCP lease, an
    # address finished its duplicate detection)
    "The socket has data to read",
    # a message still queued on a unix socket that asks for its sender's credentials
    # (SO_PASSCRED, SO_PASSPIDFD): systemd's notify socket and journald's, until read
    "Control messages in queue",
)
# Causes that come from the moment, not from the container: the next dump may work.
_PASSING_CAUSES = (
    "No space left on device",
    "Disk quota exceeded",
    "Cannot allocate memory",
    "Input/output error",
    "Interrupted system call",
    "Resource temporarily unavailable",
    *_UNREAD_CAUSES,
)


# A log line, perhaps after a timestamp ("(00.012345) ") and, for a restored
# task, its pid ("     1: "): CRIU's error lines start "Error (file:line): ".
_LOG_LINE = re.compile(r"\s*(?:\(\s*[\d.]+\)\s*)?(?:\d+:\s*)?(?P<text>.*)")


def log_errors(log_text: str, *, most: int = 3) -> tuple[str, ...]:
    """The first ``most`` error lines of a CRIU log, the root cause first.

    CRIU's first error is the one that explains a failure; what follows is
    mostly its consequence (a restore that fails on a veth NIC ends with
    "cg: cgroupd: recv req error"). Harmless noise and CRIU's closing
    "FAILED." summary are left out.
    """
    lines = []
    for raw in log_text.splitlines():
        match = _LOG_LINE.match(raw)
        line = match.group("text").strip() if match else raw.strip()
        if not line.startswith("Error"):
            continue
        if any(noise in line for noise in _HARMLESS_ERRORS + _SUMMARY_ERRORS):
            continue
        lines.append(line)
        if len(lines) == most:
            break
    return tuple(lines)


def cause_persists(error_lines: tuple[str, ...]) -> bool:
    """Whether CRIU's error lines name a cause in the container (a tty, an fd it
    cannot dump), which fails every dump until the container changes. No lines
    (CRIU killed or timed out) or a passing cause (a full disk): False."""
    return bool(error_lines) and not any(
        cause in line for line in error_lines for cause in _PASSING_CAUSES
    )


def cause_is_unread(error_lines: tuple[str, ...]) -> bool:
    """Whether CRIU's first error is a message the container had not read yet, which
    the next dump, a moment later, will most likely not meet."""
    return bool(error_lines) and any(cause in error_lines[0] for cause in _UNREAD_CAUSES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DumpStats:
    """CRIU's own figures for a dump (its times are in microseconds)."""

    freezing_time_us: int = 0
    frozen_time_us: int = 0
    memdump_time_us: int = 0
    memwrite_time_us: int = 0
    pages_scanned: int = 0
    pages_written: int = 0


_DUMP_FIELDS = {
    1: "freezing_time_us",
    2: "frozen_time_us",
    3: "memdump_time_us",
    4: "memwrite_time_us",
    5: "pages_scanned",
    7: "pages_written",
}
# A stats file starts with two little-endian magics, CRIU's "service image" one
# and the STATS one; the entry follows as a 32-bit length and a protobuf message.
DUMP_STATS_NAME = "stats-dump"
_IMG_SERVICE_MAGIC = 0x55105940
_STATS_MAGIC = 0x57093306
# Other images start with CRIU's "common image" magic and their own.
PSTREE_NAME = "pstree.img"
_IMG_COMMON_MAGIC = 0x54564319
_PSTREE_MAGIC = 0x50273030


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise CriuOutputError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> dict[int, int | bytes]:
    """Decode one protobuf message into {field number: value} (varints and bytes)."""
    fields: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            fields[number], pos = _varint(data, pos)
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            fields[number] = data[pos : pos + length]
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise CriuOutputError(f"unsupported wire type {wire_type}")
    return fields


def _stats_entry(raw: bytes, field: int) -> dict[int, int | bytes]:
    if len(raw) < 12:
        raise CriuOutputError("stats file too short")
    common, magic, length = struct.unpack_from("<III", raw)
    if common != _IMG_SERVICE_MAGIC or magic != _STATS_MAGIC:
        raise CriuOutputError("not a CRIU stats file")
    entry = _fields(raw[12 : 12 + length])
    inner = entry.get(field)
    if not isinstance(inner, bytes):
        raise CriuOutputError("stats entry missing")
    return _fields(inner)


def parse_dump_stats(raw: bytes) -> DumpStats:
    fields = _stats_entry(raw, 1)
    return DumpStats(**{name: int(fields.get(n, 0)) for n, name in _DUMP_FIELDS.items()})


def gave_up_dump(image_dir: Path) -> bool:
    """Whether CRIU's log in ``image_dir`` says it failed the dump itself ("Dumping
    FAILED.", among its last lines): it then let the tasks run on. A CRIU that was
    killed wrote no such line."""
    return _log_ends_with(image_dir / DUMP_LOG, b"Dumping FAILED.")


def gave_up_restore(image_dir: Path) -> bool:
    """Whether CRIU's log in ``image_dir`` says it failed the restore itself
    ("Restoring FAILED."): it then killed the tasks it had made."""
    return _log_ends_with(image_dir / RESTORE_LOG, b"Restoring FAILED.")


def _log_ends_with(log_path: Path, summary: bytes) -> bool:
    """Whether ``summary`` is among the last lines of the log."""
    try:
        with open(log_path, "rb") as log_file:
            log_file.seek(max(0, log_file.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
            return summary in log_file.read()
    except FileNotFoundError:
        return False


def parse_dumped_pids(raw: bytes) -> frozenset[int]:
    """The pids (in the container's PID namespace) of the processes a dump's
    ``pstree.img`` holds: after the image's two magics, one ``pstree_entry`` per
    process, each a 32-bit length and a message whose field 1 is the pid."""
    if len(raw) < 8 or struct.unpack_from("<II", raw) != (_IMG_COMMON_MAGIC, _PSTREE_MAGIC):
        raise CriuOutputError("not a CRIU process tree image")
    pids, pos = set(), 8
    while pos < len(raw):
        length = struct.unpack_from("<I", raw, pos)[0] if pos + 4 <= len(raw) else len(raw)
        if pos + 4 + length > len(raw):
            raise CriuOutputError("truncated process tree image")
        pid = _fields(raw[pos + 4 : pos + 4 + length]).get(1)
        if not isinstance(pid, int):
            raise CriuOutputError("process tree entry without a pid")
        pids.add(pid)
        pos += 4 + length
    return frozenset(pids)


def read_dumped_pids(image_dir: Path) -> frozenset[int]:
    """The pids of the processes dumped into ``image_dir`` (parse_dumped_pids).
    Raises OSError or CriuOutputError."""
    return parse_dumped_pids((image_dir / PSTREE_NAME).read_bytes())


def read_dump_stats(image_dir: Path) -> DumpStats:
    """CRIU's figures for the dump in ``image_dir``: CRIU writes them only once a
    dump has succeeded. Raises OSError or CriuOutputError."""
    return parse_dump_stats((image_dir / DUMP_STATS_NAME).read_bytes())


# CRIU locks the container's network while it dumps and restores, and records
# how in the image: the restore locks and unlocks the same way. Its default lock
# runs iptables-restore (five to seven times to unlock it, 60-70 ms of every
# restore here); the nftables lock is done inside CRIU, where it was built with
# libnftables and the kernel has nftables set concatenation (docs/benchmarks.md).
NFTABLES_LOCK = "network-lock nftables"
# What a lock leaves in the container's network namespace when CRIU is killed
# before it unlocks (every packet in or out dropped): a table "inet CRIU-<run id>"
# (nftables), or a chain CRIU that INPUT and OUTPUT jump to, in the filter tables
# of IPv4 and IPv6 (iptables).
IPTABLES_LOCK_CHAIN = "CRIU"
_NFTABLES_LOCK_TABLE = re.compile(r"^table (inet) (CRIU-[\w.-]+)$", re.MULTILINE)


def nftables_lock_tables(listing: str) -> list[tuple[str, str]]:
    """The lock tables in ``nft list tables`` output, as (family, name)."""
    return _NFTABLES_LOCK_TABLE.findall(listing)


# Binaries and boots, as keys, that passed ``criu check`` in this process, and the
# dump options each supports.
_checked: dict[str, tuple[str, ...]] = {}


def check_criu(
    criu: str = "criu",
    *,
    verdict_file: Path | None = None,
    boot_id_file: Path = Path("/proc/sys/kernel/random/boot_id"),
) -> tuple[str, ...]:
    """Raise PreflightError unless ``criu check`` passes on this kernel; return the
    dump options (CRIU config-file lines) this CRIU and kernel support: the
    nftables network lock, where they can and ``nft`` is there to remove what a
    killed CRIU's lock leaves (LxcRuntime.unlock_network).

    The checks cost about 100 ms, on every CLI command that dumps: so a pass is
    remembered, in this process and in ``verdict_file`` for the next ones,
    against the binary (path, inode, mtime: a CRIU replaced is checked anew)
    and the boot (the kernel cannot change without a reboot). A failure is
    never remembered.
    """
    path = shutil.which(criu)
    if path is None:
        raise PreflightError(f"{criu} not found: run scripts/setup.sh to install CRIU >= 4.2")
    status = os.stat(path)
    boot = boot_id_file.read_text().strip() if boot_id_file.exists() else "unknown boot"
    # "+options": a verdict from before the dump options were kept is checked anew.
    key = f"{path} {status.st_ino} {status.st_mtime_ns} {boot} +options"
    if key in _checked:
        return _checked[key]
    remembered = _read_verdict(verdict_file) if verdict_file is not None else None
    if remembered is not None and remembered[0] == key:
        _checked[key] = remembered[1]
        return remembered[1]
    result = subprocess.run([path, "check"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip().splitlines()
        raise PreflightError(
            f"'criu check' fails on this kernel: {reason[-1] if reason else 'no output'}"
        )
    nftables = shutil.which("nft") and subprocess.run(  # nft: to remove a killed CRIU's lock
        [path, "check", "--feature", "network_lock_nftables"], capture_output=True, check=False
    )
    options = (NFTABLES_LOCK,) if nftables and nftables.returncode == 0 else ()
    _checked[key] = options
    if verdict_file is not None:
        with contextlib.suppress(OSError):  # only a cache: the next command checks again
            temporary = verdict_file.with_name(verdict_file.name + ".tmp")
            temporary.write_text("".join(f"{line}\n" for line in (key, *options)))
            os.replace(temporary, verdict_file)
    return options


def _read_verdict(verdict_file: Path) -> tuple[str, tuple[str, ...]] | None:
    """The key and dump options a pass left in ``verdict_file``, if any."""
    try:
        key, *options = verdict_file.read_text().splitlines()
    except (OSError, ValueError):
        return None
    return key, tuple(options)
