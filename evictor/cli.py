"""The ``evictor`` command.

Exit codes: 0 success, 1 an operation failed, 2 bad usage or a bad config
(nothing changed). Every error is one line on stderr; ``-v`` adds CRIU's log
lines and debug logs.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from evictor.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_METRICS_PORT,
    Config,
    describe,
    load_config,
    parse_size_bytes,
)
from evictor.engine import Engine, Outcome
from evictor.errors import ConfigError, EvictorError, RuntimeFailure, UsageError
from evictor.model import ContainerSample, History, HostSample, Label, validate_container_name
from evictor.ranking import Plan
from evictor.units import format_age, format_bytes

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("evictor")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, _error_line(f"{message} (see 'evictor --help')"))


def _priority_value(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"priority must be an integer, got {raw!r}") from None
    if not -(10**9) <= value <= 10**9:
        raise argparse.ArgumentTypeError(f"priority must be within +-1e9, got {raw}")
    return value


def _size_argument(raw: str) -> int:
    try:
        return parse_size_bytes(raw)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("size: ")) from None


@functools.cache
def build_parser() -> argparse.ArgumentParser:
    """The command line's parser; built once (argparse's gettext lookups make that
    take milliseconds), so that the children of the daemon's command server find
    it built by the daemon's own command line."""
    parser = _Parser(prog="evictor", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="show details and debug logs")
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"config file (default {DEFAULT_CONFIG_PATH} if it exists)",
    )
    parser.add_argument(
        "-P",
        "--lxcpath",
        type=Path,
        default=None,
        help="LXC path of the containers (overrides lxc_path)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="evictor's state directory (overrides state_dir)",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def command(
        name: str,
        handler: Callable[..., int],
        help: str,
        *,
        names: str | None = None,
        json_output: bool = False,
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        if names == "+":
            sub.add_argument("names", nargs="+", metavar="NAME")
        elif names == "1":
            sub.add_argument("name", metavar="NAME")
        if json_output:
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        sub.set_defaults(handler=handler)
        return sub

    command("evict", _cmd_evict, "checkpoint containers to disk and stop them", names="+")
    command("restore", _cmd_restore, "restore evicted containers", names="+")
    discard = command(
        "discard",
        _cmd_discard,
        "remove evicted containers' images on purpose: they start cold (LXD's stateless start)",
        names="+",
    )
    discard.add_argument("--yes", action="store_true", help="do not ask")
    command("list", _cmd_list, "containers, their memory and their images", json_output=True)
    command(
        "status",
        _cmd_status,
        "host memory and pressure, and every container's standing",
        json_output=True,
    )
    command("plan", _cmd_plan, "what evictor would do now, and why (a dry run)", json_output=True)
    label = command("label", _cmd_label, "set a container's priority or protection", names="1")
    label.add_argument("--priority", type=_priority_value, help="higher is more important")
    protection = label.add_mutually_exclusive_group()
    protection.add_argument(
        "--protect", dest="protected", action="store_true", default=None, help="never evict it"
    )
    protection.add_argument("--unprotect", dest="protected", action="store_false")
    draining = label.add_mutually_exclusive_group()
    draining.add_argument(
        "--no-drain",
        dest="drain",
        action="store_false",
        default=None,
        help="drains (by hand, or at host shutdown) leave it running",
    )
    draining.add_argument("--drain", dest="drain", action="store_true")
    label.add_argument("--clear", action="store_true", help="remove the label")
    command("run", _cmd_run, "run the daemon: evict under pressure, restore when it drops")
    make_room = command(
        "make-room",
        _cmd_make_room,
        "evict lower-priority containers until NAME's memory fits",
        names="1",
    )
    make_room.add_argument(
        "--bytes",
        type=_size_argument,
        default=None,
        metavar="SIZE",
        help="memory NAME will need, e.g. 2GiB (default: its memory limit)",
    )
    drain = command(
        "drain", _cmd_drain, "checkpoint every evictable container, e.g. before a host reboot"
    )
    drain.add_argument(
        "--all", action="store_true", help="protected ones, and those set not to drain, too"
    )
    resume = command("resume", _cmd_resume, "restore drained containers now (default: all of them)")
    resume.add_argument("names", nargs="*", metavar="NAME")
    check_ = command(
        "check",
        _cmd_check,
        "is a container checkpointable here? every reason it is not, with its remedy",
        names="+",
        json_output=True,
    )
    check_.add_argument(
        "--trial", action="store_true", help="also dump it for real, leaving it running"
    )
    prepare = command(
        "prepare",
        _cmd_prepare,
        "apply the remedies `check` marks safe: to the LXC config and, for systemd, the rootfs",
        names="1",
    )
    prepare.add_argument("--dry-run", action="store_true", help="show the changes, make none")
    prepare.add_argument("--undo", action="store_true", help="remove what prepare added")
    prepare.add_argument("--restart", action="store_true", help="restart it so that they apply")
    check = command("check-config", _cmd_check_config, "validate a config file")
    check.add_argument("path", nargs="?", type=Path, metavar="PATH")
    demo = command("demo", _cmd_demo, "run the daemon on built-in containers and a budget")
    demo.add_argument(
        "--once",
        action="store_true",
        help="exit when the scenario is done (default: wait for Ctrl-C)",
    )
    demo.add_argument(
        "--stock",
        action="store_true",
        help="a stock Debian systemd container instead: checked, prepared, evicted, restored",
    )
    demo.add_argument(
        "--port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"metrics port (default {DEFAULT_METRICS_PORT})",
    )
    return parser


def _error_line(message: str) -> str:
    """``evictor: error: message``: one line, whatever the message holds (an argument
    or a path may hold a newline)."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    return f"evictor: error: {shown}\n"


def _report(error: EvictorError) -> None:
    sys.stderr.write(_error_line(str(error)))
    if isinstance(error, RuntimeFailure):
        for line in error.log_lines:
            log.debug("  criu: %s", line)


def _report_all(outcomes: Sequence[Outcome], render: Callable[[Outcome], str]) -> int:
    """Print each outcome (errors on stderr); exit 1 if any failed."""
    failed = 0
    for outcome in outcomes:
        if outcome.error is not None:
            failed += 1
            _report(outcome.error)
        else:
            print(render(outcome))
    return EXIT_FAILED if failed else EXIT_OK


def _each(names: Sequence[str], operation: Callable[[str], Outcome]) -> Iterator[Outcome]:
    """``operation`` on every name in turn, every name checked first."""
    for name in names:
        validate_container_name(name)
    return (operation(name) for name in names)


def _cmd_evict(args: argparse.Namespace, engine: Engine) -> int:
    return _report_all(
        list(_each(args.names, engine.evict)),
        lambda o: (
            f"evicted {o.container}: {format_bytes(o.memory_bytes)} in use,"
            f" image {format_bytes(o.image_bytes)}, {o.duration_seconds:.2f} s"
        ),
    )


def _cmd_restore(args: argparse.Namespace, engine: Engine) -> int:
    return _report_all(
        list(_each(args.names, engine.restore)),
        lambda o: (
            f"restored {o.container}: image {format_bytes(o.image_bytes)},"
            f" {o.duration_seconds:.2f} s, evicted for {format_age(o.evicted_seconds)}"
        ),
    )


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _print_json(document: Any) -> None:
    print(json.dumps(_jsonable(document), indent=2, sort_keys=True))


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _state(sample: ContainerSample) -> str:
    return "EVICTED" if sample.evicted else sample.state.value


def _memory(sample: ContainerSample) -> str:
    return format_bytes(sample.usage_bytes) if sample.usage_bytes else "-"


def _image(sample: ContainerSample, now: float) -> tuple[str, str]:
    if sample.image_bytes is None or sample.evicted_at is None:
        return "-", "-"
    return format_bytes(sample.image_bytes), f"{format_age(now - sample.evicted_at)} ago"


def _cmd_list(args: argparse.Namespace, engine: Engine) -> int:
    sample = engine.sample()
    if args.json:
        _print_json({"containers": sample.containers, "orphan_images": sample.orphan_images})
        return EXIT_OK
    now = time.time()
    rows = [("NAME", "STATE", "MEMORY", "IMAGE", "EVICTED")]
    rows += [(c.name, _state(c), _memory(c), *_image(c, now)) for c in sample.containers]
    rows += [(name, "MISSING", "-", "kept", "-") for name in sample.orphan_images]
    _table(rows)
    return EXIT_OK


def _host_line(host: HostSample) -> str:
    psi = host.pressure
    pressure = (
        f"PSI some {psi.some_avg10:.1f}%/{psi.some_avg60:.1f}%,"
        f" full {psi.full_avg10:.1f}%/{psi.full_avg60:.1f}% (avg10/avg60)"
        if psi is not None
        else "no PSI"
    )
    return (
        f"host: {format_bytes(host.available_bytes)} available of"
        f" {format_bytes(host.total_bytes)}, {format_bytes(host.free_bytes)} free,"
        f" page cache {format_bytes(host.cached_bytes)}, swap"
        f" {format_bytes(host.swap_total_bytes - host.swap_free_bytes)} used; {pressure}"
    )


def _pressure_lines(plan: Plan) -> list[str]:
    if not plan.triggers:
        return ["pressure: none"]
    return [f"pressure: {t}" for t in plan.triggers] + (
        ["memory is critically low: anti-thrash cooldowns are ignored"] if plan.critical else []
    )


def _cmd_status(args: argparse.Namespace, engine: Engine) -> int:
    now = time.time()
    assessment = engine.assess(now=now, last_pressure_at=None)
    sample, plan, priorities = assessment.sample, assessment.plan, assessment.priorities
    standing, histories = engine.standing(assessment, now), assessment.histories
    if args.json:
        _print_json(
            {
                "host": sample.host,
                "pressure": [t.message for t in plan.triggers],
                "critical": plan.critical,
                "containers": [
                    {
                        **_jsonable(c),
                        "priority": priorities[c.name].value,
                        "priority_source": priorities[c.name].source,
                        "protected": priorities[c.name].protected,
                        "eligibility": standing[c.name],
                        "checkpoint_failure": histories.get(c.name, History()).checkpoint_failure,
                        "check": histories.get(c.name, History()).check,
                    }
                    for c in sample.containers
                ],
                "orphan_images": sample.orphan_images,
            }
        )
        return EXIT_OK
    print(_host_line(sample.host))
    for line in _pressure_lines(plan):
        print(line)
    print()
    rows = [
        (
            "NAME",
            "STATE",
            "PRIORITY",
            "FROM",
            "MEMORY",
            "WORKING SET",
            "ELIGIBILITY",
            "IMAGE",
            "EVICTED",
        )
    ]
    for c in sample.containers:
        p = priorities[c.name]
        rows.append(
            (
                c.name,
                _state(c),
                str(p.value),
                p.source,
                _memory(c),
                format_bytes(c.working_set_bytes) if c.usage_bytes else "-",
                standing[c.name],
                *_image(c, now),
            )
        )
    rows += [
        (
            name,
            "MISSING",
            "-",
            "-",
            "-",
            "-",
            "container deleted or renamed; image kept",
            "kept",
            "-",
        )
        for name in sample.orphan_images
    ]
    _table(rows)
    return EXIT_OK


def _cmd_plan(args: argparse.Namespace, engine: Engine) -> int:
    plan = engine.assess(now=time.time(), last_pressure_at=None).plan
    if args.json:
        _print_json({**_jsonable(plan), "pressure": plan.pressure})
        return EXIT_OK
    for line in _pressure_lines(plan):
        print(line)
    if plan.pressure:
        print(
            f"reclaim target: {format_bytes(plan.reclaim_target_bytes)},"
            f" planned: {format_bytes(plan.reclaim_planned_bytes)}"
        )
    for decision in (*plan.evictions, *plan.restores):
        print(f"{decision.action.value} {decision.container}: {decision.reason}")
    for decision in plan.standby:
        print(f"standby {decision.container}: {decision.reason}")
    for note in plan.notes:
        print(f"note: {note}")
    if not plan.evictions and not plan.restores:
        print("nothing to do")
    return EXIT_OK


def _cmd_label(args: argparse.Namespace, engine: Engine) -> int:
    name = validate_container_name(args.name)
    settings = (args.priority, args.protected, args.drain)
    if args.clear:
        if any(setting is not None for setting in settings):
            raise UsageError("--clear cannot be combined with other settings")
        engine.clear_label(name)
        print(f"{name}: label cleared")
        return EXIT_OK
    if all(setting is None for setting in settings):
        raise UsageError(
            "label needs --priority N, --protect, --unprotect, --drain, --no-drain or --clear"
        )
    priority = engine.label(
        name, Label(priority=args.priority, protected=args.protected, drain=args.drain)
    )
    protection = "protected" if priority.protected else "not protected"
    left = "" if priority.drain else ", left running by drains"
    print(f"{name}: priority {priority.value} (from {priority.source}), {protection}{left}")
    return EXIT_OK


def _cmd_discard(args: argparse.Namespace, engine: Engine) -> int:
    names = args.names
    for name in names:
        validate_container_name(name)
    if not args.yes and not sys.stdin.isatty():
        raise UsageError("discard asks before it removes a saved state: pass --yes")
    images = {c.name: c for c in engine.sample().containers}
    failed = 0
    for name in names:
        if not args.yes:
            image = images.get(name)
            shown = _image(image, time.time()) if image is not None else ("?", "?")
            answer = input(
                f"discard the image of {name} ({shown[0]}, evicted {shown[1]})? its saved"
                " running state is lost and it starts cold [y/N] "
            )
            if answer.strip().lower() not in ("y", "yes"):
                print(f"{name}: kept")
                continue
        try:
            done = engine.discard(name)
        except UsageError:
            raise
        except EvictorError as error:
            failed += 1
            _report(error)
            continue
        print(
            f"discarded the image of {name} ({format_bytes(done.manifest.image_bytes)},"
            f" evicted for {format_age(done.evicted_seconds)}): it starts cold"
        )
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_run(args: argparse.Namespace, engine: Engine) -> int:
    from evictor.command_server import Commands
    from evictor.daemon import Daemon  # APScheduler, HTTP: only for the daemon
    from evictor.engine import check_private
    from evictor.metrics import Metrics
    from evictor.paths import command_key

    config_path = args.config or DEFAULT_CONFIG_PATH
    if config_path.exists():
        check_private(config_path, "config file")
    named = (args.config, args.lxcpath, args.state_dir)
    commands = Commands(
        key=command_key(*(None if path is None else str(path) for path in named)), main=main
    )
    return Daemon(engine, Metrics(), load_config=lambda: _config(args), commands=commands).run()


def _cmd_make_room(args: argparse.Namespace, engine: Engine) -> int:
    plan, outcomes = engine.make_room(validate_container_name(args.name), args.bytes)
    print(f"{plan.triggers[0]}; reclaiming {format_bytes(plan.reclaim_target_bytes)}")
    _report_all(outcomes, lambda o: f"evicted {o.container}: {o.reason}")
    for note in plan.notes:
        print(f"note: {note}")
    evicted = sum(o.memory_bytes for o in outcomes if o.succeeded)
    return EXIT_OK if evicted >= plan.reclaim_target_bytes else EXIT_FAILED


def _cmd_drain(args: argparse.Namespace, engine: Engine) -> int:
    drained = engine.drain(include_all=args.all)
    code = _report_all(
        drained.outcomes,
        lambda o: (
            f"drained {o.container}: image {format_bytes(o.image_bytes)},"
            f" {o.duration_seconds:.2f} s"
        ),
    )
    for names, why in (
        (drained.protected, "protected; --all drains them too"),
        (drained.kept, "drain = false; --all drains them too"),
        (drained.out_of_time, "no time was left"),
    ):
        if names:
            print(f"left running ({why}): {', '.join(names)}")
    return code


def _cmd_resume(args: argparse.Namespace, engine: Engine) -> int:
    outcomes = engine.resume(args.names)
    if not outcomes:
        print("nothing to resume: no drained containers")
        return EXIT_OK
    return _report_all(outcomes, lambda o: f"resumed {o.container}: {o.duration_seconds:.2f} s")


def _cmd_check(args: argparse.Namespace, engine: Engine) -> int:
    for name in args.names:
        validate_container_name(name)
    reports, failed = [], 0
    for name in args.names:
        try:
            reports.append(engine.check(name, trial=args.trial))
        except UsageError:
            raise
        except EvictorError as error:
            failed += 1
            _report(error)
    if args.json:
        _print_json(
            [
                {**_jsonable(r), "checkpointable": r.checkpointable, "problems": r.problems}
                for r in reports
            ]
        )
    for report in [] if args.json else reports:
        trial = " (trial dump passed)" if report.trial and report.checkpointable else ""
        verdict = "checkpointable" if report.checkpointable else "not checkpointable"
        print(f"{report.container}: {verdict}{trial}")
        for finding in report.findings:
            print(f"  {finding.code}: {finding.problem}")
            print(
                f"    remedy: {finding.remedy}{' [evictor prepare]' if finding.by_prepare else ''}"
            )
        if report.trial_failure:
            print(f"  trial dump: {report.trial_failure}")
        if args.trial and not report.running:
            print("  (not running: no trial dump, and only its config and rootfs were read)")
    unfit = sum(not r.checkpointable for r in reports)
    return EXIT_FAILED if failed or unfit else EXIT_OK


def _cmd_prepare(args: argparse.Namespace, engine: Engine) -> int:
    name = validate_container_name(args.name)
    done = engine.prepare(name, undo=args.undo, dry_run=args.dry_run, restart=args.restart)
    if not done.changed:
        print(f"{name}: nothing to {'undo' if args.undo else 'prepare'}")
        return EXIT_OK
    print(done.diff, end="")
    would = "would be " if args.dry_run else ""
    for path in done.files_added:
        print(f"{would}added to its rootfs: {path}")
    for path in done.files_removed:
        print(f"{would}removed from its rootfs: {path}")
    if done.criu_options:
        print(f"CRIU options kept for it: {', '.join(done.criu_options)}")
    if args.dry_run:
        print(f"{name}: dry run, nothing changed")
    elif done.backup is not None:
        print(f"{name}: config backed up to {done.backup}")
    if done.restarted:
        print(f"{name}: restarted, the changes apply")
    elif done.running and not args.dry_run:
        print(f"{name}: running: the changes apply from its next start (--restart restarts it)")
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace, engine: Engine) -> int:
    print(f"{args.path or args.config or DEFAULT_CONFIG_PATH}: OK")
    print(describe(engine.config))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace, engine: Engine) -> int:
    from evictor.tools import demo  # the demo pulls in the testbed and the daemon

    if args.stock:
        return demo.run_stock(state_dir=engine.config.state_dir)
    return demo.run(state_dir=engine.config.state_dir, once=args.once, port=args.port)


def _config(args: argparse.Namespace) -> Config:
    """The config file the command line names (or the default), with its overrides."""
    path = args.path if args.command == "check-config" and args.path else args.config
    if args.command == "check-config" and path is None:
        path = DEFAULT_CONFIG_PATH
    config = load_config(path)
    overrides = {}
    if args.lxcpath is not None:
        overrides["lxc_path"] = args.lxcpath.absolute()
    if args.state_dir is not None:
        overrides["state_dir"] = args.state_dir.absolute()
    return dataclasses.replace(config, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = (
        logging.INFO
        if args.command in ("run", "drain", "resume", "make-room")
        else (logging.WARNING)
    )
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else quiet,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args, Engine(_config(args))))
    except UsageError as error:
        _report(error)
        return EXIT_USAGE
    except EvictorError as error:
        _report(error)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("evictor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
