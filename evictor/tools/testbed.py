"""Checkpointable workload containers, for the tests, the demo and the benchmarks.

Each is a bare busybox rootfs whose own init starts ``memhog`` (see
workload/memhog.c): it holds a chosen amount of memory filled with a verifiable
pattern and reports a counter in ``/var/memhog.status``. The config follows
PLATFORM.md: no ttys or console, no AppArmor key, no bind mounts of the host,
an empty network namespace by default. On request a container gets a veth NIC
on lxcbr0 (a static address LXC sets, or DHCP through busybox udhcpc) and then
a TCP echo server on port 7000, and it can be unprivileged (an id map, its
rootfs owned by the mapped ids). Stock Debian containers are in ``stock``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from evictor import cgroups
from evictor.errors import EvictorError
from evictor.lxc_runtime import LxcRuntime
from evictor.model import validate_container_name

if TYPE_CHECKING:
    from evictor.tools.stock import Network

BUSYBOX = Path("/bin/busybox")
STATUS_PATH = "var/memhog.status"
DEFAULT_CACHE_DIR = Path("/var/cache/evictor")
ECHO_PORT = 7000
# The id map of an unprivileged container: root's range in /etc/subuid and /etc/subgid.
MAPPED_ROOT_ID = 100000
MAPPED_ID_COUNT = 65536
# busybox udhcpc's hook: configures eth0 from the lease (applets called through
# /bin/busybox: the rootfs has no applet links but /bin/sh).
_UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
deconfig) /bin/busybox ifconfig "$interface" 0.0.0.0 up ;;
bound|renew)
    /bin/busybox ifconfig "$interface" "$ip" netmask "$subnet" up
    if [ -n "$router" ]; then
        /bin/busybox route del default 2>/dev/null
        /bin/busybox route add default gw "${router%% *}"
    fi ;;
esac
exit 0
"""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkloadStatus:
    """One line of memhog's status file."""

    incarnation: str  # drawn at process start: unchanged across a checkpoint/restore
    pid: int
    child: int  # a scribe's child process; 0 for others
    counter: int
    passes: int  # complete verifications of the memory against the ledger
    writes: int  # a scribe's block rewrites
    messages: int  # a scribe's messages from its child, through the pipe
    errors: int  # blocks, messages and children that ever failed a check
    mib: int


