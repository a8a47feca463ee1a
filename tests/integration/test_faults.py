"""Faults injected into real evictions and restores: no path loses a container."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from evictor import checkpoint, criu, lifecycle, reconcile, restore
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
from evictor.images import ImageState, ImageStore, criu_config_directory
from evictor.journal import EventKind, Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.metrics import Metrics
from evictor.model import ContainerState, Managed
from evictor.ranking import Action, Decision, Plan, Trigger, TriggerKind
from evictor.tools import stock, testbed

from .conftest import (
    MIB,
    CriuHold,
    DaemonProcess,
    WorkloadFactory,
    evictor_argv,
    free_port,
    run_evictor,
    wait_until,
    with_criu_option,
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
    testbed.wait_alive(runtime, name, original=before)


def freeze_as_criu_does(runtime: LxcRuntime, name: str) -> None:
    """Freeze the container's freezer cgroup as CRIU does before it seizes the tasks
    (the v1 freezer on a hybrid host, cgroup2's on a pure one); LXC does not see it."""
    cgroup = runtime.memory_cgroup(name)
    assert cgroup is not None and cgroup.freeze_path is not None
    freezer = cgroup.freeze_path
    freezer.write_text("FROZEN" if freezer.name == "freezer.state" else "1")
    assert runtime.state(name) is ContainerState.RUNNING  # as LXC tells it


def kill_the_workload(runtime: LxcRuntime, name: str) -> None:
    """SIGKILL the workload's processes (memhog and its child), not the init."""
    for pid, command in runtime.processes(name):
        if command == "memhog":
            os.kill(pid, signal.SIGKILL)


def evict_with_fault(
    runtime: LxcRuntime,
    store: ImageStore,
    journal: Journal,
    name: str,
    hold: CriuHold,
    at: str,
    fault: Callable[[LxcRuntime, str], None] | None,
    *,
    kill_criu: bool = True,
    script_status: int = 0,
) -> CheckpointFailed:
    """Evict ``name``; where CRIU reaches the action-script point ``at``, inject
    ``fault``, then SIGKILL CRIU and lxc-checkpoint (``kill_criu``) or let CRIU go on
    with the script's ``script_status``. Returns the eviction's error."""
    hold.arm(at)
    thread, errors = in_background(lambda: checkpoint.evict(runtime, store, journal, name))
    hold.wait_reached()
    if fault is not None:
        fault(runtime, name)
    for pid in runtime.tools_using(store.path(name)) if kill_criu else ():
        os.kill(pid, signal.SIGKILL)
    hold.release(script_status)
    thread.join(timeout=120)
    assert len(errors) == 1 and isinstance(errors[0], CheckpointFailed), errors
    return errors[0]


def workload_child(runtime: LxcRuntime, name: str) -> int:
    """The pid of the workload's child process (memhog's, started after it)."""
    return max(pid for pid, command in runtime.processes(name) if command == "memhog")


def kill_child(pid: int) -> Callable[[LxcRuntime, str], None]:
    """A fault: SIGKILL of that process."""
    return lambda runtime, name: os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("at", "fault", "unprivileged"),
    [
        # CRIU holds the whole container frozen and seized, its image written: the
        # rollback sees its threads run again before it calls it RUNNING.
        ("post-dump", None, False),
        # CRIU froze the freezer and was killed before it seized the tasks (a chaos
        # run met it): the freezer stays frozen, LXC calls the container RUNNING.
        # The rollback thaws it.
        ("pre-dump", freeze_as_criu_does, False),
        # After a complete dump CRIU kills the tasks one by one, and only then writes
        # stats-dump: killed in between (met once in about forty kills in the first
        # 300 ms of a 256 MiB dump), it leaves some tasks dead and LXC calling the
        # container RUNNING. The rollback stops the rest and restores them all from
        # the dump. Here the workload is killed by hand, its init left, as CRIU would.
        ("post-dump", kill_the_workload, False),
        # The same for an unprivileged container, whose root must be able to read
        # the unsealed dump it is restored from.
        ("post-dump", kill_the_workload, True),
    ],
    ids=[
        "holding-the-dumped-container",
        "after-it-froze-it",
        "as-it-stops-the-dumped-tasks",
        "as-it-stops-the-dumped-tasks-unprivileged",
    ],
)
def test_criu_killed_mid_eviction_leaves_the_workload_running_intact(
    runtime: LxcRuntime,
    store: ImageStore,
    journal: Journal,
    workload: WorkloadFactory,
    criu_hold: Callable[[str], CriuHold],
    at: str,
    fault: Callable[[LxcRuntime, str], None] | None,
    unprivileged: bool,
    reachable_state_dir: Path,
) -> None:
    if unprivileged:
        store = ImageStore(reachable_state_dir / "images")
    name = workload(memory_mib=64, unprivileged=unprivileged)
    before = testbed.wait_for_counter(runtime, name, above=0)
    evict_with_fault(runtime, store, journal, name, criu_hold(name), at, fault)
    assert runtime.state(name) is ContainerState.RUNNING
    assert journal.managed()[name].state is Managed.RUNNING
    assert store.image_state(name) is ImageState.NONE
    testbed.wait_alive(runtime, name, original=before)


