"""`evictor check` remembered, `prepare` and its undo, and addresses taken while a
container was evicted: on real containers."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from evictor.diagnosis import SYSTEMD_FILES
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerState
from evictor.tools import stock, testbed

from .conftest import TEST_ROOT, StockFactory, WorkloadFactory, next_static_address, run_evictor


@pytest.fixture
def state_dir() -> Iterator[Path]:
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    directory = TEST_ROOT / f"state-prepare-{os.getpid()}"
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def evictor(lxc_path: Path, state_dir: Path, *args: str) -> tuple[int, str, str]:
    result = run_evictor("-P", str(lxc_path), "--state-dir", str(state_dir), *args)
    return result.returncode, result.stdout, result.stderr


def test_prepare_shows_applies_and_undoes_its_changes(
    runtime: LxcRuntime, stock_container: StockFactory, state_dir: Path
) -> None:
    name = stock_container("trixie", unprivileged=True, start=False)
    config = runtime.lxc_path / name / "config"
    rootfs = runtime.lxc_path / name / "rootfs"
    original = config.read_text()

    code, out, _ = evictor(runtime.lxc_path, state_dir, "prepare", "--dry-run", name)
    assert code == 0 and "+lxc.tty.max = 0" in out and f"{name}: dry run, nothing changed" in out
    assert config.read_text() == original
    assert not any(os.path.lexists(rootfs / f.path.lstrip("/")) for f in SYSTEMD_FILES)

    code, out, _ = evictor(runtime.lxc_path, state_dir, "prepare", name)
    assert code == 0, out
    backups = list(config.parent.glob("config.evictor-backup-*"))
    assert len(backups) == 1 and backups[0].read_text() == original
    assert config.read_text().startswith(original)  # evictor's block only appended
    for rootfs_file in SYSTEMD_FILES:
        path = rootfs / rootfs_file.path.lstrip("/")
        assert os.path.lexists(path), path
        # Owned by the container's root, so that it can change them.
        assert path.lstat().st_uid == testbed.MAPPED_ROOT_ID, path
    code, out, _ = evictor(runtime.lxc_path, state_dir, "prepare", name)
    assert (code, out.strip()) == (0, f"{name}: nothing to prepare")  # idempotent

    code, out, _ = evictor(runtime.lxc_path, state_dir, "prepare", "--undo", name)
    assert code == 0 and "-lxc.tty.max = 0" in out
    assert config.read_text() == original
    assert not any(os.path.lexists(rootfs / f.path.lstrip("/")) for f in SYSTEMD_FILES)


def test_a_checked_container_is_skipped_by_the_planner_and_shown(
    runtime: LxcRuntime, workload: WorkloadFactory, state_dir: Path, tmp_path: Path
) -> None:
    tty = workload(memory_mib=48, with_tty=True)  # lowest: the one to evict, but it cannot be
    other = workload(memory_mib=16)
    config = tmp_path / "evictor.toml"
    config.write_text(
        f'lxc_path = "{runtime.lxc_path}"\nstate_dir = "{state_dir}"\n'
        f'[triggers]\nbudget = "40MiB"\nmin_reclaim = "1MiB"\n'
        f'[[priorities.rules]]\nmatch = "{tty}"\npriority = -10\n'
    )
    result = run_evictor("-c", str(config), "check", tty)
    assert result.returncode == 1 and "terminal" in result.stdout
    plan = run_evictor("-c", str(config), "plan").stdout
    assert f"not checkpointable here (evictor check): {tty}: " in plan
    assert f"evict {other}" in plan and f"evict {tty}" not in plan
    status = json.loads(run_evictor("-c", str(config), "status", "--json").stdout)
    (entry,) = (c for c in status["containers"] if c["name"] == tty)
    assert entry["eligibility"].startswith("not checkpointable (evictor check): ")
    assert entry["check"]["checkpointable"] is False
    # A change of its config makes the verdict stale: a candidate again, until checked.
    with open(runtime.lxc_path / tty / "config", "a") as changed:
        changed.write("# changed\n")
    assert f"evict {tty}" in run_evictor("-c", str(config), "plan").stdout


def test_an_address_taken_while_evicted_stops_the_restore(
    runtime: LxcRuntime, workload: WorkloadFactory, state_dir: Path
) -> None:
    address = next_static_address()
    evicted = workload(network=stock.Network.static(address))
    intruder = workload(network=stock.Network.static(address), start=False)
    code, _, err = evictor(runtime.lxc_path, state_dir, "evict", evicted)
    assert code == 0, err
    runtime.start(intruder)  # takes the address meanwhile
    testbed.wait_for_counter(runtime, intruder, above=0)
    code, _, err = evictor(runtime.lxc_path, state_dir, "restore", evicted)
    assert code == 1 and f"{address} is held by {intruder}" in err
    assert runtime.state(evicted) is ContainerState.STOPPED  # not restored, image kept
    code, out, _ = evictor(runtime.lxc_path, state_dir, "status")
    assert "restore failed 1 time(s): its address is taken" in out
    runtime.stop(intruder)
    code, _, err = evictor(runtime.lxc_path, state_dir, "restore", evicted)
    assert code == 0, err
    assert runtime.state(evicted) is ContainerState.RUNNING
