from __future__ import annotations

import json

import pytest

from evictor.criu import DumpStats
from evictor.errors import ManifestError
from evictor.manifest import ImageFile, Manifest


def make_manifest(**overrides: object) -> Manifest:
    fields: dict[str, object] = dict(
        container="web-1",
        lxc_path="/var/lib/lxc",
        reason="test",
        evicted_at=1_700_000_000.5,
        memory_usage_bytes=300 << 20,
        dump_duration_seconds=1.25,
        files=(
            ImageFile(name="pages-1.img", size_bytes=4096, xxh3_128="ab" * 16),
            ImageFile(name="inventory.img", size_bytes=86, xxh3_128="cd" * 16),
        ),
        dump_stats=DumpStats(frozen_time_us=1000, pages_written=1),
    )
    fields.update(overrides)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_round_trip() -> None:
    manifest = make_manifest()
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.image_bytes == 4096 + 86


def tampered(edit: str) -> str:
    document = json.loads(make_manifest().to_json())
    if edit == "size":
        document["files"][0]["size_bytes"] += 1
    elif edit == "container":
        document["container"] = "other"
    elif edit == "format":
        document["format"] = 99
    elif edit == "drop-checksum":
        del document["body_sha256"]
    return json.dumps(document)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("size", "checksum does not match"),
        ("container", "checksum does not match"),
        ("format", "unknown format"),
        ("drop-checksum", "checksum does not match"),
    ],
)
def test_tampering_is_detected(edit: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(tampered(edit))


@pytest.mark.parametrize("text", ["", "[]", "{", '{"format": 1}', "null"])
def test_malformed_manifests_are_rejected(text: str) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(text)


@pytest.mark.parametrize("bad_name", ["../etc/passwd", "a/b", "manifest.json", ""])
def test_file_names_that_escape_the_image_are_rejected(bad_name: str) -> None:
    text = make_manifest(files=(ImageFile(name=bad_name, size_bytes=1, xxh3_128="0"),)).to_json()
    with pytest.raises(ManifestError, match="invalid file"):
        Manifest.from_json(text)


def test_a_container_name_that_escapes_the_store_is_rejected() -> None:
    with pytest.raises(ManifestError, match="invalid container name"):
        Manifest.from_json(make_manifest(container="../x").to_json())
