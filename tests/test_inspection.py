"""The facts check judges, read from fixture trees of /proc, /sys and a rootfs; and
prepare's writes into a rootfs, which never follow a link the container planted."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from evictor import lxc_config
from evictor.diagnosis import RUN_SLAVE_WANTED, SERVICE_DROP_IN
from evictor.errors import InvalidState
from evictor.inspection import (
    _tasks,
    host_facts,
    host_shutting_down,
    resolve_in_rootfs,
    rootfs_facts,
    runlevel_is_shutdown,
)
from evictor.model import CgroupLayout, ContainerConfig, IdMap
from evictor.prepare import remove_in_rootfs, write_in_rootfs


def merged_usr_rootfs(root: Path) -> Path:
    """Debian's layout: /sbin -> usr/sbin, /usr/sbin/init -> /lib/systemd/systemd,
    /lib -> usr/lib."""
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    (root / "usr/lib/x86_64-linux-gnu/systemd").mkdir(parents=True)
    (root / "usr/lib/x86_64-linux-gnu/systemd/libsystemd-shared-257.so").touch()
    (root / "usr/lib/systemd/systemd").touch()
    os.symlink("usr/sbin", root / "sbin")
    os.symlink("usr/lib", root / "lib")
    os.symlink("/lib/systemd/systemd", root / "usr/sbin/init")
    (root / "etc").mkdir()
    return root


def test_links_resolve_inside_the_rootfs(tmp_path: Path) -> None:
    rootfs = merged_usr_rootfs(tmp_path)
    assert resolve_in_rootfs(rootfs, "/sbin/init") == "/usr/lib/systemd/systemd"
    os.symlink("/etc/shadow", rootfs / "etc/inittab")  # would be the host's, followed naively
    assert resolve_in_rootfs(rootfs, "/etc/inittab") == "/etc/shadow"
    os.symlink("loop", rootfs / "loop")
    assert resolve_in_rootfs(rootfs, "/loop")  # ends, whatever it gives


def test_rootfs_facts_of_systemd_and_of_busybox(tmp_path: Path) -> None:
    systemd = rootfs_facts(merged_usr_rootfs(tmp_path / "d"), ContainerConfig(rootfs=""))
    assert systemd.systemd_version == 257 and systemd.inittab_terminals == ()
    busybox = tmp_path / "b"
    (busybox / "etc").mkdir(parents=True)
    (busybox / "sbin").mkdir()
    (busybox / "sbin/init").touch()
    (busybox / "etc/inittab").write_text(
        "# comment\n::once:/bin/memhog 16\ntty1::respawn:/bin/sh\n"
        "1:2345:respawn:/sbin/getty 38400 tty1\n"
    )
    facts = rootfs_facts(busybox, ContainerConfig(rootfs=""))
    assert facts.systemd_version is None
    assert facts.inittab_terminals == (
        "tty1::respawn:/bin/sh",
        "1:2345:respawn:/sbin/getty 38400 tty1",
    )


def test_host_facts(tmp_path: Path) -> None:
    proc, sys, cgroup = tmp_path / "proc", tmp_path / "sys", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    # These machines: CAP_SYS_RESOURCE (bit 24) missing from the bounding set.
    (proc / "self/status").write_text("Name:\tpython\nCapBnd:\t000001fffeffffff\n")
    (sys / "class/net/lxcbr0/bridge").mkdir(parents=True)
    (sys / "class/net/eth0").mkdir(parents=True)
    (cgroup / "unified").mkdir(parents=True)
    facts = host_facts(proc_root=proc, sys_root=sys, cgroup_root=cgroup)
    assert not facts.apparmor and not facts.cap_sys_resource
    assert facts.cgroup_layout is CgroupLayout.HYBRID and facts.bridges == {"lxcbr0"}
    (proc / "self/status").write_text("CapBnd:\t000001ffffffffff\n")
    (sys / "module/apparmor/parameters").mkdir(parents=True)
    (sys / "module/apparmor/parameters/enabled").write_text("Y\n")
    facts = host_facts(proc_root=proc, sys_root=sys, cgroup_root=cgroup)
    assert facts.apparmor and facts.cap_sys_resource


def fake_task(proc: Path, pid: int, *, uid: int, ns: dict[str, str], fds: dict[str, str]) -> None:
    directory = proc / str(pid)
    (directory / "ns").mkdir(parents=True)
    (directory / "fd").mkdir()
    (directory / "fdinfo").mkdir()
    (directory / "status").write_text(f"Name:\tt{pid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    for kind, target in ns.items():
        os.symlink(target, directory / "ns" / kind)
    for fd, target in fds.items():
        os.symlink(target, directory / "fd" / fd)
        flags = "0100002" if target.endswith("pressure") else "0100000"
        (directory / "fdinfo" / fd).write_text(f"pos:\t0\nflags:\t{flags}\n")


def test_tasks_of_a_container(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    ns = {"pid": "pid:[1]", "uts": "uts:[1]", "user": "user:[1]"}
    fake_task(proc, 100, uid=100000, ns=ns, fds={"3": "/sys/fs/cgroup/x/memory.pressure"})
    fake_task(proc, 101, uid=100101, ns={**ns, "uts": "uts:[2]"}, fds={"0": "/dev/pts/0"})
    fake_task(proc, 102, uid=0, ns=ns, fds={"5": "anon_inode:bpf-prog"})
    fake_task(proc, 7, uid=0, ns={**ns, "pid": "pid:[9]"}, fds={})  # another container's
    tasks = {t.pid: t for t in _tasks(proc, 100)}
    assert set(tasks) == {100, 101, 102}
    assert tasks[100].psi_triggers == 1 and tasks[100].uid == 100000
    assert tasks[101].terminals == ("/dev/pts/0",) and tasks[101].own_uts_namespace
    assert tasks[102].bpf_programs == 1 and not tasks[102].own_uts_namespace


def test_prepare_writes_and_removes_without_following_planted_links(tmp_path: Path) -> None:
    rootfs, outside = tmp_path / "rootfs", tmp_path / "host-etc"
    (rootfs / "etc").mkdir(parents=True)
    outside.mkdir()
    owner = IdMap(root_uid=os.getuid(), root_gid=os.getgid())
    os.symlink(outside, rootfs / "etc/systemd")  # planted by the container
    with pytest.raises(OSError):
        write_in_rootfs(rootfs, SERVICE_DROP_IN, owner)
    assert list(outside.iterdir()) == []
    (rootfs / "etc/systemd").unlink()
    write_in_rootfs(rootfs, SERVICE_DROP_IN, owner)
    write_in_rootfs(rootfs, RUN_SLAVE_WANTED, owner)
    written = rootfs / SERVICE_DROP_IN.path.lstrip("/")
    assert written.read_text() == SERVICE_DROP_IN.content
    assert os.readlink(rootfs / RUN_SLAVE_WANTED.path.lstrip("/")) == RUN_SLAVE_WANTED.symlink_to
    with pytest.raises(FileExistsError):  # never over a file it did not write
        write_in_rootfs(rootfs, SERVICE_DROP_IN, owner)
    remove_in_rootfs(rootfs, SERVICE_DROP_IN.path)
    remove_in_rootfs(rootfs, SERVICE_DROP_IN.path)  # gone already: fine
    assert not written.exists()
    climbing = dataclasses.replace(SERVICE_DROP_IN, path="/etc/../../x.conf")
    with pytest.raises(InvalidState, match="not a plain path"):
        write_in_rootfs(rootfs, climbing, owner)


def test_the_block_round_trips_and_leaves_the_rest_alone() -> None:
    original = "lxc.include = common.conf\nlxc.tty.max = 4\n"
    block = lxc_config.Block(
        settings=(("lxc.tty.max", "0"), ("lxc.apparmor.profile", "")),
        criu_options=("enable-fs ramfs",),
        rootfs_files=("/etc/x.conf",),
    )
    text = lxc_config.with_block(original, block)
    assert text.startswith(original) and "lxc.apparmor.profile =\n" in text
    assert lxc_config.split(text) == (original, block)
    assert lxc_config.split(original) == (original, None)


@pytest.mark.parametrize(
    ("output", "shutting_down"),
    [("N 5\n", False), ("5 0\n", True), ("5 6\n", True), ("unknown\n", False), ("", False)],
)
def test_a_runlevel_of_0_or_6_is_a_shutdown(output: str, shutting_down: bool) -> None:
    assert runlevel_is_shutdown(output) is shutting_down


def test_systemd_says_when_the_host_is_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    systemctl = bin_dir / "systemctl"  # stands in for systemd's answer
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for answer, shutting_down in (("stopping", True), ("running", False), ("degraded", False)):
        systemctl.write_text(f"#!/bin/sh\necho {answer}\n")
        systemctl.chmod(0o755)
        assert host_shutting_down(run_root=tmp_path / "run") is shutting_down
