"""The stock-container tools (evictor.tools.stock, testbed's NIC and id map options)
against real LXC: containers as LXC users make them boot, and their workloads answer."""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable
from pathlib import Path

from evictor.lxc_runtime import LxcRuntime
from evictor.tools import stock, testbed

from .conftest import StockFactory, WorkloadFactory

MAPPED_ROOT = stock.MAPPED_ROOT_ID


def test_rootfs_tarball_is_built_once_and_then_cached() -> None:
    first = stock.build_rootfs("trixie")  # builds it (about a minute) if no run did before
    started = time.monotonic()
    second = stock.build_rootfs("trixie")
    elapsed_seconds = time.monotonic() - started

    assert second == first and first.stat().st_size > 10_000_000
    assert elapsed_seconds < 0.5
    assert first.name.startswith("debian-trixie-stock-") and first.name.endswith(".tar.zst")
    assert stock.rootfs_tarball_path("bookworm") != stock.rootfs_tarball_path("trixie")
    leftovers = [p.name for p in first.parent.iterdir() if p.name.startswith(".build-")]
    assert not leftovers and not first.with_name(first.name + ".tmp").exists()


def test_unprivileged_trixie_with_a_static_address_boots_and_serves_redis_over_tcp(
    stock_container: StockFactory, static_address: Callable[[], str], test_lxc_path: Path
) -> None:
    address = static_address()
    name = stock_container("trixie", unprivileged=True, network=stock.Network.static(address))

    assert stock.system_state(test_lxc_path, name) in stock.BOOTED_STATES
    config = (test_lxc_path / name / "config").read_text()
    for line in (
        "lxc.apparmor.profile = generated",
        "lxc.include = /usr/share/lxc/config/debian.userns.conf",
        f"lxc.idmap = u 0 {MAPPED_ROOT} 65536",
        f"lxc.net.0.ipv4.address = {address}/24",
        "lxc.tty.max = 4",
        "lxc.pty.max = 1024",
    ):
        assert line in config.splitlines()
    assert "lxc.init.cmd" not in config and "sys:ro" not in config  # stock: no remedies
    rootfs = test_lxc_path / name / "rootfs"
    assert not (rootfs / "etc/systemd/system/service.d").exists()
    assert (rootfs / "etc/hostname").stat().st_uid == MAPPED_ROOT
    assert (rootfs / "usr/bin/redis-server").stat().st_uid == MAPPED_ROOT
    assert stock.ipv4_addresses(test_lxc_path, name) == [address]

    stock.wait_for_redis(test_lxc_path, name, address=address)
    stock.fill_redis(test_lxc_path, name, 2500, address=address)
    assert not stock.redis_key_mismatches(test_lxc_path, name, 2500, address=address)
    # Both ways of asking answer alike, an absent key included.
    assert not stock.redis_key_mismatches(test_lxc_path, name, 2500)
    for args in (("DBSIZE",), ("GET", "absent"), ("MGET", "evictor:0", "absent")):
        assert stock.redis(test_lxc_path, name, *args) == stock.redis(
            test_lxc_path, name, *args, address=address
        )
    stock.redis(test_lxc_path, name, "SET", "evictor:7", "changed", address=address)
    assert stock.redis_key_mismatches(test_lxc_path, name, 2500, address=address) == ["evictor:7"]

    with stock.HeldConnection(address, stock.REDIS_PORT) as held:
        port = held.local_port()
        assert held.redis("SET", "held", "1") == "OK"
        assert held.redis("INCR", "held") == 2
        reply = held.request(stock.resp_command("GET", "held"), reply_bytes=len(b"$1\r\n2\r\n"))
        assert reply == b"$1\r\n2\r\n"
        assert held.local_port() == port


def test_unprivileged_busybox_workload_gets_a_dhcp_lease_and_echoes(
    workload: WorkloadFactory, runtime: LxcRuntime
) -> None:
    name = workload(network=stock.Network.dhcp(), unprivileged=True)

    address = stock.wait_for_ipv4(runtime.lxc_path, name)
    assert ipaddress.IPv4Address(address) in stock.SUBNET
    rootfs = runtime.lxc_path / name / "rootfs"
    assert {(rootfs / p).stat().st_uid for p in ("bin/memhog", "var", testbed.STATUS_PATH)} == {
        MAPPED_ROOT
    }
    status = testbed.read_status(runtime, name)
    assert status is not None and status.errors == 0
    with stock.HeldConnection(address, testbed.ECHO_PORT) as held:
        assert held.request(b"hello\n") == b"hello\n"
        assert held.request(b"again\n") == b"again\n"


def test_unprivileged_busybox_workload_with_a_static_address_echoes(
    workload: WorkloadFactory, runtime: LxcRuntime, static_address: Callable[[], str]
) -> None:
    address = static_address()
    name = workload(network=stock.Network.static(address), unprivileged=True)

    assert stock.ipv4_addresses(runtime.lxc_path, name) == [address]
    with stock.HeldConnection(address, testbed.ECHO_PORT) as held:
        assert held.request(b"ping\n") == b"ping\n"


def test_privileged_bookworm_without_a_nic_boots_and_serves_redis_through_attach(
    stock_container: StockFactory, test_lxc_path: Path
) -> None:
    name = stock_container("bookworm", unprivileged=False, network=stock.NO_NETWORK)

    assert stock.system_state(test_lxc_path, name) in stock.BOOTED_STATES
    config = (test_lxc_path / name / "config").read_text().splitlines()
    assert "lxc.net.0.type = empty" in config
    assert not [line for line in config if line.startswith("lxc.idmap")]
    assert (test_lxc_path / name / "rootfs/etc/hostname").stat().st_uid == 0
    assert stock.ipv4_addresses(test_lxc_path, name) == []

    stock.wait_for_redis(test_lxc_path, name)
    stock.fill_redis(test_lxc_path, name, 1500, prefix=f"t{os.getpid()}")
    assert stock.redis(test_lxc_path, name, "DBSIZE") == "1500"
    assert not stock.redis_key_mismatches(test_lxc_path, name, 1500, prefix=f"t{os.getpid()}")
