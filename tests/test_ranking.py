"""The decision core: table-driven cases for each trigger, plus its invariants."""

from __future__ import annotations

import dataclasses
from random import Random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evictor import ranking
from evictor.config import AntiThrash, Config, Priorities, Rule, Size, Triggers, parse_config
from evictor.model import (
    CheckpointFailure,
    ContainerSample,
    ContainerState,
    History,
    HostSample,
    Label,
    MemoryTrend,
    Pressure,
    Priority,
)
from evictor.ranking import (
    Action,
    Plan,
    TriggerKind,
    available_slope,
    checkpoint_retry_in,
    eligibility,
    eviction_cooldown_seconds,
    failure_backoff_seconds,
    plan,
    resolve_priority,
)

MIB = 1 << 20
GIB = 1 << 30
NOW = 1_000_000.0
TOTAL = 16 * GIB
# Defaults: low 10% (1.6 GiB), high 20% (3.2 GiB), critical 5%, min_reclaim 128 MiB.
CONFIG = Config()


def host(available_mib: int, psi: float = 0.0) -> HostSample:
    return HostSample(
        total_bytes=TOTAL,
        available_bytes=available_mib * MIB,
        free_bytes=available_mib * MIB,
        cached_bytes=0,
        swap_total_bytes=0,
        swap_free_bytes=0,
        pressure=Pressure(some_avg10=psi),
    )


def running(name: str, usage_mib: int, psi: float = 0.0) -> ContainerSample:
    return ContainerSample(
        name=name,
        state=ContainerState.RUNNING,
        usage_bytes=usage_mib * MIB,
        pressure=Pressure(some_avg10=psi),
    )


def evicted(name: str, usage_mib: int) -> ContainerSample:
    return ContainerSample(
        name=name,
        state=ContainerState.STOPPED,
        evicted=True,
        evicted_usage_bytes=usage_mib * MIB,
        image_bytes=usage_mib * MIB,
        evicted_at=NOW - 600,
    )


def prio(value: int, protected: bool = False) -> Priority:
    return Priority(value=value, protected=protected, source="test")


def run_plan(
    available_mib: int,
    containers: list[ContainerSample],
    priorities: dict[str, Priority] | None = None,
    histories: dict[str, History] | None = None,
    config: Config = CONFIG,
    last_pressure_at: float | None = None,
    host_psi: float = 0.0,
) -> Plan:
    priorities = priorities or {}
    return plan(
        host=host(available_mib, host_psi),
        containers=containers,
        priorities={c.name: priorities.get(c.name, prio(0)) for c in containers},
        histories=histories or {},
        config=config,
        now=NOW,
        last_pressure_at=last_pressure_at,
    )


def evicted_names(result: Plan) -> list[str]:
    return [d.container for d in result.evictions]


# --- triggers ---------------------------------------------------------------


def test_no_trigger_no_eviction() -> None:
    result = run_plan(8000, [running("a", 500)])
    assert not result.pressure and result.evictions == ()


def test_low_watermark_reclaims_up_to_the_high_one() -> None:
    # 1000 MiB available, high watermark 3276 MiB: reclaim 2276 MiB.
    result = run_plan(1000, [running("a", 1500), running("b", 1000), running("c", 700)])
    assert result.triggers[0].message.startswith("MemAvailable 1000 MiB is below the low watermark")
    assert result.reclaim_target_bytes == int(TOTAL * 0.2) - 1000 * MIB
    assert evicted_names(result) == ["a", "b"]  # same priority: largest first
    assert result.reclaim_planned_bytes >= result.reclaim_target_bytes


def test_between_the_watermarks_nothing_happens() -> None:
    # 2000 MiB is above the low watermark (1638 MiB) but below the high one: hysteresis.
    assert run_plan(2000, [running("a", 1500)]).evictions == ()


def test_at_least_min_reclaim_is_reclaimed() -> None:
    config = parse_config({"triggers": {"host_psi_some_avg10": 20.0}})
    result = run_plan(
        8000, [running("small", 50), running("big", 200)], config=config, host_psi=35.0
    )
    assert tuple(map(str, result.triggers)) == (
        "host memory PSI some avg10 35.0% is at or above 20%",
    )
    assert result.reclaim_target_bytes == 128 * MIB
    assert evicted_names(result) == ["big"]


def test_host_psi_trigger_is_off_by_default() -> None:
    assert not run_plan(8000, [running("a", 100)], host_psi=90.0).pressure


