"""The journal: evictor's memory across restarts (SQLite, root-only).

It holds the operators' labels and every eviction and restore, successful or
not, from which the planner's per-container History is derived.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from evictor.ranking import History, Label

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    container TEXT PRIMARY KEY,
    priority INTEGER,
    protected INTEGER
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    container TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    size_bytes INTEGER,
    duration_seconds REAL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (at);
CREATE TABLE IF NOT EXISTS containers (
    container TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    drained INTEGER NOT NULL DEFAULT 0
);
"""


class Managed(enum.Enum):
    """Where evictor stands with a container; EVICTING and RESTORING are in-flight.

    A crash leaves a container in an in-flight state, which the daemon
    reconciles with reality at its next start.
    """

    RUNNING = "RUNNING"
    EVICTING = "EVICTING"
    EVICTED = "EVICTED"
    RESTORING = "RESTORING"
    FAILED = "FAILED"  # its restore failed; the image is kept and retried with backoff


@dataclasses.dataclass(frozen=True, kw_only=True)
class ManagedContainer:
    container: str
    state: Managed
    reason: str
    updated_at: float
    drained: bool  # evicted by `evictor drain`: held until the daemon restarts or `resume`


class EventKind(enum.Enum):
    EVICTED = "evicted"
    EVICT_FAILED = "evict_failed"
    RESTORED = "restored"
    RESTORE_FAILED = "restore_failed"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Event:
    container: str
    at: float
    kind: EventKind
    size_bytes: int | None = None
    duration_seconds: float | None = None
    detail: str = ""


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
        self.path = path
        self._db = sqlite3.connect(
            path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- labels ---

    def labels(self) -> dict[str, Label]:
        rows = self._db.execute("SELECT container, priority, protected FROM labels")
        return {
            name: Label(priority=priority, protected=None if protected is None else bool(protected))
            for name, priority, protected in rows
        }

    def set_label(self, container: str, label: Label) -> None:
        """Merge ``label`` into the container's label (None fields keep their value)."""
        with self._transaction() as db:
            old = self.labels().get(container, Label())
            merged = Label(
                priority=label.priority if label.priority is not None else old.priority,
                protected=label.protected if label.protected is not None else old.protected,
            )
            db.execute(
                "INSERT OR REPLACE INTO labels (container, priority, protected) VALUES (?, ?, ?)",
                (
                    container,
                    merged.priority,
                    None if merged.protected is None else int(merged.protected),
                ),
            )

    def clear_label(self, container: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM labels WHERE container = ?", (container,))

    # --- managed states ---

    def set_state(
        self,
        container: str,
        state: Managed,
        *,
        at: float,
        reason: str = "",
        drained: bool | None = None,
    ) -> None:
        """Record ``container``'s state; ``drained`` None keeps the current flag."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO containers (container, state, reason, updated_at, drained)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (container) DO UPDATE SET"
                " state = excluded.state, reason = excluded.reason,"
                " updated_at = excluded.updated_at,"
                " drained = CASE WHEN ? IS NULL THEN containers.drained ELSE excluded.drained END",
                (container, state.value, reason, at, int(bool(drained)), drained),
            )

    def set_drained(self, container: str, drained: bool) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE containers SET drained = ? WHERE container = ?", (int(drained), container)
            )

    def managed(self) -> dict[str, ManagedContainer]:
        rows = self._db.execute(
            "SELECT container, state, reason, updated_at, drained FROM containers"
        )
        return {
            name: ManagedContainer(
                container=name,
                state=Managed(state),
                reason=reason,
                updated_at=updated_at,
                drained=bool(drained),
            )
            for name, state, reason, updated_at, drained in rows
        }

    # --- events and history ---

    def record(self, event: Event) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO events (container, at, kind, size_bytes, duration_seconds, detail)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    event.container,
                    event.at,
                    event.kind.value,
                    event.size_bytes,
                    event.duration_seconds,
                    event.detail,
                ),
            )

    def events(self, *, container: str | None = None, since: float = 0.0) -> list[Event]:
        query = (
            "SELECT container, at, kind, size_bytes, duration_seconds, detail FROM events"
            " WHERE at >= ?"
        )
        args: tuple[object, ...] = (since,)
        if container is not None:
            query += " AND container = ?"
            args += (container,)
        return [
            Event(
                container=c,
                at=at,
                kind=EventKind(kind),
                size_bytes=size,
                duration_seconds=duration,
                detail=detail,
            )
            for c, at, kind, size, duration, detail in self._db.execute(
                query + " ORDER BY id", args
            )
        ]

    def histories(self, since: float) -> dict[str, History]:
        """Each container's History from its events since ``since`` (older ones no longer
        matter: the caller passes the longest of the anti-thrash and backoff windows)."""
        histories: dict[str, History] = {}
        for event in self.events(since=since):
            h = histories.get(event.container, History())
            if event.kind is EventKind.EVICTED:
                h = dataclasses.replace(
                    h, eviction_times=(*h.eviction_times, event.at), checkpoint_failure=None
                )
            elif event.kind is EventKind.EVICT_FAILED:
                h = dataclasses.replace(h, checkpoint_failure=event.detail)
            elif event.kind is EventKind.RESTORED:
                h = dataclasses.replace(
                    h, last_restored_at=event.at, restore_failures=0, last_restore_failure_at=None
                )
            else:
                h = dataclasses.replace(
                    h, restore_failures=h.restore_failures + 1, last_restore_failure_at=event.at
                )
            histories[event.container] = h
        return histories
