"""The one place evictor talks to LXC.

Queries (state, init pid) go through the liblxc binding, so that sampling many
containers spawns no processes. Checkpoint and restore go through
``lxc-checkpoint``, since no Python binding wraps liblxc's checkpoint calls;
every command is an argument list, never a shell string.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import lxc

from evictor import cgroups, criu, lxc_config
from evictor.errors import (
    CheckpointFailed,
    ContainerCommandFailed,
    ContainerNotFound,
    Phase,
    RestoreFailed,
)
from evictor.images import criu_config_directory
from evictor.model import ContainerConfig, ContainerState, IdMap, Nic

log = logging.getLogger(__name__)

DEFAULT_LXC_PATH = Path("/var/lib/lxc")
# How long to wait, after lxc-checkpoint failed, for criu to finish its log.
CRIU_LOG_WAIT_SECONDS = 2.0
LOG_EVERY_SECONDS = 30.0  # while waiting for tools an interrupted evictor left
KILLED_EXIT_SECONDS = 5.0  # for a killed tool to be gone
# How long an lxc-checkpoint (and so a CRIU dump or restore) may take before it
# is killed; a daemon that finds one still running at its start waits as long.
COMMAND_TIMEOUT_SECONDS = 900.0


# How often wait_for_state looks.
STATE_POLL_SECONDS = 0.02
# How long a killed restore's leftover tasks may take to end (freeing their memory).
LEFTOVER_EXIT_SECONDS = 10.0


_P = ParamSpec("_P")
_T = TypeVar("_T")
# python3-lxc keeps the GIL through each liblxc call, and a container's monitor
# answers no query while lxc-checkpoint restores it. A query about it from another
# thread would stop every thread of the process until the restore ended, the
# verifier's hashing among them, which the restore waits for (restore_gate.py): a
# deadlock (the demo met it, its main thread sampling while its daemon restored).
# So a restore holds this lock, and the queries that reach a monitor wait for it,
# with the GIL released.
_RESTORING = threading.RLock()


def _not_during_a_restore(method: Callable[_P, _T]) -> Callable[_P, _T]:
    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        with _RESTORING:
            return method(*args, **kwargs)

    return wrapper


class LxcRuntime:
    """Containers of one LXC path (``lxc-* -P``)."""

    def __init__(
        self,
        lxc_path: Path = DEFAULT_LXC_PATH,
        *,
        proc_root: Path = Path("/proc"),
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        command_timeout_seconds: float = COMMAND_TIMEOUT_SECONDS,
    ) -> None:
        self.lxc_path = lxc_path
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root
        self.command_timeout_seconds = command_timeout_seconds
        # liblxc handles, kept: making one parses the container's config (about
        # as costly as the state and pid queries together); their queries are live.
        self._handles: dict[str, tuple[lxc.Container, str | None]] = {}

    def _container(self, name: str) -> lxc.Container:
        """The container's liblxc handle, made again when its config file changed (a
        handle holds the config as it was parsed)."""
        digest = self.config_digest(name)
        cached = self._handles.get(name)
        if cached is None or cached[1] != digest:
            cached = self._handles[name] = (lxc.Container(name, str(self.lxc_path)), digest)
        container = cached[0]
        if not container.defined:
            del self._handles[name]
            raise ContainerNotFound(f"{name}: no such container in {self.lxc_path}", container=name)
        return container

    def names(self) -> list[str]:
        """Every container defined in the LXC path, sorted."""
        return list(self.defined())

    def defined(self) -> dict[str, str]:
        """Every container defined in the LXC path, sorted, with its config digest.

        Defined as liblxc's listing has it (``list_defined_containers``): an entry
        not starting with a dot that holds a ``config``. Found here with one stat
        each, which gives the digest too: the daemon lists every tick.
        """
        try:
            entries = sorted(entry.name for entry in os.scandir(self.lxc_path))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        defined = {}
        for name in entries:
            if not name.startswith("."):
                digest = self.config_digest(name)
                if digest is not None:
                    defined[name] = digest
        for gone in self._handles.keys() - defined.keys():
            del self._handles[gone]
        return defined

    @_not_during_a_restore
    def state(self, name: str) -> ContainerState:
        return ContainerState(self._container(name).state)

    def init_pid(self, name: str) -> int | None:
        return self.state_and_pid(name)[1]

    @_not_during_a_restore
    def state_and_pid(self, name: str) -> tuple[ContainerState, int | None]:
        """State and init pid from one liblxc handle."""
        container = self._container(name)
        pid = int(container.init_pid)
        return ContainerState(container.state), pid if pid > 0 else None

    def memory_cgroup(self, name: str) -> cgroups.MemoryCgroup | None:
        pid = self.init_pid(name)
        if pid is None:
            return None
        return cgroups.memory_cgroup_of(
            pid, proc_root=self.proc_root, cgroup_root=self.cgroup_root, container=name
        )

    def memory_usage_bytes(self, name: str) -> int | None:
        """Bytes charged to the running container's memory cgroup, None if stopped."""
        cgroup = self.memory_cgroup(name)
        if cgroup is None:
            return None
        try:
            return cgroups.read_usage_bytes(cgroup)
        except FileNotFoundError:
            return None

    def memory_limit_bytes(self, name: str) -> int | None:
        """The memory limit in the container's config (cgroup v1 or v2 key), if any."""
        container = self._container(name)
        for key in ("lxc.cgroup2.memory.max", "lxc.cgroup.memory.limit_in_bytes"):
            try:
                value = container.get_config_item(key)
            except KeyError:
                continue
            text = value[0] if isinstance(value, list) and value else value
            if isinstance(text, str) and text.strip().isdigit():
                return int(text.strip())
        return None

    def config_digest(self, name: str) -> str | None:
        """Identifies the version of the container's LXC config file (a stat, no read);
        None if it has none."""
        try:
            status = os.stat(f"{self.lxc_path}/{name}/config")
        except (FileNotFoundError, NotADirectoryError):
            return None
        return f"{status.st_ino}:{status.st_size}:{status.st_mtime_ns}"

    def processes(self, name: str) -> frozenset[tuple[int, str]]:
        """The running container's processes, as pids and command names (none if stopped)."""
        cgroup = self.memory_cgroup(name)
        if cgroup is None or cgroup.unified_path is None:
            return frozenset()
        return cgroups.processes(cgroup.unified_path, self.proc_root)

    def namespace_pids(self, name: str) -> frozenset[int]:
        """The pids of the running container's processes as its own PID namespace
        numbers them, as a dump records them (none if stopped)."""
        found = set()
        for pid, _ in self.processes(name):
            try:
                status = cgroups.read_text(self.proc_root / str(pid) / "status")
            except OSError:
                continue  # exited
            ids = next((ln.split()[1:] for ln in status.splitlines() if ln[:6] == "NSpid:"), [])
            if len(ids) > 1:
                found.add(int(ids[1]))
        return frozenset(found)

    def stopped_threads(self, name: str) -> frozenset[int]:
        """Threads of the running container that are stopped or traced (none if stopped)."""
        cgroup = self.memory_cgroup(name)
        if cgroup is None or cgroup.unified_path is None:
            return frozenset()
        return cgroups.stopped_threads(cgroup.unified_path, self.proc_root)

    def release_threads(
        self, name: str, *, stopped_before: frozenset[int], timeout_seconds: float
    ) -> str | None:
        """Make the container's threads run again after a dump that failed midway; say
        what still does not run, or return None: it all runs.

        A CRIU killed while it held the container can leave threads stopped, or a
        cgroup of it frozen while LXC calls it RUNNING (LXC knows only its own
        freezes; on a hybrid host CRIU freezes the v1 freezer): each such cgroup is
        thawed, and each thread stopped now but not before the dump gets SIGCONT.
        """
        cgroup = self.memory_cgroup(name)
        if cgroup is None or cgroup.unified_path is None:
            return None  # stopped, or cgroup v1: nothing to look at
        root = cgroup.unified_path
        deadline = time.monotonic() + timeout_seconds
        continued: set[int] = set()
        while True:
            frozen = self.thaw_cgroups(name, cgroup)
            stuck = cgroups.stopped_threads(root, self.proc_root) - stopped_before
            for tid in stuck - continued:
                log.warning("%s: thread %d left stopped by the failed dump: SIGCONT", name, tid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(tid, signal.SIGCONT)
                continued.add(tid)
            if not stuck and not frozen:
                return None
            if time.monotonic() > deadline:
                still = [f"cgroup {f.parent} frozen" for f in frozen]
                still += [f"thread {tid} stopped" for tid in sorted(stuck)]
                return ", ".join(still)
            time.sleep(0.05)

    def thaw_cgroups(self, name: str, cgroup: cgroups.MemoryCgroup | None = None) -> list[Path]:
        """Thaw every cgroup of the running container that a freezer holds, in the
        cgroup2 tree and the v1 freezer's alike, and return their freezer files."""
        cgroup = cgroup or self.memory_cgroup(name)
        if cgroup is None:
            return []
        roots = {cgroup.unified_path}
        if cgroup.freeze_path is not None:
            roots.add(cgroup.freeze_path.parent)  # the v1 freezer's, on a hybrid host
        frozen = [f for root in roots if root is not None for f in cgroups.frozen(root)]
        for freezer_file in frozen:
            log.warning("%s: thawing %s, left frozen by CRIU", name, freezer_file.parent)
            with contextlib.suppress(OSError):
                cgroups.thaw(freezer_file)
        return frozen

    def unlock_network(self, name: str) -> None:
        """Remove the network lock a killed CRIU left in the running container's
        network namespace, where it drops every packet, and log what was removed.

        CRIU unlocks the network itself whenever it ends a dump or a restore, even
        a failed one: only a CRIU killed between its lock and its unlock leaves it.
        """
        pid = self.init_pid(name)
        if pid is None:
            return

        def in_namespace(*argv: str) -> subprocess.CompletedProcess[str]:
            return self._run(["nsenter", f"--target={pid}", "--net", "--", *argv])

        def succeeds(*argv: str) -> bool:
            return in_namespace(*argv).returncode == 0

        removed = []
        listing = in_namespace("nft", "list", "tables").stderr  # _run: the output, merged
        for family, table in criu.nftables_lock_tables(listing):
            if succeeds("nft", "delete", "table", family, table):
                removed.append(f"nftables table {family} {table}")
        chain = criu.IPTABLES_LOCK_CHAIN
        for tool in ("iptables", "ip6tables"):
            if not succeeds(tool, "-w", "-S", chain):
                continue  # no lock chain (or no IPv6)
            for hook in ("INPUT", "OUTPUT"):
                while succeeds(tool, "-w", "-D", hook, "-j", chain):
                    pass  # a jump each time: CRIU's lock and a restore's may both be there
            if succeeds(tool, "-w", "-F", chain) and succeeds(tool, "-w", "-X", chain):
                removed.append(f"{tool} chain {chain}")
        for what in removed:
            log.warning("%s: removed the network lock a killed CRIU left: %s", name, what)

    @_not_during_a_restore
    def thaw(self, name: str) -> None:
        if not self._container(name).unfreeze():
            raise ContainerCommandFailed(
                f"{name}: could not thaw the frozen container", container=name
            )

    def wait_for_state(self, name: str, state: ContainerState, timeout_seconds: float) -> bool:
        """Whether the container is in ``state`` within the timeout. As with liblxc's
        wait, a STOPPED container is not waited for: no monitor is bringing it up.
        Polled: liblxc's wait keeps the GIL for all of it, and every other thread of
        the process (the metrics server, the scheduler) would stop as long."""
        deadline = time.monotonic() + timeout_seconds
        while (now := self.state(name)) is not state:
            if now is ContainerState.STOPPED or time.monotonic() >= deadline:
                return False
            time.sleep(STATE_POLL_SECONDS)
        return True

    def container_config(self, name: str) -> ContainerConfig:
        """What the container's config says (effective values, includes resolved)."""
        container = self._container(name)

        def item(key: str) -> str:
            try:
                value = container.get_config_item(key)
            except KeyError:
                return ""
            return "\n".join(value) if isinstance(value, list) else str(value or "")

        def items(key: str) -> tuple[str, ...]:
            return tuple(line for line in item(key).splitlines() if line.strip())

        nics = []
        for index, nic_type in enumerate(items("lxc.net")):
            prefix = f"lxc.net.{index}."
            nics.append(
                Nic(
                    index=index,
                    type=nic_type,
                    name=item(prefix + "name") or f"eth{index}",
                    link=item(prefix + "link") or None,
                    ipv4_addresses=items(prefix + "ipv4.address"),
                )
            )
        _, block = lxc_config.split(self._config_text(name))
        return ContainerConfig(
            rootfs=item("lxc.rootfs.path").removeprefix("dir:"),
            tty_max=_integer(item("lxc.tty.max")),
            pty_max=_integer(item("lxc.pty.max")),
            console_path=item("lxc.console.path"),
            apparmor_profile=item("lxc.apparmor.profile"),
            mount_entries=items("lxc.mount.entry"),
            nics=tuple(nics),
            idmap=_root_idmap(items("lxc.idmap")),
            init_cmd=item("lxc.init.cmd"),
            environment=items("lxc.environment"),
            seccomp_profile=item("lxc.seccomp.profile"),
            criu_options=block.criu_options if block else (),
            prepared=block is not None,
        )

    @_not_during_a_restore
    def ipv4_addresses(self, name: str) -> tuple[str, ...]:
        """The IPv4 addresses of a running container (read from its network namespace)."""
        container = self._container(name)
        if container.state != ContainerState.RUNNING.value:
            return ()
        return tuple(container.get_ips(family="inet") or ())

    def address_holders(self, addresses: tuple[str, ...], *, besides: str) -> dict[str, str]:
        """Which running container of the LXC path (but ``besides``) holds each of
        ``addresses`` now: {address: container}."""
        wanted, holders = set(addresses), {}
        for other in self.names() if wanted else ():
            if other != besides:
                for address in wanted.intersection(self.ipv4_addresses(other)):
                    holders[address] = other
        return holders

    def config_path(self, name: str) -> Path:
        return self.lxc_path / name / "config"

    def _config_text(self, name: str) -> str:
        try:
            return self.config_path(name).read_text()
        except FileNotFoundError:
            return ""

    def checkpoint(
        self,
        name: str,
        image_dir: Path,
        *,
        leave_running: bool = False,
        criu_options: tuple[str, ...] = (),
    ) -> None:
        """Dump the container into ``image_dir`` and stop it (``lxc-checkpoint -s``), or
        leave it running (a trial dump). The container's own CRIU options come after
        ``criu_options``, and so win over them."""
        config = self.container_config(name)
        argv = ["lxc-checkpoint", "-P", str(self.lxc_path), "-n", name, "-D", str(image_dir)]
        options = (*criu_options, *config.criu_options)
        result = self._run_criu(argv if leave_running else [*argv, "-s"], image_dir, options)
        if result.returncode != 0:
            criu_errors = _criu_errors(image_dir, criu.DUMP_LOG)
            lines = criu_errors or _last_output_line(result)
            raise CheckpointFailed(
                f"{name}: CRIU dump failed: {lines[0] if lines else 'no reason logged'}",
                container=name,
                phase=Phase.DUMP,
                log_lines=lines,
                # killed or timed out (a negative code): whatever CRIU logged, not the cause
                persistent=result.returncode > 0 and criu.cause_persists(criu_errors),
            )

    def restore(
        self,
        name: str,
        image_dir: Path,
        *,
        criu_options: tuple[str, ...] = (),
        environment: dict[str, str] | None = None,
    ) -> None:
        """Restore the container from ``image_dir``, daemonized (``lxc-checkpoint -r -d``).

        ``criu_options`` join the container's own and those its NICs need;
        ``environment`` is added to the tool's (and so criu's) environment.
        """
        config = self.container_config(name)
        options = (*config.criu_options, *_userns_veth_options(config), *criu_options)
        argv = ["lxc-checkpoint", "-P", str(self.lxc_path), "-n", name, "-r", "-d"]
        with _RESTORING:
            result = self._run_criu([*argv, "-D", str(image_dir)], image_dir, options, environment)
        if result.returncode != 0:
            lines = _criu_errors(image_dir, criu.RESTORE_LOG) or _last_output_line(result)
            raise RestoreFailed(
                f"{name}: CRIU restore failed: {lines[0] if lines else 'no reason logged'}",
                container=name,
                phase=Phase.RESTORE,
                log_lines=lines,
            )

    def _run_criu(
        self,
        argv: list[str],
        image_dir: Path,
        criu_options: tuple[str, ...],
        environment: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run lxc-checkpoint on ``image_dir`` with ``criu_options`` in a CRIU config
        file of its own: criu adds the file's options to those LXC passes
        (PLATFORM.md), and the file holds whatever scripts the options name.

        The file outlives every criu that may read it. An lxc-checkpoint killed
        early leaves its children to start criu later (LXC forks criu after the
        container's pre-start hooks): a criu without the file would restore past
        evictor's gate, unverified. So a failed run is followed by the wait for
        the tools (:meth:`wait_for_tools`) before the file goes.

        The file's directory sits beside the image (``criu_config_directory``), not in
        /tmp: one a killed evictor leaves is replaced by the next run on the image,
        or removed with the image."""
        directory = criu_config_directory(image_dir)
        shutil.rmtree(directory, ignore_errors=True)  # left by a killed evictor
        directory.mkdir(mode=0o700)
        try:
            lines = list(criu_options)
            if any(option.startswith("external netdev[") for option in lines):
                script = directory / "veth-pre-restore.sh"
                script.write_text(VETH_PRE_RESTORE_SCRIPT)
                script.chmod(0o700)
                lines.append(f"action-script {script}")
            config = directory / "criu.conf"
            config.write_text("".join(f"{line}\n" for line in lines))
            result = self._run(argv, {**(environment or {}), "CRIU_CONFIG_FILE": str(config)})
            if result.returncode != 0:  # criu may work on, and log why later (PLATFORM.md)
                killed = result.returncode < 0
                self.wait_for_tools(
                    image_dir,
                    seconds=self.command_timeout_seconds if killed else CRIU_LOG_WAIT_SECONDS,
                    orphan_grace_seconds=CRIU_LOG_WAIT_SECONDS,
                    kill_at_end=killed,
                )
            return result
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def wait_for_tools(
        self, image_dir: Path, *, seconds: float, orphan_grace_seconds: float, kill_at_end: bool
    ) -> None:
        """Wait up to ``seconds`` until no lxc-checkpoint or criu works on ``image_dir``.

        A dump may complete without its lxc-checkpoint, and a restore while LXC's
        side of it lives (the monitor to be). A ``criu restore`` that no
        lxc-checkpoint drives any more cannot hand the container to LXC, and may wait
        forever: it is killed once ``orphan_grace_seconds`` have passed (time for a
        failing criu to log why). With ``kill_at_end``, whatever still works on the
        image after ``seconds`` is killed too.
        """
        started = time.monotonic()
        deadline, next_log = started + seconds, started + LOG_EVERY_SECONDS
        while pids := self.tools_using(image_dir):
            now = time.monotonic()
            if now >= deadline:
                if not kill_at_end:
                    return
                log.error("killing %s, at work on %s after %.0f s", pids, image_dir, seconds)
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                kill_at_end, deadline = False, now + KILLED_EXIT_SECONDS  # then see them go
            elif now - started >= orphan_grace_seconds:
                self._kill_orphaned_restore(image_dir, pids)
            if time.monotonic() >= next_log:
                log.info("waiting for lxc-checkpoint/criu %s at work on %s", pids, image_dir)
                next_log += LOG_EVERY_SECONDS
            time.sleep(0.05)

    def _kill_orphaned_restore(self, image_dir: Path, pids: list[int]) -> None:
        """SIGKILL a ``criu restore`` among ``pids`` (the tools at work on
        ``image_dir``) if no lxc-checkpoint is among them to drive it."""
        tools = {pid: self._argv(pid) for pid in pids}
        if any(Path(argv[0]).name == "lxc-checkpoint" for argv in tools.values() if argv):
            return
        for pid, argv in tools.items():
            if "restore" in argv:
                log.warning(
                    "killing criu restore %d of %s: no lxc-checkpoint drives it", pid, image_dir
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def restore_leftovers(self, directory: Path) -> list[int]:
        """Pids of the tasks a killed ``criu restore`` left behind from the images in
        ``directory``: restored but never set running, they hold CRIU's log open (an
        fd into the image), block every signal but SIGKILL, keep their memory, and
        sit in a cgroup of their own ("lxc.payload.NAME-2") that LXC no longer knows.
        Only tasks in a PID namespace other than the host's count: not the tools still
        at work on an image, nor an operator reading its log.

        The files are told by device and inode, not by path: seen from a task in a
        container, a file on another mount than the container's root (a store on a
        file system of its own) has a path relative to that mount, not the host's.
        """
        try:
            host_pid_namespace = os.readlink(self.proc_root / "self" / "ns" / "pid")
            entries = [entry.stat() for entry in os.scandir(directory)]
        except OSError:
            return []  # not a real /proc, or no image: nothing to tell them by
        image_files = {(status.st_dev, status.st_ino) for status in entries}
        found = []
        for entry in self.proc_root.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fds = os.listdir(entry / "fd")
            except OSError:
                continue  # exited meanwhile
            for fd in fds:
                with contextlib.suppress(OSError):
                    opened = os.stat(entry / "fd" / fd)  # the open file itself
                    if (opened.st_dev, opened.st_ino) in image_files:
                        if os.readlink(entry / "ns" / "pid") != host_pid_namespace:
                            found.append(int(entry.name))
                        break
        return found

    def kill_restore_leftovers(self, image_dir: Path) -> list[int]:
        """SIGKILL what ``restore_leftovers`` finds: a container restored again from
        the image would otherwise run beside a frozen copy of itself."""
        pids = self.restore_leftovers(image_dir)
        ending = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                ending.append(os.pidfd_open(pid))
                os.kill(pid, signal.SIGKILL)
        _wait_for_pidfds(ending, LEFTOVER_EXIT_SECONDS)  # gone, and their memory freed
        if pids:
            log.warning(
                "killed %d tasks a killed criu restore left behind from %s", len(pids), image_dir
            )
        return pids

    def _argv(self, pid: int) -> list[str]:
        try:
            raw = (self.proc_root / str(pid) / "cmdline").read_bytes()
        except OSError:
            return []  # exited meanwhile
        return [arg.decode(errors="replace") for arg in raw.split(b"\0")]

    def tools_using(self, image_dir: Path) -> list[int]:
        """Pids of lxc-checkpoint or criu processes working on ``image_dir``.

        Both run in their own session, so a daemon killed mid-dump leaves them
        running; they name the image directory as an argument of their own.
        """
        wanted = str(image_dir).encode()
        pids = []
        for entry in self.proc_root.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # exited meanwhile
            if wanted in argv and Path(argv[0].decode(errors="replace")).name in (
                "lxc-checkpoint",
                "criu",
            ):
                pids.append(int(entry.name))
        return pids

    def start(self, name: str) -> None:
        """Start the container cold (``lxc-start``): for tools and demos."""
        self._checked(["lxc-start", "-P", str(self.lxc_path), "-n", name], name)

    def restart(self, name: str, shutdown_timeout_seconds: float = 60.0) -> None:
        """Shut the container down cleanly (killed after the timeout), then start it."""
        argv = ["lxc-stop", "-P", str(self.lxc_path), "-n", name]
        self._checked([*argv, "-t", str(math.ceil(shutdown_timeout_seconds))], name)
        self.start(name)

    def stop(self, name: str) -> None:
        """Stop the container at once (SIGKILL to its init)."""
        if self.state(name) is ContainerState.FROZEN:
            self.thaw(name)
        if self.state(name) is not ContainerState.STOPPED:
            self._checked(["lxc-stop", "-P", str(self.lxc_path), "-n", name, "-k"], name)

    def destroy(self, name: str) -> None:
        """Stop and delete the container with its rootfs: for tools and demos."""
        self.stop(name)
        self._checked(["lxc-destroy", "-P", str(self.lxc_path), "-n", name], name)

    def _checked(self, argv: list[str], name: str) -> None:
        result = self._run(argv)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ContainerCommandFailed(f"{name}: {argv[0]} failed: {reason}", container=name)

    def _run(
        self, argv: list[str], environment: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in its own process group, killing the group on timeout.

        Output goes to a file, not a pipe: a restored container's monitor
        inherits the tool's descriptors and would hold a pipe open for its life.
        lxc-checkpoint forks criu: killing only the parent would leave criu running.
        """
        log.debug("running %s", argv)
        with tempfile.TemporaryFile(mode="w+") as output:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
                env={**os.environ, **environment} if environment else None,
            )
            try:
                timed_out = not _wait_for_exit(process, self.command_timeout_seconds)
            except BaseException:
                # Interrupted (Ctrl-C): never leave criu running behind us.
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
            if timed_out:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            output.seek(0)
            text = output.read()
        if timed_out:
            text += f"\n{argv[0]} timed out after {self.command_timeout_seconds:g} s\n"
        return subprocess.CompletedProcess(argv, process.returncode, "", text)


