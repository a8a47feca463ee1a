"""Find a process's memory cgroup and read it, on cgroup v1 and v2.

Roots are arguments so that the parsers run against fixture trees. Hosts come in
three layouts: pure v2 (cgroup2 mounted at the root), pure v1, and the hybrid
of our machines (v1 controllers plus a cgroup2 tree at ``unified/``).
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path


class CgroupVersion(enum.Enum):
    V1 = 1
    V2 = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryCgroup:
    """Where a process's memory is accounted."""

    version: CgroupVersion
    path: Path


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


def locate_memory_cgroup(proc_cgroup: dict[str, str], cgroup_root: Path) -> MemoryCgroup | None:
    """Pick the directory that accounts memory for a process with these cgroups.

    A v1 memory controller wins when it is mounted; otherwise the v2 tree is used,
    either at the root (pure v2) or at ``unified/`` (hybrid).
    """
    if "memory" in proc_cgroup and (cgroup_root / "memory").is_dir():
        return MemoryCgroup(
            version=CgroupVersion.V1,
            path=cgroup_root / "memory" / proc_cgroup["memory"].lstrip("/"),
        )
    if "" in proc_cgroup:
        unified = (
            cgroup_root
            if (cgroup_root / "cgroup.controllers").exists()
            else (cgroup_root / "unified")
        )
        return MemoryCgroup(version=CgroupVersion.V2, path=unified / proc_cgroup[""].lstrip("/"))
    return None


def memory_cgroup_of(pid: int, *, proc_root: Path, cgroup_root: Path) -> MemoryCgroup | None:
    """The memory cgroup of a live process, or None if it has gone."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return locate_memory_cgroup(parse_proc_cgroup(text), cgroup_root)


def read_usage_bytes(cgroup: MemoryCgroup) -> int:
    """Bytes charged to the cgroup now (``memory.usage_in_bytes`` or ``memory.current``)."""
    name = "memory.usage_in_bytes" if cgroup.version is CgroupVersion.V1 else "memory.current"
    return int((cgroup.path / name).read_text())
