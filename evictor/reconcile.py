"""Bring the journal back in line with reality: at the daemon's start, and
before every operation on a container.

A process killed mid-operation leaves a container EVICTING or RESTORING in the
journal; an operator may start an evicted container by hand, or remove its
image. Whatever happened, each container ends RUNNING, or EVICTED with a
complete committed image, or FAILED with its image kept for the operator:

- EVICTING, container RUNNING (the dump failed or never began): the partial
  image is removed. But if the dump was written and some of its processes are
  gone (CRIU killed as it stopped them, one by one, after a complete dump), the
  rest are stopped and all restored from that dump.
- EVICTING or RESTORING, container FROZEN, or RUNNING with a cgroup frozen
  (CRIU killed while it held the freezer; LXC sees only its own freezes):
  thawed, then as RUNNING.
- EVICTING, container STOPPED with a complete dump (CRIU writes ``stats-dump``
  and ``inventory.img`` only when it succeeds): the image is sealed and
  committed, as the eviction would have done.
- RESTORING, container RUNNING: the restore finished; the image is removed.
- RESTORING, container STOPPED: still EVICTED; the planner will try again.
  Tasks a killed criu had restored but never set running (which LXC may call a
  RUNNING container) are killed first: the container is then STOPPED.
- EVICTED or FAILED, container RUNNING without a committed image: it was
  started outside evictor and its image is gone: RUNNING.
- RUNNING, container STOPPED with a committed image the journal has no record
  of (a lost journal): EVICTED.

lxc-checkpoint and criu run in their own session, so they outlive a killed
evictor: settling first waits for any still working on the image.
"""

from __future__ import annotations

import logging
import time

from evictor import criu, lifecycle
from evictor.errors import (
    ContainerNotFound,
    CriuOutputError,
    EvictorError,
    ImageError,
    LockBusy,
)
from evictor.images import ImageState, ImageStore
from evictor.journal import Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerState, Managed
from evictor.units import PAGE_SIZE_BYTES

log = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 10.0  # for LXC to see a killed container stopped


def dump_is_complete(store: ImageStore, name: str) -> bool:
    try:
        criu.read_dump_stats(store.path(name))
    except (OSError, CriuOutputError):
        return False
    return dump_is_written(store, name)


def dump_is_written(store: ImageStore, name: str) -> bool:
    """Whether CRIU has written the whole dump and not failed it. It writes
    ``inventory.img`` last, then flushes the images (a failure there, or of a
    post-dump script, lets the tasks run on), stops the tasks, and only then
    writes ``stats-dump``."""
    directory = store.path(name)
    return (directory / "inventory.img").is_file() and not criu.gave_up_dump(directory)


def restore_uncommitted(
    runtime: LxcRuntime, store: ImageStore, journal: Journal, name: str, *, what: str
) -> None:
    """Restore ``name``, stopped after ``what``, from the dump CRIU wrote and evictor
    never committed. That image is the container's only state: if the restore
    fails, it is set aside where no later dump removes it, the container is marked
    FAILED, and the error raised."""
    try:
        idmap = runtime.container_config(name).idmap
        if idmap is not None:  # its root restores it: let it read the image, as sealed
            store.share_with(name, idmap)
        runtime.restore(name, store.path(name))
    except EvictorError:
        kept = store.quarantine(name)
        lifecycle.move(
            journal,
            name,
            Managed.FAILED,
            at=time.time(),
            reason=f"{what} could not be undone; image kept at {kept}",
        )
        log.error("%s: could not restore after %s; its image is kept at %s", name, what, kept)
        raise


def _dumped_processes_ended(runtime: LxcRuntime, store: ImageStore, name: str) -> bool:
    """Whether processes of the dump written into ``name``'s image are gone from the
    running container: a CRIU killed as it stopped the tasks after a complete dump
    left some dead, the rest frozen."""
    if not dump_is_written(store, name):
        return False
    try:
        dumped = criu.read_dumped_pids(store.path(name))
    except (OSError, CriuOutputError):
        return False
    return bool(dumped - runtime.namespace_pids(name))


def reconcile(runtime: LxcRuntime, store: ImageStore, journal: Journal) -> list[str]:
    """Settle every container the journal knows; log and return one line per container
    settled. One that another evictor process holds is left to it."""
    settled = []
    for name in sorted(journal.managed()):
        try:
            with store.lock(name):
                outcome = settle(runtime, store, journal, name)
        except LockBusy:
            continue
        if outcome is not None:
            settled.append(outcome)
    return settled


def settle(runtime: LxcRuntime, store: ImageStore, journal: Journal, name: str) -> str | None:
    """Bring ``name``'s record in line with reality (its lock held); log and return
    what changed, or None if nothing needed to."""
    recorded = journal.state(name)
    outcome: str | None
    try:
        if recorded in lifecycle.IN_FLIGHT:
            runtime.wait_for_tools(  # a dump may complete on its own
                store.path(name),
                seconds=runtime.command_timeout_seconds,
                orphan_grace_seconds=0.0,
                kill_at_end=True,
            )
            outcome = _settle_in_flight(runtime, store, journal, name, recorded)
        else:
            outcome = _settle_at_rest(runtime, store, journal, name, recorded)
    except ContainerNotFound:
        if recorded not in lifecycle.IN_FLIGHT:
            return None  # an operation on it will say so
        lifecycle.move(
            journal,
            name,
            Managed.FAILED,
            at=time.time(),
            reason="container was deleted while evictor worked on it",
        )
        outcome = "deleted meanwhile; image (if any) kept"
    if outcome is None:
        return None
    line = f"{name}: was {recorded.value}; {outcome}"
    log.warning("reconciled %s", line)
    return line


