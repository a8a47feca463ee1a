"""The memory cgroup locator against fixture trees of each host layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from evictor.cgroups import (
    CgroupVersion,
    MemoryCgroup,
    memory_cgroup_of,
    parse_proc_cgroup,
    read_usage_bytes,
)

# /proc/PID/cgroup of an LXC container's init, as each layout shows it.
HYBRID = """9:name=systemd:/lxc.payload.web
4:memory:/lxc.payload.web
2:cpu,cpuacct:/lxc.payload.web
0::/lxc.payload.web
"""
PURE_V2 = "0::/lxc.payload.web\n"
PURE_V1 = "4:memory:/lxc.payload.web\n1:name=systemd:/lxc.payload.web\n"


def make_tree(root: Path, layout: str) -> tuple[Path, Path]:
    """Build a /proc and a /sys/fs/cgroup for pid 42 in ``layout``; return both roots."""
    proc, cgroup = root / "proc", root / "cgroup"
    (proc / "42").mkdir(parents=True)
    (proc / "42/cgroup").write_text({"hybrid": HYBRID, "v2": PURE_V2, "v1": PURE_V1}[layout])
    if layout in ("hybrid", "v1"):
        memory = cgroup / "memory/lxc.payload.web"
        memory.mkdir(parents=True)
        (memory / "memory.usage_in_bytes").write_text("1048576\n")
    if layout == "hybrid":
        (cgroup / "unified/lxc.payload.web").mkdir(parents=True)
    if layout == "v2":
        cgroup.mkdir()
        (cgroup / "cgroup.controllers").write_text("cpu memory pids\n")
        (cgroup / "lxc.payload.web").mkdir()
        (cgroup / "lxc.payload.web/memory.current").write_text("2097152\n")
    return proc, cgroup


def test_parse_proc_cgroup_splits_joined_controllers() -> None:
    paths = parse_proc_cgroup(HYBRID)
    assert paths["memory"] == paths["cpu"] == paths["cpuacct"] == "/lxc.payload.web"
    assert paths[""] == "/lxc.payload.web"
    assert paths["name=systemd"] == "/lxc.payload.web"


@pytest.mark.parametrize(
    ("layout", "version", "relative", "usage_bytes"),
    [
        ("hybrid", CgroupVersion.V1, "memory/lxc.payload.web", 1 << 20),
        ("v1", CgroupVersion.V1, "memory/lxc.payload.web", 1 << 20),
        ("v2", CgroupVersion.V2, "lxc.payload.web", 2 << 20),
    ],
)
def test_memory_cgroup_in_each_layout(
    tmp_path: Path, layout: str, version: CgroupVersion, relative: str, usage_bytes: int
) -> None:
    proc, cgroup_root = make_tree(tmp_path, layout)
    found = memory_cgroup_of(42, proc_root=proc, cgroup_root=cgroup_root)
    assert found == MemoryCgroup(version=version, path=cgroup_root / relative)
    assert read_usage_bytes(found) == usage_bytes


def test_a_gone_process_has_no_cgroup(tmp_path: Path) -> None:
    proc, cgroup_root = make_tree(tmp_path, "v2")
    assert memory_cgroup_of(7, proc_root=proc, cgroup_root=cgroup_root) is None


def test_this_machine_layout_is_understood() -> None:
    """The real /proc and /sys/fs/cgroup of the test process itself."""
    import os

    found = memory_cgroup_of(
        os.getpid(), proc_root=Path("/proc"), cgroup_root=Path("/sys/fs/cgroup")
    )
    assert found is not None and found.path.is_dir()
