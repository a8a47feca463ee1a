"""Checkpointable workload containers, for the tests, the demo and the benchmarks.

Each is a bare busybox rootfs whose own init starts ``memhog`` (see
workload/memhog.c): it holds a chosen amount of memory filled with a verifiable
pattern and reports a counter in ``/var/memhog.status``. The config follows
PLATFORM.md: no ttys or console, no AppArmor key, no bind mounts of the host,
an empty network namespace.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path

from evictor.errors import EvictorError
from evictor.lxc_runtime import LxcRuntime
from evictor.model import validate_container_name

BUSYBOX = Path("/bin/busybox")
STATUS_PATH = "var/memhog.status"
DEFAULT_CACHE_DIR = Path("/var/cache/evictor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkloadStatus:
    """One line of memhog's status file."""

    incarnation: str  # drawn at process start: unchanged across a checkpoint/restore
    pid: int
    counter: int
    passes: int  # complete verifications of the memory pattern
    errors: int  # words that ever failed verification
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


def _container_config(name: str, rootfs: Path, *, with_tty: bool) -> str:
    lines = [
        f"lxc.uts.name = {name}",
        f"lxc.rootfs.path = dir:{rootfs}",
        "lxc.net.0.type = empty",
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
    return "\n".join(lines) + "\n"


def create_workload_container(
    runtime: LxcRuntime,
    name: str,
    *,
    memory_mib: int,
    seed: int = 1,
    with_tty: bool = False,
    compressible: bool = False,
    cache_dir: Path = DEFAULT_CACHE_DIR,
) -> None:
    """Define (not start) a container whose init runs memhog holding ``memory_mib`` MiB
    (of incompressible memory, unless ``compressible``)."""
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
    inittab = [f"::once:{memhog} compressible" if compressible else f"::once:{memhog}"]
    if with_tty:
        inittab.append("tty1::respawn:/bin/sh")
    (rootfs / "etc/inittab").write_text("\n".join(inittab) + "\n")
    (rootfs / "etc/fstab").touch()
    (container_dir / "config").write_text(_container_config(name, rootfs, with_tty=with_tty))


def parse_status(line: str) -> WorkloadStatus:
    fields = dict(item.split("=", 1) for item in line.split())
    return WorkloadStatus(
        incarnation=fields["incarnation"],
        pid=int(fields["pid"]),
        counter=int(fields["counter"]),
        passes=int(fields["passes"]),
        errors=int(fields["errors"]),
        mib=int(fields["mib"]),
    )


def read_status(runtime: LxcRuntime, name: str) -> WorkloadStatus | None:
    """The workload's last status, or None before it first wrote one."""
    try:
        line = (runtime.lxc_path / name / "rootfs" / STATUS_PATH).read_text()
    except FileNotFoundError:
        return None
    return parse_status(line) if line.strip() else None


def wait_for_counter(
    runtime: LxcRuntime, name: str, *, above: int, timeout_seconds: float = 60.0
) -> WorkloadStatus:
    """Wait until the workload's counter passes ``above`` and return that status."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        status = read_status(runtime, name)
        if status is not None and status.counter > above:
            return status
        time.sleep(0.1)
    raise EvictorError(
        f"{name}: workload counter did not pass {above} within {timeout_seconds:g} s",
        container=name,
    )