def _settle_at_rest(
    runtime: LxcRuntime, store: ImageStore, journal: Journal, name: str, recorded: Managed
) -> str | None:
    state = runtime.state(name)
    committed = store.image_state(name) is ImageState.COMMITTED
    now = time.time()
    at_rest = recorded in (Managed.EVICTED, Managed.FAILED)
    if at_rest and state is ContainerState.RUNNING and not committed:
        lifecycle.move(journal, name, Managed.RUNNING, at=now, reason="started outside evictor")
        return "started outside evictor, and its image is gone: RUNNING"
    if recorded is Managed.RUNNING and state is ContainerState.STOPPED and committed:
        try:
            store.load(name)
        except ImageError:
            return None  # not a manifest evictor wrote: a restore will refuse it
        lifecycle.move(journal, name, Managed.EVICTED, at=now, reason="committed image found")
        return "stopped with a committed image the journal had no record of: EVICTED"
    return None


def _settle_in_flight(
    runtime: LxcRuntime, store: ImageStore, journal: Journal, name: str, was: Managed
) -> str:
    state = runtime.state(name)
    now = time.time()
    reason = journal.managed()[name].reason
    if state is ContainerState.FROZEN:
        runtime.thaw(name)
        state = runtime.state(name)
    image = store.image_state(name)
    if was is Managed.RESTORING and runtime.kill_restore_leftovers(store.path(name)):
        # Its tasks were restored but never set running (criu killed): LXC may call
        # it RUNNING while that frozen init lives. Now it is STOPPED, image kept.
        runtime.wait_for_state(name, ContainerState.STOPPED, STOP_TIMEOUT_SECONDS)
        state = runtime.state(name)
    if (
        was is Managed.EVICTING
        and state is ContainerState.RUNNING
        and _dumped_processes_ended(runtime, store, name)
    ):
        runtime.thaw_cgroups(name)  # frozen tasks would not die
        runtime.stop(name)
        try:
            restore_uncommitted(runtime, store, journal, name, what="an interrupted eviction")
        except EvictorError as error:
            return f"its dump was complete, its tasks being stopped; {error}: FAILED, image kept"
        store.discard_partial(name)
        why = "eviction interrupted as its tasks were stopped; restored from its dump"
        lifecycle.move(journal, name, Managed.RUNNING, at=now, reason=why)
        return "its dump was complete, its tasks being stopped: restored from it, RUNNING"
    if state is ContainerState.RUNNING:
        runtime.thaw_cgroups(name)  # a freezer a killed CRIU held, which LXC does not see
        runtime.unlock_network(name)  # and the network lock it left
        if was is Managed.RESTORING:
            if image is ImageState.COMMITTED:
                store.discard(name)
            lifecycle.move(journal, name, Managed.RUNNING, at=now, reason="restored", drained=False)
            return "its restore had finished: RUNNING, image removed"
        store.discard_partial(name)
        lifecycle.move(journal, name, Managed.RUNNING, at=now, reason="eviction interrupted")
        return "RUNNING, partial image removed"
    if image is ImageState.COMMITTED:
        lifecycle.move(journal, name, Managed.EVICTED, at=now, reason=reason)
        return "EVICTED with its committed image"
    if image is ImageState.PARTIAL and dump_is_complete(store, name):
        directory = store.path(name)
        stats = criu.read_dump_stats(directory)
        files = store.seal(name)
        config = runtime.container_config(name)
        if config.idmap is not None:
            store.share_with(name, config.idmap)
        store.commit_dump(
            name,
            files=files,
            lxc_path=runtime.lxc_path,
            reason=f"{reason} (committed after an interruption)",
            # The usage before the dump was not recorded: the pages CRIU wrote are
            # the best measure of what the container will need again.
            memory_usage_bytes=stats.pages_written * PAGE_SIZE_BYTES,
            dump_duration_seconds=0.0,
            dump_stats=stats,
            evicted_at=directory.stat().st_mtime,
            # Its addresses then were not recorded: its static ones are the best guess.
            ipv4_addresses=tuple(
                address.split("/")[0] for nic in config.nics for address in nic.ipv4_addresses
            ),
        )
        lifecycle.move(journal, name, Managed.EVICTED, at=now, reason=reason)
        return "its dump had completed: image sealed and committed, EVICTED"
    lifecycle.move(
        journal,
        name,
        Managed.FAILED,
        at=now,
        reason=f"{state.value} without a complete image after an interruption",
    )
    return f"{state.value} without a complete image: marked FAILED for the operator"
