"""Faults injected into real evictions and restores: no path loses a container."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from evictor import checkpoint, reconcile, restore
from evictor.config import Config
from evictor.daemon import Daemon
from evictor.engine import Engine
from evictor.errors import (
    CheckpointFailed,
    ContainerNotFound,
    EvictorError,
    InvalidState,
    PreflightError,
    RestoreFailed,
)
from evictor.images import ImageState, ImageStore
from evictor.journal import EventKind, Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.metrics import Metrics
from evictor.model import ContainerState, Managed
from evictor.ranking import Action, Decision, Plan, Trigger, TriggerKind
from evictor.tools import testbed

from .conftest import (
    MIB,
    DaemonProcess,
    WorkloadFactory,
    evictor_argv,
    free_port,
    run_evictor,
    wait_until,
    write_config,
)


def in_background(action: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as error:  # the test inspects it
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A 160 MiB tmpfs for the image store, unmounted afterwards."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160m,mode=0700", "tmpfs", str(mountpoint)], check=True
    )
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_criu_killed_mid_dump_leaves_the_container_running_and_counts_the_failure(
    runtime: LxcRuntime, store: ImageStore, journal: Journal, workload: WorkloadFactory
) -> None:
    name = workload(memory_mib=1024)
    before = testbed.wait_for_counter(runtime, name, above=0)
    engine = Engine(Config(lxc_path=runtime.lxc_path, state_dir=store.root.parent))
    daemon = Daemon(engine, Metrics())
    plan = Plan(
        triggers=(Trigger(TriggerKind.BUDGET, "test"),),
        critical=False,
        reclaim_target_bytes=1,
        evictions=(
            Decision(container=name, action=Action.EVICT, priority=0, size_bytes=1, reason="test"),
        ),
        standby=(),
        restores=(),
        notes=(),
    )
    thread, _ = in_background(lambda: daemon.act(plan))
    image_dir = store.path(name)
    criu_pid = wait_until(
        lambda: next(
            (
                pid
                for pid in runtime.tools_using(image_dir)
                if b"criu" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            ),
            None,
        ),
        "criu to start",
    )
    wait_until(
        lambda: any(p.stat().st_size > 32 * MIB for p in image_dir.glob("pages-*.img")),
        "criu to write pages",
    )
    assert isinstance(criu_pid, int)
    os.kill(criu_pid, signal.SIGKILL)
    thread.join(timeout=120)

    assert runtime.state(name) is ContainerState.RUNNING  # thawed if CRIU had frozen it
    assert store.image_state(name) is ImageState.NONE  # no partial image left
    assert (
        daemon.metrics.registry.get_sample_value(
            "evictor_evictions_total", {"container": name, "result": "failure", "cause": "budget"}
        )
        == 1
    )
    (event,) = journal.events()
    assert event.kind is EventKind.EVICT_FAILED
    assert journal.managed()[name].state is Managed.RUNNING
    assert testbed.wait_for_counter(runtime, name, above=before.counter).incarnation == (
        before.incarnation
    )


def test_a_store_too_small_is_refused_up_front(
    runtime: LxcRuntime, workload: WorkloadFactory, small_store: Path, tmp_path: Path
) -> None:
    name = workload(memory_mib=256)
    store = ImageStore(small_store / "images")
    journal = Journal(tmp_path / "journal.db")
    with pytest.raises(PreflightError, match=r"has \d+ MiB free, the container needs about"):
        checkpoint.evict(runtime, store, journal, name)
    assert runtime.state(name) is ContainerState.RUNNING
    assert store.image_state(name) is ImageState.NONE
    assert journal.events() == []


def test_a_store_that_fills_up_during_the_dump_leaves_the_container_running(
    runtime: LxcRuntime, workload: WorkloadFactory, small_store: Path, tmp_path: Path
) -> None:
    name = workload(memory_mib=64)  # preflight: 64 MiB + margin fits in 160 MiB
    before = testbed.wait_for_counter(runtime, name, above=0)
    store = ImageStore(small_store / "images")
    journal = Journal(tmp_path / "journal.db")

    def fill_once_the_dump_begins() -> None:
        wait_until(lambda: store.path(name).is_dir(), "the image directory")
        filler = small_store / "filler"
        free = os.statvfs(small_store).f_bavail * os.statvfs(small_store).f_frsize
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, max(free - 4 * MIB, 1))

    thread, _ = in_background(fill_once_the_dump_begins)
    with pytest.raises(CheckpointFailed) as failure:
        checkpoint.evict(runtime, store, journal, name)
    thread.join()
    assert "No space left on device" in str(failure.value) or failure.value.log_lines
    assert runtime.state(name) is ContainerState.RUNNING
    assert store.image_state(name) is ImageState.NONE  # the partial image is removed
    assert testbed.wait_for_counter(runtime, name, above=before.counter).incarnation == (
        before.incarnation
    )


def test_a_restore_that_fails_keeps_the_image_and_reports_criu_s_reason(
    runtime: LxcRuntime, store: ImageStore, journal: Journal, workload: WorkloadFactory
) -> None:
    name = workload(memory_mib=16)
    before = testbed.wait_for_counter(runtime, name, above=0)
    checkpoint.evict(runtime, store, journal, name)
    # The rootfs changes after the eviction: the workload's executable is gone.
    memhog = runtime.lxc_path / name / "rootfs/bin/memhog"
    moved = memhog.with_name("memhog.aside")
    memhog.rename(moved)
    with pytest.raises(RestoreFailed, match="CRIU restore failed") as failure:
        restore.restore(runtime, store, journal, name)
    assert failure.value.log_lines  # CRIU's own reason, from restore.log
    assert runtime.state(name) is ContainerState.STOPPED
    assert store.image_state(name) is ImageState.COMMITTED
    managed = journal.managed()[name]
    assert managed.state is Managed.FAILED and managed.reason
    history = journal.histories(since=0)[name]
    assert history.restore_failures == 1  # the planner backs off before trying again
    moved.rename(memhog)
    restore.restore(runtime, store, journal, name)
    assert testbed.wait_for_counter(runtime, name, above=before.counter).incarnation == (
        before.incarnation
    )


def test_a_container_started_by_hand_while_evicted_is_never_restored_over(
    runtime: LxcRuntime,
    store: ImageStore,
    journal: Journal,
    workload: WorkloadFactory,
    tmp_path: Path,
) -> None:
    name = workload(memory_mib=16)
    evicted = testbed.wait_for_counter(runtime, name, above=0)
    checkpoint.evict(runtime, store, journal, name)
    runtime.start(name)  # an operator boots it fresh

    fresh = testbed.wait_for_new_incarnation(runtime, name, old=evicted)
    with pytest.raises(InvalidState, match="image is stale and was not restored"):
        restore.restore(runtime, store, journal, name)
    assert store.image_state(name) is ImageState.COMMITTED  # kept for the operator
    now = testbed.read_status(runtime, name)
    assert now is not None and now.incarnation == fresh.incarnation
    with pytest.raises(InvalidState, match="has a committed image"):
        checkpoint.evict(runtime, store, journal, name)
    status = run_evictor(
        "-P", str(runtime.lxc_path), "--state-dir", str(store.root.parent), "status"
    ).stdout
    assert "stale image: started outside evictor after its eviction" in status


def test_a_container_deleted_while_evicted_is_reported_and_its_image_kept(
    runtime: LxcRuntime, store: ImageStore, journal: Journal, workload: WorkloadFactory
) -> None:
    name = workload(memory_mib=16)
    checkpoint.evict(runtime, store, journal, name)
    runtime.destroy(name)
    with pytest.raises(ContainerNotFound):
        restore.restore(runtime, store, journal, name)
    assert store.image_state(name) is ImageState.COMMITTED
    listed = run_evictor(
        "-P", str(runtime.lxc_path), "--state-dir", str(store.root.parent), "list"
    ).stdout
    assert any(line.split()[:2] == [name, "MISSING"] for line in listed.splitlines())


def test_two_daemons_on_one_state_directory(
    runtime: LxcRuntime, daemon: Callable[[Path], DaemonProcess], tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        tmp_path / "state",
        free_port(),
        metrics={"enabled": False},
    )
    first = daemon(config)
    first.wait_for_log("running: a tick every")
    second = run_evictor("-c", str(config), "run")
    assert second.returncode == 1
    assert f"another evictor daemon (pid {first.process.pid}) is running" in second.stderr  # type: ignore[union-attr]
    assert first.stop() == 0


def test_a_cli_eviction_during_another_one_fails_cleanly(
    runtime: LxcRuntime, store: ImageStore, journal: Journal, workload: WorkloadFactory
) -> None:
    name = workload(memory_mib=512)
    thread, errors = in_background(lambda: checkpoint.evict(runtime, store, journal, name))
    wait_until(lambda: runtime.tools_using(store.path(name)), "the first dump")
    second = run_evictor(
        "-P", str(runtime.lxc_path), "--state-dir", str(store.root.parent), "evict", name
    )
    thread.join(timeout=120)
    assert errors == []
    assert second.returncode == 1
    assert "another evictor process is evicting or restoring it" in second.stderr
    assert store.image_state(name) is ImageState.COMMITTED


def test_the_daemon_killed_at_each_step_loses_nothing(
    runtime: LxcRuntime, store: ImageStore, journal: Journal, workload: WorkloadFactory
) -> None:
    """Each step's leftovers, made for real, then the daemon's start-up reconciliation."""
    before_dump, after_dump, mid_restore = (workload(memory_mib=32) for _ in range(3))
    counters = {
        n: testbed.wait_for_counter(runtime, n, above=0)
        for n in (before_dump, after_dump, mid_restore)
    }
    now = time.time()
    # Killed before the dump: the journal says EVICTING, an empty image directory.
    journal.set_state(before_dump, Managed.EVICTING, at=now)
    store.begin(before_dump)
    # Killed after the dump, before the manifest: CRIU's complete image, uncommitted.
    journal.set_state(after_dump, Managed.EVICTING, at=now)
    runtime.checkpoint(after_dump, store.begin(after_dump))
    # Killed during a restore: the tool, in its own session, finishes the restore.
    checkpoint.evict(runtime, store, journal, mid_restore)
    journal.set_state(mid_restore, Managed.RESTORING, at=now)
    runtime.restore(mid_restore, store.path(mid_restore))

    settled = reconcile.reconcile(runtime, store, journal)

    assert len(settled) == 3
    assert runtime.state(before_dump) is ContainerState.RUNNING
    assert store.image_state(before_dump) is ImageState.NONE
    assert journal.managed()[after_dump].state is Managed.EVICTED
    assert store.image_state(after_dump) is ImageState.COMMITTED
    assert runtime.state(mid_restore) is ContainerState.RUNNING
    assert store.image_state(mid_restore) is ImageState.NONE
    restore.restore(runtime, store, journal, after_dump)  # the committed image restores
    for name, before in counters.items():
        after = testbed.wait_for_counter(runtime, name, above=before.counter)
        assert after.incarnation == before.incarnation and after.errors == 0


def test_evictor_killed_while_criu_restores_loses_nothing(
    runtime: LxcRuntime, workload: WorkloadFactory, tmp_path: Path
) -> None:
    """``evictor restore`` SIGKILLed while CRIU restores and the memory contents are
    being verified: CRIU's gate finds evictor gone instead of a verdict and aborts
    (or, had the verdict been given, the restore completes). Either way the
    container is RUNNING, or STOPPED with its committed image, which restores."""
    state_dir = tmp_path / "state"
    config = write_config(tmp_path / "evictor.toml", runtime.lxc_path, state_dir, free_port())
    store, journal = ImageStore(state_dir / "images"), Journal(state_dir / "journal.db")
    name = workload(memory_mib=256)
    before = testbed.wait_for_counter(runtime, name, above=0)
    checkpoint.evict(runtime, store, journal, name)
    image_dir = store.path(name)

    restoring = subprocess.Popen(
        evictor_argv("-c", str(config), "restore", name),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: runtime.tools_using(image_dir), "lxc-checkpoint to start")
    restoring.kill()
    restoring.wait()
    wait_until(lambda: not runtime.tools_using(image_dir), "CRIU to finish or abort")

    reconcile.reconcile(runtime, store, journal)
    if runtime.state(name) is ContainerState.STOPPED:
        assert "Aborting restore due to post-restore script" in (
            (image_dir / "restore.log").read_text()
        )
        assert journal.managed()[name].state is Managed.EVICTED
        restore.restore(runtime, store, journal, name)
    assert store.image_state(name) is ImageState.NONE
    assert not store.gate_path(name).exists()
    after = testbed.wait_for_counter(runtime, name, above=before.counter)
    assert after.incarnation == before.incarnation and after.errors == 0


def test_restoring_an_image_evictor_did_not_write_is_refused(
    runtime: LxcRuntime, store: ImageStore, journal: Journal, workload: WorkloadFactory
) -> None:
    name = workload(memory_mib=16)
    image_dir = store.begin(name)
    runtime.checkpoint(name, image_dir)  # a raw lxc-checkpoint dump, no manifest
    with pytest.raises(EvictorError, match="incomplete image"):
        restore.restore(runtime, store, journal, name)
    (image_dir / "manifest.json").write_text(json.dumps({"format": 1, "container": name}))
    with pytest.raises(EvictorError, match="manifest"):
        restore.restore(runtime, store, journal, name)
    assert runtime.state(name) is ContainerState.STOPPED
    shutil.rmtree(image_dir)


def test_a_corrupt_image_raises_the_alert_metric_and_is_kept(
    runtime: LxcRuntime, store: ImageStore, journal: Journal, workload: WorkloadFactory
) -> None:
    name = workload(memory_mib=16)
    engine = Engine(Config(lxc_path=runtime.lxc_path, state_dir=store.root.parent))
    checkpoint.evict(runtime, store, journal, name)
    pages = max(store.path(name).glob("pages-*.img"), key=lambda p: p.stat().st_size)
    # Truncated: refused before CRIU starts (CRIU's restored task would spin on it).
    os.truncate(pages, pages.stat().st_size - 4096)
    daemon = Daemon(engine, Metrics())
    daemon.act(
        Plan(
            triggers=(),
            critical=False,
            reclaim_target_bytes=0,
            evictions=(),
            standby=(),
            restores=(
                Decision(
                    container=name, action=Action.RESTORE, priority=0, size_bytes=1, reason="test"
                ),
            ),
            notes=(),
        )
    )
    registry = daemon.metrics.registry
    assert registry.get_sample_value("evictor_image_rejections_total", {"container": name}) == 1
    assert (
        registry.get_sample_value(
            "evictor_restores_total", {"container": name, "result": "failure"}
        )
        == 1
    )
    assert store.image_state(name) is ImageState.COMMITTED
    assert journal.managed()[name].state is Managed.FAILED
    assert runtime.state(name) is ContainerState.STOPPED
    assert not (store.path(name) / "restore.log").exists()
