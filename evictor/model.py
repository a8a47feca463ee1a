"""Value objects shared by the adapters and the decision core. No I/O here."""

from __future__ import annotations

import enum
import re

from evictor.errors import UsageError

# LXC accepts almost any name, but a name becomes a directory of the image
# store and an argument of lxc-checkpoint: allow only what cannot escape either.
_CONTAINER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ContainerState(enum.Enum):
    """A container's state as LXC reports it."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    ABORTING = "ABORTING"
    FREEZING = "FREEZING"
    FROZEN = "FROZEN"
    THAWED = "THAWED"


def validate_container_name(name: str) -> str:
    """Return ``name`` if it is a safe container name, else raise UsageError."""
    if not _CONTAINER_NAME.fullmatch(name):
        raise UsageError(
            f"invalid container name {name!r}: use 1-64 letters, digits, '_', '.' or '-',"
            " starting with a letter or digit",
            container=None,
        )
    return name
