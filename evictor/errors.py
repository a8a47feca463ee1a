"""The small error tree every evictor failure belongs to.

Each error carries the container it is about (when there is one) and, for
checkpoint and restore failures, the phase that failed and the lines of CRIU's
log that say why.
"""

from __future__ import annotations


class EvictorError(Exception):
    """Base of every error evictor reports; its message is one line."""

    def __init__(self, message: str, *, container: str | None = None) -> None:
        super().__init__(message)
        self.container = container


class UsageError(EvictorError):
    """Bad input from the operator (a name, an argument): nothing was changed."""


class ContainerNotFound(EvictorError):
    """No container of that name is defined in the LXC path."""


class InvalidState(EvictorError):
    """The container is not in the state the operation needs."""


class LockBusy(EvictorError):
    """Another evictor process is working on the same container."""


class PreflightError(EvictorError):
    """A check before the dump failed (CRIU unusable, not enough disk)."""


class ImageError(EvictorError):
    """An image is missing, incomplete or fails verification; it is left as it is."""


class NoImage(ImageError):
    """There is no committed image for the container."""


class CorruptImage(ImageError):
    """The image or its manifest does not match what was committed."""


class RuntimeFailure(EvictorError):
    """A checkpoint or restore step failed.

    ``phase`` names the step (``dump``, ``seal``, ``commit``, ``restore``,
    ``wait``); ``log_lines`` are the relevant lines of CRIU's log;
    ``persistent`` says the cause lies in the container (CRIU cannot dump one
    of its ttys or fds), so every attempt will fail until the container changes.
    """

    def __init__(
        self,
        message: str,
        *,
        container: str,
        phase: str,
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
