"""Bad input, fuzzed: every config and every command line is either accepted or a
clean one-line error with exit 2, and nothing is changed."""

from __future__ import annotations

import contextlib
import dataclasses
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evictor.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from evictor.config import Config, Section, parse_config
from evictor.errors import ConfigError


def _keys() -> dict[str, list[str]]:
    """Every key of the config, by table ("" for the top level), from its schema."""
    defaults = Config()
    keys: dict[str, list[str]] = {"": ["bogus"]}
    for field in dataclasses.fields(defaults):
        table = getattr(defaults, field.name)
        if isinstance(table, Section):
            keys[field.name] = [f.name for f in dataclasses.fields(table)]  # type: ignore[arg-type]
        else:
            keys[""].append(field.name)
    return keys


KEYS = _keys()
values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(
        [
            "10%",
            "512MiB",
            "off",
            "-1GiB",
            "1e400",
            "99%",
            "0%",
            "/abs",
            "::1",
            "127.0.0.1",
            "1TiB",
            "max",
        ]
    ),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, object]:
    document: dict[str, object] = {}
    for table, keys in KEYS.items():
        chosen = draw(st.dictionaries(st.sampled_from(keys), values, max_size=4))
        if table:
            document[table] = chosen
        else:
            document.update(chosen)
    if draw(st.booleans()):
        document["priorities"] = {
            "rules": draw(
                st.lists(
                    st.dictionaries(
                        st.sampled_from(["match", "priority", "protect", "x"]), values, max_size=3
                    ),
                    max_size=3,
                )
            )
        }
    return document


@settings(max_examples=500, deadline=None)
@given(documents())
def test_any_config_document_loads_or_names_its_key(document: dict[str, object]) -> None:
    try:
        parse_config(document)
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message
        assert message.split(":")[0].strip(), message  # starts with the key


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_config_text_loads_or_is_a_config_error(text: str) -> None:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    with contextlib.suppress(ConfigError):
        parse_config(document)


argument = st.one_of(
    st.sampled_from(
        [
            "evict",
            "restore",
            "list",
            "status",
            "plan",
            "label",
            "check-config",
            "make-room",
            "drain",
            "resume",
            "--priority",
            "--protect",
            "--clear",
            "--bytes",
            "--json",
            "--all",
            "-v",
            "../x",
            "a;rm -rf /",
            "$(id)",
            "-1",
            "99999999999999999999",
            "512MiB",
            "-P",
            "--state-dir",
            "x" * 80,
        ]
    ),
    st.text(max_size=10),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(args=st.lists(argument, max_size=5))
def test_any_command_line_is_handled_cleanly(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On an empty LXC path, with no config: nothing exists to evict or restore, so
    every command either succeeds, fails cleanly (1) or is bad usage (2)."""
    lxc_path = tmp_path / "lxc"
    lxc_path.mkdir(exist_ok=True)
    state = tmp_path / "state"
    argv = [
        "-c",
        "/nonexistent/evictor.toml",
        "-P",
        str(lxc_path),
        "--state-dir",
        str(state),
        *args,
    ]
    if any(a in ("run", "demo") for a in args):
        return  # long-running; their argument parsing is the same parser
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    err = capsys.readouterr().err
    assert code in (EXIT_OK, EXIT_FAILED, EXIT_USAGE)
    if code != EXIT_OK:
        assert err.startswith("evictor: error: ") and err.count("\n") == 1, err
    # Nothing to evict here: no image may ever appear.
    assert not (state / "images").exists() or not any(
        p for p in (state / "images").iterdir() if not p.name.startswith(".")
    )
