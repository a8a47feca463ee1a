"""The restore gate's script, run by sh as CRIU runs it, against the real FIFO."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from evictor.restore_gate import RestoreGate


def run_script(gate: RestoreGate, action: str = "post-restore") -> subprocess.Popen[bytes]:
    """Start the gate script as CRIU does: sh -c PATH, with CRTOOLS_SCRIPT_ACTION set."""
    environment = {**os.environ, **gate.environment, "CRTOOLS_SCRIPT_ACTION": action}
    return subprocess.Popen(["sh", "-c", str(gate.directory / "post-restore.sh")], env=environment)


@pytest.mark.parametrize(("verified", "exit_status"), [(True, 0), (False, 1)])
def test_the_script_passes_only_a_verified_image(
    tmp_path: Path, verified: bool, exit_status: int
) -> None:
    with RestoreGate(tmp_path / "gate", timeout_seconds=30) as gate:
        script = run_script(gate)
        time.sleep(0.2)  # the script is waiting for the verdict
        assert script.poll() is None
        gate.give_verdict(verified)
        assert script.wait(timeout=10) == exit_status
        assert gate.was_consulted()


def test_other_actions_pass_at_once_and_leave_the_verdict_alone(tmp_path: Path) -> None:
    with RestoreGate(tmp_path / "gate", timeout_seconds=30) as gate:
        gate.give_verdict(True)
        for action in ("pre-restore", "setup-namespaces", "network-unlock", "post-resume"):
            assert run_script(gate, action).wait(timeout=10) == 0
        assert not gate.was_consulted()


def test_evictor_gone_before_its_verdict_fails_the_restore(tmp_path: Path) -> None:
    with RestoreGate(tmp_path / "gate", timeout_seconds=30) as gate:
        script = run_script(gate)
        time.sleep(0.2)
    # Leaving the block closes evictor's end of the FIFO, as its death would.
    assert script.wait(timeout=10) != 0
    assert not (tmp_path / "gate").exists()


def test_no_verdict_in_time_fails_the_restore(tmp_path: Path) -> None:
    with RestoreGate(tmp_path / "gate", timeout_seconds=0.5) as gate:
        started = time.monotonic()
        assert run_script(gate).wait(timeout=10) != 0
        assert time.monotonic() - started < 5


def test_the_gate_is_root_only_and_replaces_a_leftover(tmp_path: Path) -> None:
    leftover = tmp_path / "gate"
    leftover.mkdir()
    (leftover / "verdict").write_text("verified\n")  # a regular file, not the FIFO
    with RestoreGate(leftover, timeout_seconds=30) as gate:
        assert stat.S_IMODE(gate.directory.stat().st_mode) == 0o700
        assert stat.S_ISFIFO((gate.directory / "verdict").stat().st_mode)
        for path in gate.directory.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
        config = (gate.directory / "criu.conf").read_text()
        assert config == f"action-script {gate.directory / 'post-restore.sh'}\n"
