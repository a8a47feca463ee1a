from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from evictor.criu import DumpStats
from evictor.errors import CorruptImage, ImageError, LockBusy, NoImage, UsageError
from evictor.images import ImageState, ImageStore, criu_config_directory
from evictor.manifest import MANIFEST_NAME, Manifest
from evictor.model import IdMap

NAME = "c1"


def dump(store: ImageStore, files: dict[str, bytes]) -> Path:
    """Stand in for CRIU: write image files into a fresh image directory."""
    directory = store.begin(NAME)
    for file_name, content in files.items():
        (directory / file_name).write_bytes(content)
    return directory


def commit(store: ImageStore) -> Manifest:
    return store.commit_dump(
        NAME,
        files=store.seal(NAME),
        lxc_path=Path("/lxc"),
        reason="test",
        memory_usage_bytes=100,
        dump_duration_seconds=0.1,
        dump_stats=DumpStats(),
        evicted_at=1.0,
    )


def verify(store: ImageStore) -> Manifest:
    """Every check a restore makes: the manifest, then every file against it."""
    manifest = store.load(NAME)
    store.verify_metadata(manifest)
    store.verify_memory(manifest)
    return manifest


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


@pytest.fixture
def committed(store: ImageStore) -> Manifest:
    dump(store, {"pages-1.img": os.urandom(70000), "inventory.img": b"inv", "dump.log": b"log"})
    return commit(store)


def test_a_committed_image_verifies(store: ImageStore, committed: Manifest) -> None:
    assert store.image_state(NAME) is ImageState.COMMITTED
    assert verify(store) == committed
    assert {f.name for f in committed.files} == {"pages-1.img", "inventory.img", "dump.log"}
    assert committed.image_bytes == 70000 + 3 + 3


def test_everything_is_root_only(store: ImageStore, committed: Manifest) -> None:
    # Others may pass through the store root (to an unprivileged container's image), not list it.
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o711
    assert stat.S_IMODE(store.path(NAME).stat().st_mode) == 0o700
    modes = {stat.S_IMODE(p.stat().st_mode) for p in store.path(NAME).iterdir()}
    assert modes == {0o600}


def test_an_unprivileged_container_s_root_and_nobody_else_reads_its_image(
    store: ImageStore, committed: Manifest
) -> None:
    store.share_with(NAME, IdMap(root_uid=100000, root_gid=100000))
    directory = store.path(NAME)
    assert (directory.stat().st_uid, directory.stat().st_gid) == (0, 100000)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o750
    for path in directory.iterdir():
        assert (path.stat().st_uid, path.stat().st_gid, stat.S_IMODE(path.stat().st_mode)) == (
            0,
            100000,
            0o640,
        )
    assert verify(store) == committed  # still whole


def test_a_store_an_unprivileged_root_cannot_reach_is_named() -> None:
    idmap = IdMap(root_uid=100000, root_gid=100000)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as top:  # made 0700, in a 1777 /var/tmp
        store = ImageStore(Path(top) / "state" / "images")
        assert store.unreachable_by(idmap) == Path(top)
        os.chmod(top, 0o711)
        assert store.unreachable_by(idmap) is None
        store.ensure()
        assert store.unreachable_by(idmap) is None


def test_a_loose_store_root_is_tightened(store: ImageStore) -> None:
    store.root.mkdir(mode=0o755)
    os.chmod(store.root, 0o777)
    store.ensure()
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o711


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: flip_byte(d / "pages-1.img"), "pages-1.img does not match its checksum"),
        (lambda d: os.truncate(d / "pages-1.img", 100), "pages-1.img is 100 bytes"),
        (lambda d: (d / "inventory.img").unlink(), "inventory.img is missing"),
        (lambda d: (d / "extra.img").write_bytes(b"x"), "unexpected file extra.img"),
        (lambda d: flip_byte(d / MANIFEST_NAME), "manifest"),
    ],
    ids=["flipped-byte", "truncated", "missing-file", "extra-file", "damaged-manifest"],
)
def test_damage_is_refused_and_left_as_it_is(
    store: ImageStore, committed: Manifest, damage: object, message: str
) -> None:
    directory = store.path(NAME)
    damage(directory)  # type: ignore[operator]
    snapshot = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(CorruptImage, match=message):
        verify(store)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == snapshot


def test_a_failed_restore_leaves_logs_that_do_not_spoil_the_image(
    store: ImageStore, committed: Manifest
) -> None:
    (store.path(NAME) / "restore.log").write_text("Error (x): failed\n")
    assert verify(store) == committed


def test_the_cgroup_yard_of_a_killed_criu_is_cleared_before_a_restore(
    store: ImageStore, committed: Manifest
) -> None:
    yard = store.path(NAME) / ".criu.cgyard.Ab12Cd"
    yard.mkdir()  # as a CRIU killed mid-restore leaves it (here without its tmpfs)
    with pytest.raises(CorruptImage, match=r"unexpected file \.criu\.cgyard\.Ab12Cd"):
        verify(store)
    store.clear_criu_leftovers(NAME)
    assert not yard.exists()
    assert verify(store) == committed


