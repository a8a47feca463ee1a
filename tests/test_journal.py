"""The journal: what it persists, and the histories the planner reads from it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from evictor.journal import Event, EventKind, Journal
from evictor.model import CheckpointFailure, Label

NOW = 1_000_000.0
LATER = 1_800_000_000.0


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    opened = Journal(tmp_path / "journal.db")
    yield opened
    opened.close()


def failed(name: str, at: float, *, digest: str = "v1", persistent: bool = True) -> Event:
    return Event(
        container=name,
        at=at,
        kind=EventKind.EVICT_FAILED,
        detail=f"tty at {at:g}",
        persistent=persistent,
        config_digest=digest,
    )


def test_a_checkpoint_failure_streak_counts_since_the_last_success(journal: Journal) -> None:
    journal.record(failed("a", NOW - 900))
    journal.record(Event(container="a", at=NOW - 800, kind=EventKind.EVICTED))
    for at in (NOW - 30, NOW - 20, NOW - 10):
        journal.record(failed("a", at))
    assert journal.histories(since=NOW - 60)["a"].checkpoint_failure == CheckpointFailure(
        reason=f"tty at {NOW - 10:g}", at=NOW - 10, count=3, persistent=True, config_digest="v1"
    )


def test_a_streak_older_than_the_history_window_still_counts(journal: Journal) -> None:
    """The backoff of a container failing for days must not fall back to its start."""
    for day in range(5):
        journal.record(failed("a", NOW - 86400 * day))
    history = journal.histories(since=NOW - 3600)["a"]
    assert history.checkpoint_failure is not None and history.checkpoint_failure.count == 5
    assert history.eviction_times == ()


def test_a_config_change_starts_a_new_streak(journal: Journal) -> None:
    journal.record(failed("a", NOW - 30, digest="v1"))
    journal.record(failed("a", NOW - 20, digest="v1"))
    journal.record(failed("a", NOW - 10, digest="v2", persistent=False))
    failure = journal.histories(since=NOW - 60)["a"].checkpoint_failure
    assert failure is not None
    assert (failure.count, failure.config_digest, failure.persistent) == (1, "v2", False)


def test_a_success_clears_the_failure(journal: Journal) -> None:
    journal.record(failed("a", NOW - 30))
    journal.record(Event(container="a", at=NOW - 20, kind=EventKind.EVICTED, size_bytes=1))
    history = journal.histories(since=NOW - 60)["a"]
    assert history.checkpoint_failure is None
    assert history.eviction_times == (NOW - 20,)


def test_restore_failures_count_since_the_last_restore(journal: Journal) -> None:
    for at, kind in (
        (NOW - 50, EventKind.RESTORE_FAILED),
        (NOW - 40, EventKind.RESTORED),
        (NOW - 30, EventKind.RESTORE_FAILED),
        (NOW - 20, EventKind.RESTORE_FAILED),
    ):
        journal.record(Event(container="a", at=at, kind=kind))
    history = journal.histories(since=NOW - 60)["a"]
    assert (history.restore_failures, history.last_restore_failure_at) == (2, NOW - 20)
    assert history.last_restored_at == NOW - 40


def test_a_journal_of_the_first_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, container TEXT NOT NULL, at REAL NOT NULL,"
        " kind TEXT NOT NULL, size_bytes INTEGER, duration_seconds REAL,"
        " detail TEXT NOT NULL DEFAULT '');"
        f" INSERT INTO events (container, at, kind, detail) VALUES ('a', {NOW}, 'evict_failed',"
        " 'tty');"
    )
    old.commit()
    old.close()
    journal = Journal(path)
    try:
        (event,) = journal.events()
        assert (event.detail, event.persistent, event.config_digest) == ("tty", False, None)
        journal.record(failed("a", NOW + 1))
        assert journal.histories(since=0)["a"].checkpoint_failure == CheckpointFailure(
            reason=f"tty at {NOW + 1:g}", at=NOW + 1, count=1, config_digest="v1"
        )
    finally:
        journal.close()


def test_pruning_keeps_what_the_planner_needs_and_stays_bounded(journal: Journal) -> None:
    day = 86400.0  # (LATER: a time with months before it)
    for n in range(5):  # evicted and restored daily, long ago
        journal.record(Event(container="a", at=LATER - 90 * day + n * day, kind=EventKind.EVICTED))
        journal.record(Event(container="a", at=LATER - 90 * day + n * day, kind=EventKind.RESTORED))
    for n in range(40):  # then a streak of failures, for weeks
        journal.record(failed("a", LATER - 60 * day + n * day))
    journal.record(Event(container="b", at=LATER - 10, kind=EventKind.EVICTED))  # recent
    before = journal.histories(since=LATER - 3600)
    pruned = journal.prune(before=LATER - 3600)
    assert pruned == 8 + 8  # 4 old evictions, 4 old restores; 8 failures beyond the 32 kept
    kinds = [(e.container, e.kind) for e in journal.events()]
    assert kinds.count(("a", EventKind.EVICTED)) == kinds.count(("a", EventKind.RESTORED)) == 1
    assert kinds.count(("a", EventKind.EVICT_FAILED)) == 32
    assert ("b", EventKind.EVICTED) in kinds
    after = journal.histories(since=LATER - 3600)
    assert after["b"] == before["b"]
    failure = after["a"].checkpoint_failure
    assert failure is not None and failure.count == 32 and failure.at == LATER - 21 * day
    assert journal.prune(before=LATER - 3600) == 0  # nothing more to forget


def test_labels_keep_what_is_not_set_again(journal: Journal) -> None:
    journal.set_label("a", Label(priority=5))
    journal.set_label("a", Label(drain=False))
    journal.set_label("a", Label(protected=True))
    assert journal.labels()["a"] == Label(priority=5, protected=True, drain=False)


def test_discards_are_counted_and_never_forgotten(journal: Journal) -> None:
    for at in (LATER - 90 * 86400, LATER - 80 * 86400, LATER):
        journal.record(Event(container="a", at=at, kind=EventKind.DISCARDED))
    journal.prune(before=LATER - 3600)
    assert journal.discards() == {"a": 3}
