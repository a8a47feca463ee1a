"""Real LXC containers and real CRIU checkpoints.

Every container is created in the suite's own LXC path with a name unique to
the run (``evt-PID-N``), and destroyed afterwards. A run that crashed leaves its
containers in that path; the next run destroys them before it starts, so it
never touches a container it did not create.

These tests never skip: a machine without root, LXC or CRIU fails them with the
reason (run ``scripts/setup.sh`` first).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.fleet import free_port as free_port  # the tests take it from here
from evictor import lxc_config
from evictor.criu import check_criu
from evictor.images import ImageStore
from evictor.journal import Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.tools import stock, testbed

T = TypeVar("T")
MIB = 1 << 20
GIB = 1 << 30
TEST_ROOT = Path(os.environ.get("EVICTOR_TEST_ROOT", "/var/tmp/evictor-tests"))

# The pressure tests' images (4 x 1 GiB) and page-cache file (4 GiB), with room to spare.
MIN_FREE_DISK_BYTES = 16 * GIB

_names = itertools.count(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.nodeid.split("::")[0]:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def test_lxc_path() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (LXC and CRIU): run them as root")
    check_criu()
    TEST_ROOT.parent.mkdir(parents=True, exist_ok=True)
    for where in (TEST_ROOT.parent, Path(tempfile.gettempdir())):
        free = shutil.disk_usage(where).free
        if free < MIN_FREE_DISK_BYTES:
            pytest.fail(
                f"integration tests need {MIN_FREE_DISK_BYTES / GIB:.0f} GiB free in {where}"
                f" (images, a page-cache file): {free / GIB:.1f} GiB free"
            )
    lxc_path = TEST_ROOT / "lxc"
    leftovers = LxcRuntime(lxc_path)
    for name in leftovers.names():
        leftovers.destroy(name)
    shutil.rmtree(TEST_ROOT, ignore_errors=True)
    lxc_path.mkdir(parents=True, mode=0o700)
    yield lxc_path
    for name in leftovers.names():
        leftovers.destroy(name)


@pytest.fixture
def runtime(test_lxc_path: Path) -> LxcRuntime:
    return LxcRuntime(test_lxc_path)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    opened = Journal(tmp_path / "journal.db")
    yield opened
    opened.close()


@pytest.fixture
def reachable_state_dir() -> Iterator[Path]:
    """A state directory an unprivileged container's root can reach its image in
    (pytest's own temporary directories are 0700)."""
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(TEST_ROOT, 0o711)
    directory = TEST_ROOT / f"state-{os.getpid()}-{len(list(TEST_ROOT.iterdir()))}"
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


WorkloadFactory = Callable[..., str]


@pytest.fixture
def workload(runtime: LxcRuntime) -> Iterator[WorkloadFactory]:
    """Create and start workload containers; every one is destroyed afterwards. They
    are scribes (memory rewritten all the time, a child, shared memory, a pipe)
    unless they fill at a rate (a pressure spike)."""
    created: list[str] = []

    def make(
        memory_mib: int = 16,
        *,
        with_tty: bool = False,
        start: bool = True,
        network: stock.Network | None = None,
        unprivileged: bool = False,
        fill_rate_mib_per_second: int | None = None,
    ) -> str:
        name = f"evt-{os.getpid()}-{next(_names)}"
        created.append(name)
        if network is not None and network.has_nic:
            require_bridge()
        testbed.create_workload_container(
            runtime,
            name,
            memory_mib=memory_mib,
            seed=len(created),
            with_tty=with_tty,
            network=network,
            unprivileged=unprivileged,
            fill_rate_mib_per_second=fill_rate_mib_per_second,
            scribe=fill_rate_mib_per_second is None,
        )
        if start:
            runtime.start(name)
            testbed.wait_for_counter(runtime, name, above=1)
        return name

    yield make
    for name in set(created) & set(runtime.names()):
        runtime.destroy(name)


StockFactory = Callable[..., str]


@pytest.fixture
def stock_container(test_lxc_path: Path) -> Iterator[StockFactory]:
    """Create (and by default boot) stock Debian containers (evictor.tools.stock);
    every one is destroyed afterwards."""
    runtime = LxcRuntime(test_lxc_path)
    created: list[str] = []

    def make(
        release: str = "trixie",
        *,
        unprivileged: bool = True,
        network: stock.Network = stock.NO_NETWORK,
        start: bool = True,
    ) -> str:
        name = f"evt-{os.getpid()}-{next(_names)}"
        created.append(name)
        if network.has_nic:
            require_bridge()
        stock.create_debian_container(
            test_lxc_path, name, release=release, unprivileged=unprivileged, network=network
        )
        if start:
            stock.start_and_wait(test_lxc_path, name)
        return name

    yield make
    for name in set(created) & set(runtime.names()):
        runtime.destroy(name)


def require_bridge() -> None:
    """Fail (never skip) when lxcbr0, which containers with a NIC need, is missing."""
    if not Path("/sys/class/net", stock.BRIDGE).exists():
        pytest.fail(f"{stock.BRIDGE} is missing: run scripts/setup.sh (it starts lxc-net)")
    try:
        os.kill(int(Path("/run/lxc/dnsmasq.pid").read_text()), 0)
    except (OSError, ValueError):
        pytest.fail(f"{stock.BRIDGE}'s dnsmasq is not running: run scripts/setup.sh (DHCP)")


# Static test addresses: 10.0.3.2-10.0.3.99 (lxc-net's DHCP range, as
# scripts/setup.sh sets it, starts at .100). Each is handed out once per run,
# starting from an offset drawn from the PID so that two runs at once rarely meet.
_STATIC_HOSTS = range(2, 100)
_static_count = itertools.count()


def next_static_address() -> str:
    """A static address on lxcbr0 no other container of this run has."""
    n = next(_static_count)
    if n >= len(_STATIC_HOSTS):
        pytest.fail(f"more than {len(_STATIC_HOSTS)} static test addresses asked for")
    return f"10.0.3.{_STATIC_HOSTS[(os.getpid() + n) % len(_STATIC_HOSTS)]}"


@pytest.fixture
def static_address() -> Callable[[], str]:
    """Hands out static addresses for containers, unique within the run."""
    return next_static_address


def wait_until(condition: Callable[[], T | None], what: str, timeout_seconds: float = 90.0) -> T:
    """Poll ``condition`` until it is truthy and return its value; fail the test on timeout."""
    deadline = time.monotonic() + timeout_seconds
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)
    return result


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The daemon's metrics over HTTP: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def run_evictor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        evictor_argv(*args), capture_output=True, text=True, check=False, timeout=600
    )


