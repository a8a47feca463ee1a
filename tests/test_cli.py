"""The CLI's contract for bad input: one line on stderr, exit 2, nothing changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from evictor.cli import EXIT_FAILED, EXIT_USAGE, main


def run(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> tuple[int, str, str]:
    lxc_path = tmp_path / "lxc"
    lxc_path.mkdir(exist_ok=True)
    with pytest.raises(SystemExit) as exited:
        raise SystemExit(main(["-P", str(lxc_path), "--state-dir", str(tmp_path / "state"), *args]))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


@pytest.mark.parametrize(
    "args",
    [[], ["frobnicate"], ["evict"], ["restore"], ["demo", "--port", "lots"]],
    ids=["no-command", "unknown-command", "evict-no-name", "restore-no-name", "bad-number"],
)
def test_bad_usage_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str]
) -> None:
    code, _out, err = run(capsys, tmp_path, *args)
    assert code == EXIT_USAGE
    assert err.startswith("evictor: error: ") and err.count("\n") == 1
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("name", ["../etc", "a;reboot", "$(id)", "-rf", "a b"])
def test_unsafe_names_are_refused_before_anything_happens(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str
) -> None:
    for command in ("evict", "restore"):
        code, _out, err = run(capsys, tmp_path, command, "--", name)
        assert code == EXIT_USAGE, err
        assert "invalid container name" in err and err.count("\n") == 1
    assert not (tmp_path / "state").exists()


def test_an_unknown_container_is_an_operation_failure(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _out, err = run(capsys, tmp_path, "evict", "ghost")
    assert code == EXIT_FAILED
    assert err == f"evictor: error: ghost: no such container in {tmp_path / 'lxc'}\n"


def test_list_of_an_empty_host(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, tmp_path, "list")
    assert code == 0 and err == ""
    assert out.split() == ["NAME", "STATE", "MEMORY", "IMAGE", "EVICTED"]