def test_an_important_container_under_pressure_triggers_and_is_spared() -> None:
    containers = [running("db", 2000, psi=25.0), running("batch", 300), running("web", 300)]
    priorities = {"db": prio(100), "web": prio(50)}
    result = run_plan(8000, containers, priorities)
    assert tuple(map(str, result.triggers)) == (
        "important containers stall on memory (PSI some avg10 >= 10%): db (25.0%)",
    )
    assert evicted_names(result) == ["batch"]


def test_pressure_on_an_unimportant_container_is_not_a_trigger() -> None:
    assert not run_plan(8000, [running("batch", 300, psi=80.0)]).pressure


def test_budget_trigger_reclaims_below_the_budget() -> None:
    config = parse_config({"triggers": {"budget": "1GiB"}})
    result = run_plan(
        8000,
        [running("a", 600), running("b", 500), running("c", 100)],
        {"a": prio(10)},
        config=config,
    )
    assert tuple(map(str, result.triggers)) == (
        "containers use 1200 MiB, over the budget of 1024 MiB",
    )
    # 1200 - 1024 + 128 = 304 MiB: b alone (priority 0) is enough.
    assert result.reclaim_target_bytes == 304 * MIB
    assert evicted_names(result) == ["b"]


# --- ranking ----------------------------------------------------------------


def test_priority_beats_size_and_protected_is_never_chosen() -> None:
    containers = [running("vip", 4000), running("low", 100), running("mid", 2000)]
    priorities = {"vip": prio(0, protected=True), "low": prio(1), "mid": prio(5)}
    result = run_plan(500, containers, priorities)
    assert evicted_names(result) == ["low", "mid"]
    assert "target not reachable" in result.notes[0]


def test_a_container_whose_checkpoint_failed_goes_last_within_its_priority() -> None:
    # Its backoff (60 s after one failure) is over: it is a candidate again, last.
    failure = CheckpointFailure(reason="tty: Found slave peer", at=NOW - 61)
    histories = {"a": History(checkpoint_failure=failure)}
    result = run_plan(
        1000, [running("a", 900), running("b", 100), running("c", 100)], histories=histories
    )
    assert evicted_names(result) == ["b", "c", "a"]
    assert "its checkpoint failed once: tty: Found slave peer" in result.evictions[-1].reason


# --- failed checkpoints: the next candidate stands by; backoff ---------------


def test_candidates_beyond_the_target_stand_by_in_order() -> None:
    # 1100 MiB used, 76 MiB over the budget, plus min_reclaim 128 MiB: 204 MiB to reclaim.
    config = parse_config({"triggers": {"budget": "1GiB"}})
    containers = [running(n, mib) for n, mib in (("a", 500), ("b", 150), ("c", 150), ("d", 300))]
    priorities = {"a": prio(0), "b": prio(1), "c": prio(2), "d": prio(3)}
    result = run_plan(8000, containers, priorities, config=config)
    assert evicted_names(result) == ["a"]
    # If "a" fails, "b" and then "c" make up for it: standby covers the target again.
    assert [d.container for d in result.standby] == ["b", "c"]
    assert "stands by in case an eviction above fails" in result.standby[0].reason


def test_a_tick_plans_a_bounded_number_of_evictions() -> None:
    # 1000 containers of 10 MiB, 4 GiB over the budget: far more candidates are needed
    # than a tick can evict; the plan names the first few, lowest-ranked first.
    config = parse_config({"triggers": {"budget": "6GiB"}})
    containers = [running(f"c{i:04d}", 10) for i in range(1000)]
    priorities = {c.name: prio(i) for i, c in enumerate(containers)}
    result = run_plan(8000, containers, priorities, config=config)
    most = ranking.MOST_EVICTIONS_PER_TICK
    assert evicted_names(result) == [f"c{i:04d}" for i in range(most)]
    assert [d.container for d in result.standby] == [f"c{i:04d}" for i in range(most, 2 * most)]
    assert result.reclaim_planned_bytes < result.reclaim_target_bytes
    assert f"{most} evictions this tick free {most * 10} of" in " ".join(result.notes)
    assert not any("not reachable" in note for note in result.notes)


