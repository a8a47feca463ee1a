"""A chaos run: the daemon, a dozen real containers, pressure that comes and goes,
and faults at random moments. Nothing may be lost.

A dozen scribe containers (memory rewritten all the time against a ledger, a
child, shared memory and a pipe) of mixed sizes, prepared (the pre-start guard
installed), their images on a store of its own (an ext4 file system on a loop
device, so that it can be filled). The daemon's budget is toggled by SIGHUP
between half the containers' usage and four times it, every 5-12 s. Every
3-8 s one fault, drawn at random:

- ``kill-daemon``: SIGKILL of ``evictor run``, restarted at once;
- ``kill-criu`` / ``kill-lxc-checkpoint``: the pressure flips, then SIGKILL
  of the first such tool to start on an eviction or a restore, at a random
  moment of its first 300 ms (waited for up to 10 s; not counted if none came);
- ``fill-store``: the store filled to 16 MiB of free space for 10 s;
- ``stop-by-hand``: ``lxc-stop`` of a running container (its state is the
  operator's to lose: it is started again, cold, by ``start-by-hand`` or at
  the end); at most two at a time, so that enough is left to evict;
- ``start-by-hand``: ``lxc-start`` of a stopped container: one stopped by hand
  starts; an evicted one must be refused by the guard, its image intact.

At the end the budget is raised and every container must come back RUNNING,
the same process as before (or as after its cold start by hand), with no error
in its memory, child or pipe, unless a failed eviction named it as ended (a
CRIU killed while its code is in a task takes that task with it: CRIU's hazard,
which no one can undo, counted apart); no image, partial image or kept-aside image is
left; nothing is FAILED; no task of a container runs outside LXC's instance of
it (a copy that a killed restore left behind, frozen or running).
It prints a table.

    .venv/bin/python -m bench.chaos --minutes 30
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from bench.fleet import BENCH_ROOT, free_port
from evictor.errors import EvictorError
from evictor.journal import EventKind, Journal
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerState, Managed
from evictor.tools import testbed

MIB = 1 << 20
SIZES_MIB = (16, 32, 64, 128, 256, 32, 64, 16, 128, 32, 64, 16)  # a dozen, 848 MiB in all
STORE_BYTES = 6 << 30
READY = "running: a tick every"  # what the daemon logs once it runs
RELOADED = "reloaded: "  # what it logs once a new config acts
MOST_STOPPED_BY_HAND = 2
FAULTS = (
    "kill-daemon",
    "kill-criu",
    "kill-lxc-checkpoint",
    "fill-store",
    "stop-by-hand",
    "start-by-hand",
)


@dataclasses.dataclass
class Report:
    minutes: float
    evictions: int = 0
    restores: int = 0
    faults: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    lost: list[str] = dataclasses.field(default_factory=list)  # not RUNNING at the end
    corrupt: list[str] = dataclasses.field(default_factory=list)  # running, not intact
    # Workloads a killed CRIU took with it (its code was in them), as evictor reported.
    ended_with_criu: list[str] = dataclasses.field(default_factory=list)
    leftovers: list[str] = dataclasses.field(default_factory=list)  # images, kept, partial
    failed: list[str] = dataclasses.field(default_factory=list)  # FAILED in the journal
    # Tasks a killed criu restored but never set running (an fd into the store).
    stray_tasks: list[int] = dataclasses.field(default_factory=list)
    # Of the first and the last daemon instance, each read as it was stopped or killed.
    daemon_rss_mib: tuple[float, float] = (0.0, 0.0)
    daemon_fds: tuple[int, int] = (0, 0)

    def table(self) -> str:
        rss, fds = self.daemon_rss_mib, self.daemon_fds
        rows = [
            ("minutes", f"{self.minutes:g}"),
            ("evictions", str(self.evictions)),
            ("restores", str(self.restores)),
            *((f"faults: {kind}", str(self.faults[kind])) for kind in (*FAULTS, "guard-refused")),
            ("containers lost (must be 0)", f"{len(self.lost)} {self.lost or ''}".strip()),
            ("containers corrupt (must be 0)", f"{len(self.corrupt)} {self.corrupt or ''}".strip()),
            (
                "workloads a killed CRIU took with it, named by evictor",
                f"{len(self.ended_with_criu)} {self.ended_with_criu or ''}".strip(),
            ),
            (
                "images left behind (must be 0)",
                f"{len(self.leftovers)} {self.leftovers or ''}".strip(),
            ),
            ("FAILED at the end (must be 0)", f"{len(self.failed)} {self.failed or ''}".strip()),
            ("tasks of copies LXC does not run (must be 0)", str(len(self.stray_tasks))),
            ("daemon RSS, MiB (first -> last)", f"{rss[0]:.1f} -> {rss[1]:.1f}"),
            ("daemon open fds (first -> last)", f"{fds[0]} -> {fds[1]}"),
        ]
        lines = ["| what | result |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)]
        return "\n".join(lines)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.corrupt or self.leftovers or self.failed or self.stray_tasks)


@contextlib.contextmanager
def loop_store(image: Path, mountpoint: Path) -> Iterator[Path]:
    """An ext4 file system of its own, on a loop device: a store that can fill up."""
    with open(image, "wb") as f:
        f.truncate(STORE_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        os.chmod(mountpoint, 0o711)
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        image.unlink(missing_ok=True)


class Chaos:
    def __init__(self, root: Path, state: Path, rng: random.Random) -> None:
        self.root, self.state, self.rng = root, state, rng
        self.runtime = LxcRuntime(root / "lxc")
        self.config = root / "evictor.toml"
        self.port = free_port()
        self.daemon: subprocess.Popen[bytes] | None = None
        self.log = open(root / "daemon.log", "ab")  # noqa: SIM115 (closed in stop)
        self.expected: dict[str, testbed.WorkloadStatus] = {}  # the process each must be
        self.stopped_by_hand: set[str] = set()
        self.cold_started_at: dict[str, float] = {}  # by hand, last
        self.samples: list[tuple[float, int]] = []  # RSS MiB and fds of each daemon at its end
        self.budgets = (1 << 40, 1 << 40)  # (under pressure, not), set once usage is known
        self.pressure = False

    def flip_pressure(self) -> None:
        self.pressure = not self.pressure
        self.configure(self.budgets[0] if self.pressure else self.budgets[1])

    def configure(self, budget_bytes: int) -> None:
        self.config.write_text(
            f'lxc_path = "{self.runtime.lxc_path}"\nstate_dir = "{self.state}"\n'
            "interval_seconds = 0.5\n"
            f'[triggers]\nbudget = {budget_bytes}\nmin_reclaim = "1MiB"\n'
            'important_psi_some_avg10 = "off"\n'
            '[restore]\nstable_seconds = 0\nmargin = "1MiB"\nfailure_backoff_seconds = 2\n'
            "max_failure_backoff_seconds = 8\n"
            "[evict]\nfailure_backoff_seconds = 2\nmax_failure_backoff_seconds = 8\n"
            "[antithrash]\ncooldown_seconds = 0\n"
            f"[metrics]\nport = {self.port}\n"
        )
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGHUP)

    def evictor(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "evictor.cli", "-c", str(self.config), *args]
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    def start_daemon(self) -> None:
        """Start the daemon and wait until it runs: a SIGHUP before it set its handler
        would kill it (systemd holds reloads back until READY=1)."""
        ready = self.logged(READY)
        argv = [sys.executable, "-m", "evictor.cli", "-c", str(self.config), "run"]
        self.daemon = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_for_log(READY, more_than=ready, what="the daemon did not start")

    def logged(self, text: str) -> int:
        """How many times the daemons' log holds ``text``."""
        return (self.root / "daemon.log").read_text().count(text)

    def wait_for_log(self, text: str, *, more_than: int, what: str) -> None:
        deadline = time.monotonic() + 120
        while self.logged(text) <= more_than:
            if self.daemon is None or self.daemon.poll() is not None:
                raise EvictorError(f"{what}: the daemon ended; see {self.root / 'daemon.log'}")
            if time.monotonic() > deadline:
                raise EvictorError(f"{what}: see {self.root / 'daemon.log'}")
            time.sleep(0.05)

    def sample_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(self.daemon.pid)
                self.samples.append((process.memory_info().rss / MIB, process.num_fds()))

    def stop_daemon(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.sample_daemon()
            self.daemon.send_signal(sig)
            self.daemon.wait(timeout=600)

    # --- faults ---

    def fault(self, kind: str) -> bool:
        """Inject one fault; return whether it was injected."""
        if kind == "kill-daemon":
            self.stop_daemon(signal.SIGKILL)
            self.start_daemon()
            return True
        if kind in ("kill-criu", "kill-lxc-checkpoint"):
            # Pressure flips, so that evictions or restores begin; the tool is
            # killed at a random moment of its first 300 ms.
            self.flip_pressure()
            tool = kind.removeprefix("kill-").encode()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                for pid in self._tools():
                    with contextlib.suppress(OSError):
                        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
                        if os.path.basename(argv0) == tool:
                            time.sleep(self.rng.uniform(0, 0.3))
                            os.kill(pid, signal.SIGKILL)
                            return True
                time.sleep(0.01)
            return False
        if kind == "fill-store":
            filler = self.state / "filler"
            free = shutil.disk_usage(self.state).free
            with open(filler, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, max(free - 16 * MIB, 1))
            time.sleep(10)
            filler.unlink()
            return True
        if kind == "stop-by-hand" and len(self.stopped_by_hand) >= MOST_STOPPED_BY_HAND:
            return False  # more would leave too little under pressure to evict
        names = list(self.expected)
        self.rng.shuffle(names)
        for name in names:
            state = self.runtime.state(name)
            if kind == "stop-by-hand" and state is ContainerState.RUNNING:
                # Not runtime.stop, which does nothing to a container found
                # stopped: the daemon may evict this one first.
                stop = ["lxc-stop", "-P", str(self.runtime.lxc_path), "-n", name, "-k"]
                if subprocess.run(stop, capture_output=True, check=False).returncode != 0:
                    return False
                self.stopped_by_hand.add(name)
                return True
            if kind == "start-by-hand" and state is ContainerState.STOPPED:
                return self.start_by_hand(name)
        return False

    def start_by_hand(self, name: str) -> bool:
        started = subprocess.run(
            ["lxc-start", "-P", str(self.runtime.lxc_path), "-n", name],
            capture_output=True,
            check=False,
        )
        if started.returncode == 0:
            old = self.expected[name]
            self.expected[name] = testbed.wait_for_new_incarnation(self.runtime, name, old=old)
            self.stopped_by_hand.discard(name)
            self.cold_started_at[name] = time.time()
        return True

    def _tools(self) -> list[int]:
        images = self.state / "images"
        return [
            pid
            for entry in (images.iterdir() if images.is_dir() else ())
            if entry.is_dir()
            for pid in self.runtime.tools_using(entry)
        ]


def run(root: Path, minutes: float, seed: int) -> Report:
    """Run the chaos for ``minutes`` in ``root`` (wiped first) and report."""
    rng = random.Random(seed)
    runtime = LxcRuntime(root / "lxc")
    if runtime.lxc_path.is_dir():
        for name in runtime.names():
            runtime.destroy(name)
    subprocess.run(["umount", "-l", str(root / "store")], check=False, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)
    runtime.lxc_path.mkdir(parents=True, mode=0o700)
    report = Report(minutes=minutes)
    with loop_store(root / "store.img", root / "store") as store:
        chaos = Chaos(root, store / "state", rng)
        try:
            _run(chaos, minutes, report)
        finally:
            chaos.stop_daemon(signal.SIGKILL)
            chaos.log.close()
            for name in runtime.names():
                runtime.destroy(name)
    return report


def _run(chaos: Chaos, minutes: float, report: Report) -> None:
    runtime = chaos.runtime
    names = [f"evc-{i:02d}" for i in range(len(SIZES_MIB))]
    chaos.configure(1 << 40)
    for i, (name, size) in enumerate(zip(names, SIZES_MIB, strict=True)):
        testbed.create_workload_container(runtime, name, memory_mib=size, seed=i + 1, scribe=True)
        prepared = chaos.evictor("prepare", name)
        if prepared.returncode != 0:
            raise EvictorError(f"prepare {name}: {prepared.stderr.strip()}")
        runtime.start(name)
    for name in names:
        chaos.expected[name] = testbed.wait_for_counter(runtime, name, above=0)
    usage = sum(runtime.memory_usage_bytes(n) or 0 for n in names)
    chaos.budgets = (usage // 2, usage * 4)

    chaos.start_daemon()
    deadline = time.monotonic() + minutes * 60
    next_toggle = time.monotonic()
    while time.monotonic() < deadline:
        if time.monotonic() >= next_toggle:
            chaos.flip_pressure()
            next_toggle = time.monotonic() + chaos.rng.uniform(5, 12)
        time.sleep(chaos.rng.uniform(3, 8))
        kind = chaos.rng.choice(FAULTS)
        if kind == "start-by-hand":
            kind, injected = _start_by_hand_fault(chaos)
        else:
            injected = chaos.fault(kind)
        if injected:
            report.faults[kind] += 1
            print(f"{time.strftime('%H:%M:%S')} {kind}", flush=True)

    # The end: room for all, every container stopped by hand started again.
    if chaos.daemon is None or chaos.daemon.poll() is not None:
        chaos.start_daemon()
    reloads = chaos.logged(RELOADED)
    chaos.pressure = True
    chaos.flip_pressure()
    # Until the daemon acts on the room, a round of evictions may go on: every
    # container running before then proves nothing.
    chaos.wait_for_log(RELOADED, more_than=reloads, what="the last budget was not taken")
    for name in sorted(chaos.stopped_by_hand):
        if runtime.state(name) is ContainerState.STOPPED:
            chaos.start_by_hand(name)
    settle_deadline = time.monotonic() + 300
    while time.monotonic() < settle_deadline and any(
        runtime.state(n) is not ContainerState.RUNNING for n in names
    ):
        time.sleep(1)
    chaos.stop_daemon()
    _judge(chaos, names, report)


def _start_by_hand_fault(chaos: Chaos) -> tuple[str, bool]:
    """Start a stopped container by hand: one stopped by hand starts; an evicted one
    must be refused by the guard, with its image intact."""
    images = chaos.state / "images"
    for name in chaos.rng.sample(list(chaos.expected), len(chaos.expected)):
        if chaos.runtime.state(name) is not ContainerState.STOPPED:
            continue
        manifest = images / name / "manifest.json"
        if name not in chaos.stopped_by_hand and manifest.exists():
            before = manifest.read_bytes()
            chaos.start_by_hand(name)
            if chaos.runtime.state(name) is not ContainerState.STOPPED:
                raise EvictorError(f"{name}: the guard let a cold start of an evicted one through")
            if manifest.read_bytes() != before:
                raise EvictorError(f"{name}: its image changed under a refused start")
            return "guard-refused", True
        if name in chaos.stopped_by_hand:
            return "start-by-hand", chaos.start_by_hand(name)
    return "start-by-hand", False


def _judge(chaos: Chaos, names: list[str], report: Report) -> None:
    journal = Journal(chaos.state / "journal.db")
    events = journal.events()
    for name in names:
        # A CRIU killed while its code is in a task takes the task with it, which
        # no one can undo: evictor must name it in the failure (stopped, if it was
        # the container's init), since the workload's last cold start.
        ended = [
            e.detail
            for e in events
            if e.container == name
            and e.kind is EventKind.EVICT_FAILED
            and e.at > chaos.cold_started_at.get(name, 0.0)
            and ("memhog" in e.detail or "stopped during the dump" in e.detail)
        ]
        if chaos.runtime.state(name) is not ContainerState.RUNNING:
            (report.ended_with_criu if ended else report.lost).append(name)
            continue
        try:
            testbed.wait_alive(chaos.runtime, name, original=chaos.expected[name])
        except EvictorError as error:
            if ended:
                report.ended_with_criu.append(f"{error} ({ended[-1]})")
            else:
                report.corrupt.append(str(error))
    images = chaos.state / "images"
    report.leftovers = [  # images, and partial, kept-aside, trial images and gates
        p.name
        for p in images.iterdir()
        if not p.name.startswith(".") or p.name.endswith((".gate", ".trial")) or ".kept-" in p.name
    ]
    report.stray_tasks = testbed.stray_tasks(chaos.runtime, names)
    report.failed = [
        f"{n} ({m.reason})" for n, m in journal.managed().items() if m.state is Managed.FAILED
    ]
    journal.close()
    report.evictions = sum(e.kind is EventKind.EVICTED for e in events)
    report.restores = sum(e.kind is EventKind.RESTORED for e in events)
    if chaos.samples:
        report.daemon_rss_mib = (chaos.samples[0][0], chaos.samples[-1][0])
        report.daemon_fds = (chaos.samples[0][1], chaos.samples[-1][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    report = run(BENCH_ROOT / "chaos", args.minutes, args.seed)
    print(report.table())
    sys.exit(0 if report.clean else 1)


if __name__ == "__main__":
    main()
