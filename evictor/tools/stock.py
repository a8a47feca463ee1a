"""Stock Debian LXC containers, as LXC users make them, for tests and ``evictor demo --stock``.

A container here is what ``lxc-create -t debian`` gives with Debian's stock
/etc/lxc/default.conf: systemd as init, AppArmor keys, ttys and ptys, the
template's includes, optionally an id map (unprivileged) and a veth NIC on
lxcbr0. Nothing of evictor's checkpoint remedies is applied (that is
``evictor prepare``'s job): these containers are what evictor meets in the wild.

The rootfs is a cached ``debootstrap --variant=minbase`` tarball with systemd,
dbus, iproute2, procps and redis-server. Beyond what a distro image carries it
holds only what the test workload needs: redis listening on every address
without protected mode (test-only), and ``PrivateDevices=no`` for redis-server,
which otherwise does not start under LXC on these hosts (PLATFORM.md).

Every command is an argument list, never a shell string built from names.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal, TypeAlias

from evictor.errors import ContainerCommandFailed, EvictorError, UsageError
from evictor.images import fsync_directory
from evictor.model import validate_container_name
from evictor.tools import testbed

RELEASES = ("bookworm", "trixie")  # Debian 12 and 13
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("systemd-sysv", "dbus", "iproute2", "redis-server", "procps")

BRIDGE = "lxcbr0"
GATEWAY = "10.0.3.1"
SUBNET = ipaddress.IPv4Network("10.0.3.0/24")  # lxc-net's default network on lxcbr0
MAPPED_ROOT_ID = testbed.MAPPED_ROOT_ID
MAPPED_ID_COUNT = testbed.MAPPED_ID_COUNT
REDIS_PORT = 6379
# What `systemctl is-system-running` says once boot is over.
BOOTED_STATES = ("running", "degraded")

# Appended to /etc/redis/redis.conf (a later line wins): reachable from the host.
_REDIS_TEST_CONF = """
# Test-only (evictor.tools.stock): reachable from the host over lxcbr0.
bind 0.0.0.0
protected-mode no
"""
_REDIS_DROP_IN_PATH = "etc/systemd/system/redis-server.service.d/lxc-private-devices.conf"
# redis-server.service has PrivateDevices=yes, and a unit with it fails to
# start in an LXC container on these hosts, checkpoint or not (PLATFORM.md).
_REDIS_DROP_IN = """[Service]
PrivateDevices=no
"""
# Bump when the build changes in a way the recipe's other fields do not show
# (e.g. _finish_rootfs's steps): the tarball's name then changes.
_RECIPE_VERSION = 1
# The PATH of commands run in a container (lxc-attach --clear-env).
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_TAR_OPTIONS = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")


def _no_progress(message: str) -> None:
    """The default progress sink: says nothing."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Network:
    """A container's one NIC: none (an empty network namespace), or a veth on
    lxcbr0 with a static address that LXC configures, or one the container
    asks for over DHCP (lxc-net's dnsmasq answers)."""

    kind: Literal["none", "static", "dhcp"] = "none"
    ipv4_address: str | None = None  # static only: in 10.0.3.0/24, without the prefix

    def __post_init__(self) -> None:
        if self.kind not in ("none", "static", "dhcp"):
            raise UsageError(f"network kind {self.kind!r}: use none, static or dhcp")
        if self.kind != "static":
            if self.ipv4_address is not None:
                raise UsageError(f"a {self.kind} network has no static address")
            return
        if self.ipv4_address is None:
            raise UsageError("a static network needs ipv4_address")
        try:
            address = ipaddress.IPv4Address(self.ipv4_address)
        except ValueError as error:
            raise UsageError(f"bad IPv4 address {self.ipv4_address!r}: {error}") from error
        if address not in SUBNET or address in (
            SUBNET.network_address,
            SUBNET.broadcast_address,
            ipaddress.IPv4Address(GATEWAY),
        ):
            raise UsageError(f"static address {address} is not a host address of {SUBNET}")

    @classmethod
    def none(cls) -> Network:
        return cls(kind="none")

    @classmethod
    def static(cls, ipv4_address: str) -> Network:
        return cls(kind="static", ipv4_address=ipv4_address)

    @classmethod
    def dhcp(cls) -> Network:
        return cls(kind="dhcp")

    @property
    def has_nic(self) -> bool:
        return self.kind != "none"


