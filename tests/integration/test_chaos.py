"""The chaos run, short (3 minutes): faults at random moments lose nothing.

bench/chaos.py says what it does; docs/reliability.md records a 30-minute run.
The seed is printed (``pytest -s``); ``EVICTOR_CHAOS_SEED`` replays one.
"""

from __future__ import annotations

import os
import time

from bench import chaos

from .conftest import TEST_ROOT

MINUTES = float(os.environ.get("EVICTOR_CHAOS_MINUTES", "3"))


def test_a_short_chaos_run_loses_nothing(test_lxc_path: object) -> None:
    seed = int(os.environ.get("EVICTOR_CHAOS_SEED", str(int(time.time()))))
    report = chaos.run(TEST_ROOT / "chaos", MINUTES, seed)
    print(f"\nchaos seed {seed}:\n{report.table()}")
    assert sum(report.faults.values()) >= MINUTES * 2, report.faults  # it did inject
    assert report.faults["kill-criu"] + report.faults["kill-lxc-checkpoint"] > 0, report.faults
    assert report.evictions > 0 and report.restores > 0
    assert report.clean, report.table()
