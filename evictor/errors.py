"""The one error tree every evictor failure belongs to.

Each error carries the container it is about (when there is one) and, for
checkpoint and restore failures, the phase that failed and the lines of CRIU's
log that say why. Its message is one line.
"""

from __future__ import annotations

import enum


class EvictorError(Exception):
    """Base of every error evictor reports; its message is one line."""

    def __init__(self, message: str, *, container: str | None = None) -> None:
        super().__init__(message)
        self.container = container


class UsageError(EvictorError):
    """Bad input from the operator (a name, an argument): nothing was changed."""


class ConfigError(UsageError):
    """The configuration is invalid: ``key: reason``, the key dotted from the top."""

    def __init__(self, key: str | None, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason

    def within(self, table: str) -> ConfigError:
        """The same error, its key read from the enclosing ``table``."""
        if not table:
            return self
        return ConfigError(f"{table}.{self.key}" if self.key else table, self.reason)


class ContainerNotFound(EvictorError):
    """No container of that name is defined in the LXC path."""


class InvalidState(EvictorError):
    """The container is not in the state the operation needs."""


class LockBusy(EvictorError):
    """Another evictor process is working on the same container (or state directory)."""


class PreflightError(EvictorError):
    """A check of the host before acting failed (CRIU unusable, not enough disk, a
    state directory or config file others may write to)."""


class ImageError(EvictorError):
    """An image is missing, incomplete or fails verification; it is left as it is."""


class NoImage(ImageError):
    """There is no committed image for the container."""


class CorruptImage(ImageError):
    """The image or its manifest does not match what was committed."""


class ManifestError(CorruptImage):
    """A manifest cannot be parsed or does not match its own checksum."""


class CriuOutputError(EvictorError):
    """A file CRIU wrote (its stats) cannot be decoded."""


class ContainerCommandFailed(EvictorError):
    """An LXC command on a container (start, stop, destroy, thaw) failed."""


class IllegalTransition(EvictorError):
    """A container was moved between states that the lifecycle does not join: a bug."""


class Phase(enum.Enum):
    """The step of an eviction or a restore that failed."""

    DUMP = "dump"
    SEAL = "seal"
    COMMIT = "commit"
    NETWORK = "network"  # the restore: its address is taken
    RESTORE = "restore"
    WAIT = "wait"


class RuntimeFailure(EvictorError):
    """A checkpoint or restore step failed.

    ``log_lines`` are the relevant lines of CRIU's log; ``persistent`` says the
    cause lies in the container (CRIU cannot dump one of its ttys or fds), so
    every attempt will fail until the container changes.
    """

    def __init__(
        self,
        message: str,
        *,
        container: str,
        phase: Phase,
        log_lines: tuple[str, ...] = (),
        persistent: bool = False,
    ) -> None:
        super().__init__(message, container=container)
        self.phase = phase
        self.log_lines = log_lines
        self.persistent = persistent


class CheckpointFailed(RuntimeFailure):
    """Evicting a container failed; it was left RUNNING unless the message says otherwise."""


class RestoreFailed(RuntimeFailure):
    """Restoring a container failed; its image was kept."""
