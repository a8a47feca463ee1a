"""``evictor run``: sample, plan and act once per tick, under APScheduler.

SIGHUP reloads the config (validated first; a bad one is refused and the
running one kept); the journal is pruned of what the planner no longer needs
at start and hourly. With ``[shutdown] drain``, a stop (at host shutdown, or
any) checkpoints every evictable container before the daemon exits.

Ticks never overlap and never queue up: they run in the scheduler's own thread
and missed runs coalesce into one, so a slow dump delays the next tick instead
of stacking them. SIGTERM or SIGINT stops the daemon between two
actions: a checkpoint or restore under way completes (or rolls back) first.
"""

from __future__ import annotations

import collections
import datetime
import fcntl
import logging
import math
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from wsgiref.simple_server import WSGIServer

from apscheduler.executors.debug import DebugExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from evictor import command_server
from evictor.config import Config, describe
from evictor.engine import Engine
from evictor.errors import EvictorError, LockBusy, UsageError
from evictor.inspection import host_shutting_down
from evictor.metrics import Metrics
from evictor.ranking import Action, Plan

log = logging.getLogger(__name__)


# The journal is pruned this often (and at start).
PRUNE_INTERVAL_SECONDS = 3600.0
# Ticks of MemAvailable kept for its trend (the engine uses the last few seconds).
RECENT_AVAILABLE_TICKS = 64