def evictor_argv(*args: str) -> list[str]:
    """The evictor under test (this interpreter's), as a command line."""
    return [sys.executable, "-m", "evictor.cli", *args]


class DaemonProcess:
    """``evictor run`` as a real process, its log in a file."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                evictor_argv("-c", str(self.config), "run"),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout_seconds: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_seconds
        while text not in self.log():
            assert self.process is not None and self.process.poll() is None, self.log()
            if time.monotonic() > deadline:
                pytest.fail(f"daemon never logged {text!r}:\n{self.log()}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout_seconds: float = 60.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout_seconds)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[[Path], DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(config: Path) -> DaemonProcess:
        process = DaemonProcess(config, tmp_path / f"daemon-{len(started)}.log").start()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process is not None and process.process.poll() is None:
            process.stop(signal.SIGKILL)


def write_config(
    path: Path,
    lxc_path: Path,
    state_dir: Path,
    port: int,
    *,
    interval_seconds: float = 0.5,
    **tables: dict[str, object],
) -> Path:
    """A daemon config for tests: fast ticks, no waiting, the given tables on top."""
    base: dict[str, dict[str, object]] = {
        "triggers": {"min_reclaim": "1MiB", "important_psi_some_avg10": "off"},
        "restore": {"stable_seconds": 0, "margin": "1MiB"},
        "antithrash": {"cooldown_seconds": 0},
        "metrics": {"port": port},
    }
    for table, values in tables.items():
        base.setdefault(table, {}).update(values)
    lines = [
        f'lxc_path = "{lxc_path}"',
        f'state_dir = "{state_dir}"',
        f"interval_seconds = {interval_seconds}",
    ]
    for table, values in base.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml_value(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans are spelled alike


_HOLD_SCRIPT = """#!/bin/sh
# Hold CRIU at the armed action-script point, or LXC at the armed hook (its name
# is the hook's third argument), once, until released (or 120 s).
[ "${{CRTOOLS_SCRIPT_ACTION:-$3}}" = "$(cat {dir}/armed 2>/dev/null)" ] || exit 0
rm -f {dir}/armed
touch {dir}/reached
i=0
while [ ! -e {dir}/release ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
status=$(cat {dir}/release 2>/dev/null)
rm -f {dir}/release {dir}/reached
exit "${{status:-0}}"
"""


def with_criu_option(runtime: LxcRuntime, name: str, option: str) -> None:
    """Add a CRIU option to the container's evictor block (its own, which win)."""
    config = runtime.config_path(name)
    text, block = lxc_config.split(config.read_text())
    block = block or lxc_config.Block()
    options = (*block.criu_options, option)
    config.write_text(lxc_config.with_block(text, dataclasses.replace(block, criu_options=options)))


class CriuHold:
    """Holds CRIU at one of its action-script points (pre-dump, post-dump,
    pre-restore, post-resume...) so that a fault lands at a known moment: an
    ``action-script`` among the CRIU options of the container's evictor block,
    which evictor passes to every dump and restore of it. With ``lxc_hook``, it
    holds LXC at that hook of the container instead (``pre-start``: LXC's side of
    a restore, before it starts criu)."""

    def __init__(
        self, runtime: LxcRuntime, name: str, directory: Path, *, lxc_hook: str | None = None
    ) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700)
        script = directory / "hold.sh"
        script.write_text(_HOLD_SCRIPT.format(dir=shlex.quote(str(directory))))
        script.chmod(0o700)
        if lxc_hook is None:
            with_criu_option(runtime, name, f"action-script {script}")
        else:
            config = runtime.config_path(name)
            config.write_text(config.read_text() + f"lxc.hook.{lxc_hook} = {script}\n")

    def arm(self, action: str) -> None:
        (self.directory / "armed").write_text(action)

    def wait_reached(self, timeout_seconds: float = 90.0) -> None:
        wait_until(lambda: (self.directory / "reached").exists(), "CRIU held", timeout_seconds)

    def release(self, exit_status: int = 0) -> None:
        """Let CRIU go on; a script that exits non-zero fails its step (at post-dump,
        CRIU then fails the dump, lets the tasks run on, and logs "Dumping FAILED.")."""
        (self.directory / "release").write_text(str(exit_status))


@pytest.fixture
def criu_hold(runtime: LxcRuntime, tmp_path: Path) -> Callable[[str], CriuHold]:
    """``criu_hold(name)``: a hold for that container's CRIU runs."""
    return lambda name: CriuHold(runtime, name, tmp_path / f"hold-{name}")