@pytest.mark.parametrize("lock", [criu.NFTABLES_LOCK, "network-lock iptables"])
def test_criu_killed_mid_dump_leaves_no_network_lock(
    runtime: LxcRuntime,
    store: ImageStore,
    journal: Journal,
    workload: WorkloadFactory,
    criu_hold: Callable[[str], CriuHold],
    static_address: Callable[[], str],
    lock: str,
) -> None:
    """CRIU locks the container's network (every packet dropped) before it dumps and
    unlocks it as it ends: killed in between, it leaves the lock, and the container
    runs on cut off. The rollback removes it, whichever way CRIU locked (evictor's
    choice, nftables, or iptables, CRIU's default, as a container's option): a
    connection held across the fault and a new one both answer."""
    address = static_address()
    name = workload(network=stock.Network.static(address))
    hold = criu_hold(name)
    with_criu_option(runtime, name, lock)
    rulesets: list[str] = []
    with stock.HeldConnection(address, testbed.ECHO_PORT, timeout_seconds=5) as held:
        assert held.request(b"before\n") == b"before\n"
        evict_with_fault(
            runtime,
            store,
            journal,
            name,
            hold,
            "post-dump",
            lambda runtime, name: rulesets.append(network_ruleset(runtime, name)),
        )
        assert "CRIU" in rulesets[0]  # locked, as asked
        assert runtime.state(name) is ContainerState.RUNNING
        assert "CRIU" not in network_ruleset(runtime, name)
        assert held.request(b"held\n") == b"held\n"  # CRIU had it in repair mode
    with stock.HeldConnection(address, testbed.ECHO_PORT, timeout_seconds=5) as new:
        assert new.request(b"new\n") == b"new\n"
    assert journal.managed()[name].state is Managed.RUNNING


