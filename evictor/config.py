"""evictor's configuration: one TOML file loaded into one frozen, validated object.

Unknown keys, wrong types and impossible combinations raise ConfigError naming
the key, e.g. ``triggers.low_watermark: must be below triggers.high_watermark``.
Sizes are integers (bytes) or strings with a unit ("512MiB", "2GB"); where a
share of the host's memory makes sense, "10%" (of MemTotal) too. Optional
thresholds take "off". docs/configuration.md lists every key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from evictor.errors import EvictorError

DEFAULT_CONFIG_PATH = Path("/etc/evictor/evictor.toml")

T = TypeVar("T")


class ConfigError(EvictorError):
    """The configuration is invalid; the message names the key."""


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB|%)?\s*")
_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}
_MAX_BYTES = 1 << 60  # an exbibyte: anything larger is a typo


@dataclasses.dataclass(frozen=True)
class Size:
    """A size in bytes, or a percentage of the host's total memory."""

    bytes: int | None = None
    percent: float | None = None

    def resolve(self, total_bytes: int) -> int:
        if self.percent is not None:
            return int(total_bytes * self.percent / 100)
        assert self.bytes is not None
        return self.bytes

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else f"{self.bytes}B"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    match: str  # a glob over container names
    priority: int | None = None
    protect: bool | None = None

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.match)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Triggers:
    low_watermark: Size = Size(percent=10.0)
    high_watermark: Size = Size(percent=20.0)
    critical_watermark: Size = Size(percent=5.0)
    min_reclaim: Size = Size(bytes=128 << 20)
    host_psi_some_avg10: float | None = None
    important_priority: int = 100
    important_psi_some_avg10: float | None = 10.0
    budget: Size | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class RestorePolicy:
    stable_seconds: float = 30.0
    margin: Size = Size(percent=5.0)
    failure_backoff_seconds: float = 60.0
    max_failure_backoff_seconds: float = 3600.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvictPolicy:
    """How long a container whose checkpoint failed is left alone (doubling per failure)."""

    failure_backoff_seconds: float = 60.0
    max_failure_backoff_seconds: float = 3600.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class AntiThrash:
    cooldown_seconds: float = 300.0
    backoff_factor: float = 2.0
    window_seconds: float = 3600.0
    max_cooldown_seconds: float = 3600.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Priorities:
    default: int = 0
    rules: tuple[Rule, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Metrics:
    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9857


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    lxc_path: Path = Path("/var/lib/lxc")
    state_dir: Path = Path("/var/lib/evictor")
    interval_seconds: float = 1.0
    triggers: Triggers = Triggers()
    evict: EvictPolicy = EvictPolicy()
    restore: RestorePolicy = RestorePolicy()
    antithrash: AntiThrash = AntiThrash()
    priorities: Priorities = Priorities()
    metrics: Metrics = Metrics()

    @property
    def image_dir(self) -> Path:
        return self.state_dir / "images"


# --- value converters: each takes (key, raw) and raises ConfigError naming key ---


def _type_error(key: str, expected: str, raw: object) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {type(raw).__name__} {raw!r}")


def _size(key: str, raw: object, *, percent_allowed: bool = True) -> Size:
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise _type_error(key, 'a size such as 536870912, "512MiB" or "10%"', raw)
    if isinstance(raw, int):
        if raw < 0:
            raise ConfigError(f"{key}: must not be negative, got {raw}")
        if raw > _MAX_BYTES:
            raise ConfigError(f"{key}: {raw} bytes is larger than any host")
        return Size(bytes=raw)
    if raw.strip().startswith("-"):
        raise ConfigError(f"{key}: must not be negative, got {raw!r}")
    match = _SIZE.fullmatch(raw)
    if match is None:
        raise ConfigError(f'{key}: {raw!r} is not a size (use e.g. "512MiB", "2GB" or "10%")')
    number, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        if not percent_allowed:
            raise ConfigError(f"{key}: must be a size in bytes, not a percentage")
        if not 0 < number < 100:
            raise ConfigError(f"{key}: a percentage must be between 0 and 100, got {raw!r}")
        return Size(percent=number)
    size_bytes = int(number * _UNITS[unit])
    if size_bytes > _MAX_BYTES:
        raise ConfigError(f"{key}: {raw!r} is larger than any host")
    return Size(bytes=size_bytes)


def parse_size_bytes(text: str) -> int:
    """A size given on the command line ("512MiB", "2GB", "1073741824"), in bytes."""
    size = _size("size", int(text) if text.isdigit() else text, percent_allowed=False)
    assert size.bytes is not None
    return size.bytes


def _optional(convert: Callable[[str, object], T]) -> Callable[[str, object], T | None]:
    def optional(key: str, raw: object) -> T | None:
        return None if raw == "off" else convert(key, raw)

    return optional


def _number(key: str, raw: object, *, minimum: float = 0.0, maximum: float = math.inf) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _type_error(key, "a number", raw)
    value = float(raw)
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise ConfigError(f"{key}: must be between {minimum:g} and {maximum:g}, got {raw!r}")
    return value


def _positive(key: str, raw: object) -> float:
    value = _number(key, raw)
    if value <= 0:
        raise ConfigError(f"{key}: must be greater than 0, got {raw!r}")
    return value


def _percent(key: str, raw: object) -> float:
    return _number(key, raw, maximum=100.0)


def _integer(key: str, raw: object, *, minimum: int = -(10**9), maximum: int = 10**9) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise _type_error(key, "an integer", raw)
    if not minimum <= raw <= maximum:
        raise ConfigError(f"{key}: must be between {minimum} and {maximum}, got {raw}")
    return raw


def _boolean(key: str, raw: object) -> bool:
    if not isinstance(raw, bool):
        raise _type_error(key, "true or false", raw)
    return raw


def _path(key: str, raw: object) -> Path:
    if not isinstance(raw, str) or not raw.startswith("/"):
        raise ConfigError(f"{key}: expected an absolute path, got {raw!r}")
    return Path(raw)


def _address(key: str, raw: object) -> str:
    if not isinstance(raw, str):
        raise _type_error(key, "an IP address", raw)
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError as error:
        raise ConfigError(f"{key}: {raw!r} is not an IP address") from error


def _port(key: str, raw: object) -> int:
    return _integer(key, raw, minimum=1, maximum=65535)


def _priority(key: str, raw: object) -> int:
    return _integer(key, raw)


def _glob(key: str, raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f'{key}: expected a non-empty glob such as "db-*", got {raw!r}')
    return raw


class _Table:
    """One TOML table being read: remembers which keys were taken, to catch the rest."""

    def __init__(self, prefix: str, raw: object) -> None:
        if not isinstance(raw, dict):
            raise _type_error(prefix.rstrip("."), "a table", raw)
        self.prefix = prefix
        self.raw: dict[str, Any] = raw
        self.taken: set[str] = set()

    def take(self, key: str, convert: Callable[[str, object], T], default: T) -> T:
        self.taken.add(key)
        if key not in self.raw:
            return default
        return convert(self.prefix + key, self.raw[key])

    def table(self, key: str) -> _Table:
        self.taken.add(key)
        return _Table(f"{self.prefix}{key}.", self.raw.get(key, {}))

    def done(self) -> None:
        for key in sorted(set(self.raw) - self.taken):
            raise ConfigError(f"{self.prefix}{key}: unknown key")


def _triggers(table: _Table) -> Triggers:
    d = Triggers()
    triggers = Triggers(
        low_watermark=table.take("low_watermark", _size, d.low_watermark),
        high_watermark=table.take("high_watermark", _size, d.high_watermark),
        critical_watermark=table.take("critical_watermark", _size, d.critical_watermark),
        min_reclaim=table.take("min_reclaim", _size, d.min_reclaim),
        host_psi_some_avg10=table.take(
            "host_psi_some_avg10", _optional(_percent), d.host_psi_some_avg10
        ),
        important_priority=table.take("important_priority", _priority, d.important_priority),
        important_psi_some_avg10=table.take(
            "important_psi_some_avg10", _optional(_percent), d.important_psi_some_avg10
        ),
        budget=table.take("budget", _optional(_size), d.budget),
    )
    table.done()
    watermarks = (triggers.critical_watermark, triggers.low_watermark, triggers.high_watermark)
    if len({w.percent is None for w in watermarks}) > 1:
        raise ConfigError(
            f"{table.prefix}low_watermark: critical_watermark, low_watermark and high_watermark"
            " must all be sizes or all percentages"
        )
    values = [w.percent if w.percent is not None else w.bytes for w in watermarks]
    if not values[1] < values[2]:  # type: ignore[operator]
        raise ConfigError(
            f"{table.prefix}low_watermark: must be below"
            f" {table.prefix}high_watermark ({triggers.low_watermark} >="
            f" {triggers.high_watermark})"
        )
    if not values[0] < values[1]:  # type: ignore[operator]
        raise ConfigError(
            f"{table.prefix}critical_watermark: must be below"
            f" {table.prefix}low_watermark ({triggers.critical_watermark} >="
            f" {triggers.low_watermark})"
        )
    return triggers


def _require_at_least(table: _Table, policy: object, maximum: str, minimum: str) -> None:
    """A cap below the value it caps is an impossible combination."""
    if getattr(policy, maximum) < getattr(policy, minimum):
        raise ConfigError(f"{table.prefix}{maximum}: must be at least {table.prefix}{minimum}")


def _restore(table: _Table) -> RestorePolicy:
    d = RestorePolicy()
    policy = RestorePolicy(
        stable_seconds=table.take("stable_seconds", _number, d.stable_seconds),
        margin=table.take("margin", _size, d.margin),
        failure_backoff_seconds=table.take(
            "failure_backoff_seconds", _positive, d.failure_backoff_seconds
        ),
        max_failure_backoff_seconds=table.take(
            "max_failure_backoff_seconds", _positive, d.max_failure_backoff_seconds
        ),
    )
    table.done()
    _require_at_least(table, policy, "max_failure_backoff_seconds", "failure_backoff_seconds")
    return policy


def _evict(table: _Table) -> EvictPolicy:
    d = EvictPolicy()
    policy = EvictPolicy(
        failure_backoff_seconds=table.take(
            "failure_backoff_seconds", _positive, d.failure_backoff_seconds
        ),
        max_failure_backoff_seconds=table.take(
            "max_failure_backoff_seconds", _positive, d.max_failure_backoff_seconds
        ),
    )
    table.done()
    _require_at_least(table, policy, "max_failure_backoff_seconds", "failure_backoff_seconds")
    return policy


def _antithrash(table: _Table) -> AntiThrash:
    d = AntiThrash()
    policy = AntiThrash(
        cooldown_seconds=table.take("cooldown_seconds", _number, d.cooldown_seconds),
        backoff_factor=table.take(
            "backoff_factor",
            lambda k, r: _number(k, r, minimum=1.0, maximum=100.0),
            d.backoff_factor,
        ),
        window_seconds=table.take("window_seconds", _number, d.window_seconds),
        max_cooldown_seconds=table.take("max_cooldown_seconds", _number, d.max_cooldown_seconds),
    )
    table.done()
    _require_at_least(table, policy, "max_cooldown_seconds", "cooldown_seconds")
    return policy


def _rule(key: str, raw: object) -> Rule:
    table = _Table(f"{key}.", raw)
    rule = Rule(
        match=table.take("match", _glob, ""),
        priority=table.take("priority", _optional(_priority), None),
        protect=table.take("protect", _optional(_boolean), None),
    )
    table.done()
    if not rule.match:
        raise ConfigError(f"{key}.match: every rule needs a glob to match container names")
    if rule.priority is None and rule.protect is None:
        raise ConfigError(f"{key}: a rule must set priority, protect or both")
    return rule


def _as_is(key: str, raw: Any) -> Any:
    return raw


def _priorities(table: _Table) -> Priorities:
    default = table.take("default", _priority, 0)
    raw_rules: Any = table.take("rules", _as_is, [])
    if not isinstance(raw_rules, list):
        raise _type_error(
            f"{table.prefix}rules", "an array of tables ([[priorities.rules]])", raw_rules
        )
    rules = tuple(_rule(f"{table.prefix}rules[{i}]", raw) for i, raw in enumerate(raw_rules))
    table.done()
    return Priorities(default=default, rules=rules)


def _metrics(table: _Table) -> Metrics:
    d = Metrics()
    metrics = Metrics(
        enabled=table.take("enabled", _boolean, d.enabled),
        address=table.take("address", _address, d.address),
        port=table.take("port", _port, d.port),
    )
    table.done()
    return metrics


def parse_config(document: dict[str, Any]) -> Config:
    """Build the Config from a parsed TOML document."""
    top = _Table("", document)
    d = Config()
    config = Config(
        lxc_path=top.take("lxc_path", _path, d.lxc_path),
        state_dir=top.take("state_dir", _path, d.state_dir),
        interval_seconds=top.take(
            "interval_seconds",
            lambda k, r: _number(k, r, minimum=0.05, maximum=3600),
            d.interval_seconds,
        ),
        triggers=_triggers(top.table("triggers")),
        evict=_evict(top.table("evict")),
        restore=_restore(top.table("restore")),
        antithrash=_antithrash(top.table("antithrash")),
        priorities=_priorities(top.table("priorities")),
        metrics=_metrics(top.table("metrics")),
    )
    top.done()
    return config


def load_config(path: Path | None) -> Config:
    """Load ``path``; with None, the default path if it exists, else the defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text") from error
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from error
    return parse_config(document)


def describe(config: Config) -> str:
    """The effective configuration on one line, for the log at start."""
    return " ".join(
        f"{field.name}={getattr(config, field.name)}" for field in dataclasses.fields(config)
    )
