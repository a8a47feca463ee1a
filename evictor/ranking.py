"""The decision core: who to evict, who to restore, and why.

Pure: data in, a plan out. No I/O, no clock (``now`` is an argument), no
logging. Every decision carries a reason an operator can read.

Eviction: when any trigger fires, reclaim ``max(high watermark - MemAvailable,
min_reclaim)`` (and, for the budget, enough to get ``min_reclaim`` under it),
evicting candidates lowest priority first; within one priority those whose last
checkpoint did not fail first, then the largest; ties by name. Protected
containers are never candidates; neither is a container restored less than its
cooldown ago, unless memory is critically low, nor one ``evictor check`` found
not checkpointable (with its current config), nor one whose checkpoints failed
lately (an exponential backoff; at critical pressure only failures that may
pass by themselves are retried early). The next candidates stand by: if an
eviction fails, the round goes on with them until the target is met. A tick's
plan names at most ``MOST_EVICTIONS_PER_TICK`` (and as many standing by):
evictions go one at a time, and the next tick plans the rest from a fresh
sample, so a host with thousands of candidates plans in bounded time.

The predictive trigger fires before the low watermark does, when MemAvailable
falls fast enough to cross it sooner than the evictions it would then need can
be made (from the observed eviction throughput); it reclaims the same.

Restore: only when no trigger fires and none has for ``stable_seconds``; the
evicted container of highest priority, and only when its recorded footprint
fits under the high watermark (and the budget) with a margin. One at a time.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
from collections.abc import Iterable, Iterator, Mapping, Sequence

from evictor.config import (
    AntiThrash,
    Config,
    EvictPolicy,
    FailureBackoff,
    Priorities,
    RestorePolicy,
)
from evictor.model import (
    CheckpointFailure,
    ContainerSample,
    ContainerState,
    History,
    HostSample,
    Label,
    MemoryTrend,
    Priority,
)

_MIB = 1 << 20
# Evictions (and standby candidates) a tick's plan names at most: each takes
# 0.3 s or more, so a tick never gets through more; the next tick plans again.
MOST_EVICTIONS_PER_TICK = 16
# A slower fall is noise (other processes, the page cache), not a spike.
MIN_FALL_BYTES_PER_SECOND = 32 * _MIB


class Action(enum.Enum):
    EVICT = "evict"
    RESTORE = "restore"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decision:
    container: str
    action: Action
    priority: int
    size_bytes: int  # expected to be freed (evict) or needed (restore)
    reason: str


class TriggerKind(enum.Enum):
    PREDICTED = "predicted"  # MemAvailable falls fast enough to cross the low watermark soon
    LOW_WATERMARK = "low_watermark"
    HOST_PSI = "host_psi"
    IMPORTANT_PSI = "important_psi"
    BUDGET = "budget"
    MAKE_ROOM = "make_room"  # an operator, or a starting container's hook, asked for room


@dataclasses.dataclass(frozen=True)
class Trigger:
    kind: TriggerKind
    message: str  # for people: what fired, with the figures

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    triggers: tuple[Trigger, ...]  # each firing trigger; empty: no pressure
    critical: bool  # MemAvailable below the critical watermark
    reclaim_target_bytes: int
    evictions: tuple[Decision, ...]
    # Further candidates, in order, for when an eviction above fails: the round
    # goes on with them until the target is met.
    standby: tuple[Decision, ...]
    restores: tuple[Decision, ...]
    notes: tuple[str, ...]  # why the plan does less than one might expect

    @property
    def pressure(self) -> bool:
        return bool(self.triggers)

    @property
    def reclaim_planned_bytes(self) -> int:
        return sum(d.size_bytes for d in self.evictions)


def resolve_priority(name: str, label: Label | None, priorities: Priorities) -> Priority:
    """A label beats the first matching rule, which beats the default (field by field)."""
    rule = next((r for r in priorities.rules if r.matches(name)), None)
    value, protected, source, drain = priorities.default, False, "default", True
    if rule is not None:
        if rule.priority is not None:
            value, source = rule.priority, f"rule {rule.match!r}"
        if rule.protect is not None:
            protected = rule.protect
        if rule.drain is not None:
            drain = rule.drain
    if label is not None:
        if label.priority is not None:
            value, source = label.priority, "label"
        if label.protected is not None:
            protected = label.protected
        if label.drain is not None:
            drain = label.drain
    return Priority(value=value, protected=protected, source=source, drain=drain)


def eviction_cooldown_seconds(history: History, policy: AntiThrash, now: float) -> float:
    """How long after its last restore a container is spared: grows with recent evictions."""
    recent = len([t for t in history.eviction_times if now - t <= policy.window_seconds])
    cooldown = policy.cooldown_seconds * policy.backoff_factor ** max(recent - 1, 0)
    return min(cooldown, policy.max_cooldown_seconds)


def failure_backoff_seconds(failures: int, policy: FailureBackoff) -> float:
    """The wait after ``failures`` failures in a row: doubling, capped."""
    if failures == 0:
        return 0.0
    backoff = policy.failure_backoff_seconds * 2.0 ** min(failures - 1, 30)
    return min(backoff, policy.max_failure_backoff_seconds)


def restore_backoff_seconds(history: History, policy: RestorePolicy) -> float:
    return failure_backoff_seconds(history.restore_failures, policy)


def current_checkpoint_failure(
    sample: ContainerSample, history: History
) -> CheckpointFailure | None:
    """The container's failed checkpoints, unless its config changed since: a new
    config is a new container as far as CRIU is concerned."""
    failure = history.checkpoint_failure
    if failure is None or failure.config_digest != sample.config_digest:
        return None
    return failure


def checkpoint_retry_in(
    sample: ContainerSample, history: History, policy: EvictPolicy, now: float, critical: bool
) -> float | None:
    """Seconds until a container whose checkpoints failed may be tried again, or None
    if it may be tried now. At critical pressure only a cause that may pass by
    itself (a full disk, CRIU killed) is retried early; a tty will not go away."""
    failure = current_checkpoint_failure(sample, history)
    if failure is None or (critical and not failure.persistent):
        return None
    left = failure.at + failure_backoff_seconds(failure.count, policy) - now
    return left if left > 0 else None


def describe_checkpoint_failure(failure: CheckpointFailure) -> str:
    times = "once" if failure.count == 1 else f"{failure.count} times"
    kind = "" if failure.persistent else " (may pass)"
    return f"checkpoint failed {times}{kind}: {failure.reason}"


def _cooling_down(history: History, policy: AntiThrash, now: float) -> float | None:
    """Seconds left in the container's post-restore cooldown, or None if there is none."""
    if history.last_restored_at is None:
        return None
    if now - history.last_restored_at >= policy.max_cooldown_seconds:
        return None  # past any cooldown, however many evictions there were
    left = history.last_restored_at + eviction_cooldown_seconds(history, policy, now) - now
    return left if left > 0 else None


