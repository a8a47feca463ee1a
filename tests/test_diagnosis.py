"""Checkpointability, judged from facts: each rule, and what prepare does about it."""

from __future__ import annotations

import dataclasses

import pytest

from evictor.diagnosis import (
    RUN_SLAVE_UNIT,
    SERVICE_DROP_IN,
    SYSTEMD_FILES,
    ContainerFacts,
    HostFacts,
    RootfsFacts,
    Task,
    diagnose,
    preparation,
)
from evictor.model import CgroupLayout, ContainerConfig, IdMap, Nic

HOST = HostFacts(
    apparmor=False,
    cap_sys_resource=False,
    cgroup_layout=CgroupLayout.HYBRID,
    bridges=frozenset({"lxcbr0"}),
)
# What `evictor prepare` leaves in a config: no ttys, no console.
CLEAN = ContainerConfig(rootfs="/r", console_path="none", idmap=IdMap(root_uid=1, root_gid=1))
BUSYBOX = ContainerFacts(name="c", config=CLEAN, rootfs=RootfsFacts(), running=True)
# A stock Debian 13 container as the LXC template makes it, unprivileged, stopped.
STOCK = ContainerFacts(
    name="c",
    config=ContainerConfig(
        rootfs="/r",
        tty_max=4,
        pty_max=1024,
        apparmor_profile="generated",
        nics=(Nic(index=0, type="veth", name="eth0", link="lxcbr0"),),
        idmap=IdMap(root_uid=100000, root_gid=100000),
    ),
    rootfs=RootfsFacts(systemd_version=257),
    running=False,
)


def codes(facts: ContainerFacts, host: HostFacts = HOST) -> list[str]:
    return [f.code for f in diagnose(facts, host)]


def test_a_container_built_for_it_has_nothing_to_fix() -> None:
    assert diagnose(BUSYBOX, HOST) == ()
    assert preparation(BUSYBOX, HOST).empty


def test_a_stock_systemd_container_and_what_prepare_does_about_it() -> None:
    assert codes(STOCK) == [
        "tty",
        "apparmor",
        "systemd-cgroup",
        "psi-trigger",
        "nested-namespaces",
        "run-sharing",
        "ramfs",
    ]
    assert all(f.by_prepare for f in diagnose(STOCK, HOST))
    prepared = preparation(STOCK, HOST)
    assert prepared.settings == (
        ("lxc.tty.max", "0"),
        ("lxc.console.path", "none"),
        ("lxc.apparmor.profile", ""),
        ("lxc.init.cmd", "/sbin/init systemd.legacy_systemd_cgroup_controller=1"),
        ("lxc.environment", "MEMORY_PRESSURE_WATCH=/dev/null"),
    )
    assert prepared.criu_options == ("enable-fs ramfs",)
    assert prepared.rootfs_files == SYSTEMD_FILES


def test_once_prepared_a_stock_container_has_nothing_left() -> None:
    config = dataclasses.replace(
        STOCK.config,
        tty_max=0,
        console_path="none",
        apparmor_profile="",
        init_cmd="/sbin/init systemd.legacy_systemd_cgroup_controller=1",
        environment=("MEMORY_PRESSURE_WATCH=/dev/null",),
        criu_options=("enable-fs ramfs",),
        prepared=True,
    )
    rootfs = RootfsFacts(systemd_version=257, evictor_files=tuple(f.path for f in SYSTEMD_FILES))
    assert diagnose(dataclasses.replace(STOCK, config=config, rootfs=rootfs), HOST) == ()


def test_debian_12_needs_no_psi_remedy_and_pure_v2_hosts_no_legacy_cgroups() -> None:
    bookworm = dataclasses.replace(STOCK, rootfs=RootfsFacts(systemd_version=252))
    assert "psi-trigger" not in codes(bookworm)
    v2 = dataclasses.replace(HOST, cgroup_layout=CgroupLayout.V2)
    assert "systemd-cgroup" not in codes(STOCK, v2)


def test_apparmor_matters_only_where_the_kernel_has_none() -> None:
    assert "apparmor" not in codes(STOCK, dataclasses.replace(HOST, apparmor=True))


