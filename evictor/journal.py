"""The journal: evictor's memory across restarts (SQLite, root-only).

It holds the operators' labels and every eviction and restore, successful or
not, from which the planner's per-container History is derived.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evictor.model import CheckpointFailure, CheckVerdict, History, Label, Managed

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
CREATE INDEX IF NOT EXISTS events_by_kind ON events (kind, container);
CREATE TABLE IF NOT EXISTS checks (
    container TEXT PRIMARY KEY,
    at REAL NOT NULL,
    checkpointable INTEGER NOT NULL,
    problems TEXT NOT NULL,
    config_digest TEXT,
    trial INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS containers (
    container TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    drained INTEGER NOT NULL DEFAULT 0
);
"""
# The failures of a streak kept by prune: 2**31 times any backoff is past its cap.
STREAK_KEPT = 32
# Columns added since the first schema, with their definitions: added to a
# journal written by an older evictor when it is opened.
_ADDED_COLUMNS = {
    "labels": {
        "drain": "INTEGER",  # drains leave it running (0), or not (1); NULL: unset
    },
    "events": {
        # a failed checkpoint's cause cannot pass by itself (a tty, an unsupported fd)
        "persistent": "INTEGER NOT NULL DEFAULT 0",
        # the container's LXC config when its checkpoint failed
        "config_digest": "TEXT",
    },
}


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
    DISCARDED = "discarded"  # its image removed on purpose (evictor discard)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Event:
    container: str
    at: float
    kind: EventKind
    size_bytes: int | None = None
    duration_seconds: float | None = None
    detail: str = ""
    persistent: bool = False  # EVICT_FAILED: the cause cannot pass by itself
    config_digest: str | None = None  # EVICT_FAILED: the container's LXC config then


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
        self.path = path
        self._lock = threading.RLock()  # the connection serves the daemon's threads
        self._commits = 0  # by this connection: PRAGMA data_version counts the others'
        self._db = sqlite3.connect(
            path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for column, definition in columns.items():
                if column not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._commits += 1

    def version(self) -> tuple[int, int]:
        """Differs after any commit to the journal, by this connection or another
        (another process's): what was read before may be read again."""
        with self._lock:
            (data_version,) = self._db.execute("PRAGMA data_version").fetchone()
            return self._commits, data_version

    def _read(self, query: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of a query, read whole: one thread at a time uses the connection."""
        with self._lock:
            return self._db.execute(query, args).fetchall()

    # --- labels ---

    def labels(self) -> dict[str, Label]:
        rows = self._read("SELECT container, priority, protected, drain FROM labels")
        return {
            name: Label(priority=priority, protected=_flag(protected), drain=_flag(drain))
            for name, priority, protected, drain in rows
        }

    def set_label(self, container: str, label: Label) -> None:
        """Merge ``label`` into the container's label (None fields keep their value)."""
        with self._transaction() as db:
            old = self.labels().get(container, Label())
            merged = Label(
                priority=label.priority if label.priority is not None else old.priority,
                protected=label.protected if label.protected is not None else old.protected,
                drain=label.drain if label.drain is not None else old.drain,
            )
            db.execute(
                "INSERT OR REPLACE INTO labels (container, priority, protected, drain)"
                " VALUES (?, ?, ?, ?)",
                (
                    container,
                    merged.priority,
                    None if merged.protected is None else int(merged.protected),
                    None if merged.drain is None else int(merged.drain),
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
        """Record ``container``'s state (lifecycle.move decides whether it may change);
        ``drained`` None keeps the current flag."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO containers (container, state, reason, updated_at, drained)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (container) DO UPDATE SET"
                " state = excluded.state, reason = excluded.reason,"
                " updated_at = excluded.updated_at,"
                " drained = CASE WHEN ? IS NULL THEN containers.drained ELSE excluded.drained END",
                (container, state.value, reason, at, int(bool(drained)), drained),
            )

    def state(self, container: str) -> Managed:
        """The container's recorded state; RUNNING if the journal never saw it."""
        rows = self._read("SELECT state FROM containers WHERE container = ?", (container,))
        return Managed(rows[0][0]) if rows else Managed.RUNNING

    def set_drained(self, container: str, drained: bool) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE containers SET drained = ? WHERE container = ?", (int(drained), container)
            )

    def managed(self) -> dict[str, ManagedContainer]:
        rows = self._read("SELECT container, state, reason, updated_at, drained FROM containers")
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
                "INSERT INTO events (container, at, kind, size_bytes, duration_seconds, detail,"
                " persistent, config_digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event.container,
                    event.at,
                    event.kind.value,
                    event.size_bytes,
                    event.duration_seconds,
                    event.detail,
                    int(event.persistent),
                    event.config_digest,
                ),
            )

    def events(self, *, container: str | None = None, since: float = 0.0) -> list[Event]:
        query = f"SELECT {_EVENT_COLUMNS} FROM events WHERE at >= ?"
        args: tuple[object, ...] = (since,)
        if container is not None:
            query += " AND container = ?"
            args += (container,)
        return [_event(row) for row in self._read(query + " ORDER BY id", args)]

    def eviction_rates(self, *, last: int) -> list[float]:
        """Bytes a second of the ``last`` evictions (image size over whole duration)."""
        rows = self._read(
            "SELECT size_bytes, duration_seconds FROM events WHERE kind = ?"
            " AND size_bytes > 0 AND duration_seconds > 0 ORDER BY id DESC LIMIT ?",
            (EventKind.EVICTED.value, last),
        )
        return [size / duration for size, duration in rows]

    def discards(self) -> dict[str, int]:
        """How many times each container's image was discarded, ever."""
        rows = self._read(
            "SELECT container, COUNT(*) FROM events WHERE kind = ? GROUP BY container",
            (EventKind.DISCARDED.value,),
        )
        return dict(rows)

    def record_check(self, container: str, verdict: CheckVerdict) -> None:
        """Remember ``evictor check``'s verdict (the last one per container)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO checks"
                " (container, at, checkpointable, problems, config_digest, trial)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    container,
                    verdict.at,
                    int(verdict.checkpointable),
                    json.dumps(list(verdict.problems)),
                    verdict.config_digest,
                    int(verdict.trial),
                ),
            )

    def checks(self) -> dict[str, CheckVerdict]:
        rows = self._read(
            "SELECT container, at, checkpointable, problems, config_digest, trial FROM checks"
        )
        return {
            name: CheckVerdict(
                checkpointable=bool(checkpointable),
                problems=tuple(json.loads(problems)),
                at=at,
                config_digest=digest,
                trial=bool(trial),
            )
            for name, at, checkpointable, problems, digest, trial in rows
        }

    def prune(self, *, before: float, streak_kept: int = STREAK_KEPT) -> int:
        """Forget events older than ``before`` that no History needs any more; return
        how many. Kept whatever their age: each container's last event of each kind
        (the last success delimits a failure streak), the latest ``streak_kept``
        failures of a streak since it (enough for any backoff to reach its cap), and
        every discard (operators' acts, which the metrics count)."""
        failed_after_success = """
            SELECT id FROM (
                SELECT e.id, ROW_NUMBER() OVER (
                    PARTITION BY e.container, e.kind ORDER BY e.id DESC) AS newest
                FROM events AS e
                WHERE e.kind = ? AND e.id > COALESCE(
                    (SELECT MAX(id) FROM events WHERE kind = ? AND container = e.container), 0)
            ) WHERE newest <= ?"""
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM events WHERE at < ? AND kind != ?"
                " AND id NOT IN (SELECT MAX(id) FROM events GROUP BY container, kind)"
                f" AND id NOT IN ({failed_after_success})"
                f" AND id NOT IN ({failed_after_success})",
                (
                    before,
                    EventKind.DISCARDED.value,
                    EventKind.EVICT_FAILED.value,
                    EventKind.EVICTED.value,
                    streak_kept,
                    EventKind.RESTORE_FAILED.value,
                    EventKind.RESTORED.value,
                    streak_kept,
                ),
            )
            return cursor.rowcount

    def _failures_since_success(self, failed: EventKind, succeeded: EventKind) -> list[Event]:
        """Every ``failed`` event after its container's last ``succeeded`` one, oldest first:
        a streak of failures, however old, decides a backoff."""
        return [
            _event(row)
            for row in self._read(
                f"SELECT {_EVENT_COLUMNS} FROM events AS e WHERE e.kind = ? AND e.id > COALESCE("
                " (SELECT MAX(id) FROM events WHERE kind = ? AND container = e.container), 0)"
                " ORDER BY e.id",
                (failed.value, succeeded.value),
            )
        ]

    def histories(self, since: float) -> dict[str, History]:
        """Each container's History: its evictions and restores since ``since`` (older
        ones no longer matter: the caller passes the anti-thrash window), and its
        failures since its last success."""
        evictions: dict[str, list[float]] = {}
        restored: dict[str, float] = {}
        for event in self.events(since=since):
            if event.kind is EventKind.EVICTED:
                evictions.setdefault(event.container, []).append(event.at)
            elif event.kind is EventKind.RESTORED:
                restored[event.container] = event.at
        checkpoint_failures: dict[str, CheckpointFailure] = {}
        for event in self._failures_since_success(EventKind.EVICT_FAILED, EventKind.EVICTED):
            last = checkpoint_failures.get(event.container)
            same_config = last is not None and last.config_digest == event.config_digest
            checkpoint_failures[event.container] = CheckpointFailure(
                reason=event.detail,
                at=event.at,
                count=last.count + 1 if last is not None and same_config else 1,
                persistent=event.persistent,
                config_digest=event.config_digest,
            )
        restore_failures: dict[str, list[Event]] = {}
        for event in self._failures_since_success(EventKind.RESTORE_FAILED, EventKind.RESTORED):
            restore_failures.setdefault(event.container, []).append(event)
        checks = self.checks()
        names = evictions.keys() | restored.keys() | checkpoint_failures.keys()
        return {
            name: History(
                eviction_times=tuple(evictions.get(name, ())),
                last_restored_at=restored.get(name),
                checkpoint_failure=checkpoint_failures.get(name),
                restore_failures=len(restore_failures.get(name, ())),
                last_restore_failure_at=(
                    restore_failures[name][-1].at if name in restore_failures else None
                ),
                restore_failure=(
                    restore_failures[name][-1].detail if name in restore_failures else None
                ),
                check=checks.get(name),
            )
            for name in names | restore_failures.keys() | checks.keys()
        }


def _flag(value: int | None) -> bool | None:
    return None if value is None else bool(value)


_EVENT_COLUMNS = (
    "container, at, kind, size_bytes, duration_seconds, detail, persistent, config_digest"
)


def _event(row: tuple[Any, ...]) -> Event:
    container, at, kind, size_bytes, duration_seconds, detail, persistent, digest = row
    return Event(
        container=container,
        at=at,
        kind=EventKind(kind),
        size_bytes=size_bytes,
        duration_seconds=duration_seconds,
        detail=detail,
        persistent=bool(persistent),
        config_digest=digest,
    )
