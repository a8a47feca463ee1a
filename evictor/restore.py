"""Restore one evicted container, running state intact.

The image is verified against its manifest before CRIU sees it, and removed
only once the container is RUNNING again; on any failure it stays as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from evictor.errors import InvalidState, RestoreFailed
from evictor.images import ImageStore
from evictor.lxc_runtime import LxcRuntime
from evictor.manifest import Manifest
from evictor.model import ContainerState, validate_container_name

log = logging.getLogger(__name__)

RUNNING_TIMEOUT_SECONDS = 30.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Restoration:
    manifest: Manifest
    duration_seconds: float  # verification, restore and the wait for RUNNING
    evicted_seconds: float  # how long the container was evicted


def restore(runtime: LxcRuntime, store: ImageStore, name: str) -> Restoration:
    """Verify ``name``'s image, restore it, wait until RUNNING, then remove the image."""
    validate_container_name(name)
    started = time.monotonic()
    with store.lock(name):
        manifest = store.load(name)
        state = runtime.state(name)
        if state is not ContainerState.STOPPED:
            raise InvalidState(
                f"{name}: is {state.value}; it was started outside evictor after its eviction,"
                " so its image is stale and was not restored",
                container=name,
            )
        store.verify(name)
        runtime.restore(name, store.path(name))
        if not runtime.wait_for_state(name, ContainerState.RUNNING, RUNNING_TIMEOUT_SECONDS):
            raise RestoreFailed(
                f"{name}: not RUNNING {RUNNING_TIMEOUT_SECONDS:g} s after CRIU restored it"
                f" (now {runtime.state(name).value}); image kept",
                container=name,
                phase="wait",
            )
        store.discard(name)
    restoration = Restoration(
        manifest=manifest,
        duration_seconds=time.monotonic() - started,
        evicted_seconds=max(0.0, time.time() - manifest.evicted_at),
    )
    log.info(
        "restored %s: image %d bytes, %.2f s, evicted for %.0f s",
        name,
        manifest.image_bytes,
        restoration.duration_seconds,
        restoration.evicted_seconds,
    )
    return restoration
