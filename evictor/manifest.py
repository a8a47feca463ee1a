"""The manifest: what an image holds, written last, as the commit point.

An image directory without a valid manifest is a partial dump and is never
restored. The manifest carries a checksum of its own body so that accidental
damage to it is caught as surely as damage to the image files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from evictor.criu import DumpStats
from evictor.errors import ManifestError, UsageError
from evictor.model import validate_container_name

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageFile:
    name: str
    size_bytes: int
    # XXH3-128 of the contents: catches corruption at memory speed (about 6x
    # SHA-256 here); a root attacker could rewrite any checksum (docs/security.md).
    xxh3_128: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
    container: str
    lxc_path: str
    reason: str
    evicted_at: float  # Unix time, seconds
    memory_usage_bytes: int  # the container's cgroup usage just before the dump
    dump_duration_seconds: float  # lxc-checkpoint alone, without sealing
    files: tuple[ImageFile, ...]
    dump_stats: DumpStats
    # Its IPv4 addresses when it was evicted: no other container may hold one of them
    # when it is restored (absent from manifests of evictor before 0.2)
    ipv4_addresses: tuple[str, ...] = ()

    @property
    def image_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def to_json(self) -> str:
        body = _body(self)
        document = {"format": FORMAT_VERSION, **body, "body_sha256": _digest(body)}
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            document = json.loads(text)
            if not isinstance(document, dict):
                raise ManifestError("not a JSON object")
            if document.pop("format", None) != FORMAT_VERSION:
                raise ManifestError(f"unknown format (expected {FORMAT_VERSION})")
            claimed = document.pop("body_sha256", None)
            if claimed != _digest(document):
                raise ManifestError("manifest checksum does not match its contents")
            files = tuple(ImageFile(**f) for f in document.pop("files"))
            stats = DumpStats(**document.pop("dump_stats"))
            addresses = tuple(document.pop("ipv4_addresses", ()))
            manifest = cls(files=files, dump_stats=stats, ipv4_addresses=addresses, **document)
        except ManifestError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ManifestError(f"malformed manifest: {error}") from error
        try:
            validate_container_name(manifest.container)
        except UsageError as error:
            raise ManifestError(str(error)) from error
        for image_file in manifest.files:
            if "/" in image_file.name or image_file.name in ("", ".", "..", MANIFEST_NAME):
                raise ManifestError(f"manifest names an invalid file {image_file.name!r}")
        return manifest


def _body(manifest: Manifest) -> dict[str, Any]:
    return dataclasses.asdict(manifest)


def _digest(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
