"""The daemon's reloads, on a real (empty) LXC path: the daemon end to end is tested
on real containers in tests/integration/test_daemon.py."""

from __future__ import annotations

import threading
from pathlib import Path

from evictor.config import parse_config
from evictor.daemon import Daemon
from evictor.engine import Engine
from evictor.metrics import Metrics


def test_a_reload_never_waits_for_a_tick(engine: Engine, tmp_path: Path) -> None:
    """The main thread reads the signals: were it to wait for a tick (a round of
    evictions, minutes long), a SIGTERM behind a SIGHUP would not stop the round."""
    reloaded = parse_config(
        {
            "lxc_path": str(tmp_path / "lxc"),
            "state_dir": str(tmp_path / "state"),
            "priorities": {"default": 7},
        }
    )
    daemon = Daemon(engine, Metrics(), load_config=lambda: reloaded)
    with daemon._tick_lock:  # a tick under way
        asking = threading.Thread(target=daemon.ask_reload)
        asking.start()
        asking.join(timeout=5)
        assert not asking.is_alive()
        assert engine.config.priorities.default == 0  # not under a tick
    daemon.tick()  # the next tick takes it first
    assert engine.config is reloaded

    again = parse_config({"lxc_path": str(tmp_path / "lxc"), "state_dir": str(tmp_path / "state")})
    daemon.load_config = lambda: again
    daemon.ask_reload()  # no tick under way: at once
    assert engine.config is again
