"""``evictor demo``: the daemon at work on built-in containers; ``--stock``: a stock
systemd container checked, prepared, evicted and restored.

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
from evictor.tools import stock, testbed
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


def _fresh_scene(config: Config) -> LxcRuntime:
    """An empty LXC path for the demo (whatever an interrupted demo left, removed), and
    the runtime that sets the scene up in it: creating, starting, stopping."""
    runtime = LxcRuntime(config.lxc_path)
    _clear_scene(runtime, config.state_dir)
    config.lxc_path.mkdir(parents=True)
    return runtime


def _clear_scene(runtime: LxcRuntime, demo_dir: Path) -> None:
    for name in runtime.names():
        runtime.destroy(name)
    shutil.rmtree(demo_dir, ignore_errors=True)


def run(*, state_dir: Path, once: bool, port: int) -> int:
    demo_dir = state_dir / "demo"
    config = _config(demo_dir, port)
    engine = Engine(config)
    runtime = _fresh_scene(config)
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
        _clear_scene(runtime, demo_dir)
        _say("demo containers removed")


STOCK_NAME = "evictor-demo-stock"
STOCK_KEYS = 10_000


def run_stock(*, state_dir: Path, release: str = "trixie") -> int:
    """A stock Debian systemd container, as ``lxc-create -t debian`` makes it (ttys, a
    console, an AppArmor profile), unprivileged, with redis and a veth NIC on lxcbr0
    (DHCP): evictor checks it, prepares it, then evicts and restores it twice while
    one TCP connection to its redis stays open."""
    demo_dir = state_dir / "demo-stock"
    config = Config(lxc_path=demo_dir / "lxc", state_dir=demo_dir)
    runtime = _fresh_scene(config)
    engine = Engine(config)
    lxc_path = config.lxc_path
    try:
        _say(f"a stock Debian {release} container (built on the first run, about a minute)")
        stock.create_debian_container(
            lxc_path,
            STOCK_NAME,
            release=release,
            unprivileged=True,
            network=stock.Network.dhcp(),
            progress=_say,
        )
        _say(f"booting it: {stock.start_and_wait(lxc_path, STOCK_NAME)}")
        report = engine.check(STOCK_NAME)
        _say(f"evictor check: {len(report.findings)} reasons it cannot be checkpointed as it is:")
        for finding in report.findings:
            print(f"           {finding.code}: {finding.remedy}", flush=True)
        prepared = engine.prepare(STOCK_NAME, restart=True)
        _say(
            f"evictor prepare --restart: {len(prepared.diff.splitlines())} lines of diff to its"
            f" config, {len(prepared.files_added)} files in its rootfs, CRIU options"
            f" {', '.join(prepared.criu_options)}; restarted"
        )
        stock.wait_for_boot(lxc_path, STOCK_NAME)
        trial = engine.check(STOCK_NAME, trial=True)
        if not trial.checkpointable:
            raise EvictorError(f"demo: still not checkpointable: {'; '.join(trial.problems)}")
        _say("evictor check --trial: checkpointable (a real dump, the container left running)")
        address = stock.wait_for_ipv4(lxc_path, STOCK_NAME)
        stock.wait_for_redis(lxc_path, STOCK_NAME, address=address)
        stock.fill_redis(lxc_path, STOCK_NAME, STOCK_KEYS, address=address)
        _say(f"redis at {address} holds {STOCK_KEYS} keys; a TCP connection to it stays open")
        with stock.HeldConnection(address, stock.REDIS_PORT) as held:
            for cycle in (1, 2):
                evicted = engine.evict(STOCK_NAME, reason="demo")
                if evicted.error is not None:
                    raise evicted.error
                _say(
                    f"evicted: {format_bytes(evicted.memory_bytes)} in use, image"
                    f" {format_bytes(evicted.image_bytes)}, {evicted.duration_seconds:.2f} s"
                )
                restored = engine.restore(STOCK_NAME, reason="demo")
                if restored.error is not None:
                    raise restored.error
                intact = not stock.redis_key_mismatches(
                    lxc_path, STOCK_NAME, STOCK_KEYS, address=address
                )
                same_socket = held.redis("DBSIZE")
                _say(
                    f"restored in {restored.duration_seconds:.2f} s (cycle {cycle}): keys intact"
                    f" {intact}, the open connection answers DBSIZE {same_socket}, systemd"
                    f" {stock.system_state(lxc_path, STOCK_NAME)}"
                )
                if not intact:
                    return 1
        return 0
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        engine.close()
        _clear_scene(runtime, demo_dir)
        _say("demo container removed")
