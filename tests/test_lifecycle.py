"""The lifecycle: every pair of states is either a legal move or a bug."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from evictor import lifecycle
from evictor.errors import IllegalTransition
from evictor.journal import Journal
from evictor.model import Managed


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    opened = Journal(tmp_path / "journal.db")
    yield opened
    opened.close()


@pytest.mark.parametrize(
    ("current", "to"), list(itertools.product(Managed, Managed)), ids=lambda s: s.value
)
def test_every_pair_of_states(journal: Journal, current: Managed, to: Managed) -> None:
    journal.set_state("c", current, at=1.0, reason="before", drained=True)
    if (current, to) in lifecycle.TRANSITIONS:
        assert lifecycle.move(journal, "c", to, at=2.0, reason="after") is current
        moved = journal.managed()["c"]
        assert (moved.state, moved.reason, moved.updated_at) == (to, "after", 2.0)
        assert moved.drained  # kept unless the move says otherwise
    else:
        with pytest.raises(IllegalTransition, match=f"from {current.value} to {to.value}"):
            lifecycle.move(journal, "c", to, at=2.0)
        assert journal.managed()["c"].state is current  # nothing was written


def test_a_container_never_seen_is_running(journal: Journal) -> None:
    assert journal.state("new") is Managed.RUNNING
    lifecycle.move(journal, "new", Managed.EVICTING, at=1.0)
    assert journal.state("new") is Managed.EVICTING
    with pytest.raises(IllegalTransition):
        lifecycle.move(journal, "other", Managed.RESTORING, at=1.0)


def test_every_state_can_be_reached_and_left() -> None:
    sources = {current for current, _ in lifecycle.TRANSITIONS}
    targets = {to for _, to in lifecycle.TRANSITIONS}
    assert sources == targets == set(Managed)
    # Each in-flight state leads to a state at rest, whatever happened.
    for state in lifecycle.IN_FLIGHT:
        assert {to for current, to in lifecycle.TRANSITIONS if current is state} >= {
            Managed.RUNNING,
            Managed.FAILED,
        }
