"""Is a container checkpointable here, and what would make it so? Pure: facts in,
findings and a preparation out.

The facts come from the container's LXC config, its rootfs, its running tasks
(read from /proc, never frozen) and the host (inspection.py gathers them).
Each finding says what is wrong, with the evidence, and the remedy; those that
``evictor prepare`` can apply safely are marked so, and ``preparation`` lists
the changes that apply them. Every rule is a failure measured on our machines
(PLATFORM.md, docs/compatibility.md), with the error CRIU gives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from evictor.model import CgroupLayout, ContainerConfig

# systemd's version from which a unit sees MEMORY_PRESSURE_WATCH (and PID 1 and
# journald arm PSI triggers CRIU cannot restore).
SYSTEMD_PSI_WATCH_VERSION = 254
LEGACY_CGROUP_ARGUMENT = "systemd.legacy_systemd_cgroup_controller=1"
PSI_WATCH_OFF = "MEMORY_PRESSURE_WATCH=/dev/null"
# LXC binds this itself, and maps it for CRIU (--ext-mount-map).
_MAPPED_BY_LXC = ("/sys/fs/fuse/connections",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HostFacts:
    apparmor: bool  # the kernel enforces AppArmor
    cap_sys_resource: bool  # root holds CAP_SYS_RESOURCE (in its bounding set)
    cgroup_layout: CgroupLayout
    bridges: frozenset[str]  # host bridges that exist


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """One task of a running container, as /proc shows it."""

    pid: int
    command: str
    uid: int  # on the host
    terminals: tuple[str, ...] = ()  # ttys, ptys or a console it holds open
    bpf_programs: int = 0  # BPF program fds it holds
    psi_triggers: int = 0  # memory-pressure files it holds open for writing (PSI triggers)
    own_uts_namespace: bool = False  # not the container init's
    own_user_namespace: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class RootfsFacts:
    systemd_version: int | None = None  # None: its init is not systemd
    inittab_terminals: tuple[str, ...] = ()  # inittab lines that run something on a tty
    evictor_files: tuple[str, ...] = ()  # files `evictor prepare` added, present


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContainerFacts:
    name: str
    config: ContainerConfig
    rootfs: RootfsFacts
    running: bool
    tasks: tuple[Task, ...] = ()  # when running
    filesystems: frozenset[str] = frozenset()  # types mounted in it, when running
    restart_pending: bool = False  # running since before `evictor prepare` changed it


@dataclasses.dataclass(frozen=True, kw_only=True)
class Finding:
    code: str  # stable, for scripts: "tty", "apparmor", "non-root-tasks", ...
    problem: str  # what is wrong, with the evidence and CRIU's error
    remedy: str
    by_prepare: bool  # `evictor prepare` applies the remedy


@dataclasses.dataclass(frozen=True, kw_only=True)
class RootfsFile:
    """A file ``evictor prepare`` adds inside a container's rootfs."""

    path: str  # absolute, inside the rootfs
    content: str | None = None  # a regular file's text...
    symlink_to: str | None = None  # ...or a symbolic link's target


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preparation:
    settings: tuple[tuple[str, str], ...]  # LXC keys and values, appended to the config
    criu_options: tuple[str, ...]  # kept for the container, passed to CRIU at dump and restore
    rootfs_files: tuple[RootfsFile, ...]

    @property
    def empty(self) -> bool:
        return not (self.settings or self.criu_options or self.rootfs_files)


SERVICE_DROP_IN = RootfsFile(
    path="/etc/systemd/system/service.d/evictor-checkpoint.conf",
    content="""\
# Written by `evictor prepare` (`evictor prepare --undo` removes it): what CRIU
# needs to checkpoint this container's services.
[Service]
# CRIU cannot dump a UTS or user namespace of a service's own
# ("Can't dump nested uts namespace", "Can't dump nested user namespace").
ProtectHostname=no
PrivateUsers=no
# A memory-pressure trigger cannot be restored: after a restore the service
# would spin on it.
Environment=MEMORY_PRESSURE_WATCH=/dev/null
""",
)
RUN_SLAVE_UNIT = RootfsFile(
    path="/etc/systemd/system/evictor-run-slave.service",
    content="""\
# Written by `evictor prepare` (`evictor prepare --undo` removes it).
# Services with mount namespaces of their own get /run/systemd/propagate/UNIT
# bound as slaves of /run; with two of them CRIU 4.2 cannot restore their
# sharing ("mnt-v2: Can't copy sharing from A to B"). A slave bind of all of
# /run joins that sharing group first, and then every copy succeeds.
[Unit]
Description=A slave bind of /run, for CRIU's restore of service mounts
DefaultDependencies=no
Before=sysinit.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mkdir -p /var/lib/evictor-run
ExecStart=/bin/mount --bind /run /var/lib/evictor-run
ExecStart=/bin/mount --make-slave /var/lib/evictor-run

[Install]
WantedBy=sysinit.target
""",
)
RUN_SLAVE_WANTED = RootfsFile(
    path="/etc/systemd/system/sysinit.target.wants/evictor-run-slave.service",
    symlink_to="../evictor-run-slave.service",
)
SYSTEMD_FILES = (SERVICE_DROP_IN, RUN_SLAVE_UNIT, RUN_SLAVE_WANTED)


