"""Find a process's memory cgroup and read it, on cgroup v1 and v2.

Roots are arguments so that the parsers run against fixture trees. Hosts come in
three layouts: pure v2 (cgroup2 mounted at the root), pure v1, and the hybrid
of our machines (v1 controllers plus a cgroup2 tree at ``unified/``, which has
no memory controller but does have each cgroup's ``memory.pressure``).
"""

from __future__ import annotations

import dataclasses
import enum
import os
from pathlib import Path

from evictor.model import CgroupLayout, Pressure

# cgroup v1 reports "no limit" as the largest page-aligned signed 64-bit value.
_V1_UNLIMITED = 0x7FFFFFFFFFFFF000


class CgroupVersion(enum.Enum):
    V1 = 1
    V2 = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryCgroup:
    """Where a process's memory is accounted, and where its PSI is (if anywhere)."""

    version: CgroupVersion
    path: Path
    unified_path: Path | None = None  # the cgroup2 directory, for memory.pressure
    # Whether LXC froze it: the v1 freezer's freezer.state where that controller is
    # mounted, else cgroup2's cgroup.freeze (parse_freeze_state reads it).
    freeze_path: Path | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryStats:
    usage_bytes: int
    working_set_bytes: int
    anon_bytes: int
    file_bytes: int
    limit_bytes: int | None
    pressure: Pressure | None


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Parse /proc/PID/cgroup into {controller: path}; the v2 entry has key ``""``.

    Named v1 hierarchies (``name=systemd``) are kept under their name.
    """
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            paths[""] = path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = path
    return paths


def layout(cgroup_root: Path) -> CgroupLayout:
    if (cgroup_root / "cgroup.controllers").exists():
        return CgroupLayout.V2
    if (cgroup_root / "unified").is_dir():
        return CgroupLayout.HYBRID
    return CgroupLayout.V1


def locate_memory_cgroup(proc_cgroup: dict[str, str], cgroup_root: Path) -> MemoryCgroup | None:
    """Pick the directory that accounts memory for a process with these cgroups.

    A v1 memory controller wins when it is mounted; otherwise the v2 tree is used,
    either at the root (pure v2) or at ``unified/`` (hybrid).
    """
    unified = freeze = None
    if "" in proc_cgroup:
        tree = (
            cgroup_root
            if (cgroup_root / "cgroup.controllers").exists()
            else (cgroup_root / "unified")
        )
        unified = tree / proc_cgroup[""].lstrip("/")
        freeze = unified / "cgroup.freeze"
    if "freezer" in proc_cgroup and (cgroup_root / "freezer").is_dir():
        freeze = cgroup_root / "freezer" / proc_cgroup["freezer"].lstrip("/") / "freezer.state"
    if "memory" in proc_cgroup and (cgroup_root / "memory").is_dir():
        return MemoryCgroup(
            version=CgroupVersion.V1,
            path=cgroup_root / "memory" / proc_cgroup["memory"].lstrip("/"),
            unified_path=unified,
            freeze_path=freeze,
        )
    if unified is not None:
        return MemoryCgroup(
            version=CgroupVersion.V2, path=unified, unified_path=unified, freeze_path=freeze
        )
    return None


def parse_freeze_state(text: bytes) -> bool | None:
    """Frozen (True), thawed (False) or half-way (None), from freezer.state (v1:
    ``FROZEN``, ``FREEZING``, ``THAWED``) or cgroup.freeze (v2: ``1``, ``0``)."""
    state = text.strip()
    if state in (b"FROZEN", b"1"):
        return True
    if state in (b"THAWED", b"0"):
        return False
    return None


def container_path(path: str, container: str) -> str:
    """The cgroup of a whole container, from that of one of its processes.

    LXC puts a container in ``lxc.payload.NAME`` (``lxc/NAME`` before LXC 4); an
    init that manages cgroups of its own (systemd) moves itself further down
    (``lxc.payload.NAME/init.scope``), and its own cgroup would leave out every
    service. A path outside those is the process's own.
    """
    parts = path.split("/")
    for index, part in enumerate(parts):
        if part == f"lxc.payload.{container}" or (
            part == container and index > 0 and parts[index - 1] == "lxc"
        ):
            return "/".join(parts[: index + 1])
    return path


def memory_cgroup_of(
    pid: int, *, proc_root: Path, cgroup_root: Path, container: str | None = None
) -> MemoryCgroup | None:
    """The memory cgroup of a live process (of the whole ``container`` it runs in, if
    given), or None if it has gone."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    paths = parse_proc_cgroup(text)
    if container is not None:
        paths = {controller: container_path(p, container) for controller, p in paths.items()}
    return locate_memory_cgroup(paths, cgroup_root)


def read_text(path: Path | str) -> str:
    """A small kernel file's contents: without a text wrapper, a third of
    ``Path.read_text``'s cost, which counts on the monitor's hot path."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse a ``key value`` per line file of integers, such as memory.stat (split
    and converted in C: the monitor parses one per container every tick)."""
    words = text.split()
    try:
        return dict(zip(words[::2], map(int, words[1::2]), strict=True))
    except ValueError:  # not a flat-keyed file of integers: keep what is one
        fields = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                fields[key] = int(value)
        return fields