NO_NETWORK = Network.none()


def hwaddr(name: str) -> str:
    """A fixed MAC for the container: LXC's 00:16:3e prefix and three bytes of
    the name's hash, so a re-created container keeps its DHCP lease."""
    digest = hashlib.sha256(name.encode()).digest()
    return "00:16:3e:" + ":".join(f"{byte:02x}" for byte in digest[:3])


def nic_config_lines(name: str, network: Network) -> list[str]:
    """The ``lxc.net.0.*`` lines for ``network``."""
    if not network.has_nic:
        return ["lxc.net.0.type = empty"]
    lines = [
        "lxc.net.0.type = veth",
        f"lxc.net.0.link = {BRIDGE}",
        "lxc.net.0.flags = up",
        f"lxc.net.0.hwaddr = {hwaddr(name)}",
    ]
    if network.kind == "static":
        lines += [
            f"lxc.net.0.ipv4.address = {network.ipv4_address}/{SUBNET.prefixlen}",
            f"lxc.net.0.ipv4.gateway = {GATEWAY}",
        ]
    return lines


# ---------------------------------------------------------------------------
# The rootfs tarball


def _recipe(release: str) -> dict[str, object]:
    return {
        "version": _RECIPE_VERSION,
        "release": release,
        "mirror": MIRROR,
        "variant": "minbase",
        "include": PACKAGES,
        "redis_conf": _REDIS_TEST_CONF,
        _REDIS_DROP_IN_PATH: _REDIS_DROP_IN,
    }


def rootfs_tarball_path(release: str, cache_dir: Path = testbed.DEFAULT_CACHE_DIR) -> Path:
    """Where the tarball of ``release`` lives: its name carries a hash of the recipe,
    so a changed recipe builds a new one."""
    _check_release(release)
    digest = hashlib.sha256(json.dumps(_recipe(release), sort_keys=True).encode()).hexdigest()
    return cache_dir / f"debian-{release}-stock-{digest[:12]}.tar.zst"


def _check_release(release: str) -> None:
    if release not in RELEASES:
        raise UsageError(f"unsupported Debian release {release!r}: use one of {RELEASES}")


def build_rootfs(
    release: str,
    *,
    cache_dir: Path = testbed.DEFAULT_CACHE_DIR,
    progress: Callable[[str], None] = _no_progress,
) -> Path:
    """The cached rootfs tarball (zstd) of ``release``, built on first use (about a
    minute: debootstrap from the Debian mirror).

    Built into a temporary file and renamed, under an flock on the cache, so two
    processes never build at once and nobody sees half a tarball.
    """
    tarball = rootfs_tarball_path(release, cache_dir)
    if tarball.exists():
        return tarball
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / "rootfs-build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another process building a rootfs in {cache_dir}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():  # the other process built it
            return tarball
        _build(release, tarball, progress)
    return tarball


