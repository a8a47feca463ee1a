"""Prometheus metrics: the gauges follow the latest assessment; the counters and
histograms the engine's outcomes; failure series start at 0."""

from __future__ import annotations

import dataclasses

from evictor.engine import Assessment, Outcome
from evictor.errors import CheckpointFailed, CorruptImage, Phase
from evictor.metrics import Metrics
from evictor.model import (
    CheckVerdict,
    ContainerSample,
    ContainerState,
    History,
    HostSample,
    Pressure,
    Priority,
)
from evictor.monitor import Sample
from evictor.ranking import Action, Plan, TriggerKind


def snapshot(*names: str) -> Assessment:
    """The daemon's view of a host with a running container "a", an evicted "b", and
    running ``names``."""
    host = HostSample(
        total_bytes=8,
        available_bytes=4,
        free_bytes=2,
        cached_bytes=1,
        swap_total_bytes=0,
        swap_free_bytes=0,
        pressure=Pressure(),
    )
    containers = (
        ContainerSample(name="a", state=ContainerState.RUNNING, usage_bytes=1),
        ContainerSample(
            name="b",
            state=ContainerState.STOPPED,
            evicted=True,
            evicted_usage_bytes=1,
            image_bytes=1,
            evicted_at=1.0,
        ),
        *(ContainerSample(name=n, state=ContainerState.RUNNING, usage_bytes=2) for n in names),
    )
    return Assessment(
        sample=Sample(host=host, containers=containers),
        plan=Plan(
            triggers=(),
            critical=False,
            reclaim_target_bytes=0,
            evictions=(),
            standby=(),
            restores=(),
            notes=(),
        ),
        priorities={"a": Priority(value=1, protected=False, source="default")},
        histories={
            "a": History(
                check=CheckVerdict(checkpointable=True, problems=(), at=1.0, config_digest=None)
            )
        },
        managed={},
        store_size_bytes=10,
        store_free_bytes=5,
    )


def test_failure_series_start_at_zero_for_every_container_seen() -> None:
    """A series born at 1 is invisible to increase(): a first failure must count."""
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    metrics.update(snapshot())
    for name in ("a", "b"):
        for cause in ("low_watermark", "host_psi", "important_psi", "budget"):
            labels = {"container": name, "result": "failure", "cause": cause}
            assert value("evictor_evictions_total", labels) == 0
        assert value("evictor_restores_total", {"container": name, "result": "failure"}) == 0
        assert value("evictor_image_rejections_total", {"container": name}) == 0
    assert value("evictor_restores_total", {"container": "c", "result": "failure"}) is None
    metrics.update(snapshot("c"))  # a container that appears later gets them too
    assert value("evictor_restores_total", {"container": "c", "result": "failure"}) == 0


def test_gauges_follow_the_latest_snapshot() -> None:
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    assert value("evictor_host_memory_total_bytes") is None  # nothing sampled yet
    metrics.update(snapshot("c"))
    assert value("evictor_host_memory_available_bytes") == 4
    assert value("evictor_container_memory_usage_bytes", {"container": "c"}) == 2
    assert value("evictor_container_state", {"container": "b", "state": "EVICTED"}) == 1
    assert value("evictor_container_evicted_memory_bytes", {"container": "b"}) == 1
    metrics.update(snapshot())  # "c" is gone: so are its gauges
    assert value("evictor_container_memory_usage_bytes", {"container": "c"}) is None


def test_outcomes_are_counted_and_timed() -> None:
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    evicted = Outcome(
        container="a",
        action=Action.EVICT,
        cause=TriggerKind.BUDGET,
        reason="r",
        memory_bytes=3,
        image_bytes=2,
        duration_seconds=1.5,
        frozen_seconds=0.5,
    )
    failed = Outcome(
        container="b",
        action=Action.EVICT,
        cause=TriggerKind.LOW_WATERMARK,
        reason="r",
        error=CheckpointFailed("b: tty", container="b", phase=Phase.DUMP),
    )
    rejected = Outcome(
        container="c",
        action=Action.RESTORE,
        cause=None,
        reason="r",
        error=CorruptImage("c: pages-1.img does not match its checksum", container="c"),
    )
    for outcome in (evicted, failed, rejected):
        metrics.record(outcome)
    labels = {"container": "a", "result": "success", "cause": "budget"}
    assert value("evictor_evictions_total", labels) == 1
    labels = {"container": "b", "result": "failure", "cause": "low_watermark"}
    assert value("evictor_evictions_total", labels) == 1
    assert value("evictor_checkpoint_duration_seconds_sum") == 1.5  # failures are not timed
    assert value("evictor_checkpoint_frozen_seconds_sum") == 0.5
    assert value("evictor_checkpoint_image_bytes_sum") == 2
    assert value("evictor_restores_total", {"container": "c", "result": "failure"}) == 1
    assert value("evictor_image_rejections_total", {"container": "c"}) == 1
    assert value("evictor_restore_duration_seconds_count") == 0
    assert value("evictor_errors_total", {"kind": "CheckpointFailed"}) == 1
    assert value("evictor_errors_total", {"kind": "CorruptImage"}) == 1


def test_checkpointability_is_exported_while_the_verdict_is_current() -> None:
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    assessment = snapshot("c", "d")
    containers = tuple(
        dataclasses.replace(c, config_digest="v2") for c in assessment.sample.containers
    )
    verdicts = {
        "c": CheckVerdict(checkpointable=False, problems=("tty: ...",), at=1.0, config_digest="v2"),
        "d": CheckVerdict(checkpointable=True, problems=(), at=1.0, config_digest="v1"),  # stale
    }
    metrics.update(
        dataclasses.replace(
            assessment,
            sample=dataclasses.replace(assessment.sample, containers=containers),
            histories={name: History(check=verdict) for name, verdict in verdicts.items()},
        )
    )
    assert value("evictor_container_checkpointable", {"container": "c"}) == 0
    assert value("evictor_container_checkpointable", {"container": "d"}) is None
    assert value("evictor_container_checkpointable", {"container": "a"}) is None  # unchecked


def test_discards_are_a_counter_read_from_the_journal() -> None:
    metrics = Metrics()
    metrics.update(dataclasses.replace(snapshot(), discards={"b": 2}))
    assert metrics.registry.get_sample_value("evictor_discards_total", {"container": "b"}) == 2
