"""The restore gate's script, run by sh as CRIU runs it (the integration tests
run it under CRIU itself)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from evictor.restore_gate import RestoreGate

# The process that stands for lxc-checkpoint, the gate's driver: this one, an
# ancestor of every script these tests run.
HERE = Path("/proc/self/comm").read_text().strip()


def run_script(gate: RestoreGate, action: str = "post-restore") -> subprocess.Popen[bytes]:
    """Start the gate script as CRIU does: sh -c PATH, with CRTOOLS_SCRIPT_ACTION set."""
    environment = {**os.environ, **gate.environment, "CRTOOLS_SCRIPT_ACTION": action}
    return subprocess.Popen(["sh", "-c", str(gate.directory / "post-restore.sh")], env=environment)


@pytest.mark.parametrize(("verified", "exit_status"), [(True, 0), (False, 1)])
def test_the_script_waits_and_passes_only_a_verified_image(
    tmp_path: Path, verified: bool, exit_status: int
) -> None:
    with RestoreGate(tmp_path / "gate", driver=HERE, timeout_seconds=30) as gate:
        script = run_script(gate)
        time.sleep(0.3)
        assert script.poll() is None  # waiting for the verdict
        assert gate.was_consulted()
        gate.give_verdict(verified)
        assert script.wait(timeout=10) == exit_status


def test_a_verdict_given_before_criu_asks_is_kept(tmp_path: Path) -> None:
    with RestoreGate(tmp_path / "gate", driver=HERE, timeout_seconds=30) as gate:
        gate.give_verdict(True)
        assert run_script(gate).wait(timeout=10) == 0


def test_other_actions_pass_at_once_without_consulting(tmp_path: Path) -> None:
    with RestoreGate(tmp_path / "gate", driver=HERE, timeout_seconds=30) as gate:
        for action in ("pre-restore", "setup-namespaces", "network-unlock", "post-resume"):
            assert run_script(gate, action).wait(timeout=10) == 0
        assert not gate.was_consulted()


def test_evictor_gone_before_its_verdict_fails_the_restore_at_once(tmp_path: Path) -> None:
    evictor = subprocess.Popen(["sleep", "0.5"])  # stands in for an evictor about to be killed
    with RestoreGate(
        tmp_path / "gate", driver=HERE, timeout_seconds=300, owner_pid=evictor.pid
    ) as gate:
        script = run_script(gate)
        time.sleep(0.2)
        assert script.poll() is None
        evictor.wait()
        assert script.wait(timeout=10) == 1  # within a poll, not after the 300 s timeout


@pytest.mark.parametrize("driver_killed", [False, True], ids=["driver-lives", "driver-killed"])
def test_the_gate_opens_only_while_its_driver_lives(tmp_path: Path, driver_killed: bool) -> None:
    """lxc-checkpoint's side of a restore, killed while criu restores, would leave the
    tasks running with no monitor: a verified image passes only while the driver is
    an ancestor of the script. Here a copy of sh named gate-driver runs a wrapper
    that runs the script and records its exit status."""
    driver = tmp_path / "gate-driver"
    shutil.copy("/bin/sh", driver)
    wrapper, status = tmp_path / "wrapper.sh", tmp_path / "status"
    wrapper.write_text('#!/bin/sh\n"$1"; echo $? > "$2"\n')
    wrapper.chmod(0o700)
    with RestoreGate(tmp_path / "gate", driver="gate-driver", timeout_seconds=30) as gate:
        environment = {**os.environ, **gate.environment, "CRTOOLS_SCRIPT_ACTION": "post-restore"}
        script = str(gate.directory / "post-restore.sh")
        running = subprocess.Popen(
            [str(driver), "-c", '"$0" "$1" "$2"; :', str(wrapper), script, str(status)],
            env=environment,
        )
        deadline = time.monotonic() + 10
        while not gate.was_consulted():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if driver_killed:
            running.kill()
            running.wait(timeout=10)
        gate.give_verdict(True)
        while not status.exists() or not status.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert status.read_text().strip() == ("1" if driver_killed else "0")
        running.wait(timeout=10)


def test_no_verdict_in_time_fails_the_restore(tmp_path: Path) -> None:
    with RestoreGate(tmp_path / "gate", driver=HERE, timeout_seconds=0.3) as gate:
        started = time.monotonic()
        assert run_script(gate).wait(timeout=10) == 1
        assert 0.3 <= time.monotonic() - started < 5


def test_the_gate_is_root_only_replaces_a_leftover_and_is_removed(tmp_path: Path) -> None:
    leftover = tmp_path / "gate"
    leftover.mkdir()
    (leftover / "verdict").write_text("verified\n")  # from a killed evictor's restore
    with RestoreGate(leftover, driver=HERE, timeout_seconds=30) as gate:
        assert not (gate.directory / "verdict").exists()
        assert stat.S_IMODE(gate.directory.stat().st_mode) == 0o700
        for path in gate.directory.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
        assert gate.criu_options == (f"action-script {gate.directory / 'post-restore.sh'}",)
    assert not leftover.exists()