def test_a_failed_checkpoint_is_backed_off_and_the_next_candidate_taken() -> None:
    failure = CheckpointFailure(reason="tty: Found slave peer", at=NOW - 10)
    result = run_plan(
        1000,
        [running("tty", 900), running("b", 2000)],
        {"tty": prio(-10)},
        histories={"tty": History(checkpoint_failure=failure)},
    )
    assert evicted_names(result) == ["b"]
    assert (
        "held back after failed checkpoints: tty: checkpoint failed once:"
        " tty: Found slave peer; retry in 50 s"
    ) in result.notes


def test_the_checkpoint_backoff_doubles_up_to_its_cap() -> None:
    policy = parse_config(
        {"evict": {"failure_backoff_seconds": 10, "max_failure_backoff_seconds": 50}}
    ).evict
    assert [failure_backoff_seconds(n, policy) for n in range(6)] == [0, 10, 20, 40, 50, 50]


@pytest.mark.parametrize(
    ("persistent", "retried"), [(True, False), (False, True)], ids=["a tty", "a full disk"]
)
def test_at_critical_pressure_only_a_passing_cause_is_retried_early(
    persistent: bool, retried: bool
) -> None:
    failure = CheckpointFailure(reason="why", at=NOW - 10, count=3, persistent=persistent)
    history = {"a": History(checkpoint_failure=failure)}
    # 500 MiB available is below the critical watermark (819 MiB).
    result = run_plan(500, [running("a", 900), running("b", 100)], histories=history)
    assert result.critical
    assert ("a" in evicted_names(result) + [d.container for d in result.standby]) is retried


def test_a_config_change_resets_the_backoff() -> None:
    failure = CheckpointFailure(reason="tty", at=NOW - 10, count=5, config_digest="v1")
    history = {"a": History(checkpoint_failure=failure)}
    same = dataclasses.replace(running("a", 900), config_digest="v1")
    changed = dataclasses.replace(running("a", 900), config_digest="v2")
    assert evicted_names(run_plan(1000, [same, running("b", 100)], histories=history)) == ["b"]
    result = run_plan(1000, [changed, running("b", 100)], histories=history)
    assert evicted_names(result) == ["a", "b"]  # the largest first: no failure counts now
    assert "failed" not in result.evictions[0].reason
    assert eligibility(changed, prio(0), history["a"], CONFIG, NOW) == "evictable"


# --- anti-thrash ------------------------------------------------------------


def test_a_recently_restored_container_is_spared_unless_critical() -> None:
    histories = {"a": History(eviction_times=(NOW - 400,), last_restored_at=NOW - 100)}
    spared = run_plan(1000, [running("a", 900), running("b", 100)], histories=histories)
    assert evicted_names(spared) == ["b"]
    assert "spared, restored too recently (anti-thrash cooldown): a" in spared.notes
    # Below the critical watermark (5% = 819 MiB) the cooldown no longer protects it.
    critical = run_plan(500, [running("a", 900), running("b", 100)], histories=histories)
    assert critical.critical and "a" in evicted_names(critical)


def test_repeated_evictions_back_off() -> None:
    policy = AntiThrash(
        cooldown_seconds=60, backoff_factor=2, window_seconds=3600, max_cooldown_seconds=400
    )
    times = [History(eviction_times=tuple(NOW - 10 * i for i in range(n))) for n in range(1, 6)]
    assert [eviction_cooldown_seconds(h, policy, NOW) for h in times] == [60, 120, 240, 400, 400]
    old = History(eviction_times=(NOW - 7200, NOW - 7100, NOW - 10))
    assert eviction_cooldown_seconds(old, policy, NOW) == 60  # only the last hour counts


# --- restore ----------------------------------------------------------------


def test_restore_highest_priority_first_one_at_a_time() -> None:
    containers = [evicted("low", 100), evicted("high", 100), evicted("mid", 100)]
    result = run_plan(8000, containers, {"high": prio(9), "mid": prio(5)})
    assert [(d.container, d.action) for d in result.restores] == [("high", Action.RESTORE)]


def test_restore_waits_for_pressure_to_stay_away() -> None:
    result = run_plan(8000, [evicted("a", 100)], last_pressure_at=NOW - 10)
    assert result.restores == ()
    assert "gone for 30 s (10 s so far)" in result.notes[0]
    assert run_plan(8000, [evicted("a", 100)], last_pressure_at=NOW - 31).restores != ()


def test_restore_needs_room_above_the_high_watermark_and_margin() -> None:
    # high 3276.8 MiB + margin 819.2 MiB: with 5000 MiB available, about 904 MiB of room.
    assert run_plan(5000, [evicted("a", 1000)]).restores == ()
    assert run_plan(5000, [evicted("a", 800)]).restores != ()


