"""``evictor run``: sample, plan and act once per tick, under APScheduler.

Ticks never overlap and never queue up: the job runs at most one instance at a
time and missed runs coalesce into one, so a slow dump delays the next tick
instead of stacking them. SIGTERM or SIGINT stops the daemon between two
actions: a checkpoint or restore under way completes (or rolls back) first.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import signal
import stat
import threading
import time
from types import FrameType
from wsgiref.simple_server import WSGIServer

from apscheduler.schedulers.background import BackgroundScheduler

from evictor import criu, restore
from evictor.config import describe
from evictor.engine import Engine
from evictor.errors import EvictorError, ImageError, LockBusy
from evictor.metrics import Metrics, Snapshot
from evictor.ranking import Decision, Plan
from evictor.reconcile import reconcile

log = logging.getLogger(__name__)


class _SkippedTickFilter(logging.Filter):
    """APScheduler warns whenever a tick is skipped because the last one still runs:
    that is the design here (a slow dump), not a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


def check_private(path: os.PathLike[str] | str, what: str) -> None:
    """Refuse to run from a directory or file others may write to."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise EvictorError(
            f"{what} {path} is writable by group or others"
            f" (mode {stat.S_IMODE(mode):o}): make it root-only"
        )


class Daemon:
    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.stopping = threading.Event()
        self.last_pressure_at: float | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._server: WSGIServer | None = None
        self._lock_fd: int | None = None

    # --- start-up ---

    def start_up(self) -> None:
        """Check the host, settle interrupted work, release drained containers."""
        config = self.engine.config
        log.info("starting: %s", describe(config))
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private(config.state_dir, "state directory")
        self._hold_daemon_lock()
        self.engine.store.ensure()
        criu.check_criu()
        journal = self.engine.journal
        reconcile(self.engine.runtime, self.engine.store, journal)
        for name, managed in journal.managed().items():
            if managed.drained:
                journal.set_drained(name, False)
                log.info("%s: drained before this start; restoring it as memory allows", name)

    def _hold_daemon_lock(self) -> None:
        """One daemon per state directory: a second one fails at once, naming the first."""
        path = self.engine.config.state_dir / "daemon.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockBusy(
                f"another evictor daemon (pid {holder}) is running with state"
                f" directory {self.engine.config.state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd  # held, and so locked, for the daemon's life

    # --- the loop ---

    def tick(self) -> None:
        if self.stopping.is_set():
            return
        started = time.monotonic()
        try:
            self._tick()
        except Exception:
            log.exception("tick failed")
            self.metrics.errors.labels(kind="tick").inc()
        finally:
            self.metrics.tick_seconds.observe(time.monotonic() - started)

    def _tick(self) -> None:
        engine = self.engine
        now = time.time()
        sample = engine.monitor.sample()
        managed = engine.journal.managed()
        held = frozenset(name for name, m in managed.items() if m.drained)
        assessment = engine.assess(sample, now, self.last_pressure_at, held)
        plan = assessment.plan
        if plan.pressure:
            self.last_pressure_at = now
        store_size, store_free = engine.store.capacity()
        self.metrics.update(
            Snapshot(
                sample=sample,
                plan=plan,
                priorities=assessment.priorities,
                managed={name: m.state.value for name, m in managed.items()},
                images_bytes=sum(c.image_bytes or 0 for c in sample.containers),
                store_size_bytes=store_size,
                store_free_bytes=store_free,
            )
        )
        self.act(plan)

    def act(self, plan: Plan) -> None:
        """Carry out the plan's evictions and restores, stopping early when asked to."""
        cause = plan.triggers[0].kind.value if plan.triggers else "none"

        def reason(decision: Decision) -> str:
            return f"{plan.triggers[0]}: {decision.reason}" if plan.triggers else decision.reason

        for outcome in self.engine.evict_in_turn(plan, reason=reason, stopping=self.stopping):
            name = outcome.decision.container
            if outcome.error is not None:
                log.error("eviction of %s failed: %s", name, outcome.error)
                self.metrics.evictions.labels(container=name, result="failure", cause=cause).inc()
                self.metrics.errors.labels(kind=type(outcome.error).__name__).inc()
                continue
            assert outcome.eviction is not None
            self.metrics.evictions.labels(container=name, result="success", cause=cause).inc()
            self.metrics.checkpoint_seconds.observe(outcome.eviction.duration_seconds)
            manifest = outcome.eviction.manifest
            self.metrics.frozen_seconds.observe(manifest.dump_stats.frozen_time_us / 1e6)
            self.metrics.image_bytes.observe(manifest.image_bytes)
        for decision in plan.restores:
            if self.stopping.is_set():
                return
            try:
                restoration = restore.restore(
                    self.engine.runtime, self.engine.store, self.engine.journal, decision.container
                )
            except EvictorError as error:
                log.error("restore of %s failed: %s", decision.container, error)
                if isinstance(error, ImageError):
                    self.metrics.image_rejections.labels(container=decision.container).inc()
                self.metrics.restores.labels(container=decision.container, result="failure").inc()
                self.metrics.errors.labels(kind=type(error).__name__).inc()
                continue
            log.info("restored %s: %s", decision.container, decision.reason)
            self.metrics.restores.labels(container=decision.container, result="success").inc()
            self.metrics.restore_seconds.observe(restoration.duration_seconds)

    # --- running ---

    def start(self) -> None:
        """Start up, serve metrics and schedule the ticks; returns at once."""
        self.start_up()
        self._server = self.metrics.serve(self.engine.config.metrics)
        # APScheduler logs every run at INFO: once a second is noise in the journal.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        logging.getLogger("apscheduler.scheduler").addFilter(_SkippedTickFilter())
        self._scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1})
        interval = self.engine.config.interval_seconds
        self._scheduler.add_job(
            self.tick,
            "interval",
            seconds=interval,
            id="tick",
            next_run_time=datetime.datetime.now(datetime.UTC),
            misfire_grace_time=None,
        )
        self._scheduler.start()
        log.info("running: a tick every %g s", interval)

    def stop(self) -> None:
        """Stop after the action under way, if any, and wait for it."""
        self.stopping.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
        if self._server is not None:
            self._server.shutdown()
        log.info("stopped")

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit code."""

        def request_stop(signum: int, frame: FrameType | None) -> None:
            log.info("%s received: stopping after the current action", signal.Signals(signum).name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        self.start()
        self.stopping.wait()
        self.stop()
        return 0
