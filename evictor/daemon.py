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
import threading
import time
from types import FrameType
from wsgiref.simple_server import WSGIServer

from apscheduler.schedulers.background import BackgroundScheduler

from evictor.config import describe
from evictor.engine import Engine
from evictor.errors import LockBusy
from evictor.metrics import Metrics
from evictor.ranking import Action, Plan

log = logging.getLogger(__name__)


class _SkippedTickFilter(logging.Filter):
    """APScheduler warns whenever a tick is skipped because the last one still runs:
    that is the design here (a slow dump), not a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


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
        """Hold the daemon lock, then let the engine check the host and settle."""
        log.info("starting: %s", describe(self.engine.config))
        self.engine.ensure_state_dir()
        self._hold_daemon_lock()
        self.engine.start_up()

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
        now = time.time()
        assessment = self.engine.assess(now=now, last_pressure_at=self.last_pressure_at)
        if assessment.plan.pressure:
            self.last_pressure_at = now
        self.metrics.update(assessment)
        self.act(assessment.plan)

    def act(self, plan: Plan) -> None:
        """Carry out the plan, recording each outcome; stop early when asked to."""
        for outcome in self.engine.carry_out(plan, stopping=self.stopping):
            self.metrics.record(outcome)
            if outcome.error is not None:
                what = "eviction" if outcome.action is Action.EVICT else "restore"
                log.error("%s of %s failed: %s", what, outcome.container, outcome.error)
            elif outcome.action is Action.RESTORE:
                log.info("restored %s: %s", outcome.container, outcome.reason)

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
