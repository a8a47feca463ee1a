"""Real LXC containers and real CRIU checkpoints.

Every container is created in the suite's own LXC path with a name unique to
the run (``evt-PID-N``), and destroyed afterwards. A run that crashed leaves its
containers in that path; the next run destroys them before it starts, so it
never touches a container it did not create.

These tests never skip: a machine without root, LXC or CRIU fails them with the
reason (run ``scripts/setup.sh`` first).
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from evictor import testbed
from evictor.criu import check_criu
from evictor.images import ImageStore
from evictor.journal import Journal
from evictor.lxc_runtime import LxcRuntime

TEST_ROOT = Path(os.environ.get("EVICTOR_TEST_ROOT", "/var/tmp/evictor-tests"))

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


WorkloadFactory = Callable[..., str]


@pytest.fixture
def workload(runtime: LxcRuntime) -> Iterator[WorkloadFactory]:
    """Create and start workload containers; every one is destroyed afterwards."""
    created: list[str] = []

    def make(memory_mib: int = 16, *, with_tty: bool = False, start: bool = True) -> str:
        name = f"evt-{os.getpid()}-{next(_names)}"
        created.append(name)
        testbed.create_workload_container(
            runtime, name, memory_mib=memory_mib, seed=len(created), with_tty=with_tty
        )
        if start:
            runtime.start(name)
            testbed.wait_for_counter(runtime, name, above=1)
        return name

    yield make
    for name in created:
        if runtime.exists(name):
            runtime.destroy(name)