def _build(release: str, tarball: Path, progress: Callable[[str], None]) -> None:
    for tool in ("debootstrap", "zstd", "tar", "chroot"):
        if shutil.which(tool) is None:
            raise EvictorError(f"{tool} not found: run scripts/setup.sh")
    progress(f"building the Debian {release} rootfs (debootstrap, about a minute) for {tarball}")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".build-{release}-", dir=tarball.parent))
    temporary = tarball.with_name(tarball.name + ".tmp")
    try:
        root = work / "rootfs"
        log_path = work / "debootstrap.log"
        with open(log_path, "w") as log_file:
            result = subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(PACKAGES)}",
                    release,
                    str(root),
                    MIRROR,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if result.returncode != 0:
            tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
            raise EvictorError(f"debootstrap of {release} failed: {tail}")
        debootstrap_seconds = time.monotonic() - started
        progress(f"debootstrap of {release} took {debootstrap_seconds:.0f} s; packing")
        _finish_rootfs(root)
        _pack(root, temporary)
        os.replace(temporary, tarball)
        fsync_directory(tarball.parent)
    finally:
        temporary.unlink(missing_ok=True)
        _unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)
    size_mb = tarball.stat().st_size / 1e6
    progress(f"built {tarball.name} in {time.monotonic() - started:.0f} s ({size_mb:.0f} MB)")