def parse_pressure(text: str) -> Pressure:
    """Parse a PSI file (/proc/pressure/memory or a cgroup's memory.pressure)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key in ("avg10", "avg60"):
                values[f"{kind}_{key}"] = float(value)
    return Pressure(**values)


def read_pressure(path: Path | str) -> Pressure | None:
    try:
        return parse_pressure(read_text(path))
    except OSError:
        # No PSI: kernel without CONFIG_PSI, psi=0, or a cgroup that has gone.
        return None


def usage_path(cgroup: MemoryCgroup) -> str:
    """``memory.usage_in_bytes`` or ``memory.current``: bytes charged to the cgroup."""
    name = "memory.usage_in_bytes" if cgroup.version is CgroupVersion.V1 else "memory.current"
    return f"{cgroup.path}/{name}"


def read_usage_bytes(cgroup: MemoryCgroup) -> int:
    """Bytes charged to the cgroup now."""
    return int(read_text(usage_path(cgroup)))


def read_usage_and_pressure(cgroup: MemoryCgroup, *, pressure: bool = True) -> MemoryStats:
    """Usage and PSI only (the rest left 0, and the limit unknown): what the daemon
    needs every tick, at a third of ``read_memory_stats``'s cost. PSI only if
    ``pressure``."""
    return MemoryStats(
        usage_bytes=read_usage_bytes(cgroup),
        working_set_bytes=0,
        anon_bytes=0,
        file_bytes=0,
        limit_bytes=None,
        pressure=read_cgroup_pressure(cgroup) if pressure else None,
    )


def read_cgroup_pressure(cgroup: MemoryCgroup) -> Pressure | None:
    """The cgroup's memory PSI; None where it has no cgroup2 directory."""
    if cgroup.unified_path is None:
        return None
    return read_pressure(f"{cgroup.unified_path}/memory.pressure")


def read_memory_stats(cgroup: MemoryCgroup) -> MemoryStats:
    """Usage, working set, anon/file split, limit and PSI of one cgroup."""
    light = read_usage_and_pressure(cgroup)
    stat = parse_flat_keyed(read_text(f"{cgroup.path}/memory.stat"))
    if cgroup.version is CgroupVersion.V1:
        # The total_ figures include descendant cgroups, as usage_in_bytes does.
        inactive_file = stat.get("total_inactive_file", 0)
        anon = stat.get("total_rss", 0)
        file = stat.get("total_cache", 0)
        raw_limit = int(read_text(f"{cgroup.path}/memory.limit_in_bytes"))
        limit = None if raw_limit >= _V1_UNLIMITED else raw_limit
    else:
        inactive_file = stat.get("inactive_file", 0)
        anon = stat.get("anon", 0)
        file = stat.get("file", 0)
        raw = read_text(f"{cgroup.path}/memory.max").strip()
        limit = None if raw == "max" else int(raw)
    return dataclasses.replace(
        light,
        working_set_bytes=max(0, light.usage_bytes - inactive_file),
        anon_bytes=anon,
        file_bytes=file,
        limit_bytes=limit,
    )


def tree(root: Path) -> list[Path]:
    """``root`` and every cgroup below it (cgroup2 or v1)."""
    return [root, *(p.parent for p in root.rglob("*/cgroup.procs"))]


def frozen(root: Path) -> list[Path]:
    """The freezer files in ``root``'s tree that hold a cgroup frozen: cgroup2's
    ``cgroup.freeze`` at 1, or the ``freezer.state`` of a v1 freezer cgroup frozen
    itself (``freezer.self_freezing`` 1; those below it follow it)."""
    found = []
    for directory in tree(root):
        for flag, control in (
            ("cgroup.freeze", "cgroup.freeze"),
            ("freezer.self_freezing", "freezer.state"),
        ):
            try:
                if read_text(directory / flag).strip() == "1":
                    found.append(directory / control)
            except OSError:
                continue  # not this hierarchy's, or gone meanwhile
    return found


def thaw(freezer_file: Path) -> None:
    """Thaw the cgroup of a freezer file that ``frozen`` found."""
    freezer_file.write_text("0" if freezer_file.name == "cgroup.freeze" else "THAWED")


def processes(root: Path, proc_root: Path = Path("/proc")) -> frozenset[tuple[int, str]]:
    """The processes in ``root``'s tree, each as its pid and command name."""
    found = set()
    for directory in tree(root):
        try:
            pids = read_text(directory / "cgroup.procs").split()
        except OSError:
            continue
        for pid in pids:
            try:
                found.add((int(pid), read_text(proc_root / pid / "comm").strip()))
            except OSError:
                continue  # exited
    return frozenset(found)


def stopped_threads(root: Path, proc_root: Path = Path("/proc")) -> frozenset[int]:
    """Threads in ``root``'s tree that are stopped (``T``) or held by a tracer (``t``)."""
    stopped = set()
    for directory in tree(root):
        try:
            threads = read_text(directory / "cgroup.threads").split()
        except OSError:
            continue
        for tid in threads:
            try:
                stat = read_text(proc_root / tid / "stat")
            except OSError:
                continue  # exited
            # The state follows the command name, which is in parentheses and may hold any.
            if stat[stat.rindex(")") + 2] in "Tt":
                stopped.add(int(tid))
    return frozenset(stopped)
