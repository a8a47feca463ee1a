"""Restore one evicted container, running state intact; or discard its image.

The image is verified against its manifest before any restored process runs:
everything but the memory contents before CRIU starts, the memory contents
while CRIU reads them, with CRIU held at post-restore until they check out
(restore_gate.py). The image is set aside (renamed) only once the container is
RUNNING again, and deleted in the background; on any failure it stays as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from evictor import criu, lifecycle
from evictor.errors import CorruptImage, InvalidState, Phase, RestoreFailed
from evictor.images import ImageStore
from evictor.journal import Event, EventKind, Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.manifest import Manifest
from evictor.model import ContainerState, Managed, validate_container_name
from evictor.reconcile import settle
from evictor.restore_gate import RestoreGate

log = logging.getLogger(__name__)

RUNNING_TIMEOUT_SECONDS = 30.0
# Names the container in the restoring tool's environment: the pre-start guard
# (hooks/evictor-guard) lets that start through, and no other.
RESTORING_VARIABLE = "EVICTOR_RESTORING"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Restoration:
    manifest: Manifest
    duration_seconds: float  # verification, restore and the wait for RUNNING
    cleanup_seconds: float  # setting the image aside afterwards, for its removal
    evicted_seconds: float  # how long the container was evicted


def restore(runtime: LxcRuntime, store: ImageStore, journal: Journal, name: str) -> Restoration:
    """Verify ``name``'s image, restore it, wait until RUNNING, then remove the image.

    A corrupt image or a failed restore is recorded in the journal (the planner
    then backs off before trying again); the image is kept either way.
    """
    validate_container_name(name)
    started = time.monotonic()
    with store.lock(name):
        settle(runtime, store, journal, name)
        manifest = store.load(name)
        state = runtime.state(name)
        if state is not ContainerState.STOPPED:
            raise InvalidState(
                f"{name}: is {state.value}; it was started outside evictor after its eviction,"
                " so its image is stale and was not restored",
                container=name,
            )
        lifecycle.move(journal, name, Managed.RESTORING, at=time.time())
        try:
            _refuse_a_taken_address(runtime, manifest)
            _clear_what_killed_restores_left(runtime, store, name)
            store.verify_metadata(manifest)
            _restore_verifying_memory(runtime, store, manifest)
            if not runtime.wait_for_state(name, ContainerState.RUNNING, RUNNING_TIMEOUT_SECONDS):
                raise RestoreFailed(
                    f"{name}: not RUNNING {RUNNING_TIMEOUT_SECONDS:g} s after CRIU restored it"
                    f" (now {runtime.state(name).value}); image kept",
                    container=name,
                    phase=Phase.WAIT,
                )
        except (RestoreFailed, CorruptImage) as error:
            runtime.kill_restore_leftovers(store.path(name))
            detail = str(error).removeprefix(f"{name}: ")
            failed_at = time.time()
            journal.record(
                Event(container=name, at=failed_at, kind=EventKind.RESTORE_FAILED, detail=detail)
            )
            lifecycle.move(journal, name, Managed.FAILED, at=failed_at, reason=detail)
            raise
        running_after = time.monotonic() - started
        cleanup_started = time.monotonic()
        store.set_aside(name)  # removed in the background: store.remove_set_aside
        lifecycle.move(
            journal, name, Managed.RUNNING, at=time.time(), reason="restored", drained=False
        )
    restoration = Restoration(
        manifest=manifest,
        duration_seconds=running_after,
        cleanup_seconds=time.monotonic() - cleanup_started,
        evicted_seconds=max(0.0, time.time() - manifest.evicted_at),
    )
    journal.record(
        Event(
            container=name,
            at=time.time(),
            kind=EventKind.RESTORED,
            size_bytes=manifest.image_bytes,
            duration_seconds=restoration.duration_seconds,
        )
    )
    log.info(
        "restored %s: image %d bytes, %.2f s, evicted for %.0f s",
        name,
        manifest.image_bytes,
        restoration.duration_seconds,
        restoration.evicted_seconds,
    )
    return restoration


def _clear_what_killed_restores_left(runtime: LxcRuntime, store: ImageStore, name: str) -> None:
    """A criu killed while restoring this image leaves its cgroup yard in the image,
    and may leave the tasks it had restored frozen (found by their fd into the image:
    a restored container's own tasks hold none). Only an image a restore was tried
    on (its restore.log is there) is searched for them: the search reads /proc."""
    store.clear_criu_leftovers(name)
    if (store.path(name) / criu.RESTORE_LOG).exists():
        runtime.kill_restore_leftovers(store.path(name))


def _refuse_a_taken_address(runtime: LxcRuntime, manifest: Manifest) -> None:
    """Never two containers with one address: one that took an evicted container's
    address meanwhile (a DHCP lease given again, a static one reused) stops its restore."""
    name = manifest.container
    holders = runtime.address_holders(manifest.ipv4_addresses, besides=name)
    if holders:
        taken = ", ".join(f"{address} is held by {other}" for address, other in holders.items())
        raise RestoreFailed(
            f"{name}: its address is taken ({taken}): restoring it would give two containers"
            " one address; image kept",
            container=name,
            phase=Phase.NETWORK,
        )


def _restore_verifying_memory(runtime: LxcRuntime, store: ImageStore, manifest: Manifest) -> None:
    """Restore while the memory contents are hashed; CRIU waits for the verdict."""
    name = manifest.container
    problem: list[CorruptImage] = []

    def verify_memory(gate: RestoreGate) -> None:
        try:
            store.verify_memory(manifest)
        except CorruptImage as error:
            problem.append(error)
        finally:
            gate.give_verdict(verified=not problem)

    with RestoreGate(store.gate_path(name), runtime.command_timeout_seconds) as gate:
        verifier = threading.Thread(target=verify_memory, args=(gate,), name=f"verify {name}")
        verifier.start()
        try:
            try:
                runtime.restore(
                    name,
                    store.path(name),
                    criu_options=gate.criu_options,
                    environment={**gate.environment, RESTORING_VARIABLE: name},
                )
            finally:
                verifier.join()  # never leave it writing into a removed gate
        except RestoreFailed as failure:
            if problem:
                raise problem[0] from None
            if (
                gate.was_consulted()
                and not criu.gave_up_restore(store.path(name))
                and runtime.wait_for_state(name, ContainerState.RUNNING, RUNNING_TIMEOUT_SECONDS)
                and not runtime.restore_leftovers(store.path(name))
            ):
                # lxc-checkpoint failed (killed?) but its criu went on, past the gate
                # and its verdict, and set the tasks running: they no longer hold its
                # log. (LXC may call the container RUNNING a moment after criu is done;
                # and while a frozen init lives, when criu was killed before it
                # resumed the tasks: chaos runs caught both.)
                log.warning("%s; yet CRIU completed the verified restore", failure)
                return
            raise
        if not gate.was_consulted():
            # CRIU ran without the gate (a system-wide CRIU config refusing
            # action scripts?): the processes ran before the verdict.
            log.warning("%s: CRIU restored without waiting for evictor's verification", name)
            if problem:
                runtime.stop(name)
                raise problem[0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Discarded:
    manifest: Manifest
    evicted_seconds: float  # how long the container was evicted


def discard(runtime: LxcRuntime, store: ImageStore, journal: Journal, name: str) -> Discarded:
    """Remove ``name``'s committed image on purpose: its saved running state is gone,
    and it is STOPPED, to be started cold (LXD's stateless start). Refused, changing
    nothing, for a container that is not STOPPED or has no committed image."""
    validate_container_name(name)
    with store.lock(name):  # not while it is being evicted or restored
        settle(runtime, store, journal, name)
        state = runtime.state(name)
        if state is not ContainerState.STOPPED:
            raise InvalidState(
                f"{name}: is {state.value}; only a stopped container's image can be discarded",
                container=name,
            )
        manifest = store.load(name)
        _clear_what_killed_restores_left(runtime, store, name)
        now = time.time()
        store.discard(name)
        lifecycle.move(
            journal, name, Managed.RUNNING, at=now, reason="image discarded", drained=False
        )
        journal.record(
            Event(
                container=name,
                at=now,
                kind=EventKind.DISCARDED,
                size_bytes=manifest.image_bytes,
            )
        )
    log.info("discarded the image of %s (%d bytes): it starts cold", name, manifest.image_bytes)
    return Discarded(manifest=manifest, evicted_seconds=max(0.0, now - manifest.evicted_at))