def known_uncheckpointable(sample: ContainerSample, history: History) -> str | None:
    """Why ``evictor check`` found the container not checkpointable, or None if it did
    not (or its config changed since: the verdict is stale)."""
    check = history.check
    if check is None or check.checkpointable or check.config_digest != sample.config_digest:
        return None
    return check.problems[0] if check.problems else "evictor check failed"


def eligibility(
    sample: ContainerSample, priority: Priority, history: History, config: Config, now: float
) -> str:
    """One phrase for ``evictor status``: may evictor evict this container now?"""
    if sample.evicted:
        if history.restore_failures:
            return (
                f"evicted; restore failed {history.restore_failures} time(s):"
                f" {history.restore_failure}"
            )
        return "evicted"
    if sample.stale_image:
        return "stale image: started outside evictor after its eviction; image kept"
    if priority.protected:
        return "protected"
    if sample.state is not ContainerState.RUNNING:
        return "not running"
    unfit = known_uncheckpointable(sample, history)
    if unfit is not None:
        return f"not checkpointable (evictor check): {unfit}"
    left = _cooling_down(history, config.antithrash, now)
    if left is not None:
        return f"cooling down ({left:.0f} s left)"
    failure = current_checkpoint_failure(sample, history)
    if failure is not None:
        retry_in = checkpoint_retry_in(sample, history, config.evict, now, critical=False)
        when = "may be retried now" if retry_in is None else f"retry in {retry_in:.0f} s"
        return f"{describe_checkpoint_failure(failure)}; {when}"
    return "evictable"


