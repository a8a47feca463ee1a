"""The daemon's security defaults, checked on a real start."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import psutil

from evictor.lxc_runtime import LxcRuntime

from .conftest import DaemonProcess, free_port, run_evictor, write_config


def test_the_daemon_refuses_a_world_writable_config_or_state_dir(
    runtime: LxcRuntime, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path / "evictor.toml", runtime.lxc_path, state, free_port())
    os.chmod(config, 0o666)
    refused = run_evictor("-c", str(config), "run")
    assert refused.returncode == 1
    assert "config file" in refused.stderr and "writable by group or others" in refused.stderr
    os.chmod(config, 0o600)
    state.mkdir(mode=0o777)
    os.chmod(state, 0o777)
    refused = run_evictor("-c", str(config), "run")
    assert refused.returncode == 1 and "state directory" in refused.stderr
    assert not (state / "journal.db").exists()  # refused before touching anything


def test_metrics_listen_on_localhost_and_state_is_root_only(
    runtime: LxcRuntime, daemon: Callable[[Path], DaemonProcess], tmp_path: Path
) -> None:
    state, port = tmp_path / "state", free_port()
    config = write_config(tmp_path / "evictor.toml", runtime.lxc_path, state, port)
    running = daemon(config)
    running.wait_for_log("running: a tick every")
    assert running.process is not None
    listening = [
        c.laddr
        for c in psutil.Process(running.process.pid).net_connections("inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]
    # Others may pass through the state directory and the image store, never list or
    # read them: an unprivileged container's root must reach its own image.
    for path, mode in ((state, 0o711), (state / "images", 0o711), (state / "journal.db", 0o600)):
        assert path.stat().st_mode & 0o777 == mode, path
    assert running.stop() == 0