def diagnose(container: ContainerFacts, host: HostFacts) -> tuple[Finding, ...]:
    """Everything that would stop ``container`` from being checkpointed and restored
    here; empty if nothing is known to."""
    return (*_config_findings(container.config, host), *_content_findings(container, host))


def _config_findings(config: ContainerConfig, host: HostFacts) -> Iterable[Finding]:
    if config.tty_max > 0 or config.console_path != "none":
        what = ", ".join(
            ([f"lxc.tty.max = {config.tty_max}"] if config.tty_max > 0 else [])
            + ([] if config.console_path == "none" else ["a console (lxc.console.path)"])
        )
        yield Finding(
            code="tty",
            problem=f"{what}: CRIU cannot dump the container's ttys and console"
            ' ("tty: Found slave peer index 0 without correspond master peer")',
            remedy="lxc.tty.max = 0 and lxc.console.path = none (lxc-attach still works)",
            by_prepare=True,
        )
    if config.apparmor_profile and not host.apparmor:
        yield Finding(
            code="apparmor",
            problem=f"lxc.apparmor.profile = {config.apparmor_profile} on a kernel without"
            ' AppArmor: the restore fails ("apparmor LSM specified but apparmor not supported'
            ' by kernel")',
            remedy="clear lxc.apparmor.profile (the kernel confines nothing with it anyway)",
            by_prepare=True,
        )
    binds = list(_host_binds(config.mount_entries))
    if binds:
        yield Finding(
            code="bind-mount",
            problem=f"bind mounts of host directories ({', '.join(binds)}): the restore fails"
            ' ("mnt-v2: Failed to move_mount")',
            remedy="remove them (lxc.mount.entry), putting what they provide into the rootfs",
            by_prepare=False,
        )
    for nic in config.nics:
        if nic.type not in ("veth", "empty", "none"):
            yield Finding(
                code="nic-type",
                problem=f"{nic.name} is a {nic.type} NIC: evictor restores veth and empty ones",
                remedy=f"make it veth on a bridge (lxc.net.{nic.index}.type = veth)",
                by_prepare=False,
            )
        elif nic.type == "veth" and nic.link not in host.bridges:
            yield Finding(
                code="bridge",
                problem=f"{nic.name}'s bridge {nic.link or '(none)'} does not exist on the host:"
                " the restore cannot attach the NIC",
                remedy=f"create the bridge, or set lxc.net.{nic.index}.link to one that exists",
                by_prepare=False,
            )


def _host_binds(mount_entries: Iterable[str]) -> Iterable[str]:
    """The host paths bound into the container (lxc.mount.entry = SRC DST TYPE OPTIONS...)."""
    for entry in mount_entries:
        fields = entry.split()
        if len(fields) < 4 or not fields[0].startswith("/") or fields[0] in _MAPPED_BY_LXC:
            continue
        if "bind" in fields[3].split(",") or "rbind" in fields[3].split(","):
            yield fields[0]


