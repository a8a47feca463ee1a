"""Prometheus metrics: every eviction and restore, and the state of the host.

Counters and histograms are made from the engine's outcomes as they happen;
gauges are read from the daemon's latest assessment at scrape time, so a container that disappears
disappears from the gauges too. Names follow Prometheus conventions: the
``evictor_`` prefix, base units (bytes, seconds, ratios), ``_total`` counters.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from evictor.config import Metrics as MetricsConfig
from evictor.engine import Assessment, Outcome
from evictor.model import Managed
from evictor.ranking import Action, TriggerKind

log = logging.getLogger(__name__)

_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
# evictor's own states that say more than LXC's (which shows them STOPPED or RUNNING)
_IN_FLIGHT_OR_FAILED = (Managed.EVICTING, Managed.RESTORING, Managed.FAILED)
_BYTES_BUCKETS = tuple(float(1 << n) for n in range(20, 38, 2))  # 1 MiB .. 64 GiB
# The causes of the daemon's own evictions (make-room runs in the CLI)
_DAEMON_CAUSES = tuple(kind.value for kind in TriggerKind if kind is not TriggerKind.MAKE_ROOM)


class _Gauges(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._assessment: Assessment | None = None

    def update(self, assessment: Assessment) -> None:
        with self._lock:
            self._assessment = assessment

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = self._assessment
        if snapshot is None:
            return
        host = snapshot.sample.host
        yield GaugeMetricFamily(
            "evictor_host_memory_total_bytes", "MemTotal", value=host.total_bytes
        )
        yield GaugeMetricFamily(
            "evictor_host_memory_available_bytes",
            "MemAvailable plus the per-CPU free lists",
            value=host.available_bytes,
        )
        yield GaugeMetricFamily(
            "evictor_host_memory_free_bytes",
            "MemFree plus the per-CPU free lists",
            value=host.free_bytes,
        )
        yield GaugeMetricFamily("evictor_host_page_cache_bytes", "Cached", value=host.cached_bytes)
        psi = GaugeMetricFamily(
            "evictor_host_memory_pressure_ratio",
            "Host memory PSI as a ratio of wall time",
            labels=["kind", "window"],
        )
        if host.pressure is not None:
            for kind in ("some", "full"):
                for window in ("avg10", "avg60"):
                    value = getattr(host.pressure, f"{kind}_{window}") / 100
                    psi.add_metric([kind, window], value)
        yield psi
        yield GaugeMetricFamily(
            "evictor_pressure", "1 while any trigger fires", value=float(snapshot.plan.pressure)
        )
        yield GaugeMetricFamily(
            "evictor_images_bytes", "Bytes of committed images on disk", value=snapshot.images_bytes
        )
        yield GaugeMetricFamily(
            "evictor_image_store_size_bytes",
            "Size of the filesystem holding the image store",
            value=snapshot.store_size_bytes,
        )
        yield GaugeMetricFamily(
            "evictor_image_store_free_bytes",
            "Free bytes on the filesystem holding the image store",
            value=snapshot.store_free_bytes,
        )
        memory = GaugeMetricFamily(
            "evictor_container_memory_usage_bytes",
            "Memory charged to the container's cgroup (0 if stopped)",
            labels=["container"],
        )
        footprint = GaugeMetricFamily(
            "evictor_container_evicted_memory_bytes",
            "Usage recorded when the container was evicted",
            labels=["container"],
        )
        priority = GaugeMetricFamily(
            "evictor_container_priority",
            "Effective priority",
            labels=["container", "source", "protected"],
        )
        state = GaugeMetricFamily(
            "evictor_container_state",
            "1 for the container's current state as evictor sees it",
            labels=["container", "state"],
        )
        evicted_at = GaugeMetricFamily(
            "evictor_container_evicted_timestamp_seconds",
            "When the container was evicted",
            labels=["container"],
        )
        for container in snapshot.sample.containers:
            name = container.name
            memory.add_metric([name], container.usage_bytes)
            if container.evicted:
                footprint.add_metric([name], container.evicted_usage_bytes or 0)
                evicted_at.add_metric([name], container.evicted_at or 0)
            p = snapshot.priorities.get(name)
            if p is not None:
                priority.add_metric([name, p.source, str(p.protected).lower()], p.value)
            managed = snapshot.managed.get(name)
            if managed is not None and managed.state in _IN_FLIGHT_OR_FAILED:
                shown = managed.state.value
            else:
                shown = "EVICTED" if container.evicted else container.state.value
            state.add_metric([name, shown], 1)
        checkpointable = GaugeMetricFamily(
            "evictor_container_checkpointable",
            "1 if `evictor check` found the container checkpointable with its current config,"
            " 0 if not; absent until it is checked",
            labels=["container"],
        )
        for container in snapshot.sample.containers:
            history = snapshot.histories.get(container.name)
            check = history.check if history is not None else None
            if check is not None and check.config_digest == container.config_digest:
                checkpointable.add_metric([container.name], float(check.checkpointable))
        discards = CounterMetricFamily(
            "evictor_discards",
            "Images removed on purpose (evictor discard): the container started cold",
            labels=["container"],
        )
        for name, count in sorted(snapshot.discards.items()):
            discards.add_metric([name], count)
        yield from (memory, footprint, priority, state, evicted_at, checkpointable, discards)


class Metrics:
    """All of evictor's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.evictions = Counter(
            "evictor_evictions", "Evictions attempted", ["container", "result", "cause"], registry=r
        )
        self.restores = Counter(
            "evictor_restores", "Restores attempted", ["container", "result"], registry=r
        )
        self.checkpoint_seconds = Histogram(
            "evictor_checkpoint_duration_seconds",
            "Whole evictions: preflight, dump, seal and commit",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.frozen_seconds = Histogram(
            "evictor_checkpoint_frozen_seconds",
            "How long CRIU kept the container frozen",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.image_bytes = Histogram(
            "evictor_checkpoint_image_bytes",
            "Image size per eviction",
            buckets=_BYTES_BUCKETS,
            registry=r,
        )
        self.restore_seconds = Histogram(
            "evictor_restore_duration_seconds",
            "Whole restores: verification, CRIU and the wait",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.image_rejections = Counter(
            "evictor_image_rejections",
            "Restores refused because the image failed verification (corrupt, truncated,"
            " missing files, tampered manifest); the image is kept",
            ["container"],
            registry=r,
        )
        self.errors = Counter("evictor_errors", "Errors by kind", ["kind"], registry=r)
        self.tick_seconds = Histogram(
            "evictor_tick_duration_seconds",
            "One sample-plan-act tick",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 120),
            registry=r,
        )
        self._gauges = _Gauges()
        r.register(self._gauges)
        self._known: set[str] = set()  # containers whose failure series exist

    def update(self, assessment: Assessment) -> None:
        """The gauges now report ``assessment``."""
        self._gauges.update(assessment)
        for container in assessment.sample.containers:
            if container.name not in self._known:
                self._known.add(container.name)
                self._start_failure_series(container.name)

    def record(self, outcome: Outcome) -> None:
        """Count one eviction or restore, and time it."""
        container, result = outcome.container, "success" if outcome.succeeded else "failure"
        if outcome.error is not None:
            self.errors.labels(kind=type(outcome.error).__name__).inc()
        if outcome.action is Action.EVICT:
            cause = outcome.cause.value if outcome.cause is not None else "operator"
            self.evictions.labels(container=container, result=result, cause=cause).inc()
            if outcome.succeeded:
                self.checkpoint_seconds.observe(outcome.duration_seconds)
                self.frozen_seconds.observe(outcome.frozen_seconds)
                self.image_bytes.observe(outcome.image_bytes)
            return
        self.restores.labels(container=container, result=result).inc()
        if outcome.image_rejected:
            self.image_rejections.labels(container=container).inc()
        if outcome.succeeded:
            self.restore_seconds.observe(outcome.duration_seconds)

    def _start_failure_series(self, container: str) -> None:
        """Show a container's failure counters at 0 from the first tick that sees it:
        a series that is born at 1 is invisible to ``increase()`` until its second
        sample, and a first failure would raise no alert."""
        for cause in _DAEMON_CAUSES:
            self.evictions.labels(container=container, result="failure", cause=cause)
        self.restores.labels(container=container, result="failure")
        self.image_rejections.labels(container=container)

    def serve(self, config: MetricsConfig) -> WSGIServer | None:
        """Serve /metrics on the configured address; None when metrics are off."""
        if not config.enabled:
            return None
        server, _ = start_http_server(config.port, addr=config.address, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", config.address, config.port)
        return server
