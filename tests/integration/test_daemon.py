"""The daemon end to end: real containers, real CRIU, scraped over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from evictor.images import ImageState, ImageStore
from evictor.journal import EventKind, Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerState
from evictor.tools import testbed

from .conftest import (
    MIB,
    DaemonProcess,
    WorkloadFactory,
    free_port,
    run_evictor,
    scrape,
    wait_until,
    write_config,
)


def test_evicts_the_lowest_under_a_budget_and_restores_when_load_drops(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    daemon: Callable[[Path], DaemonProcess],
    tmp_path: Path,
) -> None:
    low, mid = workload(memory_mib=64), workload(memory_mib=64)
    guard = workload(memory_mib=96)
    state, port = tmp_path / "state", free_port()
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        state,
        port,
        triggers={"budget": "200MiB"},
        priorities={
            "rules": [
                {"match": mid, "priority": 10},
                {"match": guard, "priority": -5, "protect": True},
            ]
        },
    )
    before = testbed.wait_for_counter(runtime, low, above=0)
    running = daemon(config)
    store = ImageStore(state / "images")
    running.wait_for_log(f"evicted {low}")
    assert store.image_state(low) is ImageState.COMMITTED
    assert runtime.state(low) is ContainerState.STOPPED
    assert runtime.state(mid) is ContainerState.RUNNING
    assert runtime.state(guard) is ContainerState.RUNNING  # lowest priority, but protected
    # The memory is free: none of the image is in the page cache.
    resident = subprocess.run(
        ["fincore", "-b", "-n", "-o", "RES", *map(str, store.path(low).glob("pages-*.img"))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sum(map(int, resident)) < 4 * MIB

    evicted_gauge = ("evictor_container_state", (("container", low), ("state", "EVICTED")))
    wait_until(lambda: evicted_gauge in scrape(port), "the next tick's gauges")
    metrics = scrape(port)
    assert (
        metrics[
            (
                "evictor_evictions_total",
                (("cause", "budget"), ("container", low), ("result", "success")),
            )
        ]
        == 1
    )
    assert metrics[("evictor_checkpoint_duration_seconds_count", ())] == 1
    assert metrics[("evictor_checkpoint_duration_seconds_sum", ())] > 0
    assert metrics[("evictor_checkpoint_image_bytes_sum", ())] >= 64 * MIB
    assert metrics[evicted_gauge] == 1
    assert metrics[("evictor_pressure", ())] == 0  # the budget fits again

    runtime.stop(mid)  # load drops: now low fits again
    wait_until(lambda: runtime.state(low) is ContainerState.RUNNING, f"{low} restored")
    running.wait_for_log(f"restored {low}")
    testbed.wait_alive(runtime, low, original=before)
    assert not store.path(low).exists()
    metrics = scrape(port)
    assert metrics[("evictor_restores_total", (("container", low), ("result", "success")))] == 1
    assert metrics[("evictor_restore_duration_seconds_count", ())] == 1

    assert running.stop(signal.SIGTERM) == 0
    assert "SIGTERM received" in running.log() and "stopped" in running.log()


def test_sigkill_mid_eviction_then_restart_loses_nothing(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    daemon: Callable[[Path], DaemonProcess],
    tmp_path: Path,
) -> None:
    big = workload(memory_mib=1024)
    before = testbed.wait_for_counter(runtime, big, above=0)
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        state,
        free_port(),
        triggers={"budget": "512MiB"},
        metrics={"enabled": False},
    )
    first = daemon(config)
    pages = state / "images" / big
    wait_until(
        lambda: any(p.stat().st_size > 64 * MIB for p in pages.glob("pages-*.img")),
        "the dump to be under way",
        timeout_seconds=60,
    )
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL

    # Restart with room for it: whatever the moment of the kill, it ends RUNNING
    # or EVICTED with a complete image, and then comes back with its memory intact.
    write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        state,
        free_port(),
        triggers={"budget": "4GiB"},
        metrics={"enabled": False},
    )
    second = daemon(config)
    # Killed mid-dump, the dump (its tools in their own session) went on and completed.
    second.wait_for_log(
        f"reconciled {big}: was EVICTING; its dump had completed: image sealed and committed"
    )
    wait_until(lambda: runtime.state(big) is ContainerState.RUNNING, f"{big} running")
    second.wait_for_log(f"restored {big}")
    second.stop()
    testbed.wait_alive(runtime, big, original=before)
    assert ImageStore(state / "images").image_state(big) is ImageState.NONE


def test_a_container_that_cannot_be_checkpointed_gives_way_and_backs_off(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    daemon: Callable[[Path], DaemonProcess],
    tmp_path: Path,
) -> None:
    """Ranked lowest and uncheckpointable (a tty), it fails once and the next
    candidate is evicted in the same round; under pressure that stays, it is
    tried again only as its backoff allows, and stays RUNNING throughout."""
    tty, hog = workload(memory_mib=64, with_tty=True), workload(memory_mib=64)
    spike = workload(memory_mib=64, start=False)
    tty_before = testbed.wait_for_counter(runtime, tty, above=0)
    usage = sum(runtime.memory_usage_bytes(n) or 0 for n in (tty, hog))
    state, port = tmp_path / "state", free_port()
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        state,
        port,
        triggers={"budget": usage - 20 * MIB},  # evicting either one is enough
        evict={"failure_backoff_seconds": 1, "max_failure_backoff_seconds": 4},
        priorities={
            "rules": [
                {"match": tty, "priority": -10},
                {"match": spike, "priority": 50, "protect": True},
            ]
        },
    )
    running = daemon(config)
    running.wait_for_log(f"evicted {hog}")
    journal = Journal(state / "journal.db")
    failure, eviction = journal.events()
    assert (failure.container, failure.kind) == (tty, EventKind.EVICT_FAILED)
    assert "tty" in failure.detail and failure.persistent
    assert (eviction.container, eviction.kind) == (hog, EventKind.EVICTED)
    # The same round went on to the next candidate: no tick passed in between.
    assert eviction.duration_seconds is not None
    assert eviction.at - failure.at < eviction.duration_seconds + 0.5
    assert runtime.state(tty) is ContainerState.RUNNING

    # Pressure that stays: the protected spike alone outgrows the budget. With a
    # backoff of 1 s doubling to 4 s, the tty container is tried at most at 0, 2,
    # 6 and 10 s into 12 s: 4 attempts, where every 0.5 s tick would make 24.
    runtime.start(spike)
    started = time.time()
    time.sleep(12)
    attempts = [
        e.at
        for e in journal.events(container=tty, since=started)
        if e.kind is EventKind.EVICT_FAILED
    ]
    assert 2 <= len(attempts) <= 4, attempts
    # Right after its next attempt, `plan` and `status` show it held back (4 s).
    failed = len(journal.events(container=tty))
    wait_until(lambda: len(journal.events(container=tty)) > failed, "the next attempt")
    plan = run_evictor("-c", str(config), "plan")
    assert f"held back after failed checkpoints: {tty}: checkpoint failed" in plan.stdout
    assert f"evict {tty}" not in plan.stdout
    status = run_evictor("-c", str(config), "status", "--json")
    (entry,) = (c for c in json.loads(status.stdout)["containers"] if c["name"] == tty)
    assert entry["eligibility"].startswith(f"checkpoint failed {failed + 1} times: ")
    assert "retry in" in entry["eligibility"]
    assert "tty" in entry["checkpoint_failure"]["reason"]

    metrics = scrape(port)
    failures = (
        "evictor_evictions_total",
        (("cause", "budget"), ("container", tty), ("result", "failure")),
    )
    assert metrics[failures] == failed + 1
    successes = (
        "evictor_evictions_total",
        (("cause", "budget"), ("container", hog), ("result", "success")),
    )
    assert metrics[successes] == 1
    assert running.stop() == 0
    testbed.wait_alive(runtime, tty, original=tty_before)  # unharmed, read after the attempts
    assert runtime.state(tty) is ContainerState.RUNNING


def test_sighup_reloads_the_config_and_a_bad_one_is_refused(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    daemon: Callable[[Path], DaemonProcess],
    tmp_path: Path,
) -> None:
    name = workload(memory_mib=32)
    state, port = tmp_path / "state", free_port()
    path = tmp_path / "evictor.toml"
    write_config(path, runtime.lxc_path, state, port, triggers={"budget": "4GiB"})
    running = daemon(path)
    running.wait_for_log("running: a tick every")
    assert running.process is not None
    time.sleep(1)
    assert runtime.state(name) is ContainerState.RUNNING  # no pressure under 4 GiB
    # Between signals the main thread sleeps: it is not woken to look for them.
    main_thread = Path(f"/proc/{running.process.pid}/task/{running.process.pid}/status")
    before = _context_switches(main_thread)
    time.sleep(2)
    assert _context_switches(main_thread) == before

    write_config(path, runtime.lxc_path, state, port, triggers={"budget": "16MiB"})
    running.process.send_signal(signal.SIGHUP)
    running.wait_for_log("reloaded: ")
    running.wait_for_log(f"evicted {name}")  # the new budget acts

    path.write_text("[triggers]\nlow_watermark = '30%'\n")
    running.process.send_signal(signal.SIGHUP)
    running.wait_for_log(
        "reload refused, the running config is kept: triggers.low_watermark: must be below"
    )
    write_config(path, tmp_path / "elsewhere", state, port)
    running.process.send_signal(signal.SIGHUP)
    running.wait_for_log("reload refused, the running config is kept: lxc_path changed")
    assert running.process.poll() is None  # still running, on the config it had
    assert running.stop() == 0


def _context_switches(status: Path) -> int:
    """A task's context switches so far, voluntary and not, from its /proc status."""
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
    return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])