def test_a_missing_image_and_a_partial_one_are_not_restorable(store: ImageStore) -> None:
    with pytest.raises(NoImage, match="has no image"):
        verify(store)
    dump(store, {"pages-1.img": b"x"})
    assert store.image_state(NAME) is ImageState.PARTIAL
    with pytest.raises(NoImage, match="incomplete image"):
        verify(store)


def test_begin_replaces_a_partial_image_but_never_a_committed_one(
    store: ImageStore, committed: Manifest
) -> None:
    with pytest.raises(ImageError, match="committed image already exists"):
        store.begin(NAME)
    assert verify(store) == committed
    store.discard(NAME)
    dump(store, {"pages-1.img": b"old"})
    directory = store.begin(NAME)
    assert list(directory.iterdir()) == []


def test_discard_partial_spares_a_committed_image(store: ImageStore, committed: Manifest) -> None:
    store.discard_partial(NAME)
    assert store.image_state(NAME) is ImageState.COMMITTED


def test_quarantine_sets_an_image_aside(store: ImageStore) -> None:
    dump(store, {"pages-1.img": b"state"})
    kept = store.quarantine(NAME)
    assert store.image_state(NAME) is ImageState.NONE
    assert (kept / "pages-1.img").read_bytes() == b"state"
    assert [image.container for image in store.images()] == []


def test_a_restored_image_is_set_aside_at_once_and_removed_in_the_background(
    store: ImageStore, committed: Manifest
) -> None:
    store.set_aside(NAME)
    assert store.image_state(NAME) is ImageState.NONE and store.images() == []
    (aside,) = [p for p in store.root.iterdir() if p.name.startswith(f".{NAME}.removing-")]
    store.remove_set_aside()
    deadline = time.monotonic() + 10
    while aside.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not aside.exists()


@pytest.mark.parametrize("removal", ["discard", "set_aside"])
def test_the_gate_and_criu_config_a_killed_evictor_left_go_with_the_image(
    store: ImageStore, committed: Manifest, removal: str
) -> None:
    leftovers = [store.gate_path(NAME), criu_config_directory(store.path(NAME))]
    for directory in leftovers:
        directory.mkdir()
        (directory / "left").write_text("by a killed evictor")
    getattr(store, removal)(NAME)
    assert [d for d in leftovers if d.exists()] == []
    assert store.images() == []


def test_the_criu_config_of_a_trial_dump_is_its_own() -> None:
    root = Path("/store")
    assert criu_config_directory(root / "c1") == root / ".c1.criu"
    assert criu_config_directory(root / ".c1.trial") == root / ".c1.trial.criu"


CACHESTAT_SYSCALL = 451  # Linux 6.5, the same number on every architecture


def dirty_pages(path: Path) -> int:
    """How many of the file's cached pages are dirty, by cachestat(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    whole_file = (ctypes.c_uint64 * 2)(0, 0)
    stat_ = (ctypes.c_uint64 * 5)()  # cache, dirty, writeback, evicted, recently evicted
    with open(path, "rb") as file:
        if libc.syscall(CACHESTAT_SYSCALL, file.fileno(), whole_file, stat_, 0) != 0:
            raise OSError(ctypes.get_errno(), "cachestat")
    return int(stat_[1])


def test_what_a_dump_writes_of_the_memory_is_sent_to_the_disk_while_it_dumps() -> None:
    """Left to itself, the kernel writes a dirty page back after 30 s
    (vm.dirty_expire_centisecs), or once much more is dirty; while evictor dumps,
    it is sent within 0.1 s. In /var/tmp, on a disk: a tmpfs has nothing to write
    back."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as root:
        store = ImageStore(Path(root) / "images")
        pages = store.begin(NAME) / "pages-1.img"
        pages.write_bytes(os.urandom(8 << 20))  # as CRIU has written some
        assert dirty_pages(pages) > 0
        with store.writing_back(NAME):
            deadline = time.monotonic() + 5
            while dirty_pages(pages) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert dirty_pages(pages) == 0


def test_images_lists_committed_and_partial(store: ImageStore, committed: Manifest) -> None:
    other = ImageStore(store.root)
    (other.root / "c2").mkdir()
    images = {image.container: image for image in store.images()}
    assert images[NAME].state is ImageState.COMMITTED and images[NAME].manifest == committed
    assert images["c2"].state is ImageState.PARTIAL and images["c2"].manifest is None


def test_a_second_process_cannot_take_the_lock(store: ImageStore) -> None:
    holder = (
        "import sys, time; from pathlib import Path; from evictor.images import ImageStore\n"
        "with ImageStore(Path(sys.argv[1])).lock('c1'):\n"
        "    print('held', flush=True); time.sleep(30)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", holder, str(store.root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "held\n"
        with pytest.raises(LockBusy, match="another evictor process"), store.lock(NAME):
            pass
    finally:
        process.kill()
        process.wait()
    with store.lock(NAME):
        pass


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "x" * 65, "a b", "a;rm -rf /"])
def test_names_that_could_escape_the_store_are_refused(store: ImageStore, bad: str) -> None:
    with pytest.raises(UsageError, match="invalid container name"):
        store.path(bad)
