"""Hold a restored container at CRIU's post-restore point until evictor says go.

Verifying a 1 GiB image before CRIU reads it costs a full read from disk
before the restore even starts. Instead, evictor checks everything but the
memory contents first, then hashes the memory contents while CRIU restores
from them. A CRIU action script (an option the LXC adapter merges into the
``CRIU_CONFIG_FILE`` that ``lxc-checkpoint``'s criu honours, PLATFORM.md) waits at ``post-restore``:
the restored processes' memory is loaded but none of their code has run. (A
failing ``pre-resume`` script is only logged; a failing ``post-restore`` one
makes CRIU kill the restored tree.) The script succeeds only once evictor has
written the verdict ``verified``; a rejection, evictor's death, or the timeout
fails it, and the container stays STOPPED with its image intact.

The script polls for the verdict file every 10 ms and checks that evictor is
still alive: a FIFO would block forever for a writer that was killed before
it opened it. It lets the tasks go only while LXC's side of the restore lives
(the lxc-checkpoint that started criu, the container's monitor to be): killed,
it would leave them running with no monitor, a copy LXC calls STOPPED, beside
the next restore. The script is fixed text; the paths and evictor's
pid reach the script through the environment, never in a shell string.
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
: > "$EVICTOR_GATE_DIR/consulted" || exit 1
polls=0
until [ -s "$EVICTOR_GATE_DIR/verdict" ]; do
    kill -0 "$EVICTOR_GATE_PID" 2>/dev/null || exit 1
    [ -d "$EVICTOR_GATE_DIR" ] && [ "$polls" -lt "$EVICTOR_GATE_POLLS" ] || exit 1
    sleep 0.01
    polls=$((polls + 1))
done
read -r verdict < "$EVICTOR_GATE_DIR/verdict" && [ "$verdict" = verified ] || exit 1
# The driver (LXC's side of the restore) must be an ancestor still: killed, it
# leaves criu to a reaper. Builtins only: this is on the path to RUNNING.
pid=$PPID
while [ "${pid:-0}" -gt 1 ]; do
    read -r name < "/proc/$pid/comm" || exit 1
    [ "$name" = "$EVICTOR_GATE_DRIVER" ] && exit 0
    parent=
    while read -r key value; do
        [ "$key" = PPid: ] && parent=$value && break
    done < "/proc/$pid/status"
    pid=$parent
done
exit 1
"""

VERIFIED = "verified"
REJECTED = "rejected"
POLL_SECONDS = 0.01


class RestoreGate:
    """The gate for one restore, in ``directory`` (created root-only, removed on exit).

    ``owner_pid`` is the process whose death fails the gate: evictor itself.
    ``driver`` is the name (comm) of the process that started criu and must still
    be its ancestor when the gate opens.
    """

    def __init__(
        self,
        directory: Path,
        timeout_seconds: float,
        owner_pid: int | None = None,
        driver: str = "lxc-checkpoint",
    ) -> None:
        self.directory = directory
        self.timeout_seconds = timeout_seconds
        self.owner_pid = os.getpid() if owner_pid is None else owner_pid
        self.driver = driver

    def __enter__(self) -> RestoreGate:
        shutil.rmtree(self.directory, ignore_errors=True)  # left by a killed evictor
        self.directory.mkdir(mode=0o700)
        script = self.directory / "post-restore.sh"
        script.write_text(GATE_SCRIPT)
        script.chmod(0o700)
        return self

    @property
    def criu_options(self) -> tuple[str, ...]:
        """CRIU options (config-file lines) that install the gate."""
        return (f"action-script {self.directory / 'post-restore.sh'}",)

    @property
    def environment(self) -> dict[str, str]:
        """Variables to add to the restoring tool's environment."""
        return {
            "EVICTOR_GATE_DIR": str(self.directory),
            "EVICTOR_GATE_PID": str(self.owner_pid),
            "EVICTOR_GATE_DRIVER": self.driver,
            "EVICTOR_GATE_POLLS": str(max(1, round(self.timeout_seconds / POLL_SECONDS))),
        }

    def give_verdict(self, verified: bool) -> None:
        """Let the restored processes run, or make CRIU abort the restore."""
        temporary = self.directory / "verdict.tmp"
        temporary.write_text(f"{VERIFIED if verified else REJECTED}\n")
        os.replace(temporary, self.directory / "verdict")  # the script never sees half of it

    def was_consulted(self) -> bool:
        """Whether CRIU ran the script at post-restore: call once CRIU has finished."""
        return (self.directory / "consulted").exists()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
