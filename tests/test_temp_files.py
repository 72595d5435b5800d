"""Temporary files cannot be hijacked or left behind: a symbolic link planted at every name an output's temporaries
could have (the old predictable ones included) changes nothing outside the output's folder, a planted lock link is
refused, stale temporaries of a killed run are removed, and two real builds racing to one output leave one good
file."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ccmoe_runtime.cli import main
from ccmoe_runtime.core.errors import CcmoeError
from ccmoe_runtime.core.files import output_lock, staged_output, temp_beside
from ccmoe_runtime.model.synth import SynthSpec, write_random_gguf

INV = "inventory:deepseek-v3-pruned192"
# every temporary name an output NAME had or could have: staging, verify, types, lock-free sidecars
PLANTED = (".{n}.part", ".{n}.verify.part", ".{n}.verify.types", ".{n}.types.part", "{n}.part", ".{n}.tmp", "{n}.tmp",
           ".{n}.build.json.part", ".model.safetensors.part", ".engine.json.part")


def digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def plant(folder: Path, victims: Path, names: list[str]) -> None:
    """A link at each predictable temporary name of each output name, pointing at a victim outside `folder`."""
    victims.mkdir(exist_ok=True)
    for n in names:
        for pattern in PLANTED:
            link = folder / pattern.format(n=n)
            if not link.exists() and not link.is_symlink():
                victim = victims / f"victim-{len(list(victims.iterdir()))}"
                victim.write_text("do not touch\n")
                link.symlink_to(victim)


def links_intact(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_symlink():
            assert p.resolve().read_text() == "do not touch\n"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    spec = SynthSpec(arch="qwen3moe", n_layer=2, n_expert=4, n_expert_used=2, seed=5)
    return write_random_gguf(spec, tmp_path_factory.mktemp("temp-files-model") / "tiny.gguf")


CASES = [
    (["generate", "model", "-o", "out/m.gguf"], ["m.gguf"]),
    (["generate", "model", "--type", "q8_0", "-o", "out/q.gguf"], ["q.gguf"]),
    (["generate", "inventory", "deepseek-v3", "-o", "out/i.json"], ["i.json"]),
    (["plan", INV, "--device", "strixhalo-128g", "-o", "out/p.json"], ["p.json", "p.types.txt", "p.png"]),
    (["inspect", INV, "--save", "out/i.json"], ["i.json"]),
    (["place", "MODEL", "--device", "strixhalo-128g", "-o", "out/pl.json"], ["pl.json"]),
    (["report", "--history", "out/none.jsonl", "-o", "out/r.html"], ["r.html"]),
]


@pytest.mark.parametrize("args, names", CASES, ids=[" ".join(c[0][:2]) for c in CASES])
def test_planted_links_at_temporary_names_change_nothing_outside(tmp_path, monkeypatch, model, args, names):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    plant(tmp_path / "out", tmp_path / "victims", names)
    before = digest_tree(tmp_path / "victims")
    result = CliRunner().invoke(main, [str(model) if a == "MODEL" else a for a in args])
    assert result.exit_code == 0, result.output
    assert digest_tree(tmp_path / "victims") == before
    links_intact(tmp_path / "out")
    for n in names:
        assert (tmp_path / "out" / n).is_file() and not (tmp_path / "out" / n).is_symlink()


def test_a_planted_lock_link_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "victim").write_text("do not touch\n")
    (tmp_path / ".m.gguf.lock").symlink_to(tmp_path / "victim")
    result = CliRunner().invoke(main, ["generate", "model", "-o", "m.gguf"])
    assert result.exit_code == 2 and "symbolic link" in result.output
    assert (tmp_path / "victim").read_text() == "do not touch\n" and not (tmp_path / "m.gguf").exists()


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    out = tmp_path / "o.json"
    stale = temp_beside(out)                     # what a run killed by SIGKILL leaves
    stale.write_text("half")
    with staged_output(out) as tmp:
        tmp.write_text("{}\n")
    assert not stale.exists() and out.read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.json"]


def test_temporaries_are_created_exclusively_with_unpredictable_names(tmp_path):
    out = tmp_path / "o.gguf"
    a, b = temp_beside(out), temp_beside(out, "verify")
    assert a != b and a.name.startswith(".o.gguf.") and b.name.startswith(".o.gguf.verify.")
    assert a.stat().st_size == 0 and not a.is_symlink()


def test_one_lock_per_output(tmp_path):
    out = tmp_path / "o.gguf"
    with output_lock(out):
        with pytest.raises(CcmoeError, match="another ccmoe-run is writing"):
            with output_lock(out):
                pass
        with output_lock(tmp_path / "other.gguf"):        # another output is not blocked
            pass
    assert not (tmp_path / ".o.gguf.lock").exists()


@pytest.mark.slow
def test_planted_links_at_build_and_prune_temporaries_change_nothing_outside(engine, tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert CliRunner().invoke(main, ["plan", str(model), "--device", "cpu", "-o", "plan.json", "--no-png"]).exit_code == 0
    plant(tmp_path / "out", tmp_path / "victims", ["b.gguf", "b.gguf.build.json", "p.gguf"])
    before = digest_tree(tmp_path / "victims")
    for args in (["build", str(model), "--plan", "plan.json", "-o", "out/b.gguf"],
                 ["prune", str(model), "--keep", "2", "-o", "out/p.gguf"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    assert digest_tree(tmp_path / "victims") == before
    links_intact(tmp_path / "out")
    assert (tmp_path / "out" / "b.gguf").is_file() and not (tmp_path / "out" / "b.gguf").is_symlink()


@pytest.mark.slow
def test_two_builds_racing_to_one_output_leave_one_good_file(engine, tmp_path, model):
    plan = tmp_path / "plan.json"
    assert CliRunner().invoke(main, ["plan", str(model), "--device", "cpu", "-o", str(plan), "--no-png"]).exit_code == 0
    out = tmp_path / "out" / "b.gguf"
    cmd = [sys.executable, "-m", "ccmoe_runtime.cli", "build", str(model), "--plan", str(plan), "-o", str(out),
           "--force"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert any(rc == 0 for rc, _, _ in results), results
    for rc, _, err in results:
        assert "Traceback" not in err
        if rc:
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and "another ccmoe-run is writing" in lines[0], results
    assert sorted(p.name for p in out.parent.iterdir()) == ["b.gguf", "b.gguf.build.json"]
    inspected = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert inspected.exit_code == 0, inspected.output


def test_publishing_an_engine_ignores_links_at_its_old_staging_name(tmp_path):
    from ccmoe_runtime.engine.build import _publish
    built = tmp_path / "build" / "bin"
    built.mkdir(parents=True)
    (built / "libggml.so").write_bytes(b"\x7fELF")                 # what a build leaves: a library
    published = tmp_path / "engines" / "key"
    published.parent.mkdir()
    (tmp_path / "victim").mkdir()
    (published.parent / "key.part").symlink_to(tmp_path / "victim")  # the name staging had before
    engine = _publish(built, published, "cpu", "key", "c0ffee", [], 1.0)
    assert list((tmp_path / "victim").iterdir()) == []
    assert not published.is_symlink() and (published / "bin" / "libggml.so").read_bytes() == b"\x7fELF"
    assert engine.key == "key" and not list(published.parent.glob(".key.*.part"))


def test_a_planted_build_lock_link_is_refused_and_its_target_kept(tmp_path):
    from ccmoe_runtime.engine.build import _build_lock
    (tmp_path / "victim").write_text("do not touch\n")
    (tmp_path / "key.lock").symlink_to(tmp_path / "victim")
    with pytest.raises(CcmoeError, match="build lock"):
        _build_lock(tmp_path / "key.lock")
    assert (tmp_path / "victim").read_text() == "do not touch\n"


def test_history_is_not_appended_through_a_planted_link(tmp_path):
    from ccmoe_runtime.bench.history import append_history
    (tmp_path / "victim").write_text("do not touch\n")
    (tmp_path / "h.jsonl").symlink_to(tmp_path / "victim")
    with pytest.raises(CcmoeError, match="symbolic link"):
        append_history(tmp_path / "h.jsonl", "bench", {"x": 1})
    assert (tmp_path / "victim").read_text() == "do not touch\n"
