"""The command line in-process (Click's runner): the generated reference is current, options parse through their
parameter types, and results print as lines or JSON. Bad input over every command: tests/test_bad_input.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ccmoe_runtime import __version__
from ccmoe_runtime.cli import main
from ccmoe_runtime.cli.reference import render_reference
from ccmoe_runtime.devices.profiles import profile_names

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_the_cli_reference_in_docs_is_current():
    # why: docs/cli.md is generated; a changed option must regenerate it
    expected = render_reference()
    actual = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert actual == expected, "regenerate: python -m ccmoe_runtime.cli.reference --write docs/cli.md"


def test_the_reference_covers_every_visible_command_and_no_hidden_alias():
    page = render_reference()
    for name in ("bench", "build", "calibrate", "compress", "measure", "place", "plan", "prune", "serve",
                 "engine build", "engine info", "generate model"):
        assert f"\n## ccmoe-run {name}\n" in page
    assert "## ccmoe-run profile\n" not in page          # the old name stays callable but is not documented


def test_version_and_help():
    assert invoke("--version").output.strip() == f"ccmoe-run, version {__version__}"
    result = invoke("-h")
    assert result.exit_code == 0 and "serve" in result.output and "measure" in result.output


def test_devices_lists_every_packaged_profile():
    result = invoke("devices")
    assert result.exit_code == 0
    for name in profile_names():
        assert name in result.output


def test_a_device_profile_shows_its_pools_with_sources():
    result = invoke("devices", "strixhalo-128g", "--json")
    assert result.exit_code == 0
    shown = json.loads(result.output)
    assert shown["name"] == "strixhalo-128g" and shown["pools"]


@pytest.mark.parametrize("args, needle", [
    # why: the DEVICE type lists the known names, before any work
    (["plan", "inventory:deepseek-v3-pruned192", "--device", "no-such-device"], "strixhalo-128g"),
    # why: POSITIVE refuses 0 rather than replacing it with a default
    (["plan", "inventory:deepseek-v3-pruned192", "--device", "strixhalo-128g", "--budget-gb", "0"], "budget"),
    # why: nan passes a float parse but is no size
    (["plan", "inventory:deepseek-v3-pruned192", "--device", "strixhalo-128g", "--budget-gb", "nan"], "budget"),
    # why: a port is 1-65535
    (["serve", "--device", "cpu", "--port", "70000", "--dry-run"], "port"),
    # why: the MODEL type names what it accepts
    (["inspect", "inventory:no-such-model"], "inventory:deepseek-v3"),
])
def test_parameter_types_refuse_bad_values_in_one_line(args, needle):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ccmoe-run: error:") and "; " in lines[0]
    assert needle in lines[0]


def test_plan_of_an_inventory_prints_json_with_every_tensor_and_writes_its_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("plan", "inventory:deepseek-v3-pruned192", "--device", "strixhalo-128g", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.output)
    assert summary["arch"] == "deepseek2" and summary["n_expert"] == 192
    assert summary["file_bytes"] <= summary["budget"]["weights_bytes"]
    saved = json.loads((tmp_path / "ccmoe-plan.json").read_text())
    assert len(saved["tensors"]) > 700                     # every weight matrix of the 61 blocks gets a type
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ccmoe-plan.json", "ccmoe-plan.png", "ccmoe-plan.types.txt"]


def test_inspect_prints_the_moe_structure():
    result = invoke("inspect", "inventory:deepseek-v3")
    assert result.exit_code == 0
    assert "256 routed, 8 used per token, 1 shared" in result.output
