"""The daemon's reloads, on a real (empty) LXC path: the daemon end to end is tested
on real containers in tests/integration/test_daemon.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from evictor.config import Config, parse_config
from evictor.daemon import Daemon
from evictor.engine import Engine
from evictor.metrics import Metrics


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    (tmp_path / "lxc").mkdir()
    opened = Engine(Config(lxc_path=tmp_path / "lxc", state_dir=tmp_path / "state"))
    yield opened
    opened.close()


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