def available_slope(samples: Sequence[tuple[float, int]]) -> float | None:
    """MemAvailable's slope in bytes a second, by least squares over ``samples`` of
    (time, bytes); None with fewer than three, or all at one time."""
    if len(samples) < 3:
        return None
    times = [t for t, _ in samples]
    mean_time = sum(times) / len(times)
    mean_bytes = sum(b for _, b in samples) / len(samples)
    spread = sum((t - mean_time) ** 2 for t in times)
    if spread == 0:
        return None
    return sum((t - mean_time) * (b - mean_bytes) for t, b in samples) / spread


def predict(
    available_bytes: int, low_bytes: int, need_bytes: int, trend: MemoryTrend
) -> str | None:
    """Why MemAvailable will cross the low watermark before the evictions it then needs
    could be made, or None if it will not (it is flat or rising, or slow enough).

    MemAvailable at the slope reaches the low watermark in T seconds; ``need_bytes``
    take need / (eviction throughput) seconds to evict. Waiting until the low
    watermark means evicting while the spike goes on: a spike faster than that
    meets the OOM killer. So evictions start once T is the shorter.
    """
    falling = -trend.available_bytes_per_second
    if falling < MIN_FALL_BYTES_PER_SECOND or available_bytes < low_bytes:
        return None
    seconds_to_low = (available_bytes - low_bytes) / falling
    seconds_needed = need_bytes / trend.eviction_bytes_per_second
    if seconds_to_low > seconds_needed:
        return None
    return (
        f"MemAvailable {available_bytes // _MIB} MiB falls at {falling / _MIB:.0f} MiB/s:"
        f" the low watermark ({low_bytes // _MIB} MiB) in {seconds_to_low:.1f} s, sooner than"
        f" the {seconds_needed:.1f} s evicting {need_bytes // _MIB} MiB takes"
        f" ({trend.eviction_bytes_per_second / _MIB:.0f} MiB/s lately)"
    )


def _triggers(
    host: HostSample,
    running: Iterable[ContainerSample],
    priorities: Mapping[str, Priority],
    config: Config,
    trend: MemoryTrend | None,
) -> tuple[list[Trigger], int, set[str]]:
    """The firing triggers, the bytes to reclaim, and the important containers in need."""
    t = config.triggers
    total = host.total_bytes
    high = t.high_watermark.resolve(total)
    min_reclaim = t.min_reclaim.resolve(total)
    watermark_need = max(high - host.available_bytes, min_reclaim)
    triggers: list[Trigger] = []
    need = 0
    low = t.low_watermark.resolve(total)
    if t.predictive and trend is not None:
        why = predict(host.available_bytes, low, watermark_need, trend)
        if why is not None:
            triggers.append(Trigger(TriggerKind.PREDICTED, why))
            need = max(need, watermark_need)
    if host.available_bytes < low:
        triggers.append(
            Trigger(
                TriggerKind.LOW_WATERMARK,
                f"MemAvailable {host.available_bytes // _MIB} MiB is below the low"
                f" watermark {low // _MIB} MiB",
            )
        )
        need = max(need, watermark_need)
    if (
        t.host_psi_some_avg10 is not None
        and host.pressure is not None
        and host.pressure.some_avg10 >= t.host_psi_some_avg10
    ):
        triggers.append(
            Trigger(
                TriggerKind.HOST_PSI,
                f"host memory PSI some avg10 {host.pressure.some_avg10:.1f}% is at or"
                f" above {t.host_psi_some_avg10:g}%",
            )
        )
        need = max(need, watermark_need)
    in_need: dict[str, float] = {}
    if t.important_psi_some_avg10 is not None:
        threshold, important = t.important_psi_some_avg10, t.important_priority
        in_need = {
            s.name: stall
            for s in running
            if (stall := s.pressure.some_avg10 if s.pressure is not None else 0.0) >= threshold
            and priorities[s.name].value >= important
        }
    if in_need:
        worst = heapq.nsmallest(3, [(-stall, name) for name, stall in in_need.items()])
        listed = ", ".join(f"{name} ({-stall:.1f}%)" for stall, name in worst)
        more = f" and {len(in_need) - 3} more" if len(in_need) > 3 else ""
        triggers.append(
            Trigger(
                TriggerKind.IMPORTANT_PSI,
                f"important containers stall on memory (PSI some avg10 >="
                f" {threshold:g}%): {listed}{more}",
            )
        )
        need = max(need, watermark_need)
    if t.budget is not None:
        budget = t.budget.resolve(total)
        used = sum(s.usage_bytes for s in running)
        if used > budget:
            triggers.append(
                Trigger(
                    TriggerKind.BUDGET,
                    f"containers use {used // _MIB} MiB, over the budget of {budget // _MIB} MiB",
                )
            )
            need = max(need, used - budget + min_reclaim)
    return triggers, need, set(in_need)


