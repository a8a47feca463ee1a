"""Value objects shared by the adapters, the decision core and the engine. No I/O here."""

from __future__ import annotations

import dataclasses
import enum
import re

from evictor.errors import UsageError

# LXC accepts almost any name, but a name becomes a directory of the image
# store and an argument of lxc-checkpoint: allow only what cannot escape either.
_CONTAINER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class CgroupLayout(enum.Enum):
    V1 = "v1"
    HYBRID = "hybrid"  # v1 controllers, and a cgroup2 tree at unified/
    V2 = "v2"


class ContainerState(enum.Enum):
    """A container's state as LXC reports it."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    ABORTING = "ABORTING"
    FREEZING = "FREEZING"
    FROZEN = "FROZEN"
    THAWED = "THAWED"


def validate_container_name(name: str) -> str:
    """Return ``name`` if it is a safe container name, else raise UsageError."""
    if not _CONTAINER_NAME.fullmatch(name):
        raise UsageError(
            f"invalid container name {name!r}: use 1-64 letters, digits, '_', '.' or '-',"
            " starting with a letter or digit",
            container=None,
        )
    return name


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Pressure:
    """One PSI line pair (``some`` and ``full``), as percentages of wall time."""

    some_avg10: float = 0.0
    some_avg60: float = 0.0
    full_avg10: float = 0.0
    full_avg60: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HostSample:
    total_bytes: int
    # MemAvailable (what can be allocated without swapping) and MemFree, each
    # plus the per-CPU free lists, which the kernel leaves out of both (monitor.py)
    available_bytes: int
    free_bytes: int
    cached_bytes: int  # the page cache
    swap_total_bytes: int
    swap_free_bytes: int
    pressure: Pressure | None  # None where the kernel has no PSI


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ContainerSample:
    """One container as the monitor saw it; evicted ones carry their recorded footprint."""

    name: str
    state: ContainerState
    evicted: bool = False  # STOPPED with a committed image
    stale_image: bool = False  # RUNNING although it has a committed image: started by hand
    usage_bytes: int = 0  # cgroup usage: anonymous memory, page cache, kernel memory
    # Read in a detailed sample only (not the daemon's ticks): 0 and None otherwise.
    working_set_bytes: int = 0  # usage minus inactive file cache, as the kubelet counts it
    anon_bytes: int = 0
    file_bytes: int = 0
    limit_bytes: int | None = None  # None: unlimited, or not read
    pressure: Pressure | None = None  # the cgroup's own PSI, where exposed
    evicted_usage_bytes: int | None = None  # usage recorded at eviction
    image_bytes: int | None = None
    evicted_at: float | None = None  # Unix time
    # Identifies the LXC config file's version (a change resets the checkpoint backoff).
    config_digest: str | None = None


class Managed(enum.Enum):
    """Where evictor stands with a container (lifecycle.py has the legal moves).

    RUNNING: in LXC's hands, as any container evictor has not taken; EVICTING
    and RESTORING are in flight: a crash leaves them, and the next operation
    on the container (or the daemon's start) settles them with reality.
    """

    RUNNING = "RUNNING"
    EVICTING = "EVICTING"
    EVICTED = "EVICTED"
    RESTORING = "RESTORING"
    FAILED = "FAILED"  # its restore failed (image kept, retried with backoff) or could not
    #                   be undone after a failed eviction (image kept aside)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Label:
    """What an operator set on one container with ``evictor label``; beats any rule."""

    priority: int | None = None
    protected: bool | None = None
    drain: bool | None = None  # False: drains (by hand, or at shutdown) leave it running


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Priority:
    value: int
    protected: bool
    source: str  # where the value came from: "label", "rule 'db-*'" or "default"
    drain: bool = True  # drains checkpoint it (unless it is protected)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointFailure:
    """A container's eviction attempts that failed in a row, with one config."""

    reason: str  # CRIU's root cause, as the last attempt reported it
    at: float  # the last attempt, Unix seconds
    count: int = 1  # failures in a row since the last success or config change
    persistent: bool = True  # a cause that cannot pass by itself (a tty, an unsupported fd)
    config_digest: str | None = None  # the container's LXC config at the last attempt


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CheckVerdict:
    """What ``evictor check`` last found, remembered for the planner and for ``status``."""

    checkpointable: bool
    problems: tuple[str, ...]  # one line each, the first the one to show
    at: float  # Unix seconds
    config_digest: str | None  # the container's LXC config then: a change makes it stale
    trial: bool = False  # a real dump was tried


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class History:
    """What evictor did to, and knows of, one container (times are Unix seconds)."""

    eviction_times: tuple[float, ...] = ()
    last_restored_at: float | None = None
    checkpoint_failure: CheckpointFailure | None = None  # its last eviction attempts failed
    restore_failures: int = 0  # consecutive failed restores
    last_restore_failure_at: float | None = None
    restore_failure: str | None = None  # why the last of them failed
    check: CheckVerdict | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Nic:
    """One network interface of a container's LXC config."""

    index: int  # N of lxc.net.N
    type: str  # veth, empty, macvlan, phys, ...
    name: str  # inside the container (lxc.net.N.name, else ethN)
    link: str | None = None  # the host bridge or device
    ipv4_addresses: tuple[str, ...] = ()  # static ones, "10.0.3.5/24"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class IdMap:
    """Where a user-namespaced container's root lives on the host."""

    root_uid: int
    root_gid: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ContainerConfig:
    """What a container's LXC config says, as far as checkpointing cares (effective
    values: includes resolved, later lines winning)."""

    rootfs: str
    tty_max: int = 0
    pty_max: int = 0
    console_path: str = ""  # "" is LXC's default: a console; "none" is none
    apparmor_profile: str = ""
    mount_entries: tuple[str, ...] = ()
    nics: tuple[Nic, ...] = ()
    idmap: IdMap | None = None  # None: privileged
    init_cmd: str = ""
    environment: tuple[str, ...] = ()
    seccomp_profile: str = ""
    criu_options: tuple[str, ...] = ()  # kept for it by `evictor prepare`
    prepared: bool = False  # `evictor prepare` has changed it

    @property
    def unprivileged(self) -> bool:
        return self.idmap is not None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MemoryTrend:
    """Where MemAvailable is heading, and how fast evictions free memory lately."""

    available_bytes_per_second: float  # MemAvailable's slope over the last seconds
    eviction_bytes_per_second: float  # what recent evictions freed per second of their time