class Daemon:
    """``load_config`` gives the config anew, for a reload (SIGHUP); None: no reloads.
    With ``commands``, the daemon runs ``evictor`` commands in its command server;
    None: no server."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        load_config: Callable[[], Config] | None = None,
        commands: command_server.Commands | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.load_config = load_config
        self.commands = commands
        self._command_server: command_server.CommandServer | None = None
        self.stopping = threading.Event()
        self.last_pressure_at: float | None = None
        self._pruned_at = -math.inf
        # MemAvailable at the last ticks, (time, bytes), for its trend.
        self._recent_available: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=RECENT_AVAILABLE_TICKS
        )
        # Held by a tick, and by a reload: the config never changes under a tick.
        self._tick_lock = threading.Lock()
        self._reload_asked = threading.Event()  # by a SIGHUP: see ask_reload
        self._scheduler: BackgroundScheduler | None = None
        self._server: WSGIServer | None = None
        self._lock_fd: int | None = None
        self._signal_pipe: tuple[int, ...] = ()  # (read, write): see run

    # --- start-up ---

    def start_up(self) -> None:
        """Hold the daemon lock, start the command server (while this process has one
        thread and no journal open), then let the engine check the host and settle."""
        log.info("starting: %s", describe(self.engine.config))
        self.engine.ensure_state_dir()
        self._hold_daemon_lock()
        if self.commands is not None and self._lock_fd is not None:
            self._command_server = command_server.start(
                self.commands, close_fds=(self._lock_fd, *self._signal_pipe)
            )
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
            with self._tick_lock:
                self._reload_if_asked()
                self._tick()
        except Exception:
            log.exception("tick failed")
            self.metrics.errors.labels(kind="tick").inc()
        finally:
            self.metrics.tick_seconds.observe(time.monotonic() - started)

    def _tick(self) -> None:
        now = time.time()
        if now - self._pruned_at >= PRUNE_INTERVAL_SECONDS:
            self._pruned_at = now
            if forgotten := self.engine.prune_journal(now=now):
                log.info("journal: forgot %d events the planner no longer needs", forgotten)
        assessment = self.engine.assess(
            now=now,
            last_pressure_at=self.last_pressure_at,
            recent_available=tuple(self._recent_available),
            detail=False,
        )
        self._recent_available.append((now, assessment.sample.host.available_bytes))
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
        # The ticks run in the scheduler's own thread (its debug executor), not handed
        # to a pool: one thread fewer to wake each tick, and never two ticks at once.
        self._scheduler = BackgroundScheduler(
            executors={"default": DebugExecutor()}, job_defaults={"coalesce": True}
        )
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
        notify_systemd("READY=1")

    def stop(self) -> None:
        """Stop after the action under way, if any, and wait for it; then drain, if the
        config says so for this stop."""
        self.stopping.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
        if self._drains_now():
            self._drain()
        if self._server is not None:
            self._server.shutdown()
        if self._command_server is not None:
            # Like the daemon's own action, commands under way complete first.
            self._command_server.stop()
        log.info("stopped")

    def _drains_now(self) -> bool:
        drain = self.engine.config.shutdown.drain
        return drain == "on-stop" or (drain == "on-shutdown" and host_shutting_down())

    def _drain(self) -> None:
        """Checkpoint every evictable container before LXC stops them (the unit stops
        evictor before lxc.service at shutdown); the next start restores them."""
        timeout = self.engine.config.shutdown.timeout_seconds
        log.info("draining before the stop: every evictable container, lowest priority first")
        drained = self.engine.drain(include_all=False, deadline=time.monotonic() + timeout)
        for outcome in drained.outcomes:
            self.metrics.record(outcome)
            if outcome.error is not None:
                log.error("drain of %s failed: %s", outcome.container, outcome.error)
        left = (*drained.protected, *drained.kept, *drained.out_of_time)
        log.info(
            "drained %d containers; left running: %s",
            sum(o.succeeded for o in drained.outcomes),
            ", ".join(left) or "none",
        )

    def ask_reload(self) -> None:
        """Reload the config now, or, if a tick is under way, as the next one starts:
        the main thread, which reads the signals, never waits for a tick (a stop
        must be read at once, to stop a round of evictions between two)."""
        self._reload_asked.set()
        if self._tick_lock.acquire(blocking=False):
            try:
                self._reload_if_asked()
            finally:
                self._tick_lock.release()

    def _reload_if_asked(self) -> None:
        """With the tick lock held: the config never changes under a tick."""
        if self._reload_asked.is_set():
            self._reload_asked.clear()
            self.reload()

    def reload(self) -> bool:
        """Load the config again and act on it from the next tick (the caller holds
        the tick lock). A config that does not validate, or that changes what only a
        restart can (the LXC path, the state directory, the metrics listener), is
        refused in one logged line, and the running config is kept."""
        if self.load_config is None:
            return False
        old = self.engine.config
        try:
            new = self.load_config()
            if new.metrics != old.metrics:
                raise UsageError("metrics changed: restart evictor to apply it")
            self.engine.reconfigure(new)
        except EvictorError as error:
            log.error("reload refused, the running config is kept: %s", error)
            return False
        if new.interval_seconds != old.interval_seconds and self._scheduler is not None:
            self._scheduler.reschedule_job("tick", trigger="interval", seconds=new.interval_seconds)
        log.info("reloaded: %s", describe(new))
        return True

    def run(self) -> int:
        """Run until SIGTERM or SIGINT, reloading the config on SIGHUP; return the exit
        code.

        The main thread sleeps until a signal comes: the signals are read from a
        wakeup pipe, so an idle daemon is not woken between ticks, and the handlers
        do nothing (a lock taken in a handler can deadlock the code it interrupts).
        """
        signals_read, signals_written = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signal_pipe = (signals_read, signals_written)
        for signum in _HANDLED_SIGNALS:
            signal.signal(signum, _read_from_the_wakeup_pipe)
        previous_wakeup_fd = signal.set_wakeup_fd(signals_written, warn_on_full_buffer=False)
        try:
            self.start()
            while (signum := _next_signal(signals_read)) not in _STOP_SIGNALS:
                self.ask_reload()
            log.info("%s received: stopping after the current action", signum.name)
        finally:
            signal.set_wakeup_fd(previous_wakeup_fd)
            os.close(signals_read)
            os.close(signals_written)
            self._signal_pipe = ()
        self.stop()
        return 0


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_HANDLED_SIGNALS = (*_STOP_SIGNALS, signal.SIGHUP)


def _read_from_the_wakeup_pipe(signum: int, frame: FrameType | None) -> None:
    """A handler for the signals Daemon.run reads from its wakeup pipe: one must be set
    (the default action would end the process), and it has nothing to do."""


def _next_signal(pipe: int) -> signal.Signals:
    """The next of _HANDLED_SIGNALS written to the wakeup pipe: waits as long as it takes."""
    poller = select.poll()
    poller.register(pipe, select.POLLIN)
    while True:
        try:
            signums = os.read(pipe, 1)
        except BlockingIOError:
            poller.poll()
            continue
        if signums and signums[0] in _HANDLED_SIGNALS:
            return signal.Signals(signums[0])


def notify_systemd(state: str) -> None:
    """Tell systemd (``Type=notify``) the daemon's state, e.g. ``READY=1``: only then
    does it count the service as started and deliver ``systemctl reload``'s SIGHUP,
    which would kill a process that has not yet set its handler. Nothing to do
    outside systemd (no ``NOTIFY_SOCKET``)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
        try:
            notify.sendto(state.encode(), address)
        except OSError as error:
            log.warning("could not notify systemd (%s): %s", address.lstrip("\0"), error)