@pytest.mark.parametrize(
    ("cap_sys_resource", "idmap", "reported"),
    [(False, None, True), (True, None, False), (False, IdMap(root_uid=0, root_gid=0), False)],
    ids=["privileged-here", "host-with-full-root", "identity-mapped"],
)
def test_non_root_tasks_of_a_privileged_container(
    cap_sys_resource: bool, idmap: IdMap | None, reported: bool
) -> None:
    facts = dataclasses.replace(
        BUSYBOX,
        config=dataclasses.replace(CLEAN, idmap=idmap),
        tasks=(Task(pid=7, command="dbus-daemon", uid=102),),
    )
    host = dataclasses.replace(HOST, cap_sys_resource=cap_sys_resource)
    findings = [f for f in diagnose(facts, host) if f.code == "non-root-tasks"]
    assert bool(findings) is reported
    if reported:
        assert "dbus-daemon (pid 7)" in findings[0].problem and not findings[0].by_prepare
        assert "Can't get rlimit 0" in findings[0].problem


def test_what_running_tasks_reveal() -> None:
    tasks = (
        Task(pid=1, command="systemd", uid=100000, psi_triggers=1, bpf_programs=2),
        Task(pid=30, command="agetty", uid=100000, terminals=("/dev/pts/0",)),
        Task(pid=31, command="systemd-logind", uid=100000, own_uts_namespace=True),
    )
    facts = dataclasses.replace(BUSYBOX, tasks=tasks, filesystems=frozenset({"ramfs", "proc"}))
    found = {f.code: f for f in diagnose(facts, HOST)}
    assert set(found) == {"psi-trigger", "nested-namespaces", "ramfs", "bpf", "terminal"}
    assert "systemd (pid 1)" in found["psi-trigger"].problem
    assert "agetty (pid 30)" in found["terminal"].problem
    assert "systemd-logind (pid 31)" in found["nested-namespaces"].problem
    # Not a systemd container: prepare has no drop-in for its programs.
    assert not found["psi-trigger"].by_prepare and not found["nested-namespaces"].by_prepare
    assert preparation(facts, HOST).criu_options == ("enable-fs ramfs",)


@pytest.mark.parametrize(
    ("config", "code"),
    [
        (
            dataclasses.replace(
                CLEAN, mount_entries=("/lib lib none ro,bind 0 0", "proc proc proc defaults 0 0")
            ),
            "bind-mount",
        ),
        (dataclasses.replace(CLEAN, nics=(Nic(index=0, type="macvlan", name="eth0"),)), "nic-type"),
        (
            dataclasses.replace(
                CLEAN, nics=(Nic(index=0, type="veth", name="eth0", link="br-gone"),)
            ),
            "bridge",
        ),
    ],
)
def test_what_prepare_leaves_to_the_operator(config: ContainerConfig, code: str) -> None:
    (finding,) = diagnose(dataclasses.replace(BUSYBOX, config=config), HOST)
    assert finding.code == code and not finding.by_prepare
    assert preparation(dataclasses.replace(BUSYBOX, config=config), HOST).empty


def test_lxc_maps_the_fuse_connections_bind_itself() -> None:
    entry = "/sys/fs/fuse/connections sys/fs/fuse/connections none bind,optional 0 0"
    config = dataclasses.replace(CLEAN, mount_entries=(entry,))
    assert diagnose(dataclasses.replace(BUSYBOX, config=config), HOST) == ()


def test_an_inittab_getty_is_reported_and_a_pending_restart_too() -> None:
    rootfs = RootfsFacts(inittab_terminals=("tty1::respawn:/bin/sh",))
    facts = dataclasses.replace(BUSYBOX, rootfs=rootfs, restart_pending=True)
    assert codes(facts) == ["restart", "terminal"]


def test_prepared_files_are_only_the_missing_ones() -> None:
    rootfs = RootfsFacts(systemd_version=257, evictor_files=(SERVICE_DROP_IN.path,))
    files = preparation(dataclasses.replace(STOCK, rootfs=rootfs), HOST).rootfs_files
    assert RUN_SLAVE_UNIT in files and SERVICE_DROP_IN not in files
