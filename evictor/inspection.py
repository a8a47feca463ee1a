"""Gather what diagnosis.py judges: the host, a container's config, its rootfs and
its running tasks. Reads only: nothing is frozen, nothing in the container
runs. Its roots are arguments, so tests point it at fixture trees.

The rootfs belongs to the container, so a path in it is followed the way the
container would follow it: a symbolic link resolves inside the rootfs, never
onto the host's files.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil

from evictor import cgroups
from evictor.diagnosis import SYSTEMD_FILES, ContainerFacts, HostFacts, RootfsFacts, Task
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerConfig, ContainerState

_CAP_SYS_RESOURCE = 24
_START_TIME_SLACK_SECONDS = 1.0
_SYSTEMD_SHARED = re.compile(r"libsystemd-shared-(\d+)")
_SYSTEMD_SHARED_DIRS = ("usr/lib/systemd", "lib/systemd", "usr/lib/*/systemd")
_TERMINALS = ("/dev/pts/", "/dev/tty", "/dev/console")


def host_facts(
    *,
    proc_root: Path = Path("/proc"),
    sys_root: Path = Path("/sys"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
) -> HostFacts:
    try:
        apparmor = (sys_root / "module/apparmor/parameters/enabled").read_text().strip() == "Y"
    except OSError:
        apparmor = False
    status = _status_fields((proc_root / "self/status").read_text())
    bounding = int(status.get("CapBnd", "0"), 16)
    net = sys_root / "class/net"
    bridges = frozenset(p.name for p in net.iterdir() if (p / "bridge").is_dir())
    return HostFacts(
        apparmor=apparmor,
        cap_sys_resource=bool(bounding >> _CAP_SYS_RESOURCE & 1),
        cgroup_layout=cgroups.layout(cgroup_root),
        bridges=bridges,
    )


def container_facts(
    runtime: LxcRuntime, name: str, *, proc_root: Path = Path("/proc")
) -> ContainerFacts:
    config = runtime.container_config(name)
    state, init_pid = runtime.state_and_pid(name)
    running = state in (ContainerState.RUNNING, ContainerState.FROZEN) and init_pid is not None
    tasks: tuple[Task, ...] = ()
    filesystems: frozenset[str] = frozenset()
    restart_pending = False
    if running and init_pid is not None:
        tasks = tuple(_tasks(proc_root, init_pid))
        filesystems = _filesystems((proc_root / str(init_pid) / "mountinfo").read_text())
        if config.prepared:
            started = psutil.Process(init_pid).create_time()
            changed = runtime.config_path(name).stat().st_mtime
            # A process's start time is known to about a second (the boot time's unit).
            restart_pending = changed > started + _START_TIME_SLACK_SECONDS
    return ContainerFacts(
        name=name,
        config=config,
        rootfs=rootfs_facts(Path(config.rootfs), config),
        running=running,
        tasks=tasks,
        filesystems=filesystems,
        restart_pending=restart_pending,
    )


def rootfs_facts(rootfs: Path, config: ContainerConfig) -> RootfsFacts:
    init = config.init_cmd.split()[0] if config.init_cmd.split() else "/sbin/init"
    systemd_version = None
    if "systemd" in resolve_in_rootfs(rootfs, init):
        systemd_version = _systemd_version(rootfs)
    inittab = rootfs / resolve_in_rootfs(rootfs, "/etc/inittab").lstrip("/")
    try:
        lines = inittab.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    return RootfsFacts(
        systemd_version=systemd_version,
        inittab_terminals=tuple(line for line in lines if _runs_on_a_terminal(line)),
        evictor_files=tuple(
            f.path for f in SYSTEMD_FILES if os.path.lexists(rootfs / f.path.lstrip("/"))
        ),
    )


def resolve_in_rootfs(rootfs: Path, path: str, *, hops: int = 16) -> str:
    """``path`` (absolute, inside the container) with its symbolic links followed
    the way the container sees them: an absolute target starts again at the rootfs."""
    resolved = "/"
    parts = [p for p in path.split("/") if p]
    while parts:
        part = parts.pop(0)
        candidate = posixpath.normpath(posixpath.join(resolved, part))
        host_path = rootfs / candidate.lstrip("/")
        if hops > 0 and host_path.is_symlink():
            hops -= 1
            target = os.readlink(host_path)
            parts = [p for p in target.split("/") if p] + parts
            resolved = "/" if target.startswith("/") else resolved
            continue
        resolved = candidate
    return resolved


def _systemd_version(rootfs: Path) -> int:
    """systemd's major version, from the name of its shared library (0 if not found)."""
    for directory in _SYSTEMD_SHARED_DIRS:
        for library in rootfs.glob(f"{directory}/libsystemd-shared-*.so"):
            if match := _SYSTEMD_SHARED.search(library.name):
                return int(match.group(1))
    return 0