def test_make_room_evicts_lower_priority_containers(
    runtime: LxcRuntime, workload: WorkloadFactory, tmp_path: Path
) -> None:
    small, large = workload(memory_mib=32), workload(memory_mib=96)
    peer = workload(memory_mib=32)
    important = workload(start=False)
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        state,
        free_port(),
        triggers={"budget": "250MiB"},
        priorities={
            "rules": [{"match": important, "priority": 50}, {"match": peer, "priority": 50}]
        },
    )
    result = run_evictor("-c", str(config), "make-room", important, "--bytes", "100MiB")
    assert result.returncode == 0, result.stderr
    # ~165 MiB used + 100 MiB expected > 250 MiB: the largest lower-priority one goes.
    assert f"evicted {large}" in result.stdout
    assert runtime.state(large) is ContainerState.STOPPED
    assert runtime.state(small) is ContainerState.RUNNING
    assert runtime.state(peer) is ContainerState.RUNNING  # same priority as the target
    runtime.start(important)
    assert runtime.state(important) is ContainerState.RUNNING
    again = run_evictor("-c", str(config), "make-room", important)
    assert again.returncode == 2 and "has no memory limit" in again.stderr


def test_drain_then_daemon_restart_restores_everything(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    daemon: Callable[[Path], DaemonProcess],
    tmp_path: Path,
) -> None:
    first_name, second_name = workload(memory_mib=32), workload(memory_mib=32)
    protected = workload()
    before = {n: testbed.wait_for_counter(runtime, n, above=0) for n in (first_name, second_name)}
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        state,
        free_port(),
        priorities={
            "rules": [{"match": protected, "protect": True}, {"match": second_name, "priority": 9}]
        },
        metrics={"enabled": False},
    )
    running = daemon(config)
    running.wait_for_log("running: a tick every")
    drained = run_evictor("-c", str(config), "drain")
    assert drained.returncode == 0, drained.stderr
    assert f"left running (protected; --all drains them too): {protected}" in drained.stdout
    time.sleep(2)  # four ticks: the running daemon leaves drained containers alone
    assert runtime.state(first_name) is ContainerState.STOPPED
    assert runtime.state(second_name) is ContainerState.STOPPED
    assert running.stop() == 0

    restarted = daemon(config)
    wait_until(
        lambda: all(runtime.state(n) is ContainerState.RUNNING for n in (first_name, second_name)),
        "drained containers restored",
    )
    restarted.stop()
    log = restarted.log()
    assert log.index(f"restored {second_name}") < log.index(f"restored {first_name}")
    for name, status in before.items():
        testbed.wait_alive(runtime, name, original=status)


