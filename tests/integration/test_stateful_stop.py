"""LXD's stateful stop, finished: a stateless start on purpose (discard), never a
cold start by accident (the pre-start guard), and a drain when the daemon stops
(a host reboot without losing running state). Real containers, real CRIU."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from evictor.images import ImageState, ImageStore
from evictor.journal import EventKind, Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerState, Managed
from evictor.tools import testbed

from .conftest import (
    DaemonProcess,
    WorkloadFactory,
    free_port,
    run_evictor,
    wait_until,
    write_config,
)


def evictor(runtime: LxcRuntime, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_evictor("-P", str(runtime.lxc_path), "--state-dir", str(state), *args)


def test_discard_throws_a_saved_state_away_on_purpose(
    runtime: LxcRuntime, workload: WorkloadFactory, tmp_path: Path
) -> None:
    name, running = workload(), workload()
    before = testbed.wait_for_counter(runtime, name, above=0)
    state = tmp_path / "state"
    assert evictor(runtime, state, "evict", name).returncode == 0
    # Asked, not assumed: without --yes and with nobody to answer, nothing happens.
    asked = evictor(runtime, state, "discard", name)
    assert asked.returncode == 2 and "pass --yes" in asked.stderr
    assert ImageStore(state / "images").image_state(name) is ImageState.COMMITTED
    for refused, why in ((running, "is RUNNING"), ("evt-nowhere", "no such container")):
        result = evictor(runtime, state, "discard", "--yes", refused)
        assert result.returncode == 1 and why in result.stderr
        assert result.stderr.count("\n") == 1

    done = evictor(runtime, state, "discard", "--yes", name)
    assert done.returncode == 0 and f"discarded the image of {name}" in done.stdout
    assert ImageStore(state / "images").image_state(name) is ImageState.NONE
    assert runtime.state(name) is ContainerState.STOPPED
    journal = Journal(state / "journal.db")
    assert journal.managed()[name].state is Managed.RUNNING  # in LXC's hands again
    assert journal.events(container=name)[-1].kind is EventKind.DISCARDED
    journal.close()
    again = evictor(runtime, state, "discard", "--yes", name)
    assert again.returncode == 1 and "has no image" in again.stderr
    runtime.start(name)  # a cold start: a new process
    testbed.wait_for_new_incarnation(runtime, name, old=before)


def test_the_guard_refuses_a_cold_start_of_an_evicted_container(
    runtime: LxcRuntime, workload: WorkloadFactory, tmp_path: Path
) -> None:
    name = workload()
    first = testbed.wait_for_counter(runtime, name, above=0)
    state = tmp_path / "state"
    prepared = evictor(runtime, state, "prepare", name)
    assert prepared.returncode == 0 and "+lxc.hook.pre-start = " in prepared.stdout
    runtime.restart(name)  # the hook applies from its next start
    before = testbed.wait_for_new_incarnation(runtime, name, old=first)
    assert evictor(runtime, state, "evict", name).returncode == 0
    store = ImageStore(state / "images")
    manifest = (store.path(name) / "manifest.json").read_bytes()

    # In the foreground with LXC's debug log on stderr, where the hook's reason is.
    debug = ("-F", "-l", "DEBUG", "-o", "/dev/stderr")
    start = ["lxc-start", "-P", str(runtime.lxc_path), "-n", name, *debug]
    started = subprocess.run(start, capture_output=True, text=True, check=False, timeout=60)
    assert started.returncode != 0
    assert "Failed to run lxc.hook.pre-start" in started.stderr
    assert f"run 'evictor restore {name}'" in started.stderr
    assert f"'evictor discard {name}'" in started.stderr
    assert runtime.state(name) is ContainerState.STOPPED
    assert (store.path(name) / "manifest.json").read_bytes() == manifest  # intact

    # Refused as well while evictor holds the container's lock for other work (a
    # chaos run once cold-started one so, as the daemon was about to restore it).
    with store.lock(name):
        started = subprocess.run(start, capture_output=True, text=True, check=False, timeout=60)
    assert started.returncode != 0 and f"run 'evictor restore {name}'" in started.stderr
    assert runtime.state(name) is ContainerState.STOPPED

    restored = evictor(runtime, state, "restore", name)  # evictor's own restore passes
    assert restored.returncode == 0, restored.stderr
    testbed.wait_alive(runtime, name, original=before)
    runtime.stop(name)
    runtime.start(name)  # no image: the guard lets a cold start through
    assert runtime.state(name) is ContainerState.RUNNING


def test_a_stopping_daemon_drains_and_the_next_one_restores(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    daemon: Callable[[Path], DaemonProcess],
    tmp_path: Path,
) -> None:
    low, mid = workload(memory_mib=32), workload(memory_mib=32)
    protected, stays = workload(), workload()
    before = {n: testbed.wait_for_counter(runtime, n, above=0) for n in (low, mid)}
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        state,
        free_port(),
        shutdown={"drain": "on-stop"},
        priorities={
            "rules": [
                {"match": mid, "priority": 10},
                {"match": protected, "protect": True},
                {"match": stays, "drain": False},
            ]
        },
    )
    first = daemon(config)
    first.wait_for_log("running: a tick every")
    assert first.stop(signal.SIGTERM) == 0  # as systemd stops it at shutdown
    log = first.log()
    assert log.index(f"evicted {low}") < log.index(f"evicted {mid}")  # lowest first
    assert f"left running: {protected}, {stays}" in log
    for name in (low, mid):
        assert runtime.state(name) is ContainerState.STOPPED
    assert runtime.state(protected) is runtime.state(stays) is ContainerState.RUNNING

    write_config(tmp_path / "evictor.toml", runtime.lxc_path, state, free_port())
    second = daemon(config)  # after the reboot
    wait_until(
        lambda: all(runtime.state(n) is ContainerState.RUNNING for n in (low, mid)),
        "the drained containers restored",
    )
    assert second.stop() == 0  # drain off: nothing drained
    for name, status in before.items():
        testbed.wait_alive(runtime, name, original=status)
