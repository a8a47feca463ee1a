"""evictor's configuration: one TOML file loaded into one frozen, validated object.

The schema is written once, as the dataclasses below: each key is a field whose
metadata holds the converter that checks it. A section checks and converts its
fields when it is built, from a TOML table or in code alike, then runs its
checks across keys; so a Config is valid however it was made. Unknown keys,
wrong types and impossible combinations raise ConfigError naming the key, e.g.
``triggers.low_watermark: must be below high_watermark``. Sizes are integers
(bytes) or strings with a unit ("512MiB", "2GB"); where a share of the host's
memory makes sense, "10%" (of MemTotal) too. Optional thresholds take "off".
docs/configuration.md lists every key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

from evictor.errors import ConfigError
from evictor.paths import DEFAULT_CONFIG_FILE

DEFAULT_CONFIG_PATH = Path(DEFAULT_CONFIG_FILE)
DEFAULT_METRICS_PORT = 9857

T = TypeVar("T")
# A converter takes a key and what it was given (a TOML value, or a value of the
# key's own type when built in code) and returns the value, or raises ConfigError.
Converter = Callable[[str, Any], Any]

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


# --- converters: each takes (key, value) and raises ConfigError naming the key ---


def _type_error(key: str, expected: str, raw: object) -> ConfigError:
    return ConfigError(key, f"expected {expected}, got {type(raw).__name__} {raw!r}")


def _size_bytes(key: str, size_bytes: int | float, shown: object) -> Size:
    if size_bytes < 0:
        raise ConfigError(key, f"must not be negative, got {shown!r}")
    if size_bytes > _MAX_BYTES:
        raise ConfigError(key, f"{shown!r} is larger than any host")
    return Size(bytes=int(size_bytes))


def _size_percent(key: str, percent: float, shown: object, *, percent_allowed: bool) -> Size:
    if not percent_allowed:
        raise ConfigError(key, "must be a size in bytes, not a percentage")
    if not 0 < percent < 100:
        raise ConfigError(key, f"a percentage must be between 0 and 100, got {shown!r}")
    return Size(percent=percent)


def _size(key: str, raw: object, *, percent_allowed: bool = True) -> Size:
    if isinstance(raw, Size):
        if (raw.bytes is None) == (raw.percent is None):
            raise ConfigError(key, f"a size is bytes or a percentage, got {raw!r}")
        if raw.percent is not None:
            return _size_percent(key, raw.percent, str(raw), percent_allowed=percent_allowed)
        assert raw.bytes is not None
        return _size_bytes(key, raw.bytes, raw.bytes)
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise _type_error(key, 'a size such as 536870912, "512MiB" or "10%"', raw)
    if isinstance(raw, int):
        return _size_bytes(key, raw, raw)
    if raw.strip().startswith("-"):
        raise ConfigError(key, f"must not be negative, got {raw!r}")
    match = _SIZE.fullmatch(raw)
    if match is None:
        raise ConfigError(key, f'{raw!r} is not a size (use e.g. "512MiB", "2GB" or "10%")')
    number, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        return _size_percent(key, number, raw, percent_allowed=percent_allowed)
    return _size_bytes(key, number * _UNITS[unit], raw)


def parse_size_bytes(text: str) -> int:
    """A size given on the command line ("512MiB", "2GB", "1073741824"), in bytes."""
    size = _size("size", int(text) if text.isdigit() else text, percent_allowed=False)
    assert size.bytes is not None
    return size.bytes


def _optional(convert: Converter) -> Converter:
    """None, or "off" in TOML, turns the setting off."""

    def optional(key: str, raw: object) -> object:
        return None if raw is None or raw == "off" else convert(key, raw)

    return optional


def _number(key: str, raw: object, *, minimum: float = 0.0, maximum: float = math.inf) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _type_error(key, "a number", raw)
    value = float(raw)
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise ConfigError(key, f"must be between {minimum:g} and {maximum:g}, got {raw!r}")
    return value


def _positive(key: str, raw: object) -> float:
    value = _number(key, raw)
    if value <= 0:
        raise ConfigError(key, f"must be greater than 0, got {raw!r}")
    return value


_percent = functools.partial(_number, maximum=100.0)


def _integer(key: str, raw: object, *, minimum: int = -(10**9), maximum: int = 10**9) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise _type_error(key, "an integer", raw)
    if not minimum <= raw <= maximum:
        raise ConfigError(key, f"must be between {minimum} and {maximum}, got {raw}")
    return raw


def _boolean(key: str, raw: object) -> bool:
    if not isinstance(raw, bool):
        raise _type_error(key, "true or false", raw)
    return raw


def _path(key: str, raw: object) -> Path:
    if not isinstance(raw, str | Path) or not str(raw).startswith("/"):
        raise ConfigError(key, f"expected an absolute path, got {str(raw)!r}")
    return Path(raw)


def _address(key: str, raw: object) -> str:
    if not isinstance(raw, str):
        raise _type_error(key, "an IP address", raw)
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError as error:
        raise ConfigError(key, f"{raw!r} is not an IP address") from error


def _glob(key: str, raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(key, f'expected a non-empty glob such as "db-*", got {raw!r}')
    return raw


# --- the schema ---


def setting(default: T, convert: Converter) -> T:
    """A key of the config: its default, and the converter that checks a value."""
    return dataclasses.field(default=default, metadata={"convert": convert})


def required(convert: Converter, missing: str) -> Any:
    """A key that must be given; ``missing`` says why when it is not."""
    return dataclasses.field(metadata={"convert": convert, "missing": missing})


class Section:
    """A table of the config: a frozen dataclass whose fields carry their converters."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = field.metadata["convert"](field.name, getattr(self, field.name))
            object.__setattr__(self, field.name, value)
        self.check()

    def check(self) -> None:
        """Checks across keys, run once the keys are converted; raise ConfigError."""

    @classmethod
    def from_value(cls, key: str, raw: object) -> Self:
        """The section from a TOML table (or itself, built in code)."""
        if isinstance(raw, cls):
            return raw
        if not isinstance(raw, dict):
            raise _type_error(key, "a table", raw)
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        try:
            for unknown in sorted(set(raw) - {f.name for f in fields}):
                raise ConfigError(unknown, "unknown key")
            for field in fields:
                if "missing" in field.metadata and field.name not in raw:
                    raise ConfigError(field.name, field.metadata["missing"])
            return cls(**raw)
        except ConfigError as error:
            raise error.within(key) from None


