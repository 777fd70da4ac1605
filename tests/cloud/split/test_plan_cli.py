"""``edgefed split plan`` as a user runs it: the plan of a real (tiny) model for a device and a
link, as a table or JSON, and clear errors for a bad model directory or device name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.compress.tiny_hf import build

CLI = (sys.executable, "-m", "edgefed.cli", "split", "plan")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bert")
    build("bert", out)
    return out


def test_a_plan_lists_every_option_and_never_sends_raw_input_when_told_not_to(
    tiny_bert: Path,
) -> None:
    link = ("--rtt-ms", "50", "--bandwidth-mbps", "10", "--seq", "32")
    table = run(str(tiny_bert), "--device", "jetson-nano", *link)
    kept = run(
        str(tiny_bert), "--device", "jetson-nano", *link, "--keep-raw-input-on-device", "--json"
    )
    assert table.returncode == 0, table.stderr
    assert kept.returncode == 0, kept.stderr
    rows = [line for line in table.stdout.splitlines() if "ms" not in line]
    assert {"all-edge", "all-cloud", "split k=1"} <= {" ".join(r[2:14].split()) for r in rows}
    assert sum(r.startswith("*") for r in rows) == 1  # the choice is marked
    plan = json.loads(kept.stdout)
    assert {o["placement"] for o in plan["options"]} == {"edge", "cloud", "split"}
    assert plan["choice"]["placement"] != "cloud"  # raw input stays on the device
    cloud = next(o for o in plan["options"] if o["placement"] == "cloud")
    assert cloud["excluded_because"] == "raw input must stay on the device"


def test_bad_model_directories_and_device_names_say_what_is_wrong(tmp_path: Path) -> None:
    missing = run(
        str(tmp_path / "none"), "--device", "jetson-nano", "--rtt-ms", "5", "--bandwidth-mbps", "10"
    )
    unknown = run(str(tmp_path), "--device", "toaster", "--rtt-ms", "5", "--bandwidth-mbps", "10")
    assert missing.returncode == 65
    assert "config.json" in missing.stderr
    assert unknown.returncode == 78
    assert "toaster" in unknown.stderr
    assert "jetson-nano" in unknown.stderr  # the known names are listed