def network_ruleset(runtime: LxcRuntime, name: str) -> str:
    """The container's nftables ruleset (iptables' rules among them, on its nft backend)."""
    argv = [*in_network_of(runtime, name), "nft", "list", "ruleset"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def in_network_of(runtime: LxcRuntime, name: str) -> list[str]:
    """The start of a command line that runs a host tool in the container's network."""
    return ["nsenter", f"--target={runtime.init_pid(name)}", "--net", "--"]


def test_a_process_that_ends_during_a_failed_dump_is_named(
    runtime: LxcRuntime,
    store: ImageStore,
    journal: Journal,
    workload: WorkloadFactory,
    criu_hold: Callable[[str], CriuHold],
) -> None:
    """A CRIU killed while its code is in a task takes that task with it (it runs on
    into the code and dies of SIGTRAP; kills of criu at random moments met it). That
    cannot be undone: the failure names the process, in the error, the journal and
    the log. Here the workload's child is killed by hand where CRIU holds, with CRIU."""
    name = workload(memory_mib=32)
    testbed.wait_for_counter(runtime, name, above=0)
    child_pid = workload_child(runtime, name)
    error = evict_with_fault(
        runtime, store, journal, name, criu_hold(name), "pre-dump", kill_child(child_pid)
    )
    named = f"processes ended during the dump: memhog ({child_pid})"
    assert named in str(error)
    (event,) = journal.events()
    assert event.kind is EventKind.EVICT_FAILED and named in event.detail
    assert named in journal.managed()[name].reason
    assert runtime.state(name) is ContainerState.RUNNING


def test_a_message_that_came_while_the_container_was_frozen_is_read_and_the_dump_tried_again(
    runtime: LxcRuntime,
    store: ImageStore,
    journal: Journal,
    workload: WorkloadFactory,
    criu_hold: Callable[[str], CriuHold],
) -> None:
    """A netlink message that reaches a frozen task fails its dump ("The socket has
    data to read": a stock container's networkd, just booted, met it in CI). Once
    thawed the task reads it, so the eviction is tried again and succeeds. Here the
    reader is busybox mdev, listening for uevents, and the message the uevent of a
    veth pair added to the container's network namespace where CRIU holds."""
    name = workload(start=False)
    inittab = runtime.lxc_path / name / "rootfs/etc/inittab"
    inittab.write_text(inittab.read_text() + "::respawn:/bin/busybox mdev -df\n")
    runtime.start(name)
    before = testbed.wait_for_counter(runtime, name, above=0)
    hold = criu_hold(name)
    hold.arm("network-lock")  # the tasks are frozen, their files not yet dumped
    thread, errors = in_background(lambda: checkpoint.evict(runtime, store, journal, name))
    hold.wait_reached()
    veth_pair = ["ip", "link", "add", "evt-a", "type", "veth", "peer", "evt-b"]
    subprocess.run([*in_network_of(runtime, name), *veth_pair], check=True)
    hold.release()
    thread.join(timeout=120)
    assert not errors, errors
    failed, evicted = journal.events()
    assert failed.kind is EventKind.EVICT_FAILED and "has data to read" in failed.detail
    assert evicted.kind is EventKind.EVICTED
    assert store.image_state(name) is ImageState.COMMITTED
    restore.restore(runtime, store, journal, name)
    after = testbed.wait_for_counter(runtime, name, above=before.counter)
    assert after.incarnation == before.incarnation  # its state, not a fresh start


def test_a_written_dump_criu_failed_itself_is_never_restored_over_the_container(
    runtime: LxcRuntime,
    store: ImageStore,
    journal: Journal,
    workload: WorkloadFactory,
    criu_hold: Callable[[str], CriuHold],
) -> None:
    """A dump CRIU fails after writing it (a flush onto a full store, a post-dump
    script) leaves the tasks running: a process that ends meanwhile (a short job)
    is no sign that CRIU was stopping them. The container runs on as it is, not
    restored from that dump. Here the post-dump script fails, and the workload's
    child is killed by hand where CRIU holds."""
    name = workload(memory_mib=32)
    testbed.wait_for_counter(runtime, name, above=0)
    init_pid = runtime.init_pid(name)
    child_pid = workload_child(runtime, name)
    # CRIU going on after the script, which fails: it lets the tasks run on.
    fault = kill_child(child_pid)
    error = evict_with_fault(
        runtime,
        store,
        journal,
        name,
        criu_hold(name),
        "post-dump",
        fault,
        kill_criu=False,
        script_status=1,
    )
    assert f"processes ended during the dump: memhog ({child_pid})" in str(error)
    assert runtime.state(name) is ContainerState.RUNNING
    assert runtime.init_pid(name) == init_pid  # the same container, not a restored one
    assert store.image_state(name) is ImageState.NONE


def test_an_interrupted_eviction_s_frozen_freezer_is_thawed_when_settled(
    runtime: LxcRuntime, store: ImageStore, journal: Journal, workload: WorkloadFactory
) -> None:
    """evictor and its CRIU both killed while CRIU held the freezer (systemd's stop
    kills the whole service): the next settle thaws it."""
    name = workload(memory_mib=32)
    before = testbed.wait_for_counter(runtime, name, above=0)
    lifecycle.move(journal, name, Managed.EVICTING, at=time.time(), reason="test")
    freeze_as_criu_does(runtime, name)
    with store.lock(name):
        outcome = reconcile.settle(runtime, store, journal, name)
    assert outcome is not None and "RUNNING" in outcome
    assert journal.managed()[name].state is Managed.RUNNING
    testbed.wait_alive(runtime, name, original=before)


def test_a_container_stopped_by_hand_during_its_dump_is_left_to_the_operator(
    runtime: LxcRuntime,
    store: ImageStore,
    journal: Journal,
    workload: WorkloadFactory,
    criu_hold: Callable[[str], CriuHold],
) -> None:
    """lxc-stop while CRIU is about to dump: the state is the operator's to lose.
    No restore from a half dump, no image kept aside: stopped, in LXC's hands."""
    name = workload(memory_mib=32)
    evict_with_fault(
        runtime, store, journal, name, criu_hold(name), "pre-dump", LxcRuntime.stop, kill_criu=False
    )
    assert runtime.state(name) is ContainerState.STOPPED
    managed = journal.managed()[name]
    assert managed.state is Managed.RUNNING and "stopped during the dump" in managed.reason
    assert store.image_state(name) is ImageState.NONE
    assert not list(store.root.glob(f".{name}.kept-*"))


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
    # The root cause, not just some CRIU failure.
    assert any("No space left on device" in line for line in failure.value.log_lines), (
        failure.value.log_lines
    )
    assert runtime.state(name) is ContainerState.RUNNING
    assert store.image_state(name) is ImageState.NONE  # the partial image is removed
    testbed.wait_alive(runtime, name, original=before)


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
    testbed.wait_alive(runtime, name, original=before)


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


@dataclasses.dataclass(frozen=True)
class Interruption:
    during: str  # "evict" or "restore": what the daemon was doing
    held_at: str  # the CRIU action-script point where the signal lands
    signal: signal.Signals
    with_tools: bool  # lxc-checkpoint and criu killed too (systemd's SIGKILL of the unit)
    logged: str  # what the daemon says of it: its own log line, or its successor's
    memory_mib: int = 64
    fault: Callable[[LxcRuntime, str], None] | None = None  # where CRIU is held


INTERRUPTIONS = {
    "killed-with-its-tools-before-the-dump": Interruption(
        "evict", "pre-dump", signal.SIGKILL, True, "was EVICTING; RUNNING, partial image removed"
    ),
    "killed-after-the-dump-before-the-commit": Interruption(
        "evict",
        "post-dump",
        signal.SIGKILL,
        False,
        "was EVICTING; its dump had completed: image sealed and committed, EVICTED",
    ),
    # CRIU kills the dumped tasks one by one before it writes stats-dump: killed
    # in between with the daemon, it leaves some dead (here by hand, as in the
    # rollback's test) and the rest frozen. The next daemon restores them all.
    "killed-with-its-tools-as-the-dumped-tasks-are-stopped": Interruption(
        "evict",
        "post-dump",
        signal.SIGKILL,
        True,
        "was EVICTING; its dump was complete, its tasks being stopped: restored from it, RUNNING",
        fault=kill_the_workload,
    ),
    "sigterm-during-a-dump-that-completes": Interruption(
        "evict", "post-dump", signal.SIGTERM, False, "evicted {name}"
    ),
    "killed-during-a-restore-before-the-verdict": Interruption(
        "restore",
        "pre-restore",
        signal.SIGKILL,
        False,
        "was RESTORING; EVICTED with its committed image",
        memory_mib=512,  # its memory contents take a while to verify: the kill lands first
    ),
    "killed-during-a-restore-after-the-verdict": Interruption(
        "restore",
        "post-resume",
        signal.SIGKILL,
        False,
        "was RESTORING; its restore had finished: RUNNING, image removed",
    ),
}


@pytest.mark.parametrize("case", INTERRUPTIONS.values(), ids=INTERRUPTIONS.keys())
def test_the_daemon_interrupted_at_each_step_loses_nothing(
    case: Interruption,
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    daemon: Callable[[Path], DaemonProcess],
    criu_hold: Callable[[str], CriuHold],
    tmp_path: Path,
) -> None:
    """CRIU is held at a point of a real eviction or restore by the daemon, the signal
    lands there, then CRIU goes on (or is killed too). The next daemon settles
    what it finds, and the container comes back with its workload intact."""
    name = workload(memory_mib=case.memory_mib)
    before = testbed.wait_for_counter(runtime, name, above=0)
    hold = criu_hold(name)
    state = tmp_path / "state"
    store = ImageStore(state / "images")

    def config(budget: str) -> Path:
        return write_config(
            tmp_path / "evictor.toml",
            runtime.lxc_path,
            state,
            free_port(),
            triggers={"budget": budget},
            metrics={"enabled": False},
        )

    if case.during == "restore":
        assert run_evictor("-c", str(config("4GiB")), "evict", name).returncode == 0
    hold.arm(case.held_at)
    first = daemon(config("16MiB" if case.during == "evict" else "4GiB"))
    hold.wait_reached()
    image_dir = store.path(name)
    criu_config = criu_config_directory(image_dir) / "criu.conf"
    assert criu_config.is_file(), "the CRIU config file is kept beside the image"
    if case.fault is not None:
        case.fault(runtime, name)
    tools = runtime.tools_using(image_dir) if case.with_tools else []
    assert first.process is not None
    first.process.send_signal(case.signal)
    for pid in tools:
        os.kill(pid, signal.SIGKILL)
    if case.held_at == "pre-restore":  # before the verdict: evictor was still verifying
        assert not (store.gate_path(name) / "verdict").exists()
    hold.release()
    assert first.stop(case.signal) == (0 if case.signal is signal.SIGTERM else -signal.SIGKILL)
    wait_until(lambda: not runtime.tools_using(image_dir), "CRIU to finish or abort")
    if case.signal is signal.SIGTERM:  # the action completed, then the daemon stopped
        assert case.logged.format(name=name) in first.log()
        assert store.image_state(name) is ImageState.COMMITTED

    second = daemon(config("4GiB"))  # room for it: it runs again in the end
    if case.signal is signal.SIGKILL:
        second.wait_for_log(f"reconciled {name}: {case.logged}")
    wait_until(lambda: runtime.state(name) is ContainerState.RUNNING, f"{name} running")
    assert second.stop() == 0
    testbed.wait_alive(runtime, name, original=before)
    assert store.image_state(name) is ImageState.NONE
    assert not [p for p in store.root.iterdir() if not p.name.startswith(".")], "leftovers"
    assert not criu_config.parent.exists(), "the killed daemon's CRIU config is removed"
    assert not store.gate_path(name).exists()


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
    testbed.wait_alive(runtime, name, original=before)


def test_an_lxc_checkpoint_killed_before_it_started_criu_restores_through_the_gate(
    runtime: LxcRuntime,
    store: ImageStore,
    journal: Journal,
    workload: WorkloadFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """lxc-checkpoint forks LXC's side of a restore (the monitor to be), which runs
    the container's pre-start hooks, then starts criu with evictor's CRIU config
    file. The tool killed before that leaves that side at work: its criu must still
    find the file, and so evictor's gate, and evictor must see the restore done. (A
    chaos run met it: the file went with the tool's end, criu restored unverified,
    and evictor called the running container FAILED.) A pre-start hook holds
    LXC's side here while the tool is killed."""
    name = workload(memory_mib=32, start=False)
    hold = CriuHold(runtime, name, tmp_path / "hold", lxc_hook="pre-start")
    runtime.start(name)  # not armed: the hook lets the cold start through
    before = testbed.wait_for_counter(runtime, name, above=0)
    checkpoint.evict(runtime, store, journal, name)

    hold.arm("pre-start")
    thread, errors = in_background(lambda: restore.restore(runtime, store, journal, name))
    hold.wait_reached()
    tools = [psutil.Process(pid) for pid in runtime.tools_using(store.path(name))]
    (front,) = [tool for tool in tools if tool.ppid() == os.getpid()]  # what evictor ran
    front.kill()
    time.sleep(1.0)  # evictor sees the tool end
    hold.release()
    thread.join(timeout=120)
    assert not errors, errors
    assert "yet CRIU completed the verified restore" in caplog.text
    assert journal.managed()[name].state is Managed.RUNNING
    assert store.image_state(name) is ImageState.NONE
    testbed.wait_alive(runtime, name, original=before)


def test_lxc_s_side_of_a_restore_killed_while_criu_restores_leaves_no_copy_running(
    runtime: LxcRuntime,
    store: ImageStore,
    journal: Journal,
    workload: WorkloadFactory,
    criu_hold: Callable[[str], CriuHold],
) -> None:
    """The lxc-checkpoint that starts criu is to be the container's monitor. Killed
    while criu restores, it leaves a criu that would set the tasks running with no
    monitor: a copy of the container that LXC calls STOPPED, and the next restore
    would run a second one beside it. evictor's gate lets the tasks run only while
    LXC's side of the restore lives: the restore fails, the image is kept, and the
    next one brings the container back, alone."""
    name = workload(memory_mib=32)
    before = testbed.wait_for_counter(runtime, name, above=0)
    checkpoint.evict(runtime, store, journal, name)
    hold = criu_hold(name)
    hold.arm("pre-restore")
    thread, errors = in_background(lambda: restore.restore(runtime, store, journal, name))
    hold.wait_reached()
    tools = [psutil.Process(pid) for pid in runtime.tools_using(store.path(name))]
    (lxc_side,) = [  # the lxc-checkpoint that started criu: the monitor to be
        tool
        for tool in tools
        if tool.name() == "lxc-checkpoint" and any(c.name() == "criu" for c in tool.children())
    ]
    lxc_side.kill()
    hold.release()
    thread.join(timeout=120)
    assert len(errors) == 1 and isinstance(errors[0], RestoreFailed), errors
    assert runtime.state(name) is ContainerState.STOPPED
    assert testbed.stray_tasks(runtime, [name]) == []
    assert store.image_state(name) is ImageState.COMMITTED
    restore.restore(runtime, store, journal, name)
    testbed.wait_alive(runtime, name, original=before)
    assert testbed.stray_tasks(runtime, [name]) == []


@pytest.mark.parametrize("own_mount", [False, True], ids=["store-on-root-fs", "store-own-mount"])
def test_criu_killed_at_post_restore_leaves_no_frozen_copy(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    criu_hold: Callable[[str], CriuHold],
    tmp_path: Path,
    own_mount: bool,
) -> None:
    """CRIU SIGKILLed at post-restore, where evictor's gate holds it while the memory
    is verified: the container's tasks are restored but never set running, and
    nothing else would ever end them (a chaos run found such frozen copies holding
    their memory). The failed restore kills them and keeps the image; the next
    restore brings the container back intact. Also with the store on a file
    system of its own, where those tasks see their open log by another path (a
    CI chaos run, whose store is a loop device, left such a copy running)."""
    name = workload(memory_mib=64)
    before = testbed.wait_for_counter(runtime, name, above=0)
    hold = criu_hold(name)
    state_dir = tmp_path / "state"
    if own_mount:
        state_dir.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0711", "tmpfs", state_dir], check=True)
    try:
        _kill_criu_at_post_restore_then_restore(runtime, name, before, hold, tmp_path, state_dir)
    finally:
        if own_mount:
            subprocess.run(["umount", "-l", state_dir], check=False)


def _kill_criu_at_post_restore_then_restore(
    runtime: LxcRuntime,
    name: str,
    before: testbed.WorkloadStatus,
    hold: CriuHold,
    tmp_path: Path,
    state_dir: Path,
) -> None:
    config = write_config(tmp_path / "evictor.toml", runtime.lxc_path, state_dir, free_port())
    store = ImageStore(state_dir / "images")
    assert run_evictor("-c", str(config), "evict", name).returncode == 0
    hold.arm("post-restore")
    restoring = subprocess.Popen(
        evictor_argv("-c", str(config), "restore", name),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    hold.wait_reached()
    image_dir = store.path(name)
    for pid in runtime.tools_using(image_dir):
        if Path(f"/proc/{pid}/exe").resolve().name == "criu":
            os.kill(pid, signal.SIGKILL)
    hold.release()
    _, error = restoring.communicate(timeout=120)
    assert restoring.returncode == 1, error
    assert runtime.state(name) is ContainerState.STOPPED
    assert store.image_state(name) is ImageState.COMMITTED
    stray = testbed.stray_tasks(runtime, [name])
    assert stray == [], [_describe(pid) for pid in stray]

    assert run_evictor("-c", str(config), "restore", name).returncode == 0
    testbed.wait_alive(runtime, name, original=before)
    assert testbed.stray_tasks(runtime, [name]) == []


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


def _describe(pid: int) -> str:
    proc = Path(f"/proc/{pid}")
    try:
        status = dict(line.split(":\t", 1) for line in (proc / "status").read_text().splitlines())
        fds = [os.readlink(f) for f in (proc / "fd").iterdir()]
        return f"{pid} {status['Name']} {status['State']} ppid {status['PPid']} fds {fds}"
    except OSError as error:
        return f"{pid}: {error}"
