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
from pathlib import Path

from evictor import cgroups
from evictor.errors import ContainerNotFound
from evictor.images import ImageStore, StoredImage
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerSample, ContainerState, HostSample
from evictor.units import PAGE_SIZE_BYTES

DEFAULT_PROC_ROOT = Path("/proc")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sample:
    host: HostSample
    containers: tuple[ContainerSample, ...]
    orphan_images: tuple[str, ...] = ()  # committed images of containers that no longer exist


def parse_meminfo(text: str) -> dict[str, int]:
    """Parse /proc/meminfo into {field: bytes} (the kernel reports kB = KiB)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        value = int(parts[0])
        fields[key.strip()] = value * 1024 if len(parts) > 1 and parts[1] == "kB" else value
    return fields


def read_meminfo(proc_root: Path = DEFAULT_PROC_ROOT) -> dict[str, int]:
    """The kernel's own figures, {field: bytes}."""
    return parse_meminfo((proc_root / "meminfo").read_text())


def parse_zoneinfo_per_cpu_pages(text: str) -> int:
    """Pages on the per-CPU free lists: /proc/zoneinfo's pageset ``count:`` lines."""
    return sum(
        int(line.split()[1]) for line in text.splitlines() if line.lstrip().startswith("count:")
    )


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


class Monitor:
    def __init__(
        self, runtime: LxcRuntime, store: ImageStore, proc_root: Path = DEFAULT_PROC_ROOT
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.proc_root = proc_root
        # A container's cgroup is fixed while its init lives: found once per init,
        # {name: (init pid, cgroup)}; the init is looked up again once that pid is gone.
        self._cgroups: dict[str, tuple[int, cgroups.MemoryCgroup | None]] = {}

    def sample(self, *, skip: frozenset[str] = frozenset(), detail: bool = True) -> Sample:
        """Sample the host and every container but those in ``skip``.

        A container that is starting cannot be asked for its state while its
        pre-start hook runs (its monitor is busy with the hook), hence ``skip``.
        Without ``detail`` (the daemon's ticks), a container's memory is its usage
        and PSI only: the working set, anon/file split and limit cost the kernel a
        walk of its memory.stat, and only ``evictor status`` shows them.
        """
        images = {image.container: image for image in self.store.images()}
        containers = []
        seen: dict[str, tuple[int, cgroups.MemoryCgroup | None]] = {}
        for name in self.runtime.names():
            if name in skip:
                continue
            try:
                containers.append(self._sample_container(name, images.get(name), seen, detail))
            except ContainerNotFound:
                continue  # deleted between the listing and the sample
        self._cgroups = seen
        known = {c.name for c in containers} | skip
        orphans = tuple(n for n, i in images.items() if i.manifest is not None and n not in known)
        return Sample(
            host=sample_host(self.proc_root), containers=tuple(containers), orphan_images=orphans
        )

    def _memory_cgroup(
        self, name: str, seen: dict[str, tuple[int, cgroups.MemoryCgroup | None]]
    ) -> cgroups.MemoryCgroup | None:
        """The running container's memory cgroup: asked of LXC (its init pid) only when
        the init last seen has gone, so that a tick costs one LXC query a container."""
        cached = self._cgroups.get(name)
        if cached is None or not os.path.exists(f"{self.proc_root}/{cached[0]}"):
            pid = self.runtime.init_pid(name)
            if pid is None:
                return None
            cached = (
                pid,
                cgroups.memory_cgroup_of(
                    pid,
                    proc_root=self.proc_root,
                    cgroup_root=self.runtime.cgroup_root,
                    container=name,
                ),
            )
        seen[name] = cached
        return cached[1]

    def _sample_container(
        self,
        name: str,
        image: StoredImage | None,
        seen: dict[str, tuple[int, cgroups.MemoryCgroup | None]],
        detail: bool,
    ) -> ContainerSample:
        state = self.runtime.state(name)
        config_digest = self.runtime.config_digest(name)
        if state in (ContainerState.RUNNING, ContainerState.FROZEN):
            cgroup = self._memory_cgroup(name, seen)
            if cgroup is not None:
                try:
                    stats = (
                        cgroups.read_memory_stats(cgroup)
                        if detail
                        else cgroups.read_usage_and_pressure(cgroup)
                    )
                except FileNotFoundError:
                    seen.pop(name, None)  # stopped while we read it: sampled as it is next tick
                else:
                    return ContainerSample(
                        name=name,
                        state=state,
                        stale_image=image is not None and image.manifest is not None,
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
