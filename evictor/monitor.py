"""Sample host and container memory: one sample per tick.

Host figures come from /proc/meminfo, PSI from /proc/pressure/memory; container
figures from each container's memory cgroup (v1 or v2, found from its init's
/proc/PID/cgroup) and, for evicted containers, from their image's manifest.

MemFree and MemAvailable leave out the pages on the kernel's per-CPU free
lists, which kernels since 6.7 grow on their own: right after an eviction the
freed memory can sit there by hundreds of MiB (490 MiB seen here), free and
allocatable, before it shows in MemFree. The monitor counts those pages (from
/proc/zoneinfo) as free and available, so that the planner does not evict
again for memory the last eviction already freed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import select
import threading
from collections.abc import Callable
from pathlib import Path

from evictor import cgroups
from evictor.errors import ContainerNotFound
from evictor.images import ImageStore, StoredImage
from evictor.lxc_listing import WatchedListing
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerSample, ContainerState, HostSample
from evictor.units import PAGE_SIZE_BYTES

DEFAULT_PROC_ROOT = Path("/proc")
# Containers watched at most (three open files each): a soft limit of 1024 open
# files must leave room for the rest. Those beyond are asked of LXC every tick.
MAX_WATCHED_INITS = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sample:
    host: HostSample
    containers: tuple[ContainerSample, ...]
    orphan_images: tuple[str, ...] = ()  # committed images of containers that no longer exist


# One regex over the whole text: a tick reads both files, and a loop over their
# lines in Python cost as much as the kernel's making them, or more.
_MEMINFO_FIELD = re.compile(r"^([^:\n]+):[ \t]+(\d+)( kB)?$", re.MULTILINE)
_PAGESET_COUNT = re.compile(r"\n +count: +(\d+)")


def parse_meminfo(text: str) -> dict[str, int]:
    """Parse /proc/meminfo into {field: bytes} (the kernel reports kB = KiB)."""
    return {
        key.strip(): int(value) * 1024 if kib else int(value)
        for key, value, kib in _MEMINFO_FIELD.findall(text)
    }


def read_meminfo(proc_root: Path = DEFAULT_PROC_ROOT) -> dict[str, int]:
    """The kernel's own figures, {field: bytes}."""
    return parse_meminfo((proc_root / "meminfo").read_text())


def parse_zoneinfo_per_cpu_pages(text: str) -> int:
    """Pages on the per-CPU free lists: /proc/zoneinfo's pageset ``count:`` lines."""
    return sum(map(int, _PAGESET_COUNT.findall(text)))


def read_per_cpu_free_bytes(proc_root: Path = DEFAULT_PROC_ROOT) -> int:
    """Free memory on the per-CPU lists, which MemFree and MemAvailable leave out."""
    try:
        text = cgroups.read_text(proc_root / "zoneinfo")
    except OSError:
        return 0
    return parse_zoneinfo_per_cpu_pages(text) * PAGE_SIZE_BYTES


def read_free_bytes(proc_root: Path = DEFAULT_PROC_ROOT) -> int:
    """Really free memory now: MemFree plus the per-CPU free lists."""
    return read_meminfo(proc_root)["MemFree"] + read_per_cpu_free_bytes(proc_root)


def sample_host(proc_root: Path = DEFAULT_PROC_ROOT) -> HostSample:
    meminfo = parse_meminfo(cgroups.read_text(proc_root / "meminfo"))
    per_cpu_free_bytes = read_per_cpu_free_bytes(proc_root)
    return HostSample(
        total_bytes=meminfo["MemTotal"],
        available_bytes=meminfo["MemAvailable"] + per_cpu_free_bytes,
        free_bytes=meminfo["MemFree"] + per_cpu_free_bytes,
        # Reclaimable slab counts as cache, as free(1) and psutil count it.
        cached_bytes=meminfo["Cached"] + meminfo.get("SReclaimable", 0),
        swap_total_bytes=meminfo.get("SwapTotal", 0),
        swap_free_bytes=meminfo.get("SwapFree", 0),
        pressure=cgroups.read_pressure(proc_root / "pressure" / "memory"),
    )