def plan(
    *,
    host: HostSample,
    containers: Iterable[ContainerSample],
    priorities: Mapping[str, Priority],
    histories: Mapping[str, History],
    config: Config,
    now: float,
    last_pressure_at: float | None,
    held: frozenset[str] = frozenset(),
    trend: MemoryTrend | None = None,
) -> Plan:
    """Decide what to evict or restore now.

    ``priorities`` must hold every container; ``histories`` may lack some (no
    history). ``last_pressure_at`` is when a trigger last fired, None if never.
    ``held`` containers stay evicted whatever the room (drained for a reboot).
    ``trend``, where MemAvailable heads, drives the predictive trigger.
    """
    samples = list(containers)
    running_state = ContainerState.RUNNING  # a local: an enum member is slow to look up
    running = [s for s in samples if s.state is running_state]
    triggers, need, in_need = _triggers(host, running, priorities, config, trend)
    critical = host.available_bytes < config.triggers.critical_watermark.resolve(host.total_bytes)
    notes: list[str] = []
    if triggers:
        evictions, standby = _choose_evictions(
            running,
            priorities,
            histories,
            config,
            now,
            need,
            critical,
            in_need,
            notes,
            most=MOST_EVICTIONS_PER_TICK,
        )
        return Plan(
            triggers=tuple(triggers),
            critical=critical,
            reclaim_target_bytes=need,
            evictions=evictions,
            standby=standby,
            restores=(),
            notes=tuple(notes),
        )
    restores = _choose_restore(
        host,
        [s for s in samples if s.name not in held],
        running,
        priorities,
        histories,
        config,
        now,
        last_pressure_at,
        notes,
    )
    return Plan(
        triggers=(),
        critical=critical,
        reclaim_target_bytes=0,
        evictions=(),
        standby=(),
        restores=restores,
        notes=tuple(notes),
    )


@dataclasses.dataclass
class _Passed:
    """Candidates the ranking passed over, and why, for the plan's notes."""

    spared: list[str] = dataclasses.field(default_factory=list)  # cooling down
    held: list[str] = dataclasses.field(default_factory=list)  # failed checkpoints
    uncheckpointable: list[str] = dataclasses.field(default_factory=list)
    failures: dict[str, CheckpointFailure] = dataclasses.field(default_factory=dict)


