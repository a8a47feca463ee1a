"""deploy/ stays true to the code: rules, dashboard, unit file and hook."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from evictor.daemon import notify_systemd
from evictor.metrics import Metrics

from .test_metrics import snapshot

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus/evictor-alerts.yml"
DASHBOARD = DEPLOY / "grafana/evictor-dashboard.json"


def exposed_names() -> set[str]:
    """Every sample name evictor exposes once each metric has seen one event."""
    metrics = Metrics()
    metrics.update(snapshot())
    metrics.evictions.labels(container="a", result="success", cause="budget").inc()
    metrics.restores.labels(container="a", result="success").inc()
    metrics.errors.labels(kind="tick").inc()
    metrics.image_rejections.labels(container="a").inc()
    for histogram in (
        metrics.checkpoint_seconds,
        metrics.frozen_seconds,
        metrics.image_bytes,
        metrics.restore_seconds,
        metrics.tick_seconds,
    ):
        histogram.observe(1)
    text = generate_latest(metrics.registry).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def referenced_names(text: str) -> set[str]:
    return set(re.findall(r"\bevictor_[a-z0-9_]+", text))


def test_alert_rules_and_dashboard_use_only_metrics_evictor_exposes() -> None:
    exposed = exposed_names()
    dashboard_text = json.dumps(json.loads(DASHBOARD.read_text()))
    for source, text in (("alerts", RULES.read_text()), ("dashboard", dashboard_text)):
        unknown = referenced_names(text) - exposed
        assert not unknown, f"{source} refers to metrics evictor does not expose: {unknown}"


def test_every_metric_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in exposed_names()}
    missing = {f for f in families if f not in readme}
    assert not missing, f"README does not document {missing}"


def test_alert_rules_are_valid_and_fire_as_intended() -> None:
    check = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        ["promtool", "test", "rules", str(ROOT / "tests/promtool/evictor-alerts-test.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert test.returncode == 0, test.stdout + test.stderr


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify, with the unit's install path pointed at this checkout."""
    venv = Path(
        subprocess.run(
            ["sh", "-c", "command -v evictor || true"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or ROOT / ".venv/bin/evictor"
    )
    unit = (
        (DEPLOY / "evictor.service")
        .read_text()
        .replace("/opt/evictor/.venv/bin/evictor", str(venv))
    )
    path = tmp_path / "evictor.service"
    path.write_text(unit)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [
        line for line in (result.stdout + result.stderr).splitlines() if "evictor.service" in line
    ]
    assert problems == [], problems
    assert "KillMode=mixed" in unit and "OOMScoreAdjust=-900" in unit


def test_the_dashboard_has_the_panels_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {
        "Host memory and pressure",
        "Container memory",
        "Evictions and restores",
        "Checkpoint and restore durations",
        "Evicted containers",
    } <= titles


@pytest.mark.parametrize("abstract", [False, True])
def test_the_daemon_tells_systemd_it_is_ready(
    abstract: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unit is Type=notify: READY=1 reaches the socket systemd names, a path or
    an abstract one; without NOTIFY_SOCKET nothing is sent."""
    path = f"\0evictor-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + path[1:] if abstract else path)
        notify_systemd("READY=1")
        assert systemd.recv(64) == b"READY=1"
        monkeypatch.delenv("NOTIFY_SOCKET")
        notify_systemd("READY=1")
        systemd.setblocking(False)
        with pytest.raises(BlockingIOError):
            systemd.recv(64)
