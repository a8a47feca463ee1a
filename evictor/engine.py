"""The one way in: every operation on containers, for the CLI and the daemon.

The Engine wires the adapters (LXC and CRIU, the image store, the journal, the
monitor) to the decision core, built from one Config. Each operation returns
values: an Assessment to report on, or an Outcome per container acted on,
from which the daemon makes its metrics and the CLI its output. Neither of
them touches an adapter.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import shlex
import stat
import statistics
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from evictor import checkpoint, criu, reconcile, restore
from evictor.config import Config, Priorities
from evictor.errors import EvictorError, ImageError, PreflightError, UsageError
from evictor.images import ImageStore
from evictor.journal import Journal, ManagedContainer
from evictor.lxc_runtime import LxcRuntime
from evictor.model import (
    CheckVerdict,
    ContainerState,
    History,
    Label,
    MemoryTrend,
    Priority,
    validate_container_name,
)
from evictor.monitor import DEFAULT_PROC_ROOT, Monitor, Sample
from evictor.ranking import (
    Action,
    Decision,
    Plan,
    TriggerKind,
    available_slope,
    eligibility,
    plan,
    plan_make_room,
    resolve_priority,
)
from evictor.restore import Discarded

if TYPE_CHECKING:
    from evictor.diagnosis import Finding, HostFacts
    from evictor.prepare import Prepared

log = logging.getLogger(__name__)

# Others may pass through the state directory, not list it (see ensure_state_dir).
STATE_DIR_MODE = 0o711
# MemAvailable's trend is its slope over this long (a few ticks).
TREND_WINDOW_SECONDS = 3.0
# What an eviction frees a second before any was seen: 1 GiB took 4-5 s under
# pressure here (docs/benchmarks.md), about twice as long as without.
DEFAULT_EVICTION_BYTES_PER_SECOND = 200 * (1 << 20)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Assessment:
    """One look at the host: the sample, the plan made from it, and what it was made of."""

    sample: Sample
    plan: Plan
    priorities: dict[str, Priority]
    histories: dict[str, History]
    managed: dict[str, ManagedContainer]  # what the journal records of each container
    store_size_bytes: int
    store_free_bytes: int
    discards: dict[str, int] = dataclasses.field(default_factory=dict)  # ever, per container

    @property
    def images_bytes(self) -> int:
        return sum(c.image_bytes or 0 for c in self.sample.containers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outcome:
    """What one operation did to one container."""

    container: str
    action: Action
    cause: TriggerKind | None  # the trigger that asked for it; None: an operator's command
    reason: str
    memory_bytes: int = 0  # evict: in use before the dump; restore: the footprint taken back
    image_bytes: int = 0
    duration_seconds: float = 0.0  # evict: preflight to commit; restore: to RUNNING
    frozen_seconds: float = 0.0  # evict: how long CRIU kept the container frozen
    evicted_seconds: float = 0.0  # restore: how long it had been evicted
    error: EvictorError | None = None

    @property
    def succeeded(self) -> bool:
        return self.error is None

    @property
    def image_rejected(self) -> bool:
        """A restore refused because the image is missing or failed verification."""
        return isinstance(self.error, ImageError)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckReport:
    """What ``evictor check`` found for one container."""

    container: str
    findings: tuple[Finding, ...]
    trial: bool  # a real dump was tried
    trial_failure: str | None = None  # CRIU's root cause, when the trial dump failed
    running: bool = True

    @property
    def checkpointable(self) -> bool:
        return not self.findings and self.trial_failure is None

    @property
    def problems(self) -> tuple[str, ...]:
        """One line per problem, as remembered for ``status`` and the planner."""
        lines = tuple(f"{f.code}: {f.problem}" for f in self.findings)
        return lines + ((f"trial dump: {self.trial_failure}",) if self.trial_failure else ())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Drain:
    outcomes: tuple[Outcome, ...]
    # Left running, unless all were asked for: protected ones; those set not to drain
    # (a rule's or a label's drain = false); and those the deadline left no time for.
    protected: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    out_of_time: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class _JournalRead:
    """The journal as an assessment reads it, and when that read still holds."""

    version: tuple[int, int] | None  # Journal.version() then; None: no journal yet
    since: float  # the histories hold the evictions and restores from then on
    labels: dict[str, Label] = dataclasses.field(default_factory=dict)
    histories: dict[str, History] = dataclasses.field(default_factory=dict)
    managed: dict[str, ManagedContainer] = dataclasses.field(default_factory=dict)
    discards: dict[str, int] = dataclasses.field(default_factory=dict)
    eviction_rates: tuple[float, ...]

    def holds(self, version: tuple[int, int], since: float) -> bool:
        """Whether reading again now would give the same: nothing was committed, and
        the events from ``since`` on are the ones held (none has aged out of them)."""
        return version == self.version and self.since <= since <= self._oldest_event_at

    @functools.cached_property
    def _oldest_event_at(self) -> float:
        times = [
            t
            for history in self.histories.values()
            for t in (*history.eviction_times, history.last_restored_at)
            if t is not None
        ]
        return min(times, default=math.inf)


class _Resolved(NamedTuple):
    """A container's priority, and what it was resolved from."""

    rules: Priorities
    label: Label | None
    priority: Priority