def _ranking_keys(
    running: list[ContainerSample],
    priorities: Mapping[str, Priority],
    histories: Mapping[str, History],
    config: Config,
    now: float,
    critical: bool,
    excluded: set[str],
    passed: _Passed,
) -> Iterator[tuple[int, bool, int, str]]:
    """(priority, last checkpoint failed, -usage, name) of each candidate: names are
    unique, so the keys alone order them. Those left out are recorded in ``passed``.

    This loop is the planner's cost on large hosts: most containers have no
    history, and take the short way.
    """
    for sample in running:
        name = sample.name
        priority = priorities[name]
        if priority.protected or sample.stale_image or name in excluded:
            continue
        history = histories.get(name)
        if history is None:
            yield priority.value, False, -sample.usage_bytes, name
            continue
        unfit = known_uncheckpointable(sample, history)
        if unfit is not None:
            passed.uncheckpointable.append(f"{name}: {unfit}")
            continue
        if (
            not critical
            and history.last_restored_at is not None
            and _cooling_down(history, config.antithrash, now) is not None
        ):
            passed.spared.append(name)
            continue
        failure = current_checkpoint_failure(sample, history)
        if failure is not None:
            retry_in = checkpoint_retry_in(sample, history, config.evict, now, critical)
            if retry_in is not None:
                passed.held.append(
                    f"{name}: {describe_checkpoint_failure(failure)}; retry in {retry_in:.0f} s"
                )
                continue
            passed.failures[name] = failure
        yield priority.value, failure is not None, -sample.usage_bytes, name


def _choose_evictions(
    running: list[ContainerSample],
    priorities: Mapping[str, Priority],
    histories: Mapping[str, History],
    config: Config,
    now: float,
    need: int,
    critical: bool,
    excluded: set[str],
    notes: list[str],
    most: int | None = None,
) -> tuple[tuple[Decision, ...], tuple[Decision, ...]]:
    """The evictions that reach ``need``, and as many again standing by; ``most``
    of each, if given."""
    passed = _Passed()
    keys = _ranking_keys(running, priorities, histories, config, now, critical, excluded, passed)
    # With ``most``, no more than 2 * most candidates can be taken: a bounded heap
    # keeps those, and never holds thousands of keys at once (nor wakes the
    # garbage collector for them).
    ranked = sorted(keys) if most is None else heapq.nsmallest(2 * most, keys)
    if passed.spared:
        notes.append(
            f"spared, restored too recently (anti-thrash cooldown): {_listed(passed.spared)}"
        )
    if passed.held:
        notes.append(f"held back after failed checkpoints: {_listed(passed.held, separator='; ')}")
    if passed.uncheckpointable:
        listed = _listed(passed.uncheckpointable, separator="; ")
        notes.append(f"not checkpointable here (evictor check): {listed}")
    chosen: list[Decision] = []
    standby: list[Decision] = []
    reclaimed = standing_by = 0
    for value, failed, negative_usage, name in ranked:
        if standing_by >= need or (most is not None and len(standby) >= most):
            break
        usage = -negative_usage
        why = f"lowest-ranked (priority {value}, {usage // _MIB} MiB)"
        if failed:
            why += f"; its {describe_checkpoint_failure(passed.failures[name])}"
        if reclaimed < need and (most is None or len(chosen) < most):
            reclaimed += usage
            role, decisions = f"reclaiming {need // _MIB} MiB", chosen
        else:
            standing_by += usage
            role, decisions = "stands by in case an eviction above fails", standby
        decisions.append(
            Decision(
                container=name,
                action=Action.EVICT,
                priority=value,
                size_bytes=usage,
                reason=f"{why}; {role}",
            )
        )
    if reclaimed < need and most is not None and len(chosen) >= most:
        notes.append(
            f"{len(chosen)} evictions this tick free {reclaimed // _MIB} of {need // _MIB} MiB;"
            " the next tick plans the rest"
        )
    elif reclaimed < need:
        notes.append(
            f"target not reachable: evicting every candidate frees"
            f" {reclaimed // _MIB} of {need // _MIB} MiB"
        )
    return tuple(chosen), tuple(standby)


def _listed(items: list[str], *, most: int = 5, separator: str = ", ") -> str:
    items = sorted(items)
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return separator.join(items[:most]) + more