def section(cls: type[T]) -> T:
    """A table of the config: defaults to its own defaults."""
    convert = cls.from_value  # type: ignore[attr-defined]
    return dataclasses.field(default_factory=cls, metadata={"convert": convert})


def _at_least(policy: object, maximum: str, minimum: str) -> None:
    """A cap below the value it caps is an impossible combination."""
    if getattr(policy, maximum) < getattr(policy, minimum):
        raise ConfigError(maximum, f"must be at least {minimum}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule(Section):
    match: str = required(_glob, "every rule needs a glob to match container names")
    priority: int | None = setting(None, _optional(_integer))
    protect: bool | None = setting(None, _optional(_boolean))
    drain: bool | None = setting(None, _optional(_boolean))  # false: drains leave it running

    def check(self) -> None:
        if self.priority is None and self.protect is None and self.drain is None:
            raise ConfigError(None, "a rule must set priority, protect, drain or several")

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.match)


def _rules(key: str, raw: object) -> tuple[Rule, ...]:
    if not isinstance(raw, list | tuple):
        raise _type_error(key, "an array of tables ([[priorities.rules]])", raw)
    return tuple(Rule.from_value(f"{key}[{i}]", rule) for i, rule in enumerate(raw))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Triggers(Section):
    low_watermark: Size = setting(Size(percent=10.0), _size)
    high_watermark: Size = setting(Size(percent=20.0), _size)
    critical_watermark: Size = setting(Size(percent=5.0), _size)
    min_reclaim: Size = setting(Size(bytes=128 << 20), _size)
    host_psi_some_avg10: float | None = setting(None, _optional(_percent))
    important_priority: int = setting(100, _integer)
    important_psi_some_avg10: float | None = setting(10.0, _optional(_percent))
    budget: Size | None = setting(None, _optional(_size))
    # Evict before the low watermark when MemAvailable falls fast enough to cross it
    # sooner than the evictions it would need can be made (ranking.py).
    predictive: bool = setting(True, _boolean)

    def check(self) -> None:
        watermarks = (self.critical_watermark, self.low_watermark, self.high_watermark)
        if len({w.percent is None for w in watermarks}) > 1:
            raise ConfigError(
                "low_watermark",
                "critical_watermark, low_watermark and high_watermark must all be sizes or all"
                " percentages",
            )
        critical, low, high = (w.percent if w.bytes is None else w.bytes for w in watermarks)
        assert critical is not None and low is not None and high is not None
        if not low < high:
            raise ConfigError(
                "low_watermark",
                f"must be below high_watermark ({self.low_watermark} >= {self.high_watermark})",
            )
        if not critical < low:
            raise ConfigError(
                "critical_watermark",
                f"must be below low_watermark ({self.critical_watermark} >= {self.low_watermark})",
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class FailureBackoff(Section):
    """The wait after a failure before trying again: doubling with each failure in a
    row, up to a cap."""

    failure_backoff_seconds: float = setting(60.0, _positive)
    max_failure_backoff_seconds: float = setting(3600.0, _positive)

    def check(self) -> None:
        _at_least(self, "max_failure_backoff_seconds", "failure_backoff_seconds")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvictPolicy(FailureBackoff):
    """A container whose checkpoint failed is left alone for the backoff."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RestorePolicy(FailureBackoff):
    stable_seconds: float = setting(30.0, _number)
    margin: Size = setting(Size(percent=5.0), _size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AntiThrash(Section):
    cooldown_seconds: float = setting(300.0, _number)
    backoff_factor: float = setting(2.0, functools.partial(_number, minimum=1.0, maximum=100.0))
    window_seconds: float = setting(3600.0, _number)
    max_cooldown_seconds: float = setting(3600.0, _number)

    def check(self) -> None:
        _at_least(self, "max_cooldown_seconds", "cooldown_seconds")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Priorities(Section):
    default: int = setting(0, _integer)
    rules: tuple[Rule, ...] = setting((), _rules)


def _choice(*choices: str) -> Converter:
    def choice(key: str, raw: object) -> str:
        if raw not in choices:
            raise ConfigError(key, f"expected one of {', '.join(choices)}, got {raw!r}")
        return str(raw)

    return choice


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shutdown(Section):
    """Drain when the daemon stops: checkpoint every evictable container (lowest
    priority first) so that the host can reboot without losing running state."""

    # off; on-shutdown: when the host shuts down (systemd "stopping", or runlevel 0/6);
    # on-stop: whenever the daemon is stopped (SIGTERM)
    drain: str = setting("off", _choice("off", "on-shutdown", "on-stop"))
    # evictions start no later than this after the stop began (systemd's
    # TimeoutStopSec in deploy/evictor.service is 10 minutes)
    timeout_seconds: float = setting(540.0, _positive)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Metrics(Section):
    enabled: bool = setting(True, _boolean)
    address: str = setting("127.0.0.1", _address)
    port: int = setting(DEFAULT_METRICS_PORT, functools.partial(_integer, minimum=1, maximum=65535))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(Section):
    lxc_path: Path = setting(Path("/var/lib/lxc"), _path)
    state_dir: Path = setting(Path("/var/lib/evictor"), _path)
    interval_seconds: float = setting(1.0, functools.partial(_number, minimum=0.05, maximum=3600))
    triggers: Triggers = section(Triggers)
    evict: EvictPolicy = section(EvictPolicy)
    restore: RestorePolicy = section(RestorePolicy)
    antithrash: AntiThrash = section(AntiThrash)
    priorities: Priorities = section(Priorities)
    shutdown: Shutdown = section(Shutdown)
    metrics: Metrics = section(Metrics)

    @property
    def image_dir(self) -> Path:
        return self.state_dir / "images"


def parse_config(document: dict[str, Any]) -> Config:
    """Build the Config from a parsed TOML document."""
    return Config.from_value("", document)


def load_config(path: Path | None) -> Config:
    """Load ``path``; with None, the default path if it exists, else the defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(str(path), f"cannot read: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(str(path), "not UTF-8 text") from error
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(str(path), f"invalid TOML: {error}") from error
    return parse_config(document)


def describe(config: Config) -> str:
    """The effective configuration on one line, for the log at start."""
    return " ".join(
        f"{field.name}={getattr(config, field.name)}" for field in dataclasses.fields(config)
    )
