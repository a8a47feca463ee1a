"""The image store: one root-only directory per evicted container.

Layout under the store root (default /var/lib/evictor/images, mode 0711)::

    NAME/              CRIU's image files, dump.log, stats-dump (0700 / 0600;
                       root:MAPPED-ROOT-GROUP 0750 / 0640 for an unprivileged container)
    NAME/manifest.json the commit point: written last, atomically
    .NAME.lock         flock held by whoever is evicting or restoring NAME
    .NAME.kept-NS      an image set aside after a failure, for the operator
    .NAME.gate/        the restore gate while NAME is restored (restore_gate.py)
    .NAME.criu/        the CRIU config file of a dump or restore of NAME (lxc_runtime.py)
    .NAME.trial/       a trial dump of NAME (evictor check --trial), removed after
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import enum
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import xxhash

from evictor.criu import RESTORE_LOG, DumpStats
from evictor.errors import CorruptImage, ImageError, LockBusy, ManifestError, NoImage
from evictor.manifest import MANIFEST_NAME, ImageFile, Manifest
from evictor.model import IdMap, validate_container_name

# The store root: others may pass through, not list (see ImageStore.ensure).
ROOT_MODE = 0o711
# Files a failed restore attempt adds beside a committed image; they are not
# part of the image, and CRIU never reads them.
log = logging.getLogger(__name__)
# Names an image set aside for removal: ".NAME.removing-<ns>" in the store.
SET_ASIDE_MARK = ".removing-"

_RESTORE_LEFTOVERS = frozenset({RESTORE_LOG, "stats-restore"})
# How often the memory contents a dump has written so far are sent to the disk.
WRITEBACK_INTERVAL_SECONDS = 0.1
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
# What a CRIU killed mid-restore leaves in the image directory (its working
# directory): the "cgroup yard", a directory it mounts a tmpfs on.
_CRIU_YARD_GLOB = ".criu.cgyard.*"


class ImageState(enum.Enum):
    NONE = "none"
    PARTIAL = "partial"  # a directory without a manifest: an interrupted dump
    COMMITTED = "committed"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoredImage:
    container: str
    state: ImageState
    manifest: Manifest | None


def fsync_directory(path: Path) -> None:
    """Make a directory's entries durable (after a create, rename or removal in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> str:
    with open(path, "rb") as image_file:
        return hashlib.file_digest(image_file, xxhash.xxh3_128).hexdigest()


def _flush(path: Path) -> int:
    """Write the file back to disk; return its size in bytes."""
    with open(path, "rb") as image_file:
        os.fdatasync(image_file.fileno())
        return os.fstat(image_file.fileno()).st_size