def _finish_rootfs(root: Path) -> None:
    """What an image build does after debootstrap, plus the test workload's needs."""
    subprocess.run(
        ["chroot", str(root), "apt-get", "clean"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
    )
    for leftover in (root / "var/lib/apt/lists").glob("*"):
        if leftover.is_file():
            leftover.unlink()
    # Images ship an empty machine-id: systemd makes one at first boot.
    (root / "etc/machine-id").write_text("")
    # debootstrap copied the build host's name; the container's is set at creation.
    (root / "etc/hostname").write_text("localhost\n")
    with open(root / "etc/redis/redis.conf", "a") as conf:  # keeps redis:redis 0640
        conf.write(_REDIS_TEST_CONF)
    drop_in = root / _REDIS_DROP_IN_PATH
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text(_REDIS_DROP_IN)


def _pack(root: Path, tarball: Path) -> None:
    with open(tarball, "wb") as output:
        tar = subprocess.Popen(
            ["tar", *_TAR_OPTIONS, "-C", str(root), "-cf", "-", "."],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert tar.stdout is not None
        # One thread: the build shares the machine with whatever else runs.
        zstd = subprocess.run(
            ["zstd", "-q", "-T1", "-10", "-c"],
            stdin=tar.stdout,
            stdout=output,
            stderr=subprocess.PIPE,
            check=False,
        )
        tar.stdout.close()
        tar_error = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
        if tar.wait() != 0 or zstd.returncode != 0:
            reason = tar_error.strip() or zstd.stderr.decode(errors="replace").strip()
            raise EvictorError(f"packing {root} failed: {reason}")
        output.flush()
        os.fsync(output.fileno())


def _unmount_below(directory: Path) -> None:
    """Unmount whatever a failed debootstrap left mounted in its target (/proc,
    /sys), so that removing the tree never reaches into a live filesystem."""
    prefix = str(directory.resolve()) + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


# ---------------------------------------------------------------------------
# Containers


def create_debian_container(
    lxc_path: Path,
    name: str,
    *,
    release: str,
    unprivileged: bool,
    network: Network,
    cache_dir: Path = testbed.DEFAULT_CACHE_DIR,
    progress: Callable[[str], None] = _no_progress,
) -> None:
    """Define (not start) a stock Debian container, as ``lxc-create -t debian`` does
    with the stock /etc/lxc/default.conf (plus an id map when ``unprivileged``)."""
    validate_container_name(name)
    _check_release(release)
    tarball = build_rootfs(release, cache_dir=cache_dir, progress=progress)
    container_dir = lxc_path / name
    if container_dir.exists():
        raise EvictorError(f"{name}: {container_dir} already exists", container=name)
    lxc_path.mkdir(parents=True, exist_ok=True)
    if unprivileged:
        testbed.ensure_traversable(lxc_path)
    rootfs = container_dir / "rootfs"
    rootfs.mkdir(parents=True)
    # The mapped root must be able to walk into its own container.
    os.chmod(container_dir, 0o755)
    owner = MAPPED_ROOT_ID if unprivileged else 0
    os.chown(rootfs, owner, owner)
    progress(f"{name}: unpacking Debian {release}")
    _extract(tarball, rootfs, unprivileged=unprivileged, name=name)
    _write(rootfs, "etc/hostname", f"{name}\n", owner)
    _write(rootfs, "etc/hosts", _hosts(name), owner)
    if network.kind == "dhcp":
        _enable_networkd_dhcp(rootfs, owner, name)
    (container_dir / "config").write_text(
        _debian_config(name, rootfs, unprivileged=unprivileged, network=network)
    )


def _extract(tarball: Path, rootfs: Path, *, unprivileged: bool, name: str) -> None:
    tar = ["tar", *_TAR_OPTIONS, "-xpf", "-", "-C", str(rootfs)]
    if unprivileged:
        # Unpacked as the mapped root, so every id lands shifted. It cannot
        # mknod: /dev is left empty, and LXC fills it at start (autodev).
        id_map = f"b:0:{MAPPED_ROOT_ID}:{MAPPED_ID_COUNT}"
        tar = ["lxc-usernsexec", "-m", id_map, "--", *tar, "--exclude=./dev/*"]
    zstd = subprocess.Popen(
        ["zstd", "-q", "-dc", str(tarball)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert zstd.stdout is not None
    unpacked = subprocess.run(tar, stdin=zstd.stdout, capture_output=True, text=True, check=False)
    zstd.stdout.close()
    zstd_error = zstd.stderr.read().decode(errors="replace") if zstd.stderr else ""
    if zstd.wait() != 0 or unpacked.returncode != 0:
        reason = (unpacked.stderr.strip() or zstd_error.strip() or "no output").splitlines()[-1]
        if unprivileged:
            reason += (
                f" (lxc-usernsexec needs newuidmap and root:{MAPPED_ROOT_ID}:{MAPPED_ID_COUNT}"
                " in /etc/subuid and /etc/subgid: run scripts/setup.sh)"
            )
        raise EvictorError(f"{name}: unpacking {tarball.name} failed: {reason}", container=name)


def _hosts(name: str) -> str:
    # As lxc-debian writes it.
    return (
        "127.0.0.1   localhost\n"
        f"127.0.1.1   {name}\n"
        "\n"
        "# The following lines are desirable for IPv6 capable hosts\n"
        "::1     localhost ip6-localhost ip6-loopback\n"
        "ff02::1 ip6-allnodes\n"
        "ff02::2 ip6-allrouters\n"
    )


def _enable_networkd_dhcp(rootfs: Path, owner: int, name: str) -> None:
    """DHCP on eth0 through systemd-networkd, enabled as ``systemctl enable`` would."""
    unit = "lib/systemd/system/systemd-networkd.service"
    if not (rootfs / "usr" / unit).exists() and not (rootfs / unit).exists():
        raise EvictorError(f"{name}: the rootfs has no systemd-networkd", container=name)
    _write(
        rootfs,
        "etc/systemd/network/eth0.network",
        "[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n",
        owner,
    )
    for wants, target in (
        ("multi-user.target.wants", "systemd-networkd.service"),
        ("sockets.target.wants", "systemd-networkd.socket"),
    ):
        _symlink(rootfs, f"etc/systemd/system/{wants}/{target}", f"/lib/systemd/system/{target}")
        os.lchown(rootfs / f"etc/systemd/system/{wants}", owner, owner)
        os.lchown(rootfs / f"etc/systemd/system/{wants}/{target}", owner, owner)


def _write(rootfs: Path, relative: str, text: str, owner: int) -> None:
    """Write a file into a freshly unpacked rootfs, owned by the container's root."""
    path = rootfs / relative
    _make_parents(rootfs, path, owner)
    path.unlink(missing_ok=True)  # never write through a symlink of the image
    path.write_text(text)
    os.chown(path, owner, owner)


def _symlink(rootfs: Path, relative: str, target: str) -> None:
    path = rootfs / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def _make_parents(rootfs: Path, path: Path, owner: int) -> None:
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o755)
        os.chown(directory, owner, owner)


def _debian_config(name: str, rootfs: Path, *, unprivileged: bool, network: Network) -> str:
    lines = [
        "# Made by evictor.tools.stock as lxc-create -t debian makes it from the stock",
        "# /etc/lxc/default.conf (its NIC and AppArmor lines, and an id map if unprivileged).",
        *nic_config_lines(name, network),
        "lxc.apparmor.profile = generated",
        "lxc.apparmor.allow_nesting = 1",
    ]
    if unprivileged:
        lines += testbed.id_map_config_lines()
    lines += [
        "",
        "# Common configuration",
        "lxc.include = /usr/share/lxc/config/debian.common.conf",
    ]
    if unprivileged:
        lines.append("lxc.include = /usr/share/lxc/config/debian.userns.conf")
        if network.kind == "dhcp":
            lines += [
                "# debian.userns.conf mounts /sys read-write; systemd-networkd then takes the",
                "# container for one with udev and waits for it forever, never asking for a",
                "# lease. Read-only /sys tells it there is no udev.",
                "lxc.mount.auto = sys:ro",
            ]
    lines += [
        "",
        "# Container specific configuration",
        f"lxc.rootfs.path = dir:{rootfs}",
        "lxc.tty.max = 4",
        f"lxc.uts.name = {name}",
        "lxc.arch = amd64",
        "lxc.pty.max = 1024",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Running containers


def _lxc(
    argv: Sequence[str], *, timeout_seconds: float = 60.0, input_bytes: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run an LXC tool, its output through temporary files: a container's monitor
    (lxc-start) may keep inherited descriptors open for the container's life."""
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        result = subprocess.run(
            list(argv),
            input=input_bytes,
            stdin=None if input_bytes is not None else subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            timeout=timeout_seconds,
            check=False,
        )
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(
            result.args, result.returncode, stdout.read(), stderr.read()
        )


def _last_line(data: bytes) -> str:
    lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def attach_argv(lxc_path: Path, name: str, *command: str) -> list[str]:
    """``lxc-attach`` running ``command`` in the container, with a clean environment."""
    return [
        "lxc-attach",
        "-P",
        str(lxc_path),
        "-n",
        name,
        "--clear-env",
        "-v",
        f"PATH={_PATH}",
        "--",
        *command,
    ]


def start(lxc_path: Path, name: str) -> None:
    """``lxc-start`` (daemonized)."""
    result = _lxc(["lxc-start", "-P", str(lxc_path), "-n", name])
    if result.returncode != 0:
        raise ContainerCommandFailed(
            f"{name}: lxc-start failed: {_last_line(result.stderr)}", container=name
        )


def system_state(lxc_path: Path, name: str) -> str:
    """What ``systemctl is-system-running`` says in the container (e.g. starting,
    running, degraded); "unreachable" when nothing could be asked."""
    result = _lxc(attach_argv(lxc_path, name, "systemctl", "is-system-running"))
    return result.stdout.decode(errors="replace").strip() or "unreachable"


def lxc_state(lxc_path: Path, name: str) -> str:
    """LXC's state of the container: RUNNING, STOPPED, FROZEN..."""
    result = _lxc(["lxc-info", "-P", str(lxc_path), "-n", name, "-sH"])
    if result.returncode != 0:
        raise ContainerCommandFailed(
            f"{name}: lxc-info failed: {_last_line(result.stderr)}", container=name
        )
    return result.stdout.decode().strip()


def start_and_wait(lxc_path: Path, name: str, timeout_seconds: float = 120.0) -> str:
    """Start the container and wait until systemd has booted it; return its state
    (running, or degraded when a unit failed)."""
    start(lxc_path, name)
    return wait_for_boot(lxc_path, name, timeout_seconds=timeout_seconds)


def wait_for_boot(lxc_path: Path, name: str, *, timeout_seconds: float = 120.0) -> str:
    """Wait until ``systemctl is-system-running`` says running or degraded."""
    deadline = time.monotonic() + timeout_seconds
    state = "unreachable"
    while time.monotonic() < deadline:
        state = system_state(lxc_path, name)
        if state in BOOTED_STATES:
            return state
        if lxc_state(lxc_path, name) == "STOPPED":
            raise EvictorError(f"{name}: stopped while booting", container=name)
        time.sleep(0.5)
    raise EvictorError(
        f"{name}: systemd did not finish booting within {timeout_seconds:g} s"
        f" (is-system-running: {state})",
        container=name,
    )


def ipv4_addresses(lxc_path: Path, name: str) -> list[str]:
    """The container's IPv4 addresses as LXC sees them (loopback excluded)."""
    result = _lxc(["lxc-info", "-P", str(lxc_path), "-n", name, "-iH"])
    if result.returncode != 0:
        return []
    return [
        line.strip()
        for line in result.stdout.decode().splitlines()
        if "." in line and not line.strip().startswith("127.")
    ]


def wait_for_ipv4(lxc_path: Path, name: str, *, timeout_seconds: float = 60.0) -> str:
    """Wait for the container's first IPv4 address (e.g. a DHCP lease) and return it."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        addresses = ipv4_addresses(lxc_path, name)
        if addresses:
            return addresses[0]
        time.sleep(0.25)
    raise EvictorError(f"{name}: no IPv4 address within {timeout_seconds:g} s", container=name)


# ---------------------------------------------------------------------------
# Redis: the workload of the stock containers


class RedisError(EvictorError):
    """Redis answered with an error, or could not be asked."""


RespReply: TypeAlias = str | int | list["RespReply"] | None


def resp_command(*args: str) -> bytes:
    """One command in RESP, redis's wire protocol."""
    encoded = [arg.encode() for arg in args]
    return f"*{len(encoded)}\r\n".encode() + b"".join(
        b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in encoded
    )


def render_reply(reply: RespReply) -> str:
    """A reply as ``redis-cli`` prints it when its output is not a terminal
    (arrays one element a line, nil as an empty line)."""
    if reply is None:
        return ""
    if isinstance(reply, list):
        return "\n".join(render_reply(element) for element in reply)
    return str(reply)


class HeldConnection:
    """One TCP connection from the host to a server in a container, kept open
    (e.g. across an eviction and a restore): every request goes over the same socket."""

    def __init__(self, address: str, port: int, *, timeout_seconds: float = 10.0) -> None:
        self.address = address
        self.port = port
        self._socket = socket.create_connection((address, port), timeout=timeout_seconds)
        self._buffer = b""

    def __enter__(self) -> HeldConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._socket.close()

    def local_port(self) -> int:
        """The host side's port: the same one proves the same connection."""
        return int(self._socket.getsockname()[1])

    def request(self, payload: bytes, *, reply_bytes: int | None = None) -> bytes:
        """Send ``payload`` and read ``reply_bytes`` back (default: as many as were
        sent, for an echo server)."""
        self._socket.sendall(payload)
        return self._read_exact(len(payload) if reply_bytes is None else reply_bytes)

    def redis(self, *args: str) -> RespReply:
        """One redis command on this connection; its reply (a redis error raises)."""
        self._socket.sendall(resp_command(*args))
        return self._read_reply()

    def _fill(self) -> None:
        chunk = self._socket.recv(65536)
        if not chunk:
            raise ConnectionError(
                f"{self.address}:{self.port} closed the connection"
                f" ({len(self._buffer)} bytes unread)"
            )
        self._buffer += chunk

    def _read_exact(self, size_bytes: int) -> bytes:
        while len(self._buffer) < size_bytes:
            self._fill()
        data, self._buffer = self._buffer[:size_bytes], self._buffer[size_bytes:]
        return data

    def _read_line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            self._fill()
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def _read_reply(self) -> RespReply:
        line = self._read_line()
        kind, rest = line[:1], line[1:].decode(errors="replace")
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RedisError(f"redis at {self.address}: {rest}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            return self._read_exact(size + 2)[:-2].decode(errors="replace")
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._read_reply() for _ in range(count)]
        raise RedisError(f"redis at {self.address}: unexpected reply {line[:80]!r}")


def redis(lxc_path: Path, name: str, *args: str, address: str | None = None) -> str:
    """Run one redis command in the container and return its reply as ``redis-cli``
    prints it: over TCP from the host when ``address`` is given, else through
    ``lxc-attach -- redis-cli``."""
    if address is not None:
        with HeldConnection(address, REDIS_PORT) as connection:
            return render_reply(connection.redis(*args))
    # -e: an error reply goes to stderr with exit status 1 (redis-cli >= 7).
    result = _lxc(attach_argv(lxc_path, name, "redis-cli", "-e", *args))
    if result.returncode != 0:
        command = args[0] if args else ""
        raise RedisError(
            f"{name}: redis-cli {command}: {_last_line(result.stderr)}", container=name
        )
    output = result.stdout.decode(errors="replace")
    return output[:-1] if output.endswith("\n") else output


def redis_value(prefix: str, index: int, value_bytes: int) -> str:
    """The value ``fill_redis`` stores under key ``prefix:index``."""
    seed = hashlib.sha256(f"{prefix}:{index}".encode()).hexdigest()
    return (seed * (value_bytes // len(seed) + 1))[:value_bytes]


def _batches(count: int, batch_size: int) -> Iterator[range]:
    for first in range(0, count, batch_size):
        yield range(first, min(first + batch_size, count))


_BATCH_KEYS = 1000


def fill_redis(
    lxc_path: Path,
    name: str,
    count: int,
    *,
    address: str | None = None,
    prefix: str = "evictor",
    value_bytes: int = 64,
) -> None:
    """Store ``count`` keys ``prefix:0``... with values derived from their names."""
    for batch in _batches(count, _BATCH_KEYS):
        pairs = [
            item for i in batch for item in (f"{prefix}:{i}", redis_value(prefix, i, value_bytes))
        ]
        reply = redis(lxc_path, name, "MSET", *pairs, address=address)
        if reply != "OK":
            raise RedisError(f"{name}: MSET answered {reply[:80]!r}", container=name)


def redis_key_mismatches(
    lxc_path: Path,
    name: str,
    count: int,
    *,
    address: str | None = None,
    prefix: str = "evictor",
    value_bytes: int = 64,
) -> list[str]:
    """The keys ``fill_redis`` stored that are now missing or changed."""
    wrong: list[str] = []
    for batch in _batches(count, _BATCH_KEYS):
        keys = [f"{prefix}:{i}" for i in batch]
        values = redis(lxc_path, name, "MGET", *keys, address=address).split("\n")
        if len(values) != len(keys):
            raise RedisError(
                f"{name}: MGET of {len(keys)} keys answered {len(values)} lines", container=name
            )
        wrong += [
            key
            for i, key, value in zip(batch, keys, values, strict=True)
            if value != redis_value(prefix, i, value_bytes)
        ]
    return wrong


def wait_for_redis(
    lxc_path: Path, name: str, *, address: str | None = None, timeout_seconds: float = 60.0
) -> None:
    """Wait until redis answers PING."""
    deadline = time.monotonic() + timeout_seconds
    reason = ""
    while time.monotonic() < deadline:
        try:
            if redis(lxc_path, name, "PING", address=address) == "PONG":
                return
        except (OSError, EvictorError) as error:
            reason = str(error)
        time.sleep(0.25)
    raise RedisError(
        f"{name}: redis did not answer within {timeout_seconds:g} s ({reason})", container=name
    )
