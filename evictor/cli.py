"""The ``evictor`` command.

Exit codes: 0 success, 1 an operation failed, 2 bad usage (nothing changed).
Every error is one line on stderr; ``-v`` adds CRIU's log lines and debug logs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from evictor import checkpoint, restore
from evictor.errors import EvictorError, RuntimeFailure, UsageError
from evictor.images import ImageState, ImageStore
from evictor.lxc_runtime import DEFAULT_LXC_PATH, LxcRuntime
from evictor.model import ContainerState, validate_container_name
from evictor.units import format_age, format_bytes

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_STATE_DIR = Path("/var/lib/evictor")

log = logging.getLogger("evictor")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"evictor: error: {message} (see 'evictor --help')\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evictor", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="show details and debug logs")
    parser.add_argument(
        "-P",
        "--lxcpath",
        type=Path,
        default=DEFAULT_LXC_PATH,
        help=f"LXC path of the containers (default {DEFAULT_LXC_PATH})",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"evictor's state; images go in STATE_DIR/images (default {DEFAULT_STATE_DIR})",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    evict = commands.add_parser("evict", help="checkpoint containers to disk and stop them")
    evict.add_argument("names", nargs="+", metavar="NAME")
    evict.set_defaults(handler=_cmd_evict)
    restore_cmd = commands.add_parser("restore", help="restore evicted containers")
    restore_cmd.add_argument("names", nargs="+", metavar="NAME")
    restore_cmd.set_defaults(handler=_cmd_restore)
    list_cmd = commands.add_parser("list", help="containers, their memory and their images")
    list_cmd.set_defaults(handler=_cmd_list)
    demo = commands.add_parser("demo", help="evict and restore a built-in demo container")
    demo.add_argument(
        "--memory-mib", type=int, default=256, help="memory the demo workload holds (default 256)"
    )
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _for_each(names: Sequence[str], action: Callable[[str], str]) -> int:
    """Run ``action`` on every name, report each outcome, exit 1 if any failed."""
    for name in names:
        validate_container_name(name)
    failed = 0
    for name in names:
        try:
            print(action(name))
        except EvictorError as error:
            failed += 1
            _report(error)
    return EXIT_FAILED if failed else EXIT_OK


def _report(error: EvictorError) -> None:
    print(f"evictor: error: {error}", file=sys.stderr)
    if isinstance(error, RuntimeFailure):
        for line in error.log_lines:
            log.debug("  criu: %s", line)


def _cmd_evict(args: argparse.Namespace, runtime: LxcRuntime, store: ImageStore) -> int:
    def evict_one(name: str) -> str:
        done = checkpoint.evict(runtime, store, name)
        return (
            f"evicted {name}: {format_bytes(done.manifest.memory_usage_bytes)} in use,"
            f" image {format_bytes(done.manifest.image_bytes)},"
            f" {done.duration_seconds:.2f} s"
        )

    return _for_each(args.names, evict_one)


def _cmd_restore(args: argparse.Namespace, runtime: LxcRuntime, store: ImageStore) -> int:
    def restore_one(name: str) -> str:
        done = restore.restore(runtime, store, name)
        return (
            f"restored {name}: image {format_bytes(done.manifest.image_bytes)},"
            f" {done.duration_seconds:.2f} s, evicted for {format_age(done.evicted_seconds)}"
        )

    return _for_each(args.names, restore_one)


def _cmd_list(args: argparse.Namespace, runtime: LxcRuntime, store: ImageStore) -> int:
    images = {image.container: image for image in store.images()}
    rows = [("NAME", "STATE", "MEMORY", "IMAGE", "EVICTED")]
    now = time.time()
    for name in sorted(set(runtime.names()) | set(images)):
        state = runtime.state(name).value if runtime.exists(name) else "MISSING"
        usage = runtime.memory_usage_bytes(name) if state == "RUNNING" else None
        image = images.get(name)
        image_size = evicted = "-"
        if image is not None and image.manifest is not None:
            if state == ContainerState.STOPPED.value:
                state = "EVICTED"
            image_size = format_bytes(image.manifest.image_bytes)
            evicted = f"{format_age(now - image.manifest.evicted_at)} ago"
        elif image is not None and image.state is ImageState.PARTIAL:
            image_size = "partial"
        rows.append(
            (name, state, format_bytes(usage) if usage is not None else "-", image_size, evicted)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace, runtime: LxcRuntime, store: ImageStore) -> int:
    from evictor import demo  # the demo pulls in the testbed, which the daemon never needs

    return demo.run(state_dir=args.state_dir, memory_mib=args.memory_mib)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    runtime = LxcRuntime(args.lxcpath)
    store = ImageStore(args.state_dir / "images")
    try:
        return int(args.handler(args, runtime, store))
    except UsageError as error:
        print(f"evictor: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except EvictorError as error:
        _report(error)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("evictor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