def test_restore_respects_the_budget() -> None:
    config = parse_config({"triggers": {"budget": "1GiB"}})
    # 700 used + 300 would exceed 1024 - 128.
    assert run_plan(8000, [running("r", 700), evicted("e", 300)], config=config).restores == ()
    assert run_plan(8000, [running("r", 500), evicted("e", 300)], config=config).restores != ()


def test_failed_restores_back_off() -> None:
    history = History(restore_failures=3, last_restore_failure_at=NOW - 200)
    result = run_plan(8000, [evicted("a", 100)], histories={"a": history})
    assert result.restores == ()  # third failure: 60 * 2**2 = 240 s backoff
    assert "retrying in 40 s" in result.notes[0]


# --- priorities and eligibility ---------------------------------------------


def test_label_beats_rule_beats_default() -> None:
    priorities = Priorities(
        default=5,
        rules=(Rule(match="db-*", priority=100, protect=True), Rule(match="db-*", priority=1)),
    )
    assert resolve_priority("web", None, priorities) == Priority(
        value=5, protected=False, source="default"
    )
    assert resolve_priority("db-1", None, priorities) == Priority(
        value=100, protected=True, source="rule 'db-*'"
    )
    assert resolve_priority("db-1", Label(priority=7), priorities) == Priority(
        value=7, protected=True, source="label"
    )
    assert resolve_priority("db-1", Label(protected=False), priorities).protected is False
    # Drains take every container unless a rule or a label says otherwise, the label first.
    stays = Priorities(rules=(Rule(match="db-*", drain=False),))
    assert resolve_priority("web", None, stays).drain is True
    assert resolve_priority("db-1", None, stays).drain is False
    assert resolve_priority("db-1", Label(drain=True), stays).drain is True


def test_eligibility_phrases() -> None:
    sample = running("a", 100)
    assert eligibility(sample, prio(0), History(), CONFIG, NOW) == "evictable"
    assert eligibility(sample, prio(0, True), History(), CONFIG, NOW) == "protected"
    failed = History(checkpoint_failure=CheckpointFailure(reason="tty", at=NOW - 10))
    assert eligibility(sample, prio(0), failed, CONFIG, NOW) == (
        "checkpoint failed once: tty; retry in 50 s"
    )
    twice = History(
        checkpoint_failure=CheckpointFailure(reason="full", at=NOW - 500, count=2, persistent=False)
    )
    assert eligibility(sample, prio(0), twice, CONFIG, NOW) == (
        "checkpoint failed 2 times (may pass): full; may be retried now"
    )
    assert eligibility(evicted("a", 1), prio(0), History(), CONFIG, NOW) == "evicted"


# --- invariants (Hypothesis) ------------------------------------------------

names = st.sampled_from([f"c{i}" for i in range(12)])
# containers, priorities, histories, MiB available, config, last pressure
Scenario = tuple[
    list[ContainerSample], dict[str, Priority], dict[str, History], int, Config, float | None
]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    chosen = draw(st.lists(names, unique=True, max_size=10))
    containers: list[ContainerSample] = []
    priorities: dict[str, Priority] = {}
    histories: dict[str, History] = {}
    for name in chosen:
        if draw(st.booleans()):
            containers.append(
                running(
                    name, draw(st.integers(0, 4000)), psi=draw(st.sampled_from([0.0, 0.0, 50.0]))
                )
            )
        else:
            containers.append(evicted(name, draw(st.integers(0, 4000))))
        priorities[name] = prio(draw(st.integers(0, 3)), protected=draw(st.booleans()))
        if draw(st.booleans()):
            histories[name] = History(
                eviction_times=(NOW - draw(st.integers(0, 5000)),),
                last_restored_at=NOW - draw(st.integers(0, 1000)),
                checkpoint_failure=draw(
                    st.one_of(
                        st.none(),
                        st.builds(
                            CheckpointFailure,
                            reason=st.just("failed"),
                            at=st.integers(int(NOW) - 5000, int(NOW)).map(float),
                            count=st.integers(1, 4),
                            persistent=st.booleans(),
                        ),
                    )
                ),
            )
    available = draw(st.integers(0, 16 * 1024))
    budget = draw(st.sampled_from([None, "2GiB", "8GiB"]))
    config = parse_config({"triggers": {"budget": budget or "off", "important_priority": 3}})
    last_pressure = draw(st.sampled_from([None, NOW - 5, NOW - 500]))
    return containers, priorities, histories, available, config, last_pressure