def run_demo(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``evictor demo``; the containers a demo that failed or was killed (a timeout)
    left in its LXC path are destroyed afterwards: left running, a later demo at the
    same path and name could not start its own."""
    try:
        return run_evictor("--state-dir", str(state_dir), "demo", *args)
    finally:
        for lxc_path in state_dir.glob("demo*/lxc"):
            leftovers = LxcRuntime(lxc_path)
            for name in leftovers.names():
                leftovers.destroy(name)


def test_the_demo_runs_its_scenario_and_cleans_up(tmp_path: Path, test_lxc_path: Path) -> None:
    result = run_demo(tmp_path, "--once", "--port", str(free_port()))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for line in (
        "evicted evictor-demo-cache",
        "evicted evictor-demo-batch",
        "restored evictor-demo-batch",
        "restored evictor-demo-cache",
        "evictor-demo-cache: same process, counter went on",
        "evictor-demo-batch: same process, counter went on",
        "demo containers removed",
    ):
        assert line in output
    assert "evictor-demo-db" not in " ".join(
        line for line in output.splitlines() if "evicted" in line
    )
    assert output.index("restored evictor-demo-batch") < output.index("restored evictor-demo-cache")
    assert not (tmp_path / "demo").exists()


def test_the_stock_demo_checks_prepares_evicts_and_restores(
    tmp_path: Path, test_lxc_path: Path
) -> None:
    state_dir = test_lxc_path.parent / f"demo-stock-{os.getpid()}"  # reachable when unprivileged
    result = run_demo(state_dir, "--stock")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for line in (
        "evictor check: 8 reasons it cannot be checkpointed as it is:",
        "evictor check --trial: checkpointable",
        "restored in",
        "(cycle 2): keys intact True, the open connection answers DBSIZE 10000",
        "demo container removed",
    ):
        assert line in output
    assert not (state_dir / "demo-stock").exists()
    shutil.rmtree(state_dir, ignore_errors=True)


def test_the_lxc_pre_start_hook_makes_room(
    runtime: LxcRuntime,
    workload: WorkloadFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    victim = workload(memory_mib=96)
    important = workload(start=False)
    hook = Path(__file__).parents[2] / "deploy/lxc/evictor-make-room"
    with open(runtime.lxc_path / important / "config", "a") as config_file:
        config_file.write(f"lxc.hook.pre-start = {hook}\n")
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        tmp_path / "state",
        free_port(),
        triggers={"budget": "150MiB"},
        priorities={"rules": [{"match": important, "priority": 50}]},
    )
    monkeypatch.setenv("EVICTOR", str(Path(sys.executable).parent / "evictor"))
    monkeypatch.setenv("EVICTOR_CONFIG", str(config))
    monkeypatch.setenv("EVICTOR_MAKE_ROOM_BYTES", "100MiB")
    runtime.start(important)  # lxc-start runs the hook before the container starts
    assert runtime.state(important) is ContainerState.RUNNING
    assert runtime.state(victim) is ContainerState.STOPPED
    assert ImageStore(tmp_path / "state/images").image_state(victim) is ImageState.COMMITTED


def test_resume_restores_drained_containers_now(
    runtime: LxcRuntime, workload: WorkloadFactory, tmp_path: Path
) -> None:
    low, high = workload(memory_mib=16), workload(memory_mib=16)
    before = {n: testbed.wait_for_counter(runtime, n, above=0) for n in (low, high)}
    config = write_config(
        tmp_path / "evictor.toml",
        runtime.lxc_path,
        tmp_path / "state",
        free_port(),
        priorities={"rules": [{"match": high, "priority": 5}]},
    )
    assert run_evictor("-c", str(config), "drain").returncode == 0
    assert runtime.state(low) is runtime.state(high) is ContainerState.STOPPED
    resumed = run_evictor("-c", str(config), "resume")
    assert resumed.returncode == 0, resumed.stderr
    lines = resumed.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"resumed {high}", f"resumed {low}"]
    for name, status in before.items():
        testbed.wait_alive(runtime, name, original=status)
    nothing = run_evictor("-c", str(config), "resume")
    assert nothing.stdout.strip() == "nothing to resume: no drained containers"