def _wait_for_pidfds(pidfds: list[int], timeout_seconds: float) -> bool:
    """Wait until the processes behind ``pidfds`` have all ended, or the timeout;
    return whether they did. The pidfds are closed. poll, not select: the monitor's
    pidfds may push these past select's 1024."""
    deadline = time.monotonic() + timeout_seconds
    try:
        poller = select.poll()
        for pidfd in pidfds:
            poller.register(pidfd, select.POLLIN)
        left = len(pidfds)
        while left and (remaining := deadline - time.monotonic()) > 0:
            for pidfd, _ in poller.poll(remaining * 1000):
                poller.unregister(pidfd)
                left -= 1
        return left == 0
    finally:
        for pidfd in pidfds:
            os.close(pidfd)


def _wait_for_exit(process: subprocess.Popen[bytes], timeout_seconds: float) -> bool:
    """Wait for ``process`` to end, for up to ``timeout_seconds``; return whether it did.

    Woken by the kernel when it ends (a pidfd): ``Popen.wait(timeout=)`` polls,
    sleeping up to 50 ms between looks, which cost each command 25 ms on average.
    """
    ended = _wait_for_pidfds([os.pidfd_open(process.pid)], timeout_seconds)
    if ended:
        process.wait()
    return ended


def _integer(text: str) -> int:
    return int(text) if text.strip().isdigit() else 0


