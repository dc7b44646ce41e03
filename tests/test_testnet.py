"""Several hosts in network namespaces: partitions, pauses, kills and restarts (needs root)."""

from __future__ import annotations

import os
import shutil

import pytest

from mossnode.testnet import scenario

pytestmark = pytest.mark.slow


def test_testnet_scenario(tmp_path) -> None:
    assert os.geteuid() == 0 and shutil.which("ip"), "needs root and iproute2 (.ci/run installs it)"
    out: list[str] = []
    figures = scenario(4, tmp_path, out)
    assert set(figures) == {
        "form_s",
        "partition_detect_s",
        "heal_s",
        "pause_cycle_s",
        "kill_restart_s",
    }
    assert "every status agrees on membership: [4]" in out[-1]
