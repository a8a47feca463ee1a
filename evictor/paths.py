"""Where evictor looks for things before it has read its config.

Kept free of imports beyond ``os`` and ``xxhash``: the ``evictor`` command reads it
before it decides whether to import the rest (:mod:`evictor.client`).
"""

from __future__ import annotations

import os

import xxhash

DEFAULT_CONFIG_FILE = "/etc/evictor/evictor.toml"
# Root-only; on a tmpfs, so a socket left by a killed daemon goes at reboot.
COMMAND_SOCKET_DIR = "/run/evictor"
KEY_FIELDS = 3  # a key is three NUL-separated parts
# A command's request is small; its environment is most of it.
MAX_REQUEST_BYTES = 1 << 20


def command_key(config: str | None, lxc_path: str | None, state_dir: str | None) -> str:
    """What identifies a daemon to a command: its config file (resolved) and the
    overrides it was started with. A command goes to the daemon only when it names
    the same three, so it runs with exactly the config it would read itself."""
    parts = (
        os.path.realpath(config or DEFAULT_CONFIG_FILE),
        os.path.abspath(lxc_path) if lxc_path else "",
        os.path.abspath(state_dir) if state_dir else "",
    )
    return "\0".join(parts)


def command_socket_path(key: str) -> str:
    # A hash keeps the name short; the server compares the whole key.
    return os.path.join(
        COMMAND_SOCKET_DIR,
        f"commands-{xxhash.xxh64_hexdigest(key.encode(errors='surrogateescape'))}.sock",
    )


def code_stamp() -> str:
    """Names, sizes and times of evictor's modules: a daemon whose code is not the
    command's own (upgraded, not yet restarted) must not run the command."""
    package = os.path.dirname(os.path.abspath(__file__))
    entries = []
    for directory, subdirectories, files in os.walk(package):
        subdirectories[:] = [d for d in subdirectories if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                status = os.stat(os.path.join(directory, name))
                entries.append(f"{directory}/{name}:{status.st_size}:{status.st_mtime_ns}")
    return "\n".join(sorted(entries))