def plan_make_room(
    *,
    host: HostSample,
    containers: Iterable[ContainerSample],
    priorities: Mapping[str, Priority],
    histories: Mapping[str, History],
    config: Config,
    now: float,
    target: str,
    expected_bytes: int,
) -> Plan:
    """Evict containers ranked below ``target`` until ``expected_bytes`` more fits.

    It fits when MemAvailable stays above the high watermark (and the budget,
    if any, holds) with the target's memory taken. An operator asked for it,
    so anti-thrash cooldowns do not apply; protected containers and those of
    the target's priority or above are never evicted.
    """
    running = [s for s in containers if s.state is ContainerState.RUNNING]
    t = config.triggers
    total = host.total_bytes
    need = expected_bytes - (host.available_bytes - t.high_watermark.resolve(total))
    if t.budget is not None:
        used = sum(s.usage_bytes for s in running if s.name != target)
        need = max(need, used + expected_bytes - t.budget.resolve(total))
    floor = priorities[target].value if target in priorities else config.priorities.default
    excluded = {s.name for s in running if s.name == target or priorities[s.name].value >= floor}
    notes: list[str] = []
    trigger = Trigger(
        TriggerKind.MAKE_ROOM,
        f"make room for {target} (priority {floor}): {expected_bytes // _MIB} MiB expected",
    )
    if need <= 0:
        return Plan(
            triggers=(trigger,),
            critical=False,
            reclaim_target_bytes=0,
            evictions=(),
            standby=(),
            restores=(),
            notes=("it fits already",),
        )
    evictions, standby = _choose_evictions(
        running, priorities, histories, config, now, need, True, excluded, notes
    )
    return Plan(
        triggers=(trigger,),
        critical=False,
        reclaim_target_bytes=need,
        evictions=evictions,
        standby=standby,
        restores=(),
        notes=tuple(notes),
    )


def _choose_restore(
    host: HostSample,
    samples: list[ContainerSample],
    running: list[ContainerSample],
    priorities: Mapping[str, Priority],
    histories: Mapping[str, History],
    config: Config,
    now: float,
    last_pressure_at: float | None,
    notes: list[str],
) -> tuple[Decision, ...]:
    evicted = [s for s in samples if s.evicted]
    if not evicted:
        return ()
    if last_pressure_at is not None and now - last_pressure_at < config.restore.stable_seconds:
        notes.append(
            f"restores wait until pressure has been gone for"
            f" {config.restore.stable_seconds:g} s"
            f" ({now - last_pressure_at:.0f} s so far)"
        )
        return ()
    empty = History()
    ready = []
    for sample in evicted:
        history = histories.get(sample.name, empty)
        backoff = restore_backoff_seconds(history, config.restore)
        failed_at = history.last_restore_failure_at
        if failed_at is not None and now - failed_at < backoff:
            notes.append(
                f"{sample.name}: restore failed {history.restore_failures} time(s);"
                f" retrying in {failed_at + backoff - now:.0f} s"
            )
            continue
        ready.append(sample)
    if not ready:
        return ()
    head = min(ready, key=lambda s: (-priorities[s.name].value, s.name))
    footprint = head.evicted_usage_bytes or 0
    total = host.total_bytes
    room = (
        host.available_bytes
        - config.triggers.high_watermark.resolve(total)
        - config.restore.margin.resolve(total)
    )
    if config.triggers.budget is not None:
        budget_room = (
            config.triggers.budget.resolve(total)
            - config.triggers.min_reclaim.resolve(total)
            - sum(s.usage_bytes for s in running)
        )
        room = min(room, budget_room)
    if footprint > room:
        notes.append(
            f"{head.name} (priority {priorities[head.name].value}) waits for room:"
            f" needs {footprint // _MIB} MiB, {max(room, 0) // _MIB} MiB free above"
            " the high watermark and margin"
        )
        return ()
    return (
        Decision(
            container=head.name,
            action=Action.RESTORE,
            priority=priorities[head.name].value,
            size_bytes=footprint,
            reason=f"highest-priority evicted container ({footprint // _MIB} MiB);"
            f" {room // _MIB} MiB of room",
        ),
    )