def _root_idmap(lines: tuple[str, ...]) -> IdMap | None:
    """Where the container's root (uid and gid 0) is mapped on the host, from its
    ``lxc.idmap`` lines ("u 0 100000 65536"); None if it has no user namespace."""
    roots: dict[str, int] = {}
    for line in lines:
        fields = line.split()
        if len(fields) == 4 and fields[0] in ("u", "g", "b") and fields[1] == "0":
            for kind in ("u", "g") if fields[0] == "b" else (fields[0],):
                roots[kind] = int(fields[2])
    if "u" not in roots or "g" not in roots:
        return None
    return IdMap(root_uid=roots["u"], root_gid=roots["g"])


def _userns_veth_options(config: ContainerConfig) -> tuple[str, ...]:
    """CRIU options that restore a user-namespaced container's veth NICs.

    Since kernel 6.15 CRIU's own way (creating the pair from its usernsd, with
    the dumped index) fails ("-95 reported by netlink", PLATFORM.md). Instead a
    pre-restore action script creates each pair in the host namespace, and CRIU
    moves the container's end in (``external netdev``), then attaches the host's
    end to the bridge as LXC asks it to.
    """
    if config.idmap is None:
        return ()
    return tuple(
        f"external netdev[{nic.name}]:evr{secrets.token_hex(4)}{nic.index}"
        for nic in config.nics
        if nic.type == "veth"
    )


