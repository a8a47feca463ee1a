"""`evictor status`, `plan` and `label` on real containers, as an operator runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from evictor.lxc_runtime import LxcRuntime

from .conftest import WorkloadFactory, run_evictor


def evictor(config: Path, state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_evictor("-c", str(config), "--state-dir", str(state_dir), *args)


def test_status_plan_and_labels_under_a_budget(
    runtime: LxcRuntime, workload: WorkloadFactory, tmp_path: Path
) -> None:
    low, high = workload(memory_mib=64), workload(memory_mib=64)
    guarded = workload(memory_mib=64)
    config = tmp_path / "evictor.toml"
    config.write_text(
        f'lxc_path = "{runtime.lxc_path}"\n[triggers]\nbudget = "150MiB"\nmin_reclaim = "1MiB"\n'
    )
    state = tmp_path / "state"
    assert evictor(config, state, "label", high, "--priority", "50").returncode == 0
    protected = evictor(config, state, "label", guarded, "--protect")
    assert protected.stdout.strip() == f"{guarded}: priority 0 (from default), protected"

    status = evictor(config, state, "status", "--json")
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert document["pressure"][0].startswith("containers use ")
    rows = {c["name"]: c for c in document["containers"]}
    assert rows[high]["priority"] == 50 and rows[high]["priority_source"] == "label"
    assert rows[guarded]["eligibility"] == "protected"
    assert rows[low]["eligibility"] == "evictable" and rows[low]["usage_bytes"] > 64 << 20

    plan = json.loads(evictor(config, state, "plan", "--json").stdout)
    assert [d["container"] for d in plan["evictions"]] == [low]
    text = evictor(config, state, "plan").stdout
    assert f"evict {low}: lowest-ranked (priority 0" in text

    # Labels persist: a new process sees them; --clear removes them.
    assert evictor(config, state, "label", high, "--clear").returncode == 0
    after = json.loads(evictor(config, state, "status", "--json").stdout)
    assert {c["name"]: c["priority_source"] for c in after["containers"]}[high] == "default"
    # Bad input changes nothing and exits 2 with one line.
    bad = evictor(config, state, "label", "../etc", "--priority", "1")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    nothing = evictor(config, state, "label", low)
    assert nothing.returncode == 2 and "needs --priority" in nothing.stderr
