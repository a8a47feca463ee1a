"""Hold a restored container at CRIU's post-restore point until evictor says go.

Verifying a 1 GiB image before CRIU reads it costs a full read from disk
before the restore even starts. Instead, evictor checks everything but the
memory contents first, then hashes the memory contents while CRIU restores
from them. A CRIU action script, passed through ``CRIU_CONFIG_FILE`` (which
``lxc-checkpoint``'s criu honours, PLATFORM.md), blocks at ``post-restore``:
the restored processes' memory is loaded but none of their code has run. It
succeeds only if evictor writes the verdict ``verified``; anything else (a bad
checksum, evictor gone, the timeout) fails it, and CRIU then kills the restored
tree and the container stays STOPPED with its image intact.

The script and config are fixed text; the verdict channel (a FIFO) is named to
the script through the environment, never built into a shell string.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import TracebackType

GATE_SCRIPT = """#!/bin/sh
# Written by evictor: hold the restored container at post-restore until
# evictor has verified its memory contents (evictor/restore_gate.py).
[ "$CRTOOLS_SCRIPT_ACTION" = post-restore ] || exit 0
verdict=$(timeout "$EVICTOR_GATE_TIMEOUT_SECONDS" head -n 1 "$EVICTOR_GATE_FIFO")
[ "$verdict" = verified ]
"""

VERIFIED = "verified"
REJECTED = "rejected"


class RestoreGate:
    """The gate for one restore, in ``directory`` (created root-only, removed on exit).

    The FIFO is held open read-write by evictor, so the script never blocks on
    opening it while evictor lives, and reads end-of-file if evictor dies
    before giving its verdict.
    """

    def __init__(self, directory: Path, timeout_seconds: float) -> None:
        self.directory = directory
        self.timeout_seconds = timeout_seconds
        self._fifo_fd: int | None = None

    def __enter__(self) -> RestoreGate:
        shutil.rmtree(self.directory, ignore_errors=True)  # left by a killed evictor
        self.directory.mkdir(mode=0o700)
        script = self.directory / "post-restore.sh"
        script.write_text(GATE_SCRIPT)
        script.chmod(0o700)
        config = self.directory / "criu.conf"
        config.write_text(f"action-script {script}\n")
        config.chmod(0o600)
        os.mkfifo(self.directory / "verdict", 0o600)
        self._fifo_fd = os.open(self.directory / "verdict", os.O_RDWR | os.O_CLOEXEC)
        return self

    @property
    def environment(self) -> dict[str, str]:
        """Variables to add to the restoring tool's environment."""
        return {
            "CRIU_CONFIG_FILE": str(self.directory / "criu.conf"),
            "EVICTOR_GATE_FIFO": str(self.directory / "verdict"),
            "EVICTOR_GATE_TIMEOUT_SECONDS": f"{self.timeout_seconds:g}",
        }

    def give_verdict(self, verified: bool) -> None:
        """Let the restored processes run, or make CRIU abort the restore."""
        assert self._fifo_fd is not None, "the gate is used outside its with block"
        os.write(self._fifo_fd, f"{VERIFIED if verified else REJECTED}\n".encode())

    def was_consulted(self) -> bool:
        """Whether the script read the verdict: call once CRIU has finished."""
        assert self._fifo_fd is not None, "the gate is used outside its with block"
        os.set_blocking(self._fifo_fd, False)
        try:
            return not os.read(self._fifo_fd, 64)
        except BlockingIOError:
            return True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._fifo_fd is not None:
            os.close(self._fifo_fd)
            self._fifo_fd = None
        shutil.rmtree(self.directory, ignore_errors=True)