class Engine:
    def __init__(
        self,
        config: Config,
        *,
        proc_root: Path = DEFAULT_PROC_ROOT,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
    ) -> None:
        self.config = config
        self._proc_root, self._cgroup_root = proc_root, cgroup_root
        self._runtime = LxcRuntime(config.lxc_path, proc_root=proc_root, cgroup_root=cgroup_root)
        self._store = ImageStore(config.image_dir)
        self._monitor = Monitor(self._runtime, self._store, proc_root)
        self._resolved_priorities: dict[str, _Resolved] = {}
        self._journal_read: _JournalRead | None = None
        self._store.remove_set_aside()  # what a killed evictor left

    @functools.cached_property
    def _journal(self) -> Journal:
        """Opened on first use, so that read-only commands on a fresh host create nothing."""
        self._make_state_dir()
        return Journal(self.config.state_dir / "journal.db")

    def _make_state_dir(self) -> None:
        state_dir = self.config.state_dir
        if not state_dir.exists():
            state_dir.mkdir(parents=True)
            os.chmod(state_dir, STATE_DIR_MODE)

    def ensure_state_dir(self) -> None:
        """Make the state directory, or refuse one others may write to; let others pass
        through it (an unprivileged container's root reaches its image), not list it."""
        self._make_state_dir()
        check_private(self.config.state_dir, "state directory")
        os.chmod(self.config.state_dir, STATE_DIR_MODE)

    def close(self) -> None:
        self._monitor.close()
        if "_journal" in self.__dict__:
            self._journal.close()

    def _has_journal(self) -> bool:
        return "_journal" in self.__dict__ or (self.config.state_dir / "journal.db").exists()

    # --- what the planner reads ---

    def priorities(self, names: Iterable[str]) -> dict[str, Priority]:
        labels = self._labels()
        return {n: resolve_priority(n, labels.get(n), self.config.priorities) for n in names}

    def _labels(self) -> dict[str, Label]:
        return self._journal.labels() if self._has_journal() else {}

    def _read_journal(self, now: float) -> _JournalRead:
        """What an assessment needs of the journal. Kept, and read again only when the
        journal has changed (a commit, by any process) or an event the histories
        hold has aged out of them: an idle daemon's ticks read it once."""
        since = now - self._history_horizon_seconds()
        if not self._has_journal():
            return _JournalRead(version=None, since=since, eviction_rates=())
        version = self._journal.version()
        kept = self._journal_read
        if kept is not None and kept.holds(version, since):
            return kept
        self._journal_read = _JournalRead(
            version=version,
            since=since,
            labels=self._journal.labels(),
            histories=self._journal.histories(since=since),
            managed=self._journal.managed(),
            discards=self._journal.discards(),
            eviction_rates=tuple(self._journal.eviction_rates(last=10)),
        )
        return self._journal_read

    def _histories(self, now: float) -> dict[str, History]:
        if not self._has_journal():
            return {}
        return self._journal.histories(since=now - self._history_horizon_seconds())

    def _trend(
        self,
        now: float,
        available_bytes: int,
        recent: Sequence[tuple[float, int]],
        rates: Sequence[float],
    ) -> MemoryTrend | None:
        """MemAvailable's slope over the last TREND_WINDOW_SECONDS, and the eviction
        throughput lately (the median of the last few ``rates``; a cautious default at
        first)."""
        samples = [(t, b) for t, b in recent if now - t <= TREND_WINDOW_SECONDS]
        slope = available_slope([*samples, (now, available_bytes)])
        if slope is None:
            return None
        return MemoryTrend(
            available_bytes_per_second=slope,
            eviction_bytes_per_second=(
                statistics.median(rates) if rates else DEFAULT_EVICTION_BYTES_PER_SECOND
            ),
        )

    def _managed(self) -> dict[str, ManagedContainer]:
        return self._journal.managed() if self._has_journal() else {}

    # --- looking ---

    def sample(self, *, detail: bool = True) -> Sample:
        return self._monitor.sample(detail=detail)

    def assess(
        self,
        *,
        now: float,
        last_pressure_at: float | None,
        recent_available: Sequence[tuple[float, int]] = (),
        detail: bool = True,
    ) -> Assessment:
        """Sample the host and plan; ``last_pressure_at`` is when a trigger last fired,
        ``recent_available`` MemAvailable at the last ticks, (time, bytes), for the trend;
        ``detail``: sample the containers' working sets and limits too (Monitor.sample).

        Drained containers stay evicted whatever the room (until a restart or
        ``resume``). The journal is read once, for the plan and for whoever
        reports on it.
        """
        journal = self._read_journal(now)
        labels = journal.labels
        rules = self.config.priorities
        # Kept from one assessment to the next: a priority changes only with its
        # label or the config, and is resolved again only then.
        last = self._resolved_priorities
        resolved: dict[str, _Resolved] = {}

        def priority(name: str) -> Priority:
            known = resolved.get(name)
            if known is None:
                label = labels.get(name)
                known = last.get(name)
                if known is None or known.rules is not rules or known.label != label:
                    known = _Resolved(rules, label, resolve_priority(name, label, rules))
                resolved[name] = known
            return known.priority

        triggers = self.config.triggers

        def important(name: str) -> bool:
            """Whose PSI a tick reads: the containers whose own PSI is a trigger."""
            return (
                triggers.important_psi_some_avg10 is not None
                and priority(name).value >= triggers.important_priority
            )

        sample = self._monitor.sample(detail=detail, wants_pressure=None if detail else important)
        trend = self._trend(
            now, sample.host.available_bytes, recent_available, journal.eviction_rates
        )
        priorities = {c.name: priority(c.name) for c in sample.containers}
        self._resolved_priorities = resolved
        histories, managed = journal.histories, journal.managed
        store_size_bytes, store_free_bytes = self._store.capacity()
        return Assessment(
            sample=sample,
            plan=plan(
                host=sample.host,
                containers=sample.containers,
                priorities=priorities,
                histories=histories,
                config=self.config,
                now=now,
                last_pressure_at=last_pressure_at,
                held=frozenset(name for name, m in managed.items() if m.drained),
                trend=trend,
            ),
            priorities=priorities,
            histories=histories,
            managed=managed,
            store_size_bytes=store_size_bytes,
            store_free_bytes=store_free_bytes,
            discards=journal.discards,
        )

    def standing(self, assessment: Assessment, now: float) -> dict[str, str]:
        """May the planner evict each container now? One phrase each, for ``status``
        (made on demand: a tick does not need it)."""
        empty = History()
        return {
            c.name: eligibility(
                c,
                assessment.priorities[c.name],
                assessment.histories.get(c.name, empty),
                self.config,
                now,
            )
            for c in assessment.sample.containers
        }

    # --- acting on one container ---

    def evict(
        self,
        name: str,
        *,
        cause: TriggerKind | None = None,
        reason: str = "operator request",
        drained: bool = False,
    ) -> Outcome:
        """Checkpoint ``name`` to disk and stop it; on failure it is left RUNNING."""
        validate_container_name(name)
        try:
            done = checkpoint.evict(
                self._runtime,
                self._store,
                self._journal,
                name,
                reason=reason,
                drained=drained,
            )
        except UsageError:
            raise
        except EvictorError as error:
            return Outcome(
                container=name, action=Action.EVICT, cause=cause, reason=reason, error=error
            )
        manifest = done.manifest
        return Outcome(
            container=name,
            action=Action.EVICT,
            cause=cause,
            reason=reason,
            memory_bytes=manifest.memory_usage_bytes,
            image_bytes=manifest.image_bytes,
            duration_seconds=done.duration_seconds,
            frozen_seconds=manifest.dump_stats.frozen_time_us / 1e6,
        )

    def restore(
        self, name: str, *, cause: TriggerKind | None = None, reason: str = "operator request"
    ) -> Outcome:
        """Verify ``name``'s image and restore it; on failure the image is kept."""
        validate_container_name(name)
        try:
            done = restore.restore(self._runtime, self._store, self._journal, name)
        except UsageError:
            raise
        except EvictorError as error:
            return Outcome(
                container=name, action=Action.RESTORE, cause=cause, reason=reason, error=error
            )
        self._store.remove_set_aside()
        return Outcome(
            container=name,
            action=Action.RESTORE,
            cause=cause,
            reason=reason,
            memory_bytes=done.manifest.memory_usage_bytes,
            image_bytes=done.manifest.image_bytes,
            duration_seconds=done.duration_seconds,
            evicted_seconds=done.evicted_seconds,
        )

    def check(self, name: str, *, trial: bool = False) -> CheckReport:
        """Is ``name`` checkpointable here? Every reason it is not, with its remedy,
        from its config, rootfs and tasks (nothing frozen); ``trial`` adds a real dump
        that leaves it running. The verdict is remembered for the planner and status."""
        from evictor import inspection  # imported here: the CLI starts faster
        from evictor.diagnosis import diagnose

        validate_container_name(name)
        facts = inspection.container_facts(self._runtime, name, proc_root=self._proc_root)
        report = CheckReport(
            container=name,
            findings=diagnose(facts, self._host_facts()),
            trial=trial and facts.running,
            running=facts.running,
        )
        if report.trial:
            failure = checkpoint.trial_dump(self._runtime, self._store, name)
            if failure is not None:
                report = dataclasses.replace(
                    report, trial_failure=str(failure).removeprefix(f"{name}: ")
                )
        self._journal.record_check(
            name,
            CheckVerdict(
                checkpointable=report.checkpointable,
                problems=report.problems,
                at=time.time(),
                config_digest=self._runtime.config_digest(name),
                trial=report.trial,
            ),
        )
        return report

    def prepare(
        self, name: str, *, undo: bool = False, dry_run: bool = False, restart: bool = False
    ) -> Prepared:
        """Apply the remedies ``check`` marks safe (or undo them); restart the container
        so that they apply, if asked to."""
        from evictor import prepare as preparing  # imported here: the CLI starts faster

        if undo:
            prepared = preparing.undo(self._runtime, self._store, name, dry_run=dry_run)
        else:
            prepared = preparing.prepare(
                self._runtime,
                self._store,
                self._host_facts(),
                name,
                guard_hook=self.guard_hook(),
                dry_run=dry_run,
            )
        if restart and not dry_run and prepared.changed and prepared.running:
            self._runtime.restart(name)
            prepared = dataclasses.replace(prepared, restarted=True)
        return prepared

    def reconfigure(self, config: Config) -> None:
        """Act on ``config`` from now on (a reload); its LXC path and state directory
        must be the ones the adapters were built for."""
        for key in ("lxc_path", "state_dir"):
            if getattr(config, key) != getattr(self.config, key):
                raise UsageError(f"{key} changed: restart evictor to apply it")
        self.config = config

    def prune_journal(self, *, now: float) -> int:
        """Forget the history the planner no longer needs; return how many events."""
        return self._journal.prune(before=now - self._history_horizon_seconds())

    def _history_horizon_seconds(self) -> float:
        """How far back the planner reads evictions and restores (anti-thrash)."""
        c = self.config
        return max(c.antithrash.window_seconds, c.antithrash.max_cooldown_seconds)

    def guard_hook(self) -> str:
        """The LXC pre-start hook line that refuses a cold start while the container
        holds a committed image (``lxc.hook.pre-start = ...``)."""
        from importlib import resources  # imported here: the CLI starts faster

        guard = resources.files("evictor").joinpath("hooks/evictor-guard")
        return f"{shlex.quote(str(guard))} {shlex.quote(str(self.config.state_dir))}"

    def _host_facts(self) -> HostFacts:
        from evictor import inspection  # imported here: the CLI starts faster

        return inspection.host_facts(proc_root=self._proc_root, cgroup_root=self._cgroup_root)

    def discard(self, name: str) -> Discarded:
        """Remove ``name``'s committed image on purpose: it starts cold from now on."""
        return restore.discard(self._runtime, self._store, self._journal, name)

    def label(self, name: str, label: Label) -> Priority:
        """Merge ``label`` into the container's label; return its effective priority."""
        self._journal.set_label(validate_container_name(name), label)
        return self.priorities([name])[name]

    def clear_label(self, name: str) -> None:
        self._journal.clear_label(validate_container_name(name))

    # --- acting on a plan ---

    def carry_out(self, plan: Plan, *, stopping: threading.Event) -> Iterator[Outcome]:
        """Carry out a plan, yielding each outcome as it happens; stop early when
        ``stopping`` is set (an operation under way completes first).

        Evictions go in turn until the reclaim target is met: one that fails is
        made up for by the next candidate, from the plan's standby list when its
        own are used up. (One at a time: two dumps at once took twice as long
        each under pressure here, and freed memory later; docs/benchmarks.md.)
        """
        cause = plan.triggers[0].kind if plan.triggers else None
        evicted_bytes = 0
        for decision in (*plan.evictions, *plan.standby):
            if evicted_bytes >= plan.reclaim_target_bytes or stopping.is_set():
                return
            outcome = self.evict(decision.container, cause=cause, reason=_why(plan, decision))
            if outcome.succeeded:
                evicted_bytes += decision.size_bytes
            yield outcome
        for decision in plan.restores:
            if stopping.is_set():
                return
            yield self.restore(decision.container, cause=cause, reason=decision.reason)

    def make_room(self, name: str, expected_bytes: int | None) -> tuple[Plan, list[Outcome]]:
        """Evict containers ranked below ``name`` until ``expected_bytes`` (default: its
        memory limit) fits; return the plan and what was done. ``name`` may be starting
        (its pre-start hook asking), so it is not sampled."""
        validate_container_name(name)
        if expected_bytes is None:
            expected_bytes = self._runtime.memory_limit_bytes(name)
            if expected_bytes is None:
                raise UsageError(
                    f"{name}: has no memory limit in its LXC config; pass --bytes SIZE"
                )
        sample = self._monitor.sample(skip=frozenset({name}))
        now = time.time()
        names = {c.name for c in sample.containers} | {name}
        room = plan_make_room(
            host=sample.host,
            containers=sample.containers,
            priorities=self.priorities(names),
            histories=self._histories(now),
            config=self.config,
            now=now,
            target=name,
            expected_bytes=expected_bytes,
        )
        return room, list(self.carry_out(room, stopping=threading.Event()))

    def drain(self, *, include_all: bool, deadline: float | None = None) -> Drain:
        """Checkpoint every running container but protected ones and those set to stay
        (``drain = false``), or all of them; lowest priority first; and hold them evicted
        until the daemon restarts or ``resume``. None is begun after ``deadline``
        (``time.monotonic()``)."""
        containers = self.sample().containers
        priorities = self.priorities(c.name for c in containers)
        running = [c for c in containers if c.state is ContainerState.RUNNING]
        chosen = sorted(
            (
                c
                for c in running
                if include_all or (priorities[c.name].drain and not priorities[c.name].protected)
            ),
            key=lambda c: (priorities[c.name].value, c.name),
        )
        outcomes = []
        for container in chosen:
            if deadline is not None and time.monotonic() > deadline:
                log.warning("drain: out of time, %s and the rest left running", container.name)
                break
            outcomes.append(self.evict(container.name, reason="drain", drained=True))
        tried = {o.container for o in outcomes}
        left = [c.name for c in running if c not in chosen]
        return Drain(
            outcomes=tuple(outcomes),
            protected=tuple(n for n in left if priorities[n].protected),
            kept=tuple(n for n in left if not priorities[n].protected),
            out_of_time=tuple(c.name for c in chosen if c.name not in tried),
        )

    def resume(self, names: list[str]) -> list[Outcome]:
        """Restore ``names`` (default: every drained container), highest priority first."""
        for name in names:
            validate_container_name(name)
        if not names:
            names = [n for n, m in self._managed().items() if m.drained]
        priorities = self.priorities(names)
        ordered = sorted(names, key=lambda n: (-priorities[n].value, n))
        return [self.restore(name, reason="resume") for name in ordered]

    # --- the daemon's start ---

    def start_up(self) -> None:
        """Check the host, settle what was interrupted, release drained containers."""
        self.ensure_state_dir()
        self._store.ensure()
        criu.check_criu(verdict_file=self._store.criu_verdict_path)
        journal = self._journal
        reconcile.reconcile(self._runtime, self._store, journal)
        for name, managed in journal.managed().items():
            if managed.drained:
                journal.set_drained(name, False)
                log.info("%s: drained before this start; restoring it as memory allows", name)


def _why(plan: Plan, decision: Decision) -> str:
    return f"{plan.triggers[0]}: {decision.reason}" if plan.triggers else decision.reason


def check_private(path: os.PathLike[str] | str, what: str) -> None:
    """Refuse to run from a directory or file others may write to."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PreflightError(
            f"{what} {path} is writable by group or others"
            f" (mode {stat.S_IMODE(mode):o}): make it root-only"
        )