def _content_findings(container: ContainerFacts, host: HostFacts) -> Iterable[Finding]:
    config, rootfs, tasks = container.config, container.rootfs, container.tasks
    if container.restart_pending:
        yield Finding(
            code="restart",
            problem="prepared after it started: what `evictor prepare` changed applies from its"
            " next start",
            remedy="restart it (`evictor prepare --restart`, or lxc-stop and lxc-start)",
            by_prepare=True,
        )
    systemd = rootfs.systemd_version is not None
    hybrid = host.cgroup_layout is not CgroupLayout.V2
    if systemd and hybrid and LEGACY_CGROUP_ARGUMENT not in config.init_cmd:
        yield Finding(
            code="systemd-cgroup",
            problem="systemd watches the unified cgroup tree on this hybrid host, which CRIU"
            ' does not restore ("fsnotify: Unable to open .../cgroup.events")',
            remedy=f"lxc.init.cmd = /sbin/init {LEGACY_CGROUP_ARGUMENT}",
            by_prepare=True,
        )
    psi_tasks = _listed(t for t in tasks if t.psi_triggers)
    needs_psi_off = systemd and (rootfs.systemd_version or 0) >= SYSTEMD_PSI_WATCH_VERSION
    if psi_tasks or (needs_psi_off and PSI_WATCH_OFF not in config.environment):
        yield Finding(
            code="psi-trigger",
            problem="memory-pressure triggers, which CRIU cannot restore: after a restore their"
            " owners spin on them"
            + (f" (held by {psi_tasks})" if psi_tasks else f" (systemd {rootfs.systemd_version})"),
            remedy=f"{PSI_WATCH_OFF} for PID 1 (lxc.environment) and for every service",
            by_prepare=systemd,
        )
    drop_in_missing = systemd and SERVICE_DROP_IN.path not in rootfs.evictor_files
    nested = _listed(t for t in tasks if t.own_uts_namespace or t.own_user_namespace)
    if nested or drop_in_missing:
        yield Finding(
            code="nested-namespaces",
            problem="services with a UTS or user namespace of their own (ProtectHostname=,"
            ' PrivateUsers=), which CRIU cannot dump ("Can\'t dump nested uts namespace")'
            + (f": {nested}" if nested else ""),
            remedy="ProtectHostname=no and PrivateUsers=no for every service (a drop-in)",
            by_prepare=systemd,
        )
    if systemd and RUN_SLAVE_UNIT.path not in rootfs.evictor_files:
        yield Finding(
            code="run-sharing",
            problem="services with mount namespaces of their own: CRIU 4.2 cannot restore the"
            ' sharing of their /run mounts ("mnt-v2: Can\'t copy sharing")',
            remedy="a unit that makes a slave bind of /run at boot",
            by_prepare=True,
        )
    # systemd mounts service credentials on ramfs where it cannot use tmpfs (in a user
    # namespace), and may do so whenever a service starts: expected for any systemd.
    ramfs = "ramfs" in container.filesystems or systemd
    if ramfs and "enable-fs ramfs" not in config.criu_options:
        yield Finding(
            code="ramfs",
            problem="ramfs mounts (systemd's service credentials), which CRIU refuses to dump"
            ' ("mnt: FS mnt ./run/credentials/... unsupported id")',
            remedy="the CRIU option enable-fs ramfs (an empty ramfs is mounted at restore)",
            by_prepare=True,
        )
    if config.idmap is None and not host.cap_sys_resource:
        others = _listed(t for t in tasks if t.uid != 0)
        if others or (systemd and not container.running):
            yield Finding(
                code="non-root-tasks",
                problem="tasks of other users than root in a privileged container, on a host"
                " whose root lacks CAP_SYS_RESOURCE: CRIU cannot read their limits (\"Can't get"
                ' rlimit 0: Operation not permitted")'
                + (f": {others}" if others else ": a systemd container runs some (dbus)"),
                remedy="give it a user namespace: unprivileged (lxc.idmap), or an identity map"
                " (lxc.idmap = u 0 0 65536 and g 0 0 65536); or run it on a host with full root",
                by_prepare=False,
            )
    bpf = _listed(t for t in tasks if t.bpf_programs)
    if bpf:
        yield Finding(
            code="bpf",
            problem=f"BPF programs held by {bpf}, which CRIU cannot dump (\"Can't dump file ..."
            ' anon_inode:bpf-prog")',
            remedy=f"for systemd, {LEGACY_CGROUP_ARGUMENT} on a hybrid host, or a seccomp"
            " profile that answers bpf with EPERM (common.seccomp plus `bpf errno 1`)",
            by_prepare=False,
        )
    held = _listed(t for t in tasks if t.terminals)
    if held or rootfs.inittab_terminals:
        evidence = held or "; ".join(rootfs.inittab_terminals)
        yield Finding(
            code="terminal",
            problem=f"processes on a terminal ({evidence}): CRIU cannot dump a tty without its"
            ' other end ("tty: Unable to find a master")',
            remedy="no getty or shell on a tty (inittab, or lxc.tty.max = 0 for systemd), and no"
            " lxc-attach session left open",
            by_prepare=False,
        )


def _listed(tasks: Iterable[Task], most: int = 4) -> str:
    named = [f"{t.command} (pid {t.pid})" for t in tasks]
    more = f" and {len(named) - most} more" if len(named) > most else ""
    return ", ".join(named[:most]) + more


def preparation(container: ContainerFacts, host: HostFacts) -> Preparation:
    """The changes ``evictor prepare`` makes for the findings it can remedy: keys for the
    LXC config, CRIU options, files in the rootfs. Never more than those; what an
    earlier preparation made is not repeated (the caller keeps it)."""
    codes = {f.code for f in diagnose(container, host) if f.by_prepare}
    settings: list[tuple[str, str]] = []
    criu_options: list[str] = []
    files: list[RootfsFile] = []
    if "tty" in codes:
        settings += [("lxc.tty.max", "0"), ("lxc.console.path", "none")]
    if "apparmor" in codes:
        settings.append(("lxc.apparmor.profile", ""))
    if "systemd-cgroup" in codes:
        settings.append(("lxc.init.cmd", f"/sbin/init {LEGACY_CGROUP_ARGUMENT}"))
    if "psi-trigger" in codes and PSI_WATCH_OFF not in container.config.environment:
        settings.append(("lxc.environment", PSI_WATCH_OFF))
    if codes & {"psi-trigger", "nested-namespaces"}:
        files.append(SERVICE_DROP_IN)
    if "run-sharing" in codes:
        files += [RUN_SLAVE_UNIT, RUN_SLAVE_WANTED]
    if "ramfs" in codes:
        criu_options.append("enable-fs ramfs")
    present = set(container.rootfs.evictor_files)
    return Preparation(
        settings=tuple(settings),
        criu_options=tuple(criu_options),
        rootfs_files=tuple(f for f in files if f.path not in present),
    )
