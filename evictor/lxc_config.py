"""evictor's block in a container's LXC config: written by ``evictor prepare``, read
by the LXC adapter. Text in, text out: no I/O.

The block is appended at the end of the config, so that its keys win over the
same keys earlier in the file or in its includes (for LXC, the last value of a
single-valued key counts, and an empty value clears one). Comment lines in it
record what LXC has no key for: the CRIU options the container needs, and the
files ``prepare`` added to its rootfs (which ``--undo`` removes)::

    # >>> evictor prepare: `evictor prepare --undo NAME` removes this block >>>
    lxc.tty.max = 0
    # evictor.criu-option: enable-fs ramfs
    # evictor.rootfs-file: /etc/systemd/system/service.d/evictor-checkpoint.conf
    # <<< evictor prepare <<<
"""

from __future__ import annotations

import dataclasses

BEGIN = "# >>> evictor prepare: `evictor prepare --undo NAME` removes this block >>>"
END = "# <<< evictor prepare <<<"
_CRIU_OPTION = "# evictor.criu-option: "
_ROOTFS_FILE = "# evictor.rootfs-file: "


@dataclasses.dataclass(frozen=True, kw_only=True)
class Block:
    settings: tuple[tuple[str, str], ...] = ()  # (LXC key, value), in order
    criu_options: tuple[str, ...] = ()  # CRIU config-file lines, e.g. "enable-fs ramfs"
    rootfs_files: tuple[str, ...] = ()  # absolute paths inside the rootfs


def split(text: str) -> tuple[str, Block | None]:
    """The config without evictor's block, and the block (None if there is none)."""
    lines = text.splitlines(keepends=True)
    stripped = [line.rstrip("\n") for line in lines]
    if BEGIN not in stripped or END not in stripped:
        return text, None
    start, end = stripped.index(BEGIN), stripped.index(END)
    settings: list[tuple[str, str]] = []
    criu_options: list[str] = []
    rootfs_files: list[str] = []
    for line in stripped[start + 1 : end]:
        if line.startswith(_CRIU_OPTION):
            criu_options.append(line.removeprefix(_CRIU_OPTION).strip())
        elif line.startswith(_ROOTFS_FILE):
            rootfs_files.append(line.removeprefix(_ROOTFS_FILE).strip())
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.append((key.strip(), value.strip()))
    block = Block(
        settings=tuple(settings),
        criu_options=tuple(criu_options),
        rootfs_files=tuple(rootfs_files),
    )
    return "".join(lines[:start] + lines[end + 1 :]), block


def render(block: Block) -> str:
    lines = [BEGIN]
    lines += [f"{key} = {value}".rstrip() for key, value in block.settings]
    lines += [f"{_CRIU_OPTION}{option}" for option in block.criu_options]
    lines += [f"{_ROOTFS_FILE}{path}" for path in block.rootfs_files]
    lines.append(END)
    return "\n".join(lines) + "\n"


def with_block(text: str, block: Block) -> str:
    """``text`` (evictor's block already split off) with ``block`` at the end."""
    if text and not text.endswith("\n"):
        text += "\n"
    return text + render(block)
