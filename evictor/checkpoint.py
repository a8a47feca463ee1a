"""Evict one container: a stateful stop that really frees its memory.

Steps, each of which either completes or leaves the container RUNNING:
settle (an interrupted or outdated record) -> preflight -> dump (lxc-checkpoint
-s) -> seal (fsync, checksum, drop from the page cache) -> commit (the
manifest). A container is STOPPED only once its image is complete; if anything
fails after CRIU stopped it, it is restored from that image at once.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import stat
import time
from pathlib import Path

from evictor import criu, lifecycle
from evictor.errors import (
    CheckpointFailed,
    CriuOutputError,
    EvictorError,
    InvalidState,
    Phase,
    PreflightError,
)
from evictor.images import ImageState, ImageStore
from evictor.journal import Event, EventKind, Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.manifest import Manifest
from evictor.model import ContainerConfig, ContainerState, Managed, validate_container_name
from evictor.reconcile import dump_is_written, restore_uncommitted, settle

log = logging.getLogger(__name__)

# Room the store must have beyond the container's memory usage: CRIU's metadata
# and the tmpfs mounts it archives are small, a usage figure can grow meanwhile.
FREE_SPACE_MARGIN_BYTES = 64 << 20
FREE_SPACE_MARGIN_RATIO = 0.05

# After a failed dump, how long the container's threads have to be seen running again,
# and then how long those let go run before the processes that ended are counted.
RELEASE_TIMEOUT_SECONDS = 5.0
RELEASE_SETTLE_SECONDS = 0.5


# A trial dump that fails for a cause that may pass is tried this often, this far apart.
TRIAL_ATTEMPTS = 3
TRIAL_PAUSE_SECONDS = 1.0
# An eviction whose dump met a message the container had not read yet (it came as
# the tasks were frozen) is tried again once, after the container has run a moment.
EVICT_ATTEMPTS = 2
EVICT_RETRY_PAUSE_SECONDS = 0.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class Eviction:
    manifest: Manifest
    duration_seconds: float  # the whole eviction, preflight to commit


def required_free_bytes(usage_bytes: int) -> int:
    return usage_bytes + max(FREE_SPACE_MARGIN_BYTES, int(usage_bytes * FREE_SPACE_MARGIN_RATIO))


def preflight(
    runtime: LxcRuntime, store: ImageStore, name: str
) -> tuple[ContainerConfig, tuple[str, ...]]:
    """Check that ``name`` can be evicted now; return its config and the CRIU options
    to dump it with (criu.check_criu)."""
    state = runtime.state(name)
    if state is not ContainerState.RUNNING:
        raise InvalidState(
            f"{name}: is {state.value}, only a RUNNING container can be evicted", container=name
        )
    if store.image_state(name) is ImageState.COMMITTED:
        raise InvalidState(
            f"{name}: is RUNNING but has a committed image in {store.root} from an earlier"
            " eviction; it was started outside evictor (remove the image to evict it again)",
            container=name,
        )
    dump_options = criu.check_criu(verdict_file=store.criu_verdict_path)
    config = runtime.container_config(name)
    if config.idmap is not None and (blocked := store.unreachable_by(config.idmap)):
        raise PreflightError(
            f"{name}: its root (uid {config.idmap.root_uid}) could not reach its image at"
            f" restore: {blocked} is mode {stat.S_IMODE(blocked.stat().st_mode):o}; others"
            " must be able to pass through every directory above the image store (o+x)",
            container=name,
        )
    return config, dump_options


def _check_room(store: ImageStore, name: str, usage_bytes: int) -> None:
    free_bytes = store.free_bytes()
    if free_bytes < required_free_bytes(usage_bytes):
        raise PreflightError(
            f"{name}: image store {store.root} has {free_bytes >> 20} MiB free, the container"
            f" needs about {required_free_bytes(usage_bytes) >> 20} MiB",
            container=name,
        )


def evict(
    runtime: LxcRuntime,
    store: ImageStore,
    journal: Journal,
    name: str,
    *,
    reason: str = "operator request",
    drained: bool = False,
) -> Eviction:
    """Checkpoint ``name`` to the image store and stop it; raise EvictorError on failure.

    A failure of the checkpoint itself (not of the preflight) is recorded in the
    journal, so that the planner backs off and then ranks the container last.
    """
    validate_container_name(name)
    started = time.monotonic()
    with store.lock(name):
        settle(runtime, store, journal, name)
        for attempt in range(1, EVICT_ATTEMPTS + 1):
            try:
                manifest = _evict_once(runtime, store, journal, name, reason=reason)
                break
            except CheckpointFailed as failure:
                if (
                    attempt == EVICT_ATTEMPTS
                    or not criu.cause_is_unread(failure.log_lines)
                    or runtime.state(name) is not ContainerState.RUNNING
                ):
                    raise
                log.warning(
                    "%s: trying again in %.1f s, once it has read its messages",
                    name,
                    EVICT_RETRY_PAUSE_SECONDS,
                )
                time.sleep(EVICT_RETRY_PAUSE_SECONDS)
        lifecycle.move(
            journal, name, Managed.EVICTED, at=manifest.evicted_at, reason=reason, drained=drained
        )
    eviction = Eviction(manifest=manifest, duration_seconds=time.monotonic() - started)
    journal.record(
        Event(
            container=name,
            at=manifest.evicted_at,
            kind=EventKind.EVICTED,
            size_bytes=manifest.image_bytes,
            duration_seconds=eviction.duration_seconds,
            detail=reason,
        )
    )
    log.info(
        "evicted %s (%s): %d bytes in use, image %d bytes, %.2f s (dump %.2f s, frozen %.2f s)",
        name,
        reason,
        manifest.memory_usage_bytes,
        manifest.image_bytes,
        eviction.duration_seconds,
        manifest.dump_duration_seconds,
        manifest.dump_stats.frozen_time_us / 1e6,
    )
    return eviction


def _evict_once(
    runtime: LxcRuntime, store: ImageStore, journal: Journal, name: str, *, reason: str
) -> Manifest:
    """One attempt: preflight, dump, seal, commit; a failure is rolled back, recorded
    in the journal, and raised."""
    config, dump_options = preflight(runtime, store, name)
    usage_bytes = runtime.memory_usage_bytes(name) or 0
    _check_room(store, name, usage_bytes)
    addresses = runtime.ipv4_addresses(name)
    # For a rollback: to tell threads the dump left stopped from those stopped
    # already, and to name the processes a killed CRIU took with it.
    stopped_before = runtime.stopped_threads(name)
    processes_before = runtime.processes(name)
    lifecycle.move(journal, name, Managed.EVICTING, at=time.time(), reason=reason)
    phase = Phase.DUMP
    try:
        image_dir = store.begin(name)
        dump_started = time.monotonic()
        with store.writing_back(name):
            runtime.checkpoint(name, image_dir, criu_options=dump_options)
        dump_seconds = time.monotonic() - dump_started
        state = runtime.state(name)
        if state is not ContainerState.STOPPED:
            raise CheckpointFailed(
                f"{name}: is {state.value} after a successful dump", container=name, phase=phase
            )
        phase = Phase.SEAL
        files = store.seal(name)
        if config.idmap is not None:
            store.share_with(name, config.idmap)
        phase = Phase.COMMIT
        manifest = store.commit_dump(
            name,
            files=files,
            lxc_path=runtime.lxc_path,
            reason=reason,
            memory_usage_bytes=usage_bytes,
            dump_duration_seconds=dump_seconds,
            dump_stats=_dump_stats(image_dir),
            evicted_at=time.time(),
            ipv4_addresses=addresses,
        )
    except BaseException as error:
        failure = _as_failure(error, name, phase)
        ended = _roll_back(
            runtime, store, journal, name, failure or error, stopped_before, processes_before
        )
        if failure is None:
            raise
        if ended:
            failure = CheckpointFailed(
                f"{failure}; {ended}",
                container=name,
                phase=failure.phase,
                log_lines=failure.log_lines,
                persistent=failure.persistent,
            )
        journal.record(
            Event(
                container=name,
                at=time.time(),
                kind=EventKind.EVICT_FAILED,
                detail=str(failure).removeprefix(f"{name}: "),
                persistent=failure.persistent,
                config_digest=runtime.config_digest(name),
            )
        )
        if failure is error:
            raise
        raise failure from error
    return manifest


def trial_dump(
    runtime: LxcRuntime, store: ImageStore, name: str, *, attempts: int = TRIAL_ATTEMPTS
) -> CheckpointFailed | None:
    """Dump ``name`` for real and leave it running (``evictor check --trial``); return
    why CRIU failed, or None if the dump worked. A failure whose cause may pass (a
    netlink socket with unread messages) is tried again. The trial image is removed."""
    validate_container_name(name)
    with store.lock(name):
        state = runtime.state(name)
        if state is not ContainerState.RUNNING:
            raise InvalidState(
                f"{name}: is {state.value}, only a RUNNING container can be tried", container=name
            )
        dump_options = criu.check_criu(verdict_file=store.criu_verdict_path)
        trial_dir = store.trial_path(name)
        failure = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(TRIAL_PAUSE_SECONDS)
            shutil.rmtree(trial_dir, ignore_errors=True)  # left by a killed evictor, or before
            trial_dir.mkdir(mode=0o700)
            dumped = False
            try:
                runtime.checkpoint(name, trial_dir, leave_running=True, criu_options=dump_options)
                dumped = True
                return None
            except CheckpointFailed as error:
                failure = error
                if error.persistent:
                    return error
            finally:
                shutil.rmtree(trial_dir, ignore_errors=True)
                if runtime.state(name) is ContainerState.FROZEN:
                    runtime.thaw(name)
                if not dumped:  # CRIU killed (Ctrl-C) or timed out with the lock on?
                    runtime.unlock_network(name)
        return failure


def _as_failure(error: BaseException, name: str, phase: Phase) -> CheckpointFailed | None:
    """The CheckpointFailed to report for ``error``; None for an interruption (Ctrl-C)."""
    if isinstance(error, CheckpointFailed):
        return error
    if isinstance(error, OSError):
        return CheckpointFailed(
            f"{name}: {phase.value} failed: {error.strerror or error}", container=name, phase=phase
        )
    if isinstance(error, EvictorError):
        return CheckpointFailed(f"{error}", container=name, phase=phase)
    return None


def _dump_stats(image_dir: Path) -> criu.DumpStats:
    """CRIU's figures for the manifest; their absence never fails an eviction."""
    try:
        return criu.read_dump_stats(image_dir)
    except (OSError, CriuOutputError) as error:
        log.warning("no dump stats in %s: %s", image_dir, error)
        return criu.DumpStats()