def _drop_from_page_cache(path: Path) -> None:
    with open(path, "rb") as image_file:
        os.posix_fadvise(image_file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def seal_files(paths: list[Path]) -> tuple[ImageFile, ...]:
    """Make image files durable, checksum them, and drop them from the page cache.

    A dump leaves the image as dirty page cache, so the container's memory is
    not free until the pages are written back and released (PLATFORM.md). The
    checksums are computed from the page cache while the kernel writes it back
    (xxhash releases the GIL), so they cost no extra read and little time.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as hasher:
        digests = hasher.map(_digest, paths)
        sizes = [_flush(path) for path in paths]
        files = tuple(
            ImageFile(name=path.name, size_bytes=size_bytes, xxh3_128=digest)
            for path, size_bytes, digest in zip(paths, sizes, digests, strict=True)
        )
    for path in paths:
        _drop_from_page_cache(path)
        os.chmod(path, 0o600)
    return files


def criu_config_directory(image_dir: Path) -> Path:
    """Where a dump into (or a restore from) ``image_dir`` keeps its CRIU config
    file: beside the image, ``.NAME.criu`` for ``NAME`` or ``.NAME.trial``."""
    return image_dir.with_name(f".{image_dir.name.lstrip('.')}.criu")


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int]:
    function = ctypes.CDLL(None, use_errno=True).sync_file_range
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


def start_writeback(path: Path | str) -> None:
    """Start writing the file's dirty pages back to disk, and return at once: they
    stay cached, clean. ``sync_file_range(2)`` with SYNC_FILE_RANGE_WRITE, which
    Python's os lacks. Not a flush: nothing waits, and an error is ignored."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # removed meanwhile
    try:
        _sync_file_range()(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
    finally:
        os.close(fd)


def is_memory_contents(file_name: str) -> bool:
    """CRIU's page images: the memory contents, which CRIU copies into the
    restored processes' memory and acts on in no other way."""
    return file_name.startswith("pages-") and file_name.endswith(".img")


def verify_file(directory: Path, expected: ImageFile, *, contents: bool = True) -> str | None:
    """Return why ``expected`` does not match the file on disk, or None if it does.

    With ``contents=False`` only the size is checked.
    """
    path = directory / expected.name
    try:
        with open(path, "rb") as image_file:
            size_bytes = os.fstat(image_file.fileno()).st_size
            if size_bytes != expected.size_bytes:
                return f"{expected.name} is {size_bytes} bytes, expected {expected.size_bytes}"
            if not contents:
                return None
            if hashlib.file_digest(image_file, xxhash.xxh3_128).hexdigest() != expected.xxh3_128:
                return f"{expected.name} does not match its checksum"
    except FileNotFoundError:
        return f"{expected.name} is missing"
    return None


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        """Create the store root: others may pass through it (an unprivileged
        container's root must reach its own image) but not list it; set so if it
        was otherwise."""
        self.root.mkdir(mode=ROOT_MODE, parents=True, exist_ok=True)
        os.chmod(self.root, ROOT_MODE)

    def share_with(self, container: str, idmap: IdMap) -> None:
        """Let an unprivileged container's root read its sealed image, and nobody else.

        CRIU opens some image files from inside the container's user namespace
        at restore, some before and some after its id map is written: each file
        is owned by root (for before) with the mapped root's group (for after),
        0640, in a 0750 directory (PLATFORM.md; "owned by the mapped root, 0600"
        fails now and then on timens-0.img).
        """
        directory = self.path(container)
        for path in (directory, *directory.iterdir()):
            os.chown(path, 0, idmap.root_gid)
            os.chmod(path, 0o750 if path.is_dir() else 0o640)

    def unreachable_by(self, idmap: IdMap) -> Path | None:
        """The first directory on the way to the store that an unprivileged
        container's root cannot pass through, or None if it can reach its image."""
        for directory in (*reversed(self.root.parents), self.root):
            if not directory.exists():
                return None  # created by evictor, passable
            status = directory.stat()
            if status.st_mode & stat.S_IXOTH:
                continue
            if status.st_gid == idmap.root_gid and status.st_mode & stat.S_IXGRP:
                continue
            return directory
        return None

    def path(self, container: str) -> Path:
        return self.root / validate_container_name(container)

    @contextlib.contextmanager
    def lock(self, container: str) -> Iterator[None]:
        """Hold the container's lock, or raise LockBusy at once if another holds it."""
        self.ensure()
        lock_path = self.root / f".{validate_container_name(container)}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                raise LockBusy(
                    f"{container}: another evictor process is evicting or restoring it",
                    container=container,
                ) from error
            yield
        finally:
            os.close(fd)

    def image_state(self, container: str) -> ImageState:
        directory = self.path(container)
        if (directory / MANIFEST_NAME).is_file():
            return ImageState.COMMITTED
        if directory.is_dir():
            return ImageState.PARTIAL
        return ImageState.NONE

    def begin(self, container: str) -> Path:
        """Make an empty image directory for a new dump.

        A partial image left by an interrupted dump is removed; a committed one
        is refused, since it may be the only copy of the container's state.
        """
        self.ensure()
        state = self.image_state(container)
        directory = self.path(container)
        if state is ImageState.COMMITTED:
            raise ImageError(
                f"{container}: a committed image already exists at {directory}",
                container=container,
            )
        if state is ImageState.PARTIAL:
            shutil.rmtree(directory)
        directory.mkdir(mode=0o700)
        return directory

    @contextlib.contextmanager
    def writing_back(self, container: str) -> Iterator[None]:
        """While CRIU dumps into the image, send what it has written of the memory
        contents to the disk every 0.1 s: the disk works while CRIU still dumps, and
        the seal's flush finds little left to write. The pages stay cached for the
        seal's checksums, which so still cost no read (docs/benchmarks.md)."""
        directory = self.path(container)
        stop = threading.Event()

        def write_back() -> None:
            while not stop.wait(WRITEBACK_INTERVAL_SECONDS):
                with contextlib.suppress(OSError):  # the directory removed meanwhile
                    for entry in os.scandir(directory):
                        if is_memory_contents(entry.name):
                            start_writeback(entry.path)

        thread = threading.Thread(target=write_back, name=f"writeback-{container}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def seal(self, container: str) -> tuple[ImageFile, ...]:
        """Seal every file CRIU wrote (see seal_files), then the directory itself."""
        directory = self.path(container)
        files = seal_files([path for path in sorted(directory.iterdir()) if path.is_file()])
        fsync_directory(directory)
        return files

    def commit_dump(
        self,
        container: str,
        *,
        files: tuple[ImageFile, ...],
        lxc_path: Path,
        reason: str,
        memory_usage_bytes: int,
        dump_duration_seconds: float,
        dump_stats: DumpStats,
        evicted_at: float,
        ipv4_addresses: tuple[str, ...] = (),
    ) -> Manifest:
        """Commit a sealed dump (``files``, from seal): from here on it is the
        container's state. The one place a manifest is made."""
        manifest = Manifest(
            container=container,
            lxc_path=str(lxc_path),
            reason=reason,
            evicted_at=evicted_at,
            memory_usage_bytes=memory_usage_bytes,
            dump_duration_seconds=round(dump_duration_seconds, 6),
            files=files,
            dump_stats=dump_stats,
            ipv4_addresses=ipv4_addresses,
        )
        self.commit(manifest)
        return manifest

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest atomically: after this the image is the container's state."""
        directory = self.path(manifest.container)
        temporary = directory / f".{MANIFEST_NAME}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, manifest.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, directory / MANIFEST_NAME)
        fsync_directory(directory)

    def load(self, container: str) -> Manifest:
        """The committed manifest, unverified against the files."""
        directory = self.path(container)
        try:
            raw = (directory / MANIFEST_NAME).read_bytes()
        except FileNotFoundError as error:
            what = "an incomplete image (no manifest)" if directory.is_dir() else "no image"
            raise NoImage(f"{container}: has {what} in {self.root}", container=container) from error
        try:
            manifest = Manifest.from_json(raw.decode())
        except UnicodeDecodeError as error:
            raise CorruptImage(
                f"{container}: manifest is not UTF-8 text", container=container
            ) from error
        except ManifestError as error:
            raise CorruptImage(f"{container}: {error}", container=container) from error
        if manifest.container != container:
            raise CorruptImage(
                f"{container}: manifest is for container {manifest.container!r}",
                container=container,
            )
        return manifest

    def clear_criu_leftovers(self, container: str) -> None:
        """Remove a cgroup yard that a CRIU killed mid-restore left in the image (else
        the image would be refused as holding an unexpected file ever after). Call
        with the container's lock held, no CRIU at work on it."""
        for yard in self.path(container).glob(_CRIU_YARD_GLOB):
            # Unmounted first: the tmpfs may still be on it, in the host's namespace.
            subprocess.run(["umount", "-l", str(yard)], capture_output=True, check=False)
            try:
                yard.rmdir()
            except OSError as error:
                log.warning("%s: could not remove CRIU's %s: %s", container, yard, error)

    def verify_metadata(self, manifest: Manifest) -> None:
        """Check a loaded manifest's file list, every file but the memory
        contents, and the sizes of those.

        These are what CRIU acts on while it restores (mounts, files, sockets,
        process tree). The memory contents, of the right size, only fill the
        restored processes' memory, so they can be checked while CRIU reads
        them (restore.py); a truncated one would make CRIU's restored task spin.
        """
        container = manifest.container
        directory = self.path(container)
        listed = {f.name for f in manifest.files}
        for path in directory.iterdir():
            if path.name not in listed | _RESTORE_LEFTOVERS | {MANIFEST_NAME}:
                raise CorruptImage(
                    f"{container}: unexpected file {path.name} in image", container=container
                )
        for image_file in manifest.files:
            self._verify_file(
                manifest, image_file, contents=not is_memory_contents(image_file.name)
            )

    def verify_memory(self, manifest: Manifest) -> None:
        """Check the memory contents (``pages-*.img``) of a manifest's image."""
        for image_file in manifest.files:
            if is_memory_contents(image_file.name):
                self._verify_file(manifest, image_file, contents=True)

    def _verify_file(self, manifest: Manifest, image_file: ImageFile, *, contents: bool) -> None:
        problem = verify_file(self.path(manifest.container), image_file, contents=contents)
        if problem:
            raise CorruptImage(f"{manifest.container}: {problem}", container=manifest.container)

    def trial_path(self, container: str) -> Path:
        """Where ``evictor check --trial`` dumps, removed afterwards."""
        return self.root / f".{validate_container_name(container)}.trial"

    @property
    def criu_verdict_path(self) -> Path:
        """Where a passing ``criu check`` is remembered (criu.check_criu)."""
        return self.root / ".criu-check"

    def gate_path(self, container: str) -> Path:
        return self.root / f".{validate_container_name(container)}.gate"

    def discard(self, container: str) -> None:
        """Remove the image, and the restore gate and CRIU config a killed evictor
        may have left."""
        shutil.rmtree(self.path(container), ignore_errors=False)
        self._remove_run_leftovers(container)
        fsync_directory(self.root)

    def set_aside(self, container: str) -> None:
        """Take the image (and its gate) out of the store at once, by a rename: a
        restore is done when the container runs, not when gigabytes of its image
        and their page cache are freed (``remove_set_aside``)."""
        name = validate_container_name(container)
        os.rename(self.path(name), self.root / f".{name}{SET_ASIDE_MARK}{time.time_ns()}")
        self._remove_run_leftovers(name)
        fsync_directory(self.root)

    def _remove_run_leftovers(self, container: str) -> None:
        shutil.rmtree(self.gate_path(container), ignore_errors=True)
        shutil.rmtree(criu_config_directory(self.path(container)), ignore_errors=True)

    def set_aside_paths(self) -> list[Path]:
        """The images ``set_aside`` left that are not yet removed."""
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if SET_ASIDE_MARK in p.name]

    def remove_set_aside(self) -> None:
        """Delete what ``set_aside`` left (or a killed evictor did), in the background:
        an ``rm`` of its own session, which outlives a CLI that returns at once."""
        entries = [str(p) for p in self.set_aside_paths()]
        if entries:
            subprocess.Popen(  # argv of paths the store made: no shell
                ["rm", "-rf", "--", *entries],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )

    def discard_partial(self, container: str) -> None:
        """Remove a dump that was never committed; a committed image is never touched."""
        if self.image_state(container) is ImageState.PARTIAL:
            self.discard(container)

    def quarantine(self, container: str) -> Path:
        """Move an image aside, out of every other operation's way, and return where."""
        kept = self.root / f".{validate_container_name(container)}.kept-{time.time_ns()}"
        os.rename(self.path(container), kept)
        fsync_directory(self.root)
        return kept

    def free_bytes(self) -> int:
        return self.capacity()[1]

    def capacity(self) -> tuple[int, int]:
        """(size, free) of the filesystem that holds (or will hold) the store, in bytes;
        creates nothing."""
        existing = next(p for p in (self.root, *self.root.parents) if p.exists())
        filesystem = os.statvfs(existing)
        return filesystem.f_blocks * filesystem.f_frsize, filesystem.f_bavail * filesystem.f_frsize

    def images(self) -> list[StoredImage]:
        """Every image in the store, committed or partial, by container name."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            state = self.image_state(path.name)
            manifest = None
            if state is ImageState.COMMITTED:
                with contextlib.suppress(ImageError):
                    manifest = self.load(path.name)
            found.append(StoredImage(container=path.name, state=state, manifest=manifest))
        return found
