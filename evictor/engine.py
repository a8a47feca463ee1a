"""Wiring: the adapters and the decision core, built from one Config.

The CLI and the daemon both act through an Engine, so a command and the
daemon see the same priorities, history and plan.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from pathlib import Path

from evictor.config import Config
from evictor.images import ImageStore
from evictor.journal import Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.monitor import DEFAULT_PROC_ROOT, Monitor, Sample
from evictor.ranking import History, Plan, Priority, plan, resolve_priority


@dataclasses.dataclass(frozen=True, kw_only=True)
class Assessment:
    plan: Plan
    priorities: dict[str, Priority]
    histories: dict[str, History]


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
        horizon = max(
            c.antithrash.window_seconds,
            c.antithrash.max_cooldown_seconds,
            c.restore.max_failure_backoff_seconds,
        )
        return self.journal.histories(since=now - horizon)

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
