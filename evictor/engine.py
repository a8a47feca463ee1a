"""Wiring: the adapters and the decision core, built from one Config.

The CLI and the daemon both act through an Engine, so a command and the
daemon see the same priorities, history and plan.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from evictor import checkpoint
from evictor.config import Config
from evictor.errors import EvictorError
from evictor.images import ImageStore
from evictor.journal import Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.monitor import DEFAULT_PROC_ROOT, Monitor, Sample
from evictor.ranking import Decision, History, Plan, Priority, plan, resolve_priority


@dataclasses.dataclass(frozen=True, kw_only=True)
class Assessment:
    plan: Plan
    priorities: dict[str, Priority]
    histories: dict[str, History]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvictionOutcome:
    """One planned eviction, done (``eviction``) or failed (``error``)."""

    decision: Decision
    eviction: checkpoint.Eviction | None = None
    error: EvictorError | None = None


class Engine:
    def __init__(
        self,
        config: Config,
        *,
        proc_root: Path = DEFAULT_PROC_ROOT,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
    ) -> None:
        self.config = config
        self.runtime = LxcRuntime(config.lxc_path, proc_root=proc_root, cgroup_root=cgroup_root)
        self.store = ImageStore(config.image_dir)
        self.monitor = Monitor(self.runtime, self.store, proc_root)

    @functools.cached_property
    def journal(self) -> Journal:
        """Opened on first use, so that read-only commands on a fresh host create nothing."""
        return Journal(self.config.state_dir / "journal.db")

    def priorities(self, names: Iterable[str]) -> dict[str, Priority]:
        labels = self.journal.labels() if self._has_journal() else {}
        return {n: resolve_priority(n, labels.get(n), self.config.priorities) for n in names}

    def histories(self, now: float) -> dict[str, History]:
        if not self._has_journal():
            return {}
        c = self.config
        horizon = max(c.antithrash.window_seconds, c.antithrash.max_cooldown_seconds)
        return self.journal.histories(since=now - horizon)

    def evict_in_turn(
        self, plan: Plan, *, reason: Callable[[Decision], str], stopping: threading.Event
    ) -> Iterator[EvictionOutcome]:
        """Evict the plan's candidates in turn until its reclaim target is met.

        An eviction that fails is made up for by the next candidate, from the
        plan's standby list when its own are used up. Yields each outcome as it
        happens; stops early when ``stopping`` is set.
        """
        evicted_bytes = 0
        for decision in (*plan.evictions, *plan.standby):
            if evicted_bytes >= plan.reclaim_target_bytes or stopping.is_set():
                return
            try:
                eviction = checkpoint.evict(
                    self.runtime,
                    self.store,
                    self.journal,
                    decision.container,
                    reason=reason(decision),
                )
            except EvictorError as error:
                yield EvictionOutcome(decision=decision, error=error)
                continue
            evicted_bytes += decision.size_bytes
            yield EvictionOutcome(decision=decision, eviction=eviction)

    def assess(
        self,
        sample: Sample,
        now: float,
        last_pressure_at: float | None,
        held: frozenset[str] = frozenset(),
    ) -> Assessment:
        """The plan for ``sample``, with the priorities and histories it was made from
        (read from the journal once, for the plan and for whoever reports on it)."""
        priorities = self.priorities(c.name for c in sample.containers)
        histories = self.histories(now)
        return Assessment(
            plan=plan(
                host=sample.host,
                containers=sample.containers,
                priorities=priorities,
                histories=histories,
                config=self.config,
                now=now,
                last_pressure_at=last_pressure_at,
                held=held,
            ),
            priorities=priorities,
            histories=histories,
        )

    def _has_journal(self) -> bool:
        return "journal" in self.__dict__ or (self.config.state_dir / "journal.db").exists()
