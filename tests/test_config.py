"""Config loading: every kind of bad config is a ConfigError naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from evictor.cli import EXIT_USAGE, main
from evictor.config import Config, Rule, Size, load_config, parse_config
from evictor.errors import ConfigError

GOOD = """
lxc_path = "/srv/lxc"
interval_seconds = 2.5

[triggers]
low_watermark = "1GiB"
high_watermark = "2GiB"
critical_watermark = "512MiB"
min_reclaim = 268435456
host_psi_some_avg10 = 40
important_psi_some_avg10 = "off"
budget = "80%"

[restore]
stable_seconds = 60
margin = "256MiB"

[antithrash]
cooldown_seconds = 120

[priorities]
default = 10

[[priorities.rules]]
match = "db-*"
priority = 100
protect = true

[[priorities.rules]]
match = "batch-*"
priority = 1

[metrics]
address = "::1"
port = 9100
"""


def test_a_full_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "evictor.toml"
    path.write_text(GOOD)
    config = load_config(path)
    assert config.lxc_path == Path("/srv/lxc") and config.interval_seconds == 2.5
    t = config.triggers
    assert (t.low_watermark, t.high_watermark, t.critical_watermark) == (
        Size(bytes=1 << 30),
        Size(bytes=2 << 30),
        Size(bytes=512 << 20),
    )
    assert t.min_reclaim == Size(bytes=256 << 20)
    assert t.host_psi_some_avg10 == 40.0 and t.important_psi_some_avg10 is None
    assert t.budget == Size(percent=80.0)
    assert config.priorities.rules == (
        Rule(match="db-*", priority=100, protect=True),
        Rule(match="batch-*", priority=1),
    )
    assert config.metrics.address == "::1" and config.metrics.port == 9100
    assert config.antithrash.cooldown_seconds == 120


def test_an_empty_config_is_the_defaults() -> None:
    assert parse_config({}) == Config()


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"frobnicate": 1}, "frobnicate: unknown key"),
        ({"triggers": {"low_watermak": "5%"}}, "triggers.low_watermak: unknown key"),
        ({"triggers": {"low_watermark": "30%"}}, "triggers.low_watermark: must be below"),
        ({"triggers": {"low_watermark": "20%"}}, "triggers.low_watermark: must be below"),
        ({"triggers": {"critical_watermark": "15%"}}, "triggers.critical_watermark: must be"),
        ({"triggers": {"low_watermark": "1GiB"}}, "must all be sizes or all percentages"),
        ({"triggers": {"min_reclaim": -1}}, "triggers.min_reclaim: must not be negative"),
        ({"triggers": {"budget": "-5MiB"}}, "triggers.budget: must not be negative"),
        ({"triggers": {"budget": "lots"}}, "triggers.budget: 'lots' is not a size"),
        ({"triggers": {"budget": "150%"}}, "between 0 and 100"),
        ({"triggers": {"budget": "99999999TiB"}}, "larger than any host"),
        ({"triggers": {"budget": 1.5}}, "triggers.budget: expected a size"),
        ({"triggers": {"host_psi_some_avg10": 101}}, "host_psi_some_avg10: must be between"),
        ({"triggers": {"important_priority": "high"}}, "expected an integer"),
        ({"triggers": "yes"}, "triggers: expected a table"),
        ({"interval_seconds": 0}, "interval_seconds: must be between"),
        ({"interval_seconds": True}, "interval_seconds: expected a number"),
        ({"interval_seconds": float("nan")}, "interval_seconds: must be between"),
        ({"lxc_path": "relative/path"}, "lxc_path: expected an absolute path"),
        ({"antithrash": {"max_cooldown_seconds": 1}}, "max_cooldown_seconds: must be at least"),
        ({"antithrash": {"backoff_factor": 0.5}}, "backoff_factor: must be between"),
        ({"priorities": {"default": 10**12}}, "priorities.default: must be between"),
        ({"priorities": {"rules": {"match": "x"}}}, "priorities.rules: expected an array"),
        ({"priorities": {"rules": [{"match": "x"}]}}, "rules[0]: a rule must set priority"),
        ({"priorities": {"rules": [{"match": "x", "drain": 1}]}}, "drain: expected true or"),
        ({"priorities": {"rules": [{"priority": 1}]}}, "rules[0].match: every rule needs"),
        ({"priorities": {"rules": [{"match": "x", "protect": "yes"}]}}, "expected true or"),
        ({"metrics": {"port": 70000}}, "metrics.port: must be between 1 and 65535"),
        ({"shutdown": {"drain": "yes"}}, "shutdown.drain: expected one of off, on-shutdown"),
        ({"shutdown": {"timeout_seconds": 0}}, "shutdown.timeout_seconds: must be greater"),
        ({"metrics": {"address": "localhost:80"}}, "metrics.address: 'localhost:80' is not"),
    ],
)
def test_bad_configs_name_their_key(document: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(document)


def test_malformed_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[triggers\nlow = ")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[triggers]\nlow_watermark = '30%'\n", "triggers.low_watermark: must be below"),
        ("bogus = 1\n", "bogus: unknown key"),
        ("=", "invalid TOML"),
    ],
)
def test_check_config_prints_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = tmp_path / "evictor.toml"
    path.write_text(text)
    assert main(["check-config", str(path)]) == EXIT_USAGE
    _, err = capsys.readouterr()
    assert message in err and err.count("\n") == 1


def test_a_bad_config_stops_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "evictor.toml"
    path.write_text("interval_seconds = -1\n")
    assert main(["-c", str(path), "--state-dir", str(tmp_path / "state"), "status"]) == EXIT_USAGE
    assert "interval_seconds" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).parents[1] / "deploy/evictor.toml"
    assert main(["check-config", str(example)]) == 0
    assert capsys.readouterr().out.startswith(f"{example}: OK")
