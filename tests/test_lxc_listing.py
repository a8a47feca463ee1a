"""The watched listing gives what a full listing gives, after every kind of change
to an LXC path (real files, real inotify), and stats nothing while nothing changed."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from inotify_simple import Event, flags

from evictor import lxc_listing
from evictor.images import ImageStore
from evictor.lxc_listing import WatchedListing
from evictor.lxc_runtime import LxcRuntime
from evictor.monitor import Monitor


def _container(lxc_path: Path, name: str, text: str = "lxc.uts.name = x\n") -> Path:
    (lxc_path / name).mkdir(exist_ok=True)
    config = lxc_path / name / "config"
    config.write_text(text)
    return config


@pytest.fixture
def lxc_path(tmp_path: Path) -> Path:
    path = tmp_path / "lxc"
    path.mkdir()
    _container(path, "c1")
    _container(path, "c2")
    (path / ".hidden").mkdir()
    _container(path, ".hidden")
    (path / "no-config").mkdir()
    (path / "a-file").write_text("")
    return path


@pytest.fixture
def listing(lxc_path: Path) -> Iterator[WatchedListing]:
    watched = WatchedListing(LxcRuntime(lxc_path))
    yield watched
    watched.close()


def test_the_watched_listing_follows_every_change(
    lxc_path: Path, listing: WatchedListing, tmp_path: Path
) -> None:
    def in_place_edit() -> None:
        with open(lxc_path / "c1" / "config", "a") as config:
            config.write("lxc.arch = amd64\n")

    def touch() -> None:
        os.utime(lxc_path / "c2" / "config", ns=(1, 1))

    def atomic_replace() -> None:
        (lxc_path / "c1" / "config.new").write_text("lxc.uts.name = replaced\n")
        os.replace(lxc_path / "c1" / "config.new", lxc_path / "c1" / "config")

    def symlinked_config() -> None:
        (tmp_path / "shared.conf").write_text("lxc.uts.name = shared\n")
        (lxc_path / "linked").mkdir()
        (lxc_path / "linked" / "config").symlink_to(tmp_path / "shared.conf")

    def edit_the_link_target() -> None:  # no event in the container's directory
        (tmp_path / "shared.conf").write_text("lxc.uts.name = shared, longer\n")

    def delete_c1() -> None:
        (lxc_path / "c1" / "config").unlink()
        (lxc_path / "c1").rmdir()

    changes = [
        in_place_edit,
        touch,
        atomic_replace,
        lambda: _container(lxc_path, "no-config"),  # a config made in a watched directory
        lambda: (lxc_path / "c2" / "config").unlink(),
        lambda: _container(lxc_path, "c3"),
        lambda: os.rename(lxc_path / "c3", lxc_path / "c4"),
        lambda: (lxc_path / "c4" / "config").write_text("lxc.uts.name = renamed\n"),
        symlinked_config,
        edit_the_link_target,
        delete_c1,
    ]
    full = LxcRuntime(lxc_path)
    assert (
        listing.defined()
        == full.defined()
        == {name: full.config_digest(name) for name in ("c1", "c2")}
    )
    for change in changes:
        before = full.defined()
        change()
        after = full.defined()
        assert after != before  # each change is one a listing must see
        assert listing.defined() == after
        assert list(listing.defined()) == sorted(after)


def test_nothing_changed_stats_nothing(
    lxc_path: Path, listing: WatchedListing, monkeypatch: pytest.MonkeyPatch
) -> None:
    listing.defined()
    runtime = LxcRuntime(lxc_path)
    monkeypatch.setattr(listing, "_runtime", runtime)
    stats: list[str] = []
    real_digest = runtime.config_digest

    def counted_digest(name: str) -> str | None:
        stats.append(name)
        return real_digest(name)

    monkeypatch.setattr(runtime, "config_digest", counted_digest)
    for _ in range(3):
        listing.defined()
    assert stats == []
    with open(lxc_path / "c2" / "config", "a") as config:
        config.write("lxc.arch = amd64\n")
    assert listing.defined()["c2"] == real_digest("c2")
    assert stats == ["c2"]


def test_a_lost_event_starts_over(
    lxc_path: Path, listing: WatchedListing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overflowed queue cannot be made here without changing the host's inotify
    limits: the change's event is taken away, and the overflow handed in."""
    listing.defined()
    inotify = listing._inotify
    assert inotify is not None
    os.utime(lxc_path / "c1" / "config", ns=(2, 2))
    assert inotify.read(timeout=0)  # the change's event, lost
    monkeypatch.setattr(inotify, "read", lambda timeout: [Event(-1, flags.Q_OVERFLOW, 0, "")])
    assert listing.defined() == LxcRuntime(lxc_path).defined()


def test_without_inotify_every_listing_is_full(
    lxc_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_more_instances() -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(lxc_listing, "INotify", no_more_instances)
    listing = WatchedListing(LxcRuntime(lxc_path))
    with caplog.at_level(logging.WARNING):
        assert listing.defined() == LxcRuntime(lxc_path).defined()
        os.utime(lxc_path / "c1" / "config", ns=(3, 3))
        _container(lxc_path, "c3")
        assert listing.defined() == LxcRuntime(lxc_path).defined()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "listing it in full at every tick" in warnings[0]


def test_an_lxc_path_made_later_is_watched_once_it_exists(tmp_path: Path) -> None:
    lxc_path = tmp_path / "later"
    listing = WatchedListing(LxcRuntime(lxc_path))
    try:
        assert listing.defined() == {}
        lxc_path.mkdir()
        _container(lxc_path, "c1")
        assert listing.defined() == LxcRuntime(lxc_path).defined() != {}
        assert listing._inotify is not None
        os.utime(lxc_path / "c1" / "config", ns=(4, 4))
        assert listing.defined() == LxcRuntime(lxc_path).defined()
    finally:
        listing.close()


def _inotify_instances() -> int:
    return sum(
        os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    )


def test_only_the_ticks_watch_the_lxc_path(lxc_path: Path, tmp_path: Path) -> None:
    """A command's one detailed sample lists in full; the daemon's ticks (not
    detailed) keep a watch, until the monitor is closed."""
    before = _inotify_instances()
    monitor = Monitor(LxcRuntime(lxc_path), ImageStore(tmp_path / "images"))
    try:
        detailed = monitor.sample(detail=True)
        assert _inotify_instances() == before
        ticked = monitor.sample(detail=False)
        assert _inotify_instances() == before + 1
        assert [c.name for c in ticked.containers] == [c.name for c in detailed.containers]
        assert [c.name for c in ticked.containers] == ["c1", "c2"]
    finally:
        monitor.close()
    assert _inotify_instances() == before
