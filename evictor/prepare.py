"""``evictor prepare``: apply the remedies diagnosis.py marks safe, and install
the guard against cold starts (evictor/hooks/evictor-guard); or undo it all.

Changes to the LXC config go into evictor's block at its end (lxc_config.py),
after a backup of the file; the unified diff is returned. Files in the rootfs
are written owned by the container's root and listed in the block, so that
``--undo`` removes exactly them. They are written without following any
symbolic link the container may have planted: evictor runs as the host's root.
A container is never prepared while evicted: its image was dumped with the
config it has, and restores with that one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from evictor import diagnosis, inspection, lxc_config
from evictor.diagnosis import HostFacts, Preparation, RootfsFile
from evictor.errors import InvalidState
from evictor.images import ImageState, ImageStore
from evictor.lxc_runtime import LxcRuntime
from evictor.model import ContainerState, IdMap, validate_container_name

# LXC keys that take one value per line (the others: the last line wins).
_LIST_KEYS = frozenset({"lxc.environment", "lxc.mount.entry", "lxc.idmap", "lxc.hook.pre-start"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prepared:
    """What ``prepare`` (or its undo) changed, or would change with ``dry_run``."""

    container: str
    diff: str  # of the LXC config; empty if unchanged
    files_added: tuple[str, ...] = ()  # in the rootfs
    files_removed: tuple[str, ...] = ()
    criu_options: tuple[str, ...] = ()  # the container's, after the change
    backup: Path | None = None  # the config as it was
    running: bool = False  # so a restart applies the change
    restarted: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.diff or self.files_added or self.files_removed)


def prepare(
    runtime: LxcRuntime,
    store: ImageStore,
    host: HostFacts,
    name: str,
    *,
    guard_hook: str,
    dry_run: bool,
) -> Prepared:
    """Apply the safe remedies, and install ``guard_hook`` (an LXC pre-start hook that
    refuses to cold-start the container while it holds a committed image)."""
    validate_container_name(name)
    with store.lock(name):
        _refuse_if_evicted(runtime, store, name)
        facts = inspection.container_facts(runtime, name)
        text = runtime.config_path(name).read_text()
        base, block = lxc_config.split(text)
        preparation = diagnosis.preparation(facts, host)
        preparation = dataclasses.replace(
            preparation, settings=(*preparation.settings, ("lxc.hook.pre-start", guard_hook))
        )
        added = preparation.rootfs_files
        before = block or lxc_config.Block()
        merged = _merge(before, preparation)
        new_text = text if merged == before else lxc_config.with_block(base, merged)
        prepared = Prepared(
            container=name,
            diff=_diff(runtime.config_path(name), text, new_text),
            files_added=tuple(f.path for f in added),
            criu_options=merged.criu_options,
            running=facts.running,
        )
        if dry_run or not prepared.changed:
            return prepared
        owner = facts.config.idmap or IdMap(root_uid=0, root_gid=0)
        for rootfs_file in added:
            write_in_rootfs(Path(facts.config.rootfs), rootfs_file, owner)
        return dataclasses.replace(prepared, backup=_rewrite(runtime.config_path(name), new_text))


def undo(runtime: LxcRuntime, store: ImageStore, name: str, *, dry_run: bool) -> Prepared:
    validate_container_name(name)
    with store.lock(name):
        _refuse_if_evicted(runtime, store, name)
        config_path = runtime.config_path(name)
        text = config_path.read_text()
        base, block = lxc_config.split(text)
        if block is None:
            return Prepared(container=name, diff="")
        rootfs = Path(runtime.container_config(name).rootfs)
        prepared = Prepared(
            container=name,
            diff=_diff(config_path, text, base),
            files_removed=block.rootfs_files,
            running=runtime.state(name) is not ContainerState.STOPPED,
        )
        if dry_run:
            return prepared
        for path in block.rootfs_files:
            remove_in_rootfs(rootfs, path)
        return dataclasses.replace(prepared, backup=_rewrite(config_path, base))


def _refuse_if_evicted(runtime: LxcRuntime, store: ImageStore, name: str) -> None:
    if store.image_state(name) is ImageState.COMMITTED:
        raise InvalidState(
            f"{name}: has a committed image, dumped with its current config: restore it"
            " (or discard the image) before preparing it",
            container=name,
        )
    runtime.state(name)  # an unknown container fails here, naming it


def _merge(block: lxc_config.Block, preparation: Preparation) -> lxc_config.Block:
    """An earlier preparation's block with a new one's changes: a key set again takes
    its new value (a list key gets one more line); options and files are added to."""
    settings = list(block.settings)
    for key, value in preparation.settings:
        if key not in _LIST_KEYS:
            settings = [(k, v) for k, v in settings if k != key]
        if (key, value) not in settings:
            settings.append((key, value))
    return lxc_config.Block(
        settings=tuple(settings),
        criu_options=tuple(dict.fromkeys((*block.criu_options, *preparation.criu_options))),
        rootfs_files=tuple(
            dict.fromkeys((*block.rootfs_files, *(f.path for f in preparation.rootfs_files)))
        ),
    )


def _diff(path: Path, before: str, after: str) -> str:
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=str(path),
            tofile=f"{path} (prepared)",
        )
    )


def _rewrite(path: Path, text: str) -> Path:
    """Replace the config atomically, keeping a copy of what it was; return the copy."""
    backup = path.with_name(f"{path.name}.evictor-backup-{time.strftime('%Y%m%dT%H%M%S')}")
    shutil.copy2(path, backup)
    temporary = path.with_name(f".{path.name}.evictor-tmp")
    temporary.write_text(text)
    os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
    os.replace(temporary, path)
    return backup


@contextmanager
def _directory_in_rootfs(rootfs: Path, path: str, owner: IdMap | None) -> Iterator[int]:
    """A descriptor of the directory holding ``path`` (absolute, inside the rootfs),
    reached without following a symbolic link; missing directories are made (owned by
    ``owner``) unless ``owner`` is None."""
    fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in [p for p in path.split("/") if p][:-1]:
            if part in (".", ".."):
                raise InvalidState(f"{path}: not a plain path")
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if owner is None:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                os.chown(part, owner.root_uid, owner.root_gid, dir_fd=fd, follow_symlinks=False)
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def write_in_rootfs(rootfs: Path, rootfs_file: RootfsFile, owner: IdMap) -> None:
    name = rootfs_file.path.rsplit("/", 1)[-1]
    with _directory_in_rootfs(rootfs, rootfs_file.path, owner) as directory:
        if rootfs_file.symlink_to is not None:
            os.symlink(rootfs_file.symlink_to, name, dir_fd=directory)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(name, flags, 0o644, dir_fd=directory)
            with os.fdopen(fd, "w") as written:
                written.write(rootfs_file.content or "")
        os.chown(name, owner.root_uid, owner.root_gid, dir_fd=directory, follow_symlinks=False)


def remove_in_rootfs(rootfs: Path, path: str) -> None:
    try:
        with _directory_in_rootfs(rootfs, path, None) as directory:
            os.unlink(path.rsplit("/", 1)[-1], dir_fd=directory)
    except FileNotFoundError:
        pass  # removed already
