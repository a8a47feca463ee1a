"""The one place evictor talks to LXC.

Queries (state, init pid) go through the liblxc binding, so that sampling many
containers spawns no processes. Checkpoint and restore go through
``lxc-checkpoint``, since no Python binding wraps liblxc's checkpoint calls;
every command is an argument list, never a shell string.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import lxc

from evictor import cgroups, criu
from evictor.errors import (
    CheckpointFailed,
    ContainerCommandFailed,
    ContainerNotFound,
    Phase,
    RestoreFailed,
)
from evictor.model import ContainerState

log = logging.getLogger(__name__)

DEFAULT_LXC_PATH = Path("/var/lib/lxc")
# How long an lxc-checkpoint (and so a CRIU dump or restore) may take before it
# is killed; a daemon that finds one still running at its start waits as long.
COMMAND_TIMEOUT_SECONDS = 900.0


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
        self._handles: dict[str, lxc.Container] = {}

    def _container(self, name: str) -> lxc.Container:
        container = self._handles.get(name)
        if container is None:
            container = self._handles[name] = lxc.Container(name, str(self.lxc_path))
        if not container.defined:
            del self._handles[name]
            raise ContainerNotFound(f"{name}: no such container in {self.lxc_path}", container=name)
        return container

    def names(self) -> list[str]:
        """Every container defined in the LXC path, sorted."""
        if not self.lxc_path.is_dir():
            return []
        names = sorted(lxc.list_containers(config_path=str(self.lxc_path)))
        for gone in self._handles.keys() - set(names):
            del self._handles[gone]
        return names

    def state(self, name: str) -> ContainerState:
        return ContainerState(self._container(name).state)

    def init_pid(self, name: str) -> int | None:
        return self.state_and_pid(name)[1]

    def state_and_pid(self, name: str) -> tuple[ContainerState, int | None]:
        """State and init pid from one liblxc handle (the monitor's hot path)."""
        container = self._container(name)
        pid = int(container.init_pid)
        return ContainerState(container.state), pid if pid > 0 else None

    def memory_cgroup(self, name: str) -> cgroups.MemoryCgroup | None:
        pid = self.init_pid(name)
        if pid is None:
            return None
        return cgroups.memory_cgroup_of(pid, proc_root=self.proc_root, cgroup_root=self.cgroup_root)

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
        """Identifies the version of the container's LXC config file (a stat, no read:
        the monitor asks every tick); None if it has none."""
        try:
            status = os.stat(self.lxc_path / name / "config")
        except FileNotFoundError:
            return None
        return f"{status.st_ino}:{status.st_size}:{status.st_mtime_ns}"

    def thaw(self, name: str) -> None:
        if not self._container(name).unfreeze():
            raise ContainerCommandFailed(
                f"{name}: could not thaw the frozen container", container=name
            )

    def wait_for_state(self, name: str, state: ContainerState, timeout_seconds: float) -> bool:
        return bool(self._container(name).wait(state.value, math.ceil(timeout_seconds)))

    def checkpoint(self, name: str, image_dir: Path) -> None:
        """Dump the container into ``image_dir`` and stop it (``lxc-checkpoint -s``)."""
        self._container(name)
        result = self._run(
            ["lxc-checkpoint", "-P", str(self.lxc_path), "-n", name, "-s", "-D", str(image_dir)]
        )
        if result.returncode != 0:
            criu_errors = _criu_errors(image_dir / "dump.log")
            lines = criu_errors or _last_output_line(result)
            raise CheckpointFailed(
                f"{name}: CRIU dump failed: {lines[-1] if lines else 'no reason logged'}",
                container=name,
                phase=Phase.DUMP,
                log_lines=lines,
                # killed or timed out (a negative code): whatever CRIU logged, not the cause
                persistent=result.returncode > 0 and criu.cause_persists(criu_errors),
            )

    def restore(
        self, name: str, image_dir: Path, environment: dict[str, str] | None = None
    ) -> None:
        """Restore the container from ``image_dir``, daemonized (``lxc-checkpoint -r -d``).

        ``environment`` is added to the tool's (and so criu's) environment.
        """
        self._container(name)
        result = self._run(
            [
                "lxc-checkpoint",
                "-P",
                str(self.lxc_path),
                "-n",
                name,
                "-r",
                "-d",
                "-D",
                str(image_dir),
            ],
            environment,
        )
        if result.returncode != 0:
            lines = _criu_errors(image_dir / "restore.log") or _last_output_line(result)
            raise RestoreFailed(
                f"{name}: CRIU restore failed: {lines[-1] if lines else 'no reason logged'}",
                container=name,
                phase=Phase.RESTORE,
                log_lines=lines,
            )

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
            timed_out = False
            try:
                process.wait(timeout=self.command_timeout_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
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


def _criu_errors(log_path: Path) -> tuple[str, ...]:
    """CRIU's reasons from its log, if it wrote one."""
    try:
        return criu.log_errors(log_path.read_text(errors="replace"))
    except FileNotFoundError:
        return ()


def _last_output_line(result: subprocess.CompletedProcess[str]) -> tuple[str, ...]:
    """The tool's own last line of output, for a failure CRIU did not log."""
    output = [line for line in result.stderr.splitlines() if line.strip()]
    return tuple(output[-1:])
