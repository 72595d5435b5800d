"""The checks `compress` runs before the long work: fit, disk and RAM from the inventory, in seconds at any size."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from click.testing import CliRunner

from ccmoe_runtime.cli import main

DSV3 = "inventory:deepseek-v3-pruned192"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _fails_fast(args: list[str], code: int, *words: str) -> None:
    start = time.monotonic()
    result = invoke(*args)
    took = time.monotonic() - start
    assert result.exit_code == code, result.output
    assert took < 10, took
    for w in words:
        assert w in result.output, result.output


def test_a_too_small_budget_fails_before_any_profiling(tmp_path):
    # why: the budget check used to come after hours of profiling
    _fails_fast(["compress", DSV3, "--device", "strixhalo-128g", "--budget-gb", "50", "-o", str(tmp_path / "o.gguf")],
                4, "even the smallest plan needs", "50.00 GB")
    assert not list(tmp_path.iterdir())                      # nothing written


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_too_small_disk_fails_before_any_profiling(tiny_disk):
    _fails_fast(["compress", DSV3, "--device", "strixhalo-128g", "--budget-gb", "110", "-o", str(tiny_disk / "o.gguf")],
                4, "not enough disk", "free beside")
    assert not list(tiny_disk.iterdir())


def test_check_only_reports_fit_disk_and_ram_of_a_real_model(deepseek2_model, tmp_path):
    result = invoke("compress", str(deepseek2_model), "--device", "strixhalo-128g", "-o", str(tmp_path / "o.gguf"),
                    "--check", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert [c["name"] for c in found["checks"]] == ["fit", "disk", "ram"] and all(c["ok"] for c in found["checks"])
    assert 0 < found["smallest_plan_bytes"] <= found["budget_bytes"] and not found["streams"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", [["measure"], ["place"]])
def test_weight_less_inventories_say_what_the_command_needs(command, tmp_path, monkeypatch):
    # why: they used to say "inventory:... does not exist"
    monkeypatch.chdir(tmp_path)
    result = invoke(command[0], DSV3, *command[1:])
    assert result.exit_code in (2, 4), result.output
    assert "does not exist" not in result.output and "needs the model's weights" in result.output
