"""``evictor demo``: the daemon at work on built-in containers.

Four containers of different priorities fit a memory budget; a spike container
starts and the budget is outgrown, so the daemon evicts the lowest-priority
ones (statefully, to disk); the spike ends and the daemon restores them,
running state intact, highest priority first. The metrics endpoint is up
throughout. Everything lives under STATE_DIR/demo, in its own LXC path, and is
removed at the end: the demo never touches the operator's containers.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from evictor.config import AntiThrash, Config, Priorities, RestorePolicy, Rule, Size, Triggers
from evictor.config import Metrics as MetricsConfig
from evictor.daemon import Daemon
from evictor.engine import Engine
from evictor.errors import EvictorError
from evictor.lxc_runtime import LxcRuntime
from evictor.metrics import Metrics
from evictor.model import ContainerSample, ContainerState
from evictor.tools import testbed
from evictor.units import format_bytes

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class DemoContainer:
    name: str
    memory_mib: int
    priority: int
    protected: bool = False


CONTAINERS = (
    DemoContainer("evictor-demo-db", 96, 100, protected=True),
    DemoContainer("evictor-demo-web", 64, 50),
    DemoContainer("evictor-demo-batch", 64, 10),
    DemoContainer("evictor-demo-cache", 48, 0),
)
SPIKE = DemoContainer("evictor-demo-spike", 96, 60)
BUDGET_MIB = 330
PHASE_TIMEOUT_SECONDS = 120.0


def _config(demo_dir: Path, port: int) -> Config:
    rules = tuple(
        Rule(match=c.name, priority=c.priority, protect=c.protected or None)
        for c in (*CONTAINERS, SPIKE)
    )
    return Config(
        lxc_path=demo_dir / "lxc",
        state_dir=demo_dir,
        interval_seconds=1.0,
        triggers=Triggers(
            budget=Size(bytes=BUDGET_MIB * MIB),
            min_reclaim=Size(bytes=16 * MIB),
            important_psi_some_avg10=None,
        ),
        restore=RestorePolicy(stable_seconds=3.0, margin=Size(bytes=MIB)),
        antithrash=AntiThrash(cooldown_seconds=10.0),
        priorities=Priorities(default=0, rules=rules),
        metrics=MetricsConfig(port=port),
    )


def _say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [demo] {message}", flush=True)


def _wait(what: str, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PHASE_TIMEOUT_SECONDS
    while not done():
        if time.monotonic() > deadline:
            raise EvictorError(f"demo: timed out waiting until {what}")
        time.sleep(0.25)


def _table(engine: Engine) -> None:
    sample = engine.sample()
    used = sum(c.usage_bytes for c in sample.containers)
    _say(f"containers use {format_bytes(used)} of a {BUDGET_MIB} MiB budget:")
    priorities = engine.priorities(c.name for c in sample.containers)
    for c in sample.containers:
        state = "EVICTED" if c.evicted else c.state.value
        memory = format_bytes(c.usage_bytes or c.evicted_usage_bytes or 0)
        protected = ", protected" if priorities[c.name].protected else ""
        print(
            f"           {c.name:<20} {state:<8} {memory:>10}  priority"
            f" {priorities[c.name].value}{protected}",
            flush=True,
        )


def _all(
    engine: Engine, names: tuple[str, ...], condition: Callable[[ContainerSample], bool]
) -> bool:
    return all(condition(c) for c in engine.sample().containers if c.name in names)


def run(*, state_dir: Path, once: bool, port: int) -> int:
    demo_dir = state_dir / "demo"
    config = _config(demo_dir, port)
    engine = Engine(config)
    runtime = LxcRuntime(config.lxc_path)  # to set the scene up: creating, starting, stopping
    for name in runtime.names():  # left behind by an interrupted demo
        runtime.destroy(name)
    shutil.rmtree(demo_dir, ignore_errors=True)
    runtime.lxc_path.mkdir(parents=True, mode=0o700)
    logging.getLogger("evictor").setLevel(logging.INFO)
    daemon = Daemon(engine, Metrics())
    try:
        _say(
            f"starting {len(CONTAINERS)} containers, each running a workload that holds"
            " patterned memory and counts once a second"
        )
        for container in (*CONTAINERS, SPIKE):
            testbed.create_workload_container(
                runtime, container.name, memory_mib=container.memory_mib
            )
        for container in CONTAINERS:
            runtime.start(container.name)
        first = {c.name: testbed.wait_for_counter(runtime, c.name, above=0) for c in CONTAINERS}
        daemon.start()
        _say(f"daemon running; metrics at http://127.0.0.1:{port}/metrics")
        _table(engine)

        _say(
            f"a spike: {SPIKE.name} (priority {SPIKE.priority}) starts with"
            f" {SPIKE.memory_mib} MiB and the budget is outgrown"
        )
        runtime.start(SPIKE.name)
        victims = ("evictor-demo-cache", "evictor-demo-batch")
        _wait(
            "the lowest-priority containers are evicted",
            lambda: _all(engine, victims, lambda c: c.evicted),
        )
        _table(engine)

        _say(f"the spike ends: {SPIKE.name} stops; the daemon restores, highest priority first")
        runtime.stop(SPIKE.name)
        _wait(
            "the evicted containers run again",
            lambda: _all(
                engine,
                victims,
                lambda c: c.state is ContainerState.RUNNING and not c.stale_image,
            ),
        )
        _table(engine)
        intact = True
        for name in victims:
            before = first[name]
            after = testbed.wait_for_counter(runtime, name, above=before.counter)
            same = after.incarnation == before.incarnation and after.errors == 0
            intact &= same
            _say(
                f"{name}: {'same process, counter went on' if same else 'RESTARTED'}"
                f" ({before.counter} -> {after.counter}), memory pattern errors {after.errors}"
            )
        _say(
            "scenario done"
            + (
                ""
                if once
                else f"; metrics still at http://127.0.0.1:{port}/metrics,"
                " Ctrl-C to stop and remove the demo containers"
            )
        )
        if not once:
            daemon.stopping.wait()
        return 0 if intact else 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        daemon.stop()
        for name in runtime.names():
            runtime.destroy(name)
        shutil.rmtree(demo_dir, ignore_errors=True)
        _say("demo containers removed")