def _runs_on_a_terminal(inittab_line: str) -> bool:
    """An inittab entry that puts a getty or a shell on a tty: busybox's "tty1::..." or
    sysvinit's "1:2345:respawn:/sbin/getty 38400 tty1"."""
    line = inittab_line.strip()
    if not line or line.startswith("#"):
        return False
    ident = line.split(":", 1)[0]
    return ident.startswith(("tty", "console")) or "getty" in line


def _status_fields(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _filesystems(mountinfo: str) -> frozenset[str]:
    """The filesystem types in a mountinfo text (the field after " - ")."""
    return frozenset(
        line.split(" - ", 1)[1].split()[0] for line in mountinfo.splitlines() if " - " in line
    )


def _namespace(proc_root: Path, pid: int, kind: str) -> str | None:
    try:
        return os.readlink(proc_root / str(pid) / "ns" / kind)
    except OSError:
        return None


def _tasks(proc_root: Path, init_pid: int) -> Iterator[Task]:
    """The tasks in the container's PID namespace (the container's init's)."""
    pid_namespace = _namespace(proc_root, init_pid, "pid")
    uts = _namespace(proc_root, init_pid, "uts")
    user = _namespace(proc_root, init_pid, "user")
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if _namespace(proc_root, pid, "pid") != pid_namespace:
            continue
        try:
            task = _task(proc_root, pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        yield dataclasses.replace(
            task,
            own_uts_namespace=_namespace(proc_root, pid, "uts") != uts,
            own_user_namespace=_namespace(proc_root, pid, "user") != user,
        )


def _task(proc_root: Path, pid: int) -> Task:
    directory = proc_root / str(pid)
    status = _status_fields((directory / "status").read_text())
    terminals: list[str] = []
    bpf_programs = psi_triggers = 0
    for fd in (directory / "fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(_TERMINALS):
            terminals.append(target)
        elif target == "anon_inode:bpf-prog":
            bpf_programs += 1
        elif target.endswith("pressure") and _opened_for_writing(directory / "fdinfo" / fd.name):
            psi_triggers += 1
    return Task(
        pid=pid,
        command=status.get("Name", "?"),
        uid=int(status.get("Uid", "0").split()[0]),
        terminals=tuple(sorted(set(terminals))),
        bpf_programs=bpf_programs,
        psi_triggers=psi_triggers,
    )


def _opened_for_writing(fdinfo: Path) -> bool:
    """A PSI file is a trigger when it is held open for writing (the trigger was written)."""
    try:
        flags = int(_status_fields(fdinfo.read_text()).get("flags", "0"), 8)
    except (OSError, ValueError):
        return False
    return flags & os.O_ACCMODE != os.O_RDONLY


def host_shutting_down(*, run_root: Path = Path("/run")) -> bool:
    """Whether the host is shutting down or rebooting: systemd says it is
    "stopping", or, without systemd, the runlevel is 0 or 6."""
    if (run_root / "systemd/system").is_dir():
        result = _output(["systemctl", "is-system-running"])
        return result.strip() == "stopping"
    return runlevel_is_shutdown(_output(["runlevel"]))


def runlevel_is_shutdown(runlevel_output: str) -> bool:
    """``runlevel`` prints the previous and the current runlevel ("N 5", "5 6")."""
    fields = runlevel_output.split()
    return len(fields) == 2 and fields[1] in ("0", "6")


def _output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    except OSError:  # not installed: no shutdown it could tell of
        return ""