def plan_of(scenario: Scenario, order: list[ContainerSample] | None = None) -> Plan:
    containers, priorities, histories, available, config, last_pressure = scenario
    return plan(
        host=host(available),
        containers=order or containers,
        priorities=priorities,
        histories=histories,
        config=config,
        now=NOW,
        last_pressure_at=last_pressure,
    )


def stall(sample: ContainerSample) -> float:
    assert sample.pressure is not None  # the scenarios give every container its PSI
    return sample.pressure.some_avg10


def restored_at(history: History) -> float:
    assert history.last_restored_at is not None  # every history in the scenarios has one
    return history.last_restored_at


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_plan_invariants(scenario: Scenario) -> None:
    containers, priorities, histories, _, config, _ = scenario
    result = plan_of(scenario)
    by_name = {c.name: c for c in containers}
    evicted_set = set(evicted_names(result))
    restored = {d.container for d in result.restores}
    # A protected container is never chosen; only running ones are evicted.
    assert not any(priorities[n].protected for n in evicted_set)
    assert all(by_name[n].state is ContainerState.RUNNING for n in evicted_set)
    # No pressure, no eviction; nothing both evicted and restored; one restore at a time.
    if not result.pressure:
        assert result.evictions == ()
    assert not evicted_set & restored
    assert len(result.restores) <= 1
    # A lower-priority candidate always goes before a higher-priority one, and the
    # standby candidates come after the chosen ones, never among them.
    values = [d.priority for d in (*result.evictions, *result.standby)]
    assert values == sorted(values)
    standby = {d.container for d in result.standby}
    assert not standby & evicted_set
    # A container backed off after a failed checkpoint is never chosen, nor standing by.
    for name in evicted_set | standby:
        history = histories.get(name, History())
        assert (
            checkpoint_retry_in(by_name[name], history, config.evict, NOW, result.critical) is None
        )
    if result.pressure:
        critical = result.critical
        left_out = [
            c
            for c in containers
            if c.state is ContainerState.RUNNING
            and c.name not in evicted_set | standby
            and not priorities[c.name].protected
            and not (priorities[c.name].value >= 3 and stall(c) >= 10)  # in need
            and (
                critical
                or c.name not in histories
                or NOW - restored_at(histories[c.name])
                >= eviction_cooldown_seconds(histories[c.name], config.antithrash, NOW)
            )
            and checkpoint_retry_in(
                c, histories.get(c.name, History()), config.evict, NOW, critical
            )
            is None
        ]
        reached = result.reclaim_planned_bytes >= result.reclaim_target_bytes
        # When the target is reachable the plan reaches it, and nothing is left unused
        # when it is not...
        assert reached or not left_out
        # ...and every candidate left out ranks at least as high as every one chosen
        # or standing by.
        if values:
            assert all(priorities[c.name].value >= values[-1] for c in left_out)


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False))
def test_plan_does_not_depend_on_input_order(scenario: Scenario, random: Random) -> None:
    shuffled = list(scenario[0])
    random.shuffle(shuffled)
    assert plan_of(scenario, shuffled) == plan_of(scenario)


def test_config_defaults_used_by_these_tests() -> None:
    t = Triggers()
    assert (t.low_watermark, t.high_watermark, t.critical_watermark) == (
        Size(percent=10.0),
        Size(percent=20.0),
        Size(percent=5.0),
    )
    assert dataclasses.replace(CONFIG).restore.stable_seconds == 30


def test_the_example_in_docs_configuration() -> None:
    """docs/configuration.md walks through this plan; keep the two in step."""
    config = parse_config(
        {
            "priorities": {
                "rules": [
                    {"match": "db-*", "priority": 100, "protect": True},
                    {"match": "batch-*", "priority": -10},
                ]
            }
        }
    )
    containers = [
        running("batch-1", 3 * 1024),
        running("web-1", 2 * 1024),
        running("web-2", 5 * 1024),
        running("db-1", 8 * 1024),
    ]
    priorities = {c.name: resolve_priority(c.name, None, config.priorities) for c in containers}
    result = plan(
        host=dataclasses.replace(host(6 * 1024), total_bytes=64 * GIB),
        containers=containers,
        priorities=priorities,
        histories={},
        config=config,
        now=NOW,
        last_pressure_at=None,
    )
    assert result.reclaim_target_bytes == int(64 * GIB * 0.2) - 6 * GIB
    assert evicted_names(result) == ["batch-1", "web-2"]


