"""A container's lifecycle in evictor's hands: its legal moves, written once.

The journal persists a container's state; this module alone decides whether a
move is legal. An illegal move is a bug in evictor, and raises. A container
the journal has never seen is RUNNING: in LXC's hands.

Every move happens under the container's lock in the image store, so no other
evictor process moves it meanwhile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from evictor.errors import IllegalTransition
from evictor.model import Managed

if TYPE_CHECKING:
    from evictor.journal import Journal

RUNNING, EVICTING, EVICTED, RESTORING, FAILED = (
    Managed.RUNNING,
    Managed.EVICTING,
    Managed.EVICTED,
    Managed.RESTORING,
    Managed.FAILED,
)

# (from, to): what the move means.
TRANSITIONS: dict[tuple[Managed, Managed], str] = {
    (RUNNING, EVICTING): "an eviction begins",
    (EVICTING, EVICTED): "its image is committed: it is stopped, its state on disk",
    (EVICTING, RUNNING): "the eviction failed or was interrupted; the container runs on",
    (EVICTING, FAILED): "the eviction could not be undone (its image is kept aside, or its"
    " threads did not run again)",
    (EVICTED, RESTORING): "a restore begins",
    (FAILED, RESTORING): "a failed restore is tried again",
    (RESTORING, RUNNING): "it runs again, restored",
    (RESTORING, EVICTED): "the restore was interrupted before the container ran",
    (RESTORING, FAILED): "the restore failed; its image is kept",
    (EVICTED, RUNNING): "its image is gone: discarded, or started outside evictor",
    (FAILED, RUNNING): "its image is gone: discarded, or started outside evictor",
    (FAILED, EVICTING): "started outside evictor after a failure; an eviction begins",
    (RUNNING, EVICTED): "found stopped with a committed image the journal had no record of",
}

IN_FLIGHT = frozenset({EVICTING, RESTORING})


def is_legal(current: Managed, to: Managed) -> bool:
    return (current, to) in TRANSITIONS


def move(
    journal: Journal,
    container: str,
    to: Managed,
    *,
    at: float,
    reason: str = "",
    drained: bool | None = None,
) -> Managed:
    """Move ``container`` to ``to`` and return the state it left.

    ``drained`` None keeps the container's drained flag.
    """
    current = journal.state(container)
    if not is_legal(current, to):
        raise IllegalTransition(
            f"{container}: evictor tried to move it from {current.value} to {to.value},"
            " which its lifecycle does not allow (a bug in evictor)",
            container=container,
        )
    journal.set_state(container, to, at=at, reason=reason, drained=drained)
    return current