def _roll_back(
    runtime: LxcRuntime,
    store: ImageStore,
    journal: Journal,
    name: str,
    error: BaseException,
    stopped_before: frozenset[int],
    processes_before: frozenset[tuple[int, str]],
) -> str | None:
    """Leave the container RUNNING after a failed eviction, and say so in the log;
    return what the failed dump cost it: the processes that ended meanwhile, if any.

    A failed dump leaves it running (CRIU thaws it) or frozen; a failure after
    the dump (sealing, the manifest) finds it stopped with an uncommitted image,
    which is then restored at once. It is called RUNNING only once its threads
    are seen to run (``stopped_before``: those stopped before the dump, left so).
    A CRIU killed while its code is in a task (injected, or not yet cured) takes
    that task with it: it runs on into the code and dies of SIGTRAP. One killed
    as it stops the tasks after a complete dump leaves some dead: the rest are
    stopped, and all restored from that dump.
    """
    state = runtime.state(name)
    log.warning(
        "eviction of %s failed (%s); container is %s, rolling back", name, error, state.value
    )
    if state is ContainerState.FROZEN:
        runtime.thaw(name)
        state = runtime.state(name)
    written = dump_is_written(store, name)
    not_running = ended = None
    if state is ContainerState.RUNNING:
        not_running = runtime.release_threads(
            name, stopped_before=stopped_before, timeout_seconds=RELEASE_TIMEOUT_SECONDS
        )
        if not criu.gave_up_dump(store.path(name)):
            # A task a killed CRIU let go into its code dies as it runs; a CRIU that
            # failed the dump itself cured every task before it let them go.
            time.sleep(RELEASE_SETTLE_SECONDS)
        ended = _ended(processes_before, runtime.processes(name))
        if written and ended:
            log.warning("%s: its dump was complete and its tasks were being stopped", name)
            runtime.stop(name)
            state = runtime.state(name)
    if state is ContainerState.STOPPED and not written:
        # CRIU stops a container only after a complete dump: someone else stopped
        # it meanwhile (lxc-stop), or its init ended with a killed CRIU, and its
        # running state went with that.
        store.discard_partial(name)
        why = (
            f"eviction failed ({error}): stopped during the dump, by hand or with its killed"
            " CRIU; state lost"
        )
        lifecycle.move(journal, name, Managed.RUNNING, at=time.time(), reason=why)
        log.warning("%s: %s", name, why)
        return "stopped during the dump; state lost"
    if state is ContainerState.STOPPED and store.image_state(name) is not ImageState.NONE:
        restore_uncommitted(runtime, store, journal, name, what="a failed eviction")
        state = runtime.state(name)
        not_running = ended = None  # restored from a complete dump: all came back
    if state is not ContainerState.RUNNING:
        return None
    runtime.unlock_network(name)
    store.discard_partial(name)
    if ended:
        log.error("%s: %s (a killed CRIU takes the task its code is in with it)", name, ended)
    if not_running is None:
        why = f"eviction failed: {error}" + (f"; {ended}" if ended else "")
        lifecycle.move(journal, name, Managed.RUNNING, at=time.time(), reason=why)
    else:
        why = f"eviction failed and the container does not run again: {not_running}"
        lifecycle.move(journal, name, Managed.FAILED, at=time.time(), reason=why)
        log.error("%s: %s", name, why)
    return ended


def _ended(before: frozenset[tuple[int, str]], after: frozenset[tuple[int, str]]) -> str | None:
    """The processes of ``before`` gone from ``after``, said in a line; None if none."""
    gone = sorted(before - after)
    if not gone:
        return None
    return "processes ended during the dump: " + ", ".join(f"{cmd} ({pid})" for pid, cmd in gone)