# --- predictive eviction ------------------------------------------------------


def test_the_slope_of_memavailable() -> None:
    samples = [(NOW + t, 8 * GIB - int(t * 512 * MIB)) for t in (0.0, 0.5, 1.0, 1.5)]
    assert available_slope(samples) == pytest.approx(-512 * MIB)
    assert available_slope(samples[:2]) is None  # too few to tell a trend
    assert available_slope([(NOW, 1), (NOW, 2), (NOW, 3)]) is None


def falling(mib_per_second: float, eviction_mib_per_second: float = 200) -> MemoryTrend:
    return MemoryTrend(
        available_bytes_per_second=-mib_per_second * MIB,
        eviction_bytes_per_second=eviction_mib_per_second * MIB,
    )


def test_a_fast_fall_evicts_before_the_low_watermark() -> None:
    # 2000 MiB available, low watermark 1638 MiB: 362 MiB to go. At 512 MiB/s that is
    # 0.7 s; evicting the 1276 MiB the high watermark asks takes 6.4 s at 200 MiB/s.
    containers = [running("low", 1500), running("vip", 3000)]
    priorities = {"vip": prio(100, protected=True)}
    result = plan(
        host=host(2000),
        containers=containers,
        priorities={"low": prio(0), **priorities},
        histories={},
        config=CONFIG,
        now=NOW,
        last_pressure_at=None,
        trend=falling(512),
    )
    (trigger,) = result.triggers
    assert trigger.kind is TriggerKind.PREDICTED
    assert "falls at 512 MiB/s: the low watermark (1638 MiB) in 0.7 s" in trigger.message
    assert result.reclaim_target_bytes == int(TOTAL * 0.2) - 2000 * MIB  # as the watermark's
    assert evicted_names(result) == ["low"]


@pytest.mark.parametrize(
    ("trend", "fires"),
    [
        (falling(512), True),
        (falling(16), False),  # noise, not a spike
        (falling(512, eviction_mib_per_second=4000), False),  # evictions would keep up
        (falling(-100), False),  # rising
        (None, False),  # too few samples
    ],
)
def test_when_the_prediction_fires(trend: MemoryTrend | None, fires: bool) -> None:
    result = plan(
        host=host(2000),
        containers=[running("low", 1500)],
        priorities={"low": prio(0)},
        histories={},
        config=CONFIG,
        now=NOW,
        last_pressure_at=None,
        trend=trend,
    )
    assert result.pressure is fires
    off = dataclasses.replace(
        CONFIG, triggers=dataclasses.replace(CONFIG.triggers, predictive=False)
    )
    assert not plan(
        host=host(2000),
        containers=[running("low", 1500)],
        priorities={"low": prio(0)},
        histories={},
        config=off,
        now=NOW,
        last_pressure_at=None,
        trend=trend,
    ).pressure


@settings(max_examples=300, deadline=None)
@given(
    scenarios(),
    st.floats(min_value=-4096, max_value=4096),
    st.floats(min_value=16, max_value=4096),
)
def test_prediction_invariants(scenario: Scenario, slope_mib: float, eviction_mib: float) -> None:
    containers, priorities, histories, available, config, last_pressure = scenario
    trend = MemoryTrend(
        available_bytes_per_second=slope_mib * MIB, eviction_bytes_per_second=eviction_mib * MIB
    )
    result = plan(
        host=host(available),
        containers=containers,
        priorities=priorities,
        histories=histories,
        config=config,
        now=NOW,
        last_pressure_at=last_pressure,
        trend=trend,
    )
    kinds = {t.kind for t in result.triggers}
    # Never on a flat or rising trend, nor below the low watermark (where it fires anyway).
    if slope_mib >= 0 or available * MIB < config.triggers.low_watermark.resolve(TOTAL):
        assert TriggerKind.PREDICTED not in kinds
    # The same reclaim bounds as the low watermark; never a protected container.
    if kinds == {TriggerKind.PREDICTED}:
        t = config.triggers
        high, floor = t.high_watermark.resolve(TOTAL), t.min_reclaim.resolve(TOTAL)
        assert result.reclaim_target_bytes == max(high - available * MIB, floor)
    assert not any(priorities[d.container].protected for d in result.evictions)
