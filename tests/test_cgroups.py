"""The memory cgroup reader against fixture trees of each host layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evictor.cgroups import (
    CgroupVersion,
    MemoryCgroup,
    container_path,
    frozen,
    memory_cgroup_of,
    parse_freeze_state,
    parse_pressure,
    parse_proc_cgroup,
    read_memory_stats,
    stopped_threads,
    thaw,
)
from evictor.model import Pressure

MIB = 1 << 20
# /proc/PID/cgroup of an LXC container's init, as each layout shows it.
PROC_CGROUP = {
    "hybrid": "9:name=systemd:/lxc.payload.web\n6:freezer:/lxc.payload.web\n"
    "4:memory:/lxc.payload.web\n2:cpu,cpuacct:/lxc.payload.web\n0::/lxc.payload.web\n",
    "v1": "6:freezer:/lxc.payload.web\n4:memory:/lxc.payload.web\n"
    "1:name=systemd:/lxc.payload.web\n",
    "v2": "0::/lxc.payload.web\n",
}
PRESSURE = (
    "some avg10=12.50 avg60=3.25 avg300=1.00 total=123\n"
    "full avg10=2.00 avg60=0.50 avg300=0.10 total=45\n"
)
# memory.stat excerpts in each version's own keys (v1: total_* include children).
V1_STAT = (
    f"cache {MIB}\nrss {MIB}\ntotal_cache {40 * MIB}\ntotal_rss {60 * MIB}\n"
    f"total_inactive_file {30 * MIB}\ntotal_active_file {10 * MIB}\n"
)
V2_STAT = f"anon {70 * MIB}\nfile {25 * MIB}\ninactive_file {20 * MIB}\nactive_file {5 * MIB}\n"


def make_tree(root: Path, layout: str, *, limited: bool) -> tuple[Path, Path]:
    """Build a /proc and a /sys/fs/cgroup for pid 42 in ``layout``; return both roots."""
    proc, cgroup = root / "proc", root / "cgroup"
    (proc / "42").mkdir(parents=True)
    (proc / "42/cgroup").write_text(PROC_CGROUP[layout])
    if layout in ("hybrid", "v1"):
        (cgroup / "freezer/lxc.payload.web").mkdir(parents=True)
        (cgroup / "freezer/lxc.payload.web/freezer.state").write_text("THAWED\n")
        memory = cgroup / "memory/lxc.payload.web"
        memory.mkdir(parents=True)
        (memory / "memory.usage_in_bytes").write_text(f"{100 * MIB}\n")
        (memory / "memory.stat").write_text(V1_STAT)
        (memory / "memory.limit_in_bytes").write_text(
            f"{512 * MIB}\n" if limited else "9223372036854771712\n"
        )
    if layout == "hybrid":
        (cgroup / "unified/lxc.payload.web").mkdir(parents=True)
        (cgroup / "unified/lxc.payload.web/memory.pressure").write_text(PRESSURE)
    if layout == "v2":
        web = cgroup / "lxc.payload.web"
        web.mkdir(parents=True)
        (cgroup / "cgroup.controllers").write_text("cpu memory pids\n")
        (web / "memory.current").write_text(f"{96 * MIB}\n")
        (web / "memory.stat").write_text(V2_STAT)
        (web / "memory.max").write_text(f"{512 * MIB}\n" if limited else "max\n")
        (web / "memory.pressure").write_text(PRESSURE)
    return proc, cgroup


def test_parse_proc_cgroup_splits_joined_controllers() -> None:
    paths = parse_proc_cgroup(PROC_CGROUP["hybrid"])
    assert paths["memory"] == paths["cpu"] == paths["cpuacct"] == "/lxc.payload.web"
    assert paths[""] == "/lxc.payload.web"
    assert paths["name=systemd"] == "/lxc.payload.web"


def test_parse_pressure() -> None:
    assert parse_pressure(PRESSURE) == Pressure(
        some_avg10=12.5, some_avg60=3.25, full_avg10=2.0, full_avg60=0.5
    )


@pytest.mark.parametrize(
    ("layout", "version", "memory_dir", "unified_dir", "freeze_file"),
    [
        (
            "hybrid",
            CgroupVersion.V1,
            "memory/lxc.payload.web",
            "unified/lxc.payload.web",
            "freezer/lxc.payload.web/freezer.state",
        ),
        (
            "v1",
            CgroupVersion.V1,
            "memory/lxc.payload.web",
            None,
            "freezer/lxc.payload.web/freezer.state",
        ),
        (
            "v2",
            CgroupVersion.V2,
            "lxc.payload.web",
            "lxc.payload.web",
            "lxc.payload.web/cgroup.freeze",
        ),
    ],
)
def test_memory_cgroup_in_each_layout(
    tmp_path: Path,
    layout: str,
    version: CgroupVersion,
    memory_dir: str,
    unified_dir: str | None,
    freeze_file: str,
) -> None:
    proc, root = make_tree(tmp_path, layout, limited=False)
    assert memory_cgroup_of(42, proc_root=proc, cgroup_root=root) == MemoryCgroup(
        version=version,
        path=root / memory_dir,
        unified_path=root / unified_dir if unified_dir else None,
        freeze_path=root / freeze_file,
    )


@pytest.mark.parametrize(
    ("text", "frozen"),
    [
        (b"FROZEN\n", True),
        (b"THAWED\n", False),
        (b"FREEZING\n", None),
        (b"1\n", True),
        (b"0\n", False),
    ],
)
def test_freeze_state_of_each_freezer(text: bytes, frozen: bool | None) -> None:
    assert parse_freeze_state(text) is frozen


@pytest.mark.parametrize("limited", [True, False], ids=["limited", "unlimited"])
@pytest.mark.parametrize(
    ("layout", "usage", "working_set", "anon", "file", "has_psi"),
    [
        # working set = usage - inactive file, as the kubelet computes it
        ("hybrid", 100, 70, 60, 40, True),
        ("v1", 100, 70, 60, 40, False),
        ("v2", 96, 76, 70, 25, True),
    ],
)
def test_memory_stats_in_each_layout(
    tmp_path: Path,
    layout: str,
    usage: int,
    working_set: int,
    anon: int,
    file: int,
    has_psi: bool,
    limited: bool,
) -> None:
    proc, root = make_tree(tmp_path, layout, limited=limited)
    cgroup = memory_cgroup_of(42, proc_root=proc, cgroup_root=root)
    assert cgroup is not None
    stats = read_memory_stats(cgroup)
    assert (stats.usage_bytes, stats.working_set_bytes, stats.anon_bytes, stats.file_bytes) == (
        usage * MIB,
        working_set * MIB,
        anon * MIB,
        file * MIB,
    )
    assert stats.limit_bytes == (512 * MIB if limited else None)
    assert stats.pressure == (parse_pressure(PRESSURE) if has_psi else None)


def test_a_gone_process_has_no_cgroup(tmp_path: Path) -> None:
    proc, root = make_tree(tmp_path, "v2", limited=False)
    assert memory_cgroup_of(7, proc_root=proc, cgroup_root=root) is None


def test_this_machine_layout_is_understood() -> None:
    """The real /proc and /sys/fs/cgroup of the test process itself."""
    found = memory_cgroup_of(
        os.getpid(), proc_root=Path("/proc"), cgroup_root=Path("/sys/fs/cgroup")
    )
    assert found is not None and found.path.is_dir()
    assert read_memory_stats(found).usage_bytes > 0


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/lxc.payload.web/init.scope", "/lxc.payload.web"),  # systemd moved itself down
        ("/lxc.payload.web", "/lxc.payload.web"),
        ("/lxc.payload.web/system.slice/redis.service", "/lxc.payload.web"),
        ("/lxc/web/init.scope", "/lxc/web"),  # LXC before 4
        ("/lxc.payload.webby/init.scope", "/lxc.payload.webby/init.scope"),  # another container
        ("/user.slice", "/user.slice"),
    ],
)
def test_a_container_s_memory_is_its_whole_cgroup(path: str, expected: str) -> None:
    assert container_path(path, "web") == expected


def test_frozen_cgroups_and_stopped_threads_are_found_in_the_whole_tree(tmp_path: Path) -> None:
    root, child = tmp_path / "lxc.payload.c1", tmp_path / "lxc.payload.c1" / "init.scope"
    child.mkdir(parents=True)
    proc = tmp_path / "proc"
    (root / "cgroup.freeze").write_text("0\n")
    (child / "cgroup.freeze").write_text("1\n")
    (root / "cgroup.threads").write_text("10\n11\n")
    (child / "cgroup.threads").write_text("12\n13\n")
    (child / "cgroup.procs").write_text("12\n")
    states = {10: "S", 11: "T", 12: "R", 13: "t"}
    for tid, state in states.items():
        (proc / str(tid)).mkdir(parents=True)
        # A command name with spaces and parentheses: the state follows the last ")".
        (proc / str(tid) / "stat").write_text(f"{tid} (a (b) c) {state} 1 2 3\n")
    assert frozen(root) == [child / "cgroup.freeze"]
    assert stopped_threads(root, proc) == {11, 13}
    (proc / "11" / "stat").unlink()  # exited meanwhile
    assert stopped_threads(root, proc) == {13}
    thaw(child / "cgroup.freeze")
    assert frozen(root) == []


def test_a_v1_freezer_frozen_by_itself_is_found_and_thawed(tmp_path: Path) -> None:
    # As a CRIU killed after it froze a container leaves it, on a hybrid host: the
    # container's freezer FROZEN, the cgroups below it frozen through it.
    root, child = tmp_path / "lxc.payload.c1", tmp_path / "lxc.payload.c1" / "inner"
    child.mkdir(parents=True)
    for directory, self_freezing in ((root, "1"), (child, "0")):
        (directory / "cgroup.procs").write_text("")
        (directory / "freezer.state").write_text("FROZEN\n")
        (directory / "freezer.self_freezing").write_text(f"{self_freezing}\n")
    assert frozen(root) == [root / "freezer.state"]
    thaw(root / "freezer.state")
    assert (root / "freezer.state").read_text() == "THAWED"