# The pre-restore script of _userns_veth_options. The container's end of each
# pair comes from the `external netdev[IF]:NAME` lines of CRIU_CONFIG_FILE; the
# host's end from criu's own arguments, where LXC passes `--external
# veth[IF]:HOST@BRIDGE` (lxc.net.N.veth.pair, or a fresh name at each restore).
VETH_PRE_RESTORE_SCRIPT = r"""#!/bin/sh
# Written by evictor: create the veth pairs CRIU moves into a user-namespaced
# container at restore (evictor/lxc_runtime.py).
[ "$CRTOOLS_SCRIPT_ACTION" = pre-restore ] || exit 0
pid=$$
while [ "$pid" -gt 1 ] && [ "$(cat /proc/$pid/comm)" != criu ]; do
    pid=$(cut -d' ' -f4 /proc/$pid/stat)
done
[ "$pid" -gt 1 ] || { echo "evictor: criu not found among the script's ancestors" >&2; exit 1; }
criu_argv=$(tr '\0' '\n' < /proc/$pid/cmdline)
sed -n 's/^external netdev\[\([^]]*\)\]:\(.*\)$/\1 \2/p' "$CRIU_CONFIG_FILE" |
while read -r ifname inside; do
    host=$(printf '%s\n' "$criu_argv" | sed -n "s/^veth\[$ifname\]:\([^@]*\)@.*/\1/p" | head -n 1)
    [ -n "$host" ] || { echo "evictor: no veth[$ifname] among criu's arguments" >&2; exit 1; }
    ip link del "$host" 2>/dev/null  # left by a failed restore
    ip link add name "$host" type veth peer name "$inside" || exit 1
done
"""


def _criu_errors(image_dir: Path, log_name: str) -> tuple[str, ...]:
    """CRIU's reasons from its log in ``image_dir`` (none if it wrote no log)."""
    try:
        return criu.log_errors((image_dir / log_name).read_text(errors="replace"))
    except FileNotFoundError:
        return ()


def _last_output_line(result: subprocess.CompletedProcess[str]) -> tuple[str, ...]:
    """The tool's own last line of output, for a failure CRIU did not log; or, for a
    tool killed by a signal, that."""
    output = [line for line in result.stderr.splitlines() if line.strip()]
    if result.returncode < 0 and not (output and "timed out after" in output[-1]):
        tool = Path(str(result.args[0])).name
        return (f"{tool} was killed ({signal.Signals(-result.returncode).name})",)
    return tuple(output[-1:])