@dataclasses.dataclass(frozen=True)
class _Watch:
    """What stays open of a running container between ticks: its init's pidfd (which,
    unlike a pid, can never name another process) and its cgroup's usage and freeze
    files, read again in place (a pread each) instead of opened every tick."""

    pidfd: int
    usage_fd: int
    freeze_fd: int

    def close(self) -> None:
        for fd in (self.pidfd, self.usage_fd, self.freeze_fd):
            os.close(fd)


@dataclasses.dataclass(frozen=True)
class _Init:
    """A running container's init and its memory cgroup; ``watch`` while fewer than
    MAX_WATCHED_INITS are watched."""

    pid: int
    cgroup: cgroups.MemoryCgroup | None
    watch: _Watch | None = None

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()


class Monitor:
    def __init__(
        self, runtime: LxcRuntime, store: ImageStore, proc_root: Path = DEFAULT_PROC_ROOT
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.proc_root = proc_root
        # A container's cgroup is fixed while its init lives: found once per init.
        self._inits: dict[str, _Init] = {}
        # The watched inits' pidfds, all polled at once at each tick.
        self._pidfds = select.poll()
        self._watched: dict[int, str] = {}  # pidfd: container
        # One sample at a time: the demo reads through the daemon's engine while it ticks.
        self._lock = threading.Lock()
        self._listing = WatchedListing(runtime)

    def sample(
        self,
        *,
        skip: frozenset[str] = frozenset(),
        detail: bool = True,
        wants_pressure: Callable[[str], bool] | None = None,
    ) -> Sample:
        """Sample the host and every container but those in ``skip``.

        A container that is starting cannot be asked for its state while its
        pre-start hook runs (its monitor is busy with the hook), hence ``skip``.
        Without ``detail`` (the daemon's ticks), a container's memory is its usage
        and PSI only: the working set, anon/file split and limit cost the kernel a
        walk of its memory.stat, and only ``evictor status`` shows them; and LXC is
        not asked the state of a container whose init still runs (its cgroup says
        whether it is frozen); and the LXC path is listed through its inotify watch
        (lxc_listing), which a command's one sample would not repay.
        ``wants_pressure``: whose PSI to read (default all).
        """
        with self._lock:
            return self._sample(skip, detail, wants_pressure)

    def _sample(
        self, skip: frozenset[str], detail: bool, wants_pressure: Callable[[str], bool] | None
    ) -> Sample:
        self._forget_ended_inits()
        images = {image.container: image for image in self.store.images()}
        containers = []
        defined = self.runtime.defined() if detail else self._listing.defined()
        for name, config_digest in defined.items():
            if name in skip:
                continue
            pressure = wants_pressure is None or wants_pressure(name)
            try:
                containers.append(
                    self._sample_container(name, config_digest, images.get(name), detail, pressure)
                )
            except ContainerNotFound:
                continue  # deleted between the listing and the sample
        known = {c.name for c in containers} | skip
        for name in self._inits.keys() - known:
            self._forget(name)
        orphans = tuple(n for n, i in images.items() if i.manifest is not None and n not in known)
        return Sample(
            host=sample_host(self.proc_root), containers=tuple(containers), orphan_images=orphans
        )

    def close(self) -> None:
        with self._lock:
            for name in list(self._inits):
                self._forget(name)
            self._listing.close()

    def _forget(self, name: str) -> None:
        init = self._inits.pop(name)
        if init.watch is not None:
            self._pidfds.unregister(init.watch.pidfd)
            del self._watched[init.watch.pidfd]
        init.close()

    def _forget_ended_inits(self) -> None:
        """Drop the watched inits that have exited: one poll for the whole fleet."""
        for pidfd, _ in self._pidfds.poll(0):
            self._forget(self._watched[pidfd])

    def _state(self, name: str) -> ContainerState:
        """LXC's state; the init of a running or frozen container is then watched."""
        state, pid = self.runtime.state_and_pid(name)
        if state in (ContainerState.RUNNING, ContainerState.FROZEN) and pid is not None:
            self._find_init(name, pid)
        return state

    def _find_init(self, name: str, pid: int) -> None:
        init = self._inits.get(name)
        if init is not None and init.pid == pid:
            return
        if init is not None:
            self._forget(name)
        cgroup = cgroups.memory_cgroup_of(
            pid, proc_root=self.proc_root, cgroup_root=self.runtime.cgroup_root, container=name
        )
        watch = None
        if (
            cgroup is not None
            and cgroup.freeze_path is not None
            and len(self._watched) < MAX_WATCHED_INITS
        ):
            watch = _open_watch(pid, cgroup, cgroup.freeze_path)
        if watch is not None:
            self._pidfds.register(watch.pidfd, select.POLLIN)
            self._watched[watch.pidfd] = name
        self._inits[name] = _Init(pid, cgroup, watch)

    def _sample_container(
        self,
        name: str,
        config_digest: str,
        image: StoredImage | None,
        detail: bool,
        pressure: bool,
    ) -> ContainerSample:
        stale_image = image is not None and image.manifest is not None
        init = self._inits.get(name)
        if not detail and init is not None and init.watch is not None:
            ticked = _tick_sample(name, config_digest, init, stale_image, pressure)
            if ticked is not None:
                return ticked
        state = self._state(name)
        init = self._inits.get(name)
        if state in (ContainerState.RUNNING, ContainerState.FROZEN) and init is not None:
            cgroup = init.cgroup
            if cgroup is not None:
                try:
                    stats = (
                        cgroups.read_memory_stats(cgroup)
                        if detail
                        else cgroups.read_usage_and_pressure(cgroup, pressure=pressure)
                    )
                except OSError:
                    pass  # stopped while we read it: sampled as it is next tick
                else:
                    return ContainerSample(
                        name=name,
                        state=state,
                        stale_image=stale_image,
                        usage_bytes=stats.usage_bytes,
                        working_set_bytes=stats.working_set_bytes,
                        anon_bytes=stats.anon_bytes,
                        file_bytes=stats.file_bytes,
                        limit_bytes=stats.limit_bytes,
                        pressure=stats.pressure,
                        config_digest=config_digest,
                    )
        if state is ContainerState.STOPPED and image is not None and image.manifest is not None:
            return ContainerSample(
                name=name,
                state=state,
                evicted=True,
                evicted_usage_bytes=image.manifest.memory_usage_bytes,
                image_bytes=image.manifest.image_bytes,
                evicted_at=image.manifest.evicted_at,
                config_digest=config_digest,
            )
        return ContainerSample(name=name, state=state, config_digest=config_digest)


def _tick_sample(
    name: str, config_digest: str, init: _Init, stale_image: bool, pressure: bool
) -> ContainerSample | None:
    """A tick's sample of a watched container, read from its files kept open (LXC
    reads the freezer too); None if they do not tell: its cgroup has just gone, or
    it is half-way frozen (LXC is asked then)."""
    assert init.watch is not None and init.cgroup is not None  # a watch is on a cgroup
    try:
        frozen = cgroups.parse_freeze_state(os.pread(init.watch.freeze_fd, 16, 0))
        usage_bytes = int(os.pread(init.watch.usage_fd, 32, 0))
    except OSError:
        return None
    if frozen is None:
        return None
    return ContainerSample(
        name=name,
        state=ContainerState.FROZEN if frozen else ContainerState.RUNNING,
        stale_image=stale_image,
        usage_bytes=usage_bytes,
        pressure=cgroups.read_cgroup_pressure(init.cgroup) if pressure else None,
        config_digest=config_digest,
    )


def _open_watch(pid: int, cgroup: cgroups.MemoryCgroup, freeze_path: Path) -> _Watch | None:
    opened: list[int] = []
    try:
        opened.append(os.pidfd_open(pid))
        for path in (cgroups.usage_path(cgroup), freeze_path):
            opened.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError:  # stopped just now, or out of files: asked of LXC
        for fd in opened:
            os.close(fd)
        return None
    return _Watch(*opened)
