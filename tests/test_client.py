"""Which commands the ``evictor`` front hands to a daemon, and for which daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from evictor import client, command_server, paths


def key(config: str | None = None, lxc_path: str | None = None, state: str | None = None) -> str:
    return paths.command_key(config, lxc_path, state)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["evict", "a"], (key(), False)),
        (["-v", "status"], (key(), True)),
        (["-c", "/etc/e.toml", "restore", "a"], (key("/etc/e.toml"), False)),
        (["--config=/etc/e.toml", "-P", "/l", "list"], (key("/etc/e.toml", "/l"), False)),
        (["--state-dir", "s", "--verbose", "plan"], (key(state="s"), True)),
        # What the daemon does not run, and what argparse must judge.
        (["run"], None),
        (["-c", "/etc/e.toml", "demo"], None),
        (["check", "a"], None),
        (["prepare", "a"], None),
        (["check-config"], None),
        (["--help"], None),
        (["--conf", "/etc/e.toml", "list"], None),  # an abbreviation
        (["-c"], None),
        ([], None),
    ],
)
def test_the_front_hands_over_only_what_a_daemon_runs_as_given(
    argv: list[str], expected: tuple[str, bool] | None
) -> None:
    assert client.served_key(argv) == expected


def test_a_key_names_the_files_not_the_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert key("./e.toml", "l/", "s") == key(f"{tmp_path}/e.toml", f"{tmp_path}/l", f"{tmp_path}/s")
    assert key() == key("/etc/evictor/evictor.toml")
    assert key(state="/a") != key(lxc_path="/a")
    assert paths.command_socket_path(key()) != paths.command_socket_path(key(state="/a"))


@pytest.mark.parametrize(
    ("uid", "message", "why"),
    [
        (1000, None, "uid 1000 is not the daemon's"),
        (0, b"stamp\0/other.toml\0\0\0rest", "another config"),
        (0, b"old stamp\0/e.toml\0\0\0rest", "the daemon runs other evictor code: restart it"),
        (0, b"stamp\0/e.toml\0\0\0rest", None),
    ],
)
def test_the_server_serves_its_own_user_config_and_code_only(
    uid: int, message: bytes | None, why: str | None
) -> None:
    ours = b"stamp\0/e.toml\0\0\0rest"
    key = "\0".join(("/e.toml", "", ""))
    refusal = command_server.refusal(
        uid=uid, our_uid=0, flags=0, fds=[3, 4, 5], message=message or ours, key=key, stamp="stamp"
    )
    assert refusal == why
    assert (
        command_server.refusal(
            uid=0, our_uid=0, flags=0, fds=[3], message=ours, key=key, stamp="stamp"
        )
        == "malformed request"
    )
