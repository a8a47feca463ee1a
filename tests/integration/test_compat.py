"""The compatibility matrix of docs/compatibility.md, cell by cell, on real containers.

{busybox, Debian 12 systemd, Debian 13 systemd} x {privileged, unprivileged} x
{no NIC, a veth NIC on lxcbr0}. The Debian containers are made as `lxc-create -t
debian` makes them (ttys, a console, an AppArmor profile): `evictor check` says
what stops them, `evictor prepare --restart` fixes what it safely can, and then
`check --trial` must pass. Every cell that works is evicted and restored twice
through the CLI, as an operator would: memory freed, the service answering with
its data over a TCP connection held across both cycles. A cell that cannot work
here is asserted to be reported by `check`, with CRIU's own error.
"""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from evictor.images import ImageState, ImageStore
from evictor.inspection import host_facts
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerState
from evictor.tools import stock, testbed

from .conftest import (
    MIB,
    StockFactory,
    WorkloadFactory,
    next_static_address,
    run_evictor,
)

REDIS_KEYS = 2000
# What a stock Debian container trips over here, all of which `prepare` remedies.
STOCK_FINDINGS = {"tty", "apparmor", "systemd-cgroup", "nested-namespaces", "run-sharing", "ramfs"}


class Operator:
    """`evictor` as an operator runs it, on the suite's LXC path and its own state."""

    def __init__(self, lxc_path: Path, state_dir: Path) -> None:
        self.lxc_path, self.state_dir = lxc_path, state_dir

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_evictor("-P", str(self.lxc_path), "--state-dir", str(self.state_dir), *args)

    def check(self, name: str, *options: str) -> tuple[int, dict[str, object]]:
        result = self.run("check", "--json", *options, name)
        (report,) = json.loads(result.stdout)
        return result.returncode, report


def codes(report: dict[str, object]) -> set[str]:
    findings = report["findings"]
    assert isinstance(findings, list)
    return {finding["code"] for finding in findings}


CELLS = [
    ("busybox", False, "none"),
    ("busybox", False, "static"),
    ("busybox", True, "none"),
    ("busybox", True, "dhcp"),
    ("bookworm", False, "none"),
    ("bookworm", False, "static"),
    ("bookworm", True, "none"),
    ("bookworm", True, "dhcp"),
    ("trixie", False, "none"),
    ("trixie", False, "static"),
    ("trixie", True, "none"),
    ("trixie", True, "dhcp"),
]


@pytest.mark.parametrize(
    ("kind", "unprivileged", "network"),
    CELLS,
    ids=[f"{k}-{'unprivileged' if u else 'privileged'}-{n}" for k, u, n in CELLS],
)
def test_the_matrix(
    kind: str,
    unprivileged: bool,
    network: str,
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    stock_container: StockFactory,
    reachable_state_dir: Path,
) -> None:
    lxc_path = runtime.lxc_path
    operator = Operator(lxc_path, reachable_state_dir)
    nic = {
        "none": stock.NO_NETWORK,
        "static": stock.Network.static(next_static_address()) if network == "static" else None,
        "dhcp": stock.Network.dhcp(),
    }[network]
    assert nic is not None
    systemd = kind != "busybox"
    if not systemd:
        name = workload(memory_mib=32, network=nic, unprivileged=unprivileged)
    else:
        name = stock_container(kind, unprivileged=unprivileged, network=nic)
        # As the template makes it: check names what stops it, all of which prepare fixes.
        code, before = operator.check(name)
        assert code == 1 and codes(before) >= STOCK_FINDINGS, before
        prepared = operator.run("prepare", "--restart", name)
        assert prepared.returncode == 0, prepared.stderr
        assert f"{name}: restarted, the changes apply" in prepared.stdout
        stock.wait_for_boot(lxc_path, name)

    if nic.kind == "dhcp":  # its lease first: a real dump then sees it settled
        stock.wait_for_ipv4(lxc_path, name)
    code, report = operator.check(name, "--trial")
    works = unprivileged or not systemd or host_facts().cap_sys_resource
    if not works:
        # Privileged, with services of other users than root (dbus), on a host whose
        # root lacks CAP_SYS_RESOURCE: reported ahead of time, with CRIU's own error.
        assert code == 1 and codes(report) == {"non-root-tasks"}, report
        assert "Can't get rlimit 0: Operation not permitted" in str(report["trial_failure"])
        evicted = operator.run("evict", name)
        assert evicted.returncode == 1 and "Can't get rlimit 0" in evicted.stderr
        assert runtime.state(name) is ContainerState.RUNNING
        return
    assert code == 0 and report["checkpointable"], report

    address = None
    if nic.has_nic:
        address = nic.ipv4_address or stock.wait_for_ipv4(lxc_path, name)
    if systemd:
        stock.wait_for_redis(lxc_path, name, address=address)
        stock.fill_redis(lxc_path, name, REDIS_KEYS, address=address)
        system_state = stock.system_state(lxc_path, name)
    else:
        workload_before = testbed.wait_for_counter(runtime, name, above=0)
    port = stock.REDIS_PORT if systemd else testbed.ECHO_PORT
    held = stock.HeldConnection(address, port) if address else None
    store = ImageStore(reachable_state_dir / "images")
    try:
        for cycle in (1, 2):
            evicted = operator.run("evict", name)
            assert evicted.returncode == 0, f"cycle {cycle}: {evicted.stderr}"
            assert runtime.state(name) is ContainerState.STOPPED
            assert store.image_state(name) is ImageState.COMMITTED
            assert_memory_freed(store, name)
            if unprivileged:
                assert_readable_by_its_root_only(store.path(name))
            restored = operator.run("restore", name)
            assert restored.returncode == 0, f"cycle {cycle}: {restored.stderr}"
            print(f"{kind} {unprivileged=} {network}: {evicted.stdout.strip()}; {restored.stdout}")
            assert runtime.state(name) is ContainerState.RUNNING
            assert not store.path(name).exists()
            if systemd:
                if held is not None:  # the same TCP connection, still open
                    assert held.redis("GET", "evictor:7") == stock.redis_value("evictor", 7, 64)
                assert not stock.redis_key_mismatches(lxc_path, name, REDIS_KEYS, address=address)
                assert stock.system_state(lxc_path, name) == system_state
            else:
                if held is not None:
                    assert held.request(f"cycle {cycle}\n".encode()) == f"cycle {cycle}\n".encode()
                testbed.wait_alive(runtime, name, original=workload_before)
    finally:
        if held is not None:
            held.close()


def assert_memory_freed(store: ImageStore, name: str) -> None:
    """The container's cgroup, and so all the memory charged to it, is gone; the
    image it was written to does not stay in the page cache."""
    assert not list(Path("/sys/fs/cgroup/memory").glob(f"lxc.payload.{name}")), name
    pages = [str(p) for p in store.path(name).glob("pages-*.img")]
    resident = subprocess.run(
        ["fincore", "-b", "-n", "-o", "RES", *pages], capture_output=True, text=True, check=True
    ).stdout.split()
    assert sum(map(int, resident)) < 2 * MIB


def assert_readable_by_its_root_only(image_dir: Path) -> None:
    """root:MAPPED-ROOT-GROUP, 0750 and 0640: the container's root reads its image at
    restore, nobody else does."""
    for path in (image_dir, *image_dir.iterdir()):
        status = path.stat()
        if path.name == "manifest.json":  # evictor's alone: CRIU never reads it
            expected = (0, 0, 0o600)
        else:
            expected = (0, testbed.MAPPED_ROOT_ID, 0o750 if path.is_dir() else 0o640)
        assert (status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)) == expected, path