def memhog_binary(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Compile memhog statically (once per source version) and return its path."""
    source = resources.files("evictor.tools").joinpath("workload/memhog.c").read_bytes()
    binary = cache_dir / f"memhog-{hashlib.sha256(source).hexdigest()[:12]}"
    if binary.exists():
        return binary
    cache_dir.mkdir(parents=True, exist_ok=True)
    source_path = binary.with_suffix(".c")
    source_path.write_bytes(source)
    temporary = binary.with_suffix(".tmp")
    result = subprocess.run(
        ["gcc", "-O2", "-static", "-o", str(temporary), str(source_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise EvictorError(f"compiling memhog failed: {result.stderr.strip()}")
    os.replace(temporary, binary)
    return binary


def _container_config(
    name: str,
    rootfs: Path,
    *,
    with_tty: bool,
    nic_lines: Sequence[str] = ("lxc.net.0.type = empty",),
    id_map_lines: Sequence[str] = (),
) -> str:
    lines = [
        f"lxc.uts.name = {name}",
        f"lxc.rootfs.path = dir:{rootfs}",
        *nic_lines,
        "lxc.autodev = 1",
        "lxc.mount.auto = proc:mixed sys:ro cgroup:mixed",
        "lxc.signal.halt = SIGUSR1",
        "lxc.signal.reboot = SIGTERM",
        "lxc.cap.drop = sys_module mac_admin mac_override sys_time",
    ]
    if with_tty:
        # A tty makes CRIU refuse the dump ("tty: Found slave peer index 0 ...").
        lines += ["lxc.tty.max = 1", "lxc.pty.max = 1"]
    else:
        lines += ["lxc.tty.max = 0", "lxc.pty.max = 0", "lxc.console.path = none"]
    lines += id_map_lines
    return "\n".join(lines) + "\n"


def create_workload_container(
    runtime: LxcRuntime,
    name: str,
    *,
    memory_mib: int,
    seed: int = 1,
    with_tty: bool = False,
    scribe: bool = False,
    compressible: bool = False,
    fill_rate_mib_per_second: int | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    network: Network | None = None,
    unprivileged: bool = False,
) -> None:
    """Define (not start) a container whose init runs memhog holding ``memory_mib`` MiB
    (of incompressible memory, unless ``compressible``), filled at once or at
    ``fill_rate_mib_per_second``; a ``scribe`` keeps rewriting it and talks with a
    child through shared memory and a pipe.

    With a ``network`` that has a NIC, init also runs a TCP echo server on port
    7000 (and, for DHCP, busybox udhcpc). ``unprivileged`` maps the container's
    ids to 100000-165535 and hands its rootfs to the mapped root.
    """
    validate_container_name(name)
    container_dir = runtime.lxc_path / name
    rootfs = container_dir / "rootfs"
    for directory in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "var", "root"):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin/busybox")
    os.symlink("busybox", rootfs / "bin/sh")
    os.link(rootfs / "bin/busybox", rootfs / "sbin/init")
    shutil.copy2(memhog_binary(cache_dir), rootfs / "bin/memhog")
    memhog = f"/bin/memhog {memory_mib} {seed} /{STATUS_PATH}"
    options = (
        (["scribe"] if scribe else [])
        + (["compressible"] if compressible else [])
        + ([f"rate={fill_rate_mib_per_second}"] if fill_rate_mib_per_second else [])
    )
    inittab = [" ".join(["::once:" + memhog, *options])]
    if with_tty:
        inittab.append("tty1::respawn:/bin/sh")
    nic_lines: Sequence[str] = ("lxc.net.0.type = empty",)
    if network is not None and network.has_nic:
        from evictor.tools import stock  # imported here: stock imports this module

        nic_lines = stock.nic_config_lines(name, network)
        # -ll: nc keeps listening and serves each connection with its own cat.
        inittab.append(f"::respawn:/bin/busybox nc -ll -p {ECHO_PORT} -e /bin/busybox cat")
        if network.kind == "dhcp":
            (rootfs / "etc/udhcpc.sh").write_text(_UDHCPC_SCRIPT)
            os.chmod(rootfs / "etc/udhcpc.sh", 0o755)
            # -f: stays in the foreground, a child of init, renewing the lease.
            inittab.append("::once:/bin/busybox udhcpc -i eth0 -s /etc/udhcpc.sh -f -S")
    (rootfs / "etc/inittab").write_text("\n".join(inittab) + "\n")
    (rootfs / "etc/fstab").touch()
    id_map_lines: list[str] = []
    if unprivileged:
        ensure_traversable(runtime.lxc_path)
        os.chmod(container_dir, 0o755)  # the mapped root walks into its rootfs
        _chown_tree(rootfs, MAPPED_ROOT_ID)
        id_map_lines = id_map_config_lines()
    (container_dir / "config").write_text(
        _container_config(
            name, rootfs, with_tty=with_tty, nic_lines=nic_lines, id_map_lines=id_map_lines
        )
    )


def id_map_config_lines() -> list[str]:
    """An unprivileged container's ``lxc.idmap`` lines."""
    return [
        f"lxc.idmap = u 0 {MAPPED_ROOT_ID} {MAPPED_ID_COUNT}",
        f"lxc.idmap = g 0 {MAPPED_ROOT_ID} {MAPPED_ID_COUNT}",
    ]


def ensure_traversable(lxc_path: Path) -> None:
    """Make ``lxc_path`` searchable by others (adding only ``x``, as 0711 does) and
    check that its ancestors are: LXC sets an unprivileged container's rootfs up as
    its mapped root, which has no rights over host root's private directories."""
    mode = lxc_path.stat().st_mode
    if mode & 0o001 == 0:
        os.chmod(lxc_path, (mode & 0o7777) | 0o011)
    for ancestor in lxc_path.resolve().parents:
        if ancestor.stat().st_mode & 0o001 == 0:
            raise EvictorError(
                f"{ancestor} is not searchable by others: an unprivileged container's"
                f" root (host uid {MAPPED_ROOT_ID}) cannot reach {lxc_path} through it"
            )


def _chown_tree(root: Path, owner: int) -> None:
    """Hand a tree to ``owner`` (uid and gid), symlinks themselves included."""
    os.lchown(root, owner, owner)
    for directory, subdirectories, files in os.walk(root):
        for entry in (*subdirectories, *files):
            os.lchown(os.path.join(directory, entry), owner, owner)


def parse_status(line: str) -> WorkloadStatus:
    fields = dict(item.split("=", 1) for item in line.split())
    counts = {f.name: int(fields[f.name]) for f in dataclasses.fields(WorkloadStatus)[1:]}
    return WorkloadStatus(incarnation=fields["incarnation"], **counts)


def read_status(runtime: LxcRuntime, name: str) -> WorkloadStatus | None:
    """The workload's last status, or None before it first wrote one."""
    try:
        line = (runtime.lxc_path / name / "rootfs" / STATUS_PATH).read_text()
    except FileNotFoundError:
        return None
    return parse_status(line) if line.strip() else None


def wait_alive(
    runtime: LxcRuntime, name: str, *, original: WorkloadStatus, timeout_seconds: float = 60.0
) -> WorkloadStatus:
    """Check that ``name``'s workload runs on, intact, as the process ``original`` was:
    read now (after whatever was done to it), then wait for two more ticks of that
    process, with no error and, for a scribe, memory rewritten and messages passed
    since now. Returns that status; raises EvictorError naming what is wrong."""
    now = read_status(runtime, name)
    if now is None:
        raise EvictorError(f"{name}: the workload never wrote its status", container=name)
    later = wait_for_counter(runtime, name, above=now.counter + 1, timeout_seconds=timeout_seconds)
    wrong = []
    if later.incarnation != original.incarnation:
        wrong.append("it is a new process (started again, not restored)")
    if later.errors:
        wrong.append(f"{later.errors} errors in its memory, child or pipe")
    if original.child and (later.writes <= now.writes or later.messages <= now.messages):
        wrong.append("it no longer rewrites its memory or hears from its child")
    if wrong:
        raise EvictorError(f"{name}: workload not intact: {'; '.join(wrong)}", container=name)
    return later


def wait_for_new_incarnation(
    runtime: LxcRuntime, name: str, *, old: WorkloadStatus, timeout_seconds: float = 60.0
) -> WorkloadStatus:
    """Wait for the first status of a process other than ``old``'s (after a cold
    start the file holds the previous process's last line until the new one writes)."""
    return _wait_for_status(
        runtime,
        name,
        lambda status: status.incarnation != old.incarnation,
        f"no new workload process within {timeout_seconds:g} s",
        timeout_seconds,
    )


def wait_for_counter(
    runtime: LxcRuntime, name: str, *, above: int, timeout_seconds: float = 60.0
) -> WorkloadStatus:
    """Wait until the workload's counter passes ``above`` and return that status."""
    return _wait_for_status(
        runtime,
        name,
        lambda status: status.counter > above,
        f"workload counter did not pass {above} within {timeout_seconds:g} s",
        timeout_seconds,
    )


def _wait_for_status(
    runtime: LxcRuntime,
    name: str,
    accept: Callable[[WorkloadStatus], bool],
    failure: str,
    timeout_seconds: float,
) -> WorkloadStatus:
    """Poll the workload's status until ``accept`` takes one; else raise ``failure``."""
    deadline = time.monotonic() + timeout_seconds
    status = None
    while time.monotonic() < deadline:
        status = read_status(runtime, name)
        if status is not None and accept(status):
            return status
        time.sleep(0.1)
    seen = f"last status {status}" if status else "no status written"
    raise EvictorError(
        f"{name}: {failure} (container {runtime.state(name).value}, {seen})", container=name
    )


def stray_tasks(runtime: LxcRuntime, names: Sequence[str]) -> list[int]:
    """Tasks of these containers that LXC does not run: in a cgroup of theirs
    (``lxc.payload.NAME``, or ``lxc.payload.NAME-N`` when that one was taken) that
    is not the one of the running container's init. A copy a killed restore left
    behind lives there, whatever it holds open; the tests' judge of such copies,
    independent of evictor's own way of finding them. A zombie (ended, not yet
    reaped by init) holds nothing and does not count."""
    live = {}
    for name in names:
        pid = runtime.init_pid(name)
        if pid is not None:
            live[name] = _payload_cgroup(Path(f"/proc/{pid}/cgroup"))
    stray = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        cgroup = _payload_cgroup(entry / "cgroup")
        if cgroup is None:
            continue
        for name in names:
            prefix = f"lxc.payload.{name}"
            ours = cgroup == prefix or (
                cgroup.startswith(f"{prefix}-") and cgroup[len(prefix) + 1 :].isdigit()
            )
            if ours and live.get(name) != cgroup and not _zombie(entry):
                stray.append(int(entry.name))
    return stray


def _payload_cgroup(proc_cgroup: Path) -> str | None:
    """The top cgroup of a task in the unified hierarchy (``0::/TOP/...``)."""
    try:
        unified = cgroups.parse_proc_cgroup(proc_cgroup.read_text()).get("", "")
    except OSError:
        return None  # exited meanwhile
    return unified.lstrip("/").split("/", 1)[0] or None


def _zombie(proc_entry: Path) -> bool:
    try:
        stat = (proc_entry / "stat").read_text()
    except OSError:
        return True  # gone meanwhile
    return stat[stat.rindex(")") + 2 :].startswith("Z")
