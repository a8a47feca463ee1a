"""Fixtures shared by the unit and the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from evictor.config import Config
from evictor.engine import Engine

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """An engine on an empty, real LXC path of its own."""
    (tmp_path / "lxc").mkdir()
    opened = Engine(Config(lxc_path=tmp_path / "lxc", state_dir=tmp_path / "state"))
    yield opened
    opened.close()
