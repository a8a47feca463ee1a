"""Bring the journal back in line with reality when the daemon starts.

A daemon killed mid-operation leaves a container EVICTING or RESTORING in the
journal. Whatever the moment, each ends RUNNING, or EVICTED with a complete
committed image, or FAILED with its image kept for the operator:

- EVICTING, container RUNNING (the dump failed or never began): the partial
  image is removed.
- EVICTING, container FROZEN (CRIU killed while it held the freezer): thawed,
  then as RUNNING.
- EVICTING, container STOPPED with a complete dump (CRIU writes ``stats-dump``
  and ``inventory.img`` only when it succeeds): the image is sealed and
  committed, as the eviction would have done.
- RESTORING, container RUNNING: the restore finished; the image is removed.
- RESTORING, container STOPPED: still EVICTED; the planner will try again.

lxc-checkpoint and criu run in their own session, so they outlive a killed
daemon: reconciliation first waits for any still working on an image.
"""

from __future__ import annotations

import logging
import mmap
import time

from evictor import criu
from evictor.errors import ContainerNotFound
from evictor.images import ImageState, ImageStore
from evictor.journal import Journal, Managed
from evictor.lxc_runtime import LxcRuntime
from evictor.manifest import Manifest
from evictor.model import ContainerState

log = logging.getLogger(__name__)

TOOLS_TIMEOUT_SECONDS = 900.0


def _wait_for_tools(runtime: LxcRuntime, store: ImageStore, name: str) -> None:
    deadline = time.monotonic() + TOOLS_TIMEOUT_SECONDS
    while pids := runtime.tools_using(store.path(name)):
        if time.monotonic() > deadline:
            log.error(
                "%s: lxc-checkpoint/criu (pids %s) still running after %.0f s",
                name,
                pids,
                TOOLS_TIMEOUT_SECONDS,
            )
            return
        log.info("%s: waiting for an interrupted checkpoint or restore (pids %s)", name, pids)
        time.sleep(0.5)


def dump_is_complete(store: ImageStore, name: str) -> bool:
    directory = store.path(name)
    try:
        criu.parse_dump_stats((directory / "stats-dump").read_bytes())
    except (OSError, criu.StatsFormatError):
        return False
    return (directory / "inventory.img").is_file()


def reconcile(runtime: LxcRuntime, store: ImageStore, journal: Journal) -> list[str]:
    """Settle every in-flight container; log and return one line per container settled."""
    settled = []
    for name, managed in sorted(journal.managed().items()):
        if managed.state not in (Managed.EVICTING, Managed.RESTORING):
            continue
        _wait_for_tools(runtime, store, name)
        with store.lock(name):
            try:
                outcome = _settle(runtime, store, journal, name, managed.state, managed.reason)
            except ContainerNotFound:
                journal.set_state(
                    name,
                    Managed.FAILED,
                    at=time.time(),
                    reason="container was deleted while evictor worked on it",
                )
                outcome = "deleted meanwhile; image (if any) kept"
        message = f"{name}: was {managed.state.value} when evictor stopped; {outcome}"
        log.warning("reconciled %s", message)
        settled.append(message)
    return settled


def _settle(
    runtime: LxcRuntime, store: ImageStore, journal: Journal, name: str, was: Managed, reason: str
) -> str:
    state = runtime.state(name)
    now = time.time()
    if state is ContainerState.FROZEN:
        runtime.thaw(name)
        state = runtime.state(name)
    image = store.image_state(name)
    if state is ContainerState.RUNNING:
        if was is Managed.RESTORING and image is ImageState.COMMITTED:
            store.discard(name)
            journal.set_state(name, Managed.RUNNING, at=now, reason="restored", drained=False)
            return "its restore had finished: RUNNING, image removed"
        store.discard_partial(name)
        journal.set_state(name, Managed.RUNNING, at=now, reason="eviction interrupted")
        return "RUNNING, partial image removed"
    if image is ImageState.COMMITTED:
        journal.set_state(name, Managed.EVICTED, at=now, reason=reason)
        return "EVICTED with its committed image"
    if image is ImageState.PARTIAL and dump_is_complete(store, name):
        _commit_interrupted(runtime, store, name, reason)
        journal.set_state(name, Managed.EVICTED, at=now, reason=reason)
        return "its dump had completed: image sealed and committed, EVICTED"
    journal.set_state(
        name,
        Managed.FAILED,
        at=now,
        reason=f"{state.value} without a complete image after an interruption",
    )
    return f"{state.value} without a complete image: marked FAILED for the operator"


def _commit_interrupted(runtime: LxcRuntime, store: ImageStore, name: str, reason: str) -> None:
    """Seal and commit a dump whose eviction was interrupted after CRIU finished."""
    directory = store.path(name)
    files = store.seal(name)
    stats = criu.parse_dump_stats((directory / "stats-dump").read_bytes())
    store.commit(
        Manifest(
            container=name,
            lxc_path=str(runtime.lxc_path),
            reason=f"{reason} (committed after an interruption)",
            evicted_at=directory.stat().st_mtime,
            # The usage before the dump was not recorded: the pages CRIU wrote are
            # the best measure of what the container will need again.
            memory_usage_bytes=stats.pages_written * mmap.PAGESIZE,
            dump_duration_seconds=0.0,
            files=files,
            dump_stats=stats,
        )
    )
