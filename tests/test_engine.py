"""The engine's operations and outcomes, on a real (empty) LXC path: what happens
to containers is tested on real ones in tests/integration/."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from evictor.config import Config, parse_config
from evictor.engine import Assessment, Engine
from evictor.errors import ContainerNotFound, UsageError
from evictor.journal import Event, EventKind, Journal
from evictor.model import Label
from evictor.ranking import Action, Decision, Plan, Trigger, TriggerKind

MIB = 1 << 20


def eviction(name: str, size_mib: int) -> Decision:
    return Decision(
        container=name, action=Action.EVICT, priority=0, size_bytes=size_mib * MIB, reason="why"
    )


def budget_plan(target_mib: int, evictions: list[str], standby: list[str]) -> Plan:
    return Plan(
        triggers=(Trigger(TriggerKind.BUDGET, "over the budget"),),
        critical=False,
        reclaim_target_bytes=target_mib * MIB,
        evictions=tuple(eviction(n, 10) for n in evictions),
        standby=tuple(eviction(n, 10) for n in standby),
        restores=(),
        notes=(),
    )


def test_a_failed_eviction_is_an_outcome_not_an_exception(engine: Engine, tmp_path: Path) -> None:
    outcome = engine.evict("ghost")
    assert not outcome.succeeded and isinstance(outcome.error, ContainerNotFound)
    assert (outcome.container, outcome.action, outcome.cause) == ("ghost", Action.EVICT, None)
    assert outcome.reason == "operator request"


def test_bad_input_raises_before_anything_happens(engine: Engine, tmp_path: Path) -> None:
    for operation in (engine.evict, engine.restore):
        with pytest.raises(UsageError, match="invalid container name"):
            operation("../etc")
    assert not (tmp_path / "state").exists()


def test_the_round_goes_on_to_the_standby_when_evictions_fail(engine: Engine) -> None:
    outcomes = list(engine.carry_out(budget_plan(5, ["a"], ["b", "c"]), stopping=threading.Event()))
    # Each fails (no such container): every candidate is tried, in order, for the cause.
    assert [o.container for o in outcomes] == ["a", "b", "c"]
    assert {o.cause for o in outcomes} == {TriggerKind.BUDGET}
    assert outcomes[0].reason == "over the budget: why"


def test_a_stopping_daemon_starts_nothing_more(engine: Engine) -> None:
    stopping = threading.Event()
    stopping.set()
    assert list(engine.carry_out(budget_plan(5, ["a"], ["b"]), stopping=stopping)) == []


def test_an_empty_host(engine: Engine, tmp_path: Path) -> None:
    assessment = engine.assess(now=1000.0, last_pressure_at=None)
    assert assessment.sample.containers == () and not assessment.plan.pressure
    assert engine.standing(assessment, 1000.0) == {} and assessment.images_bytes == 0
    assert not (tmp_path / "state").exists()  # looking creates nothing
    drained = engine.drain(include_all=False)
    assert drained.outcomes == () and drained.protected == drained.kept == ()
    assert engine.resume([]) == []


def test_labels_persist_and_resolve(engine: Engine, tmp_path: Path) -> None:
    priority = engine.label("web", Label(priority=7))
    assert (priority.value, priority.source, priority.protected) == (7, "label", False)
    assert engine.label("web", Label(protected=True)).protected
    reopened = Engine(Config(lxc_path=tmp_path / "lxc", state_dir=tmp_path / "state"))
    assert reopened.priorities(["web"])["web"].value == 7
    reopened.clear_label("web")
    assert engine.priorities(["web"])["web"].source == "default"
    reopened.close()


def test_each_assessment_sees_the_labels_and_rules_of_its_time(
    engine: Engine, tmp_path: Path
) -> None:
    # A stopped container is enough: defined by its config file.
    (tmp_path / "lxc" / "web").mkdir()
    (tmp_path / "lxc" / "web" / "config").write_text("lxc.uts.name = web\n")

    def web_priority() -> tuple[int, str]:
        priority = engine.assess(now=1000.0, last_pressure_at=None).priorities["web"]
        return priority.value, priority.source

    assert web_priority() == (Config().priorities.default, "default")
    # Labelled from elsewhere (a command's own process), between two assessments.
    other = Engine(Config(lxc_path=tmp_path / "lxc", state_dir=tmp_path / "state"))
    other.label("web", Label(priority=7))
    assert web_priority() == (7, "label")
    other.label("web", Label(priority=9))
    assert web_priority() == (9, "label")
    other.clear_label("web")
    other.close()
    assert web_priority() == (Config().priorities.default, "default")
    engine.reconfigure(
        parse_config(
            {
                "lxc_path": str(tmp_path / "lxc"),
                "state_dir": str(tmp_path / "state"),
                "priorities": {"rules": [{"match": "web*", "priority": 3}]},
            }
        )
    )
    assert web_priority() == (3, "rule 'web*'")


def test_each_assessment_reads_the_journal_as_it_is_then(engine: Engine, tmp_path: Path) -> None:
    """The daemon keeps what it read of the journal between ticks: a change made by
    itself or by another process, or an event that ages out, is seen at once."""
    (tmp_path / "lxc" / "web").mkdir()
    (tmp_path / "lxc" / "web" / "config").write_text("lxc.uts.name = web\n")
    window = Config().antithrash.window_seconds  # the longest the histories reach back

    def assessed(now: float) -> Assessment:
        return engine.assess(now=now, last_pressure_at=None)

    engine.label("web", Label(priority=5))  # a commit by the engine itself
    assert assessed(1000.0).priorities["web"].value == 5
    engine.label("web", Label(priority=6))
    assert assessed(1000.0).priorities["web"].value == 6
    other = Journal(tmp_path / "state" / "journal.db")  # another process's connection
    other.record(Event(container="web", at=1000.0, kind=EventKind.EVICTED, size_bytes=MIB))
    other.record(Event(container="web", at=1010.0, kind=EventKind.DISCARDED))
    seen = assessed(1020.0)
    assert seen.histories["web"].eviction_times == (1000.0,)
    assert seen.discards == {"web": 1}
    assert assessed(1000.0 + window).histories["web"].eviction_times == (1000.0,)
    assert "web" not in assessed(1000.0 + window + 1).histories  # aged out
    other.close()


def test_make_room_needs_a_size(engine: Engine) -> None:
    with pytest.raises(ContainerNotFound):
        engine.make_room("ghost", None)  # its memory limit is read from its config
    plan, outcomes = engine.make_room("ghost", 0)
    assert plan.notes == ("it fits already",) and outcomes == []
