"""Bad input over every command: each case ends in exactly one `ccmoe-run: error:` line with the documented exit code
(docs/cli.md: 2 bad input, 3 engine, 4 memory or disk, 5 server), no traceback, and the folder it ran in unchanged."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ccmoe_runtime.cli import main
from ccmoe_runtime.model.synth import SynthSpec, write_random_gguf

BINARY = bytes(range(256)) * 4
NOT_UTF8 = b"name = \"\xff\xfe caf\xe9\"\n"
INV = "inventory:deepseek-v3-pruned192"


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with a hash of its bytes (folders and links by kind)."""
    seen = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            seen[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            seen[rel] = f"dir:{stat.S_IMODE(p.stat().st_mode):o}"
        else:
            seen[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return seen


def _mount(path: Path, options: str) -> bool:
    """A small tmpfs at `path` (root only; else False)."""
    if os.geteuid() != 0:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    spec = SynthSpec(arch="qwen3moe", n_layer=2, n_expert=4, n_expert_used=2, seed=3)
    return write_random_gguf(spec, tmp_path_factory.mktemp("bad-input-model") / "tiny.gguf")


@pytest.fixture(scope="module")
def plan(model) -> Path:
    """A real plan of `model`."""
    out = model.with_name("tiny-plan.json")
    result = CliRunner().invoke(main, ["plan", str(model), "--device", "cpu", "-o", str(out), "--no-png"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def work(tmp_path, monkeypatch, model, plan):
    """A folder with every kind of bad file, the current directory while the command runs."""
    (tmp_path / "binary.toml").write_bytes(BINARY)
    (tmp_path / "latin1.toml").write_bytes(NOT_UTF8)
    (tmp_path / "binary.jsonl").write_bytes(BINARY)
    (tmp_path / "latin1.jsonl").write_bytes(NOT_UTF8)
    (tmp_path / "binary.txt").write_bytes(BINARY)
    (tmp_path / "latin1.txt").write_bytes(NOT_UTF8)
    (tmp_path / "binary.json").write_bytes(BINARY)
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "random.gguf").write_bytes(random.Random(0).randbytes(4096))
    (tmp_path / "truncated.gguf").write_bytes(model.read_bytes()[:3000])
    (tmp_path / "existing.json").write_text("{}\n")
    (tmp_path / "list.jsonl").write_text('[1, 2]\n"text"\n{"kind": "eval"\n')
    (tmp_path / "plan.json").symlink_to(plan)
    (tmp_path / "existing.html").write_text("<html></html>\n")
    (tmp_path / "model.gguf").symlink_to(model)
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = _mount(ro, "ro,size=64k")          # root writes through mode bits: a read-only file system then
    if not mounted:
        ro.chmod(0o555)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    if mounted:
        subprocess.run(["umount", str(ro)], check=False)
    ro.chmod(0o755)


def _one_error_line(output: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ccmoe-run: error:")]
    assert len(errors) == 1, output
    assert "internal error" not in errors[0], output
    return errors[0]


def check(work: Path, args: list[str], code: int, needle: str, env: dict | None = None):
    before = snapshot(work)
    result = CliRunner().invoke(main, args, env=env)
    line = _one_error_line(result.output)
    assert result.exit_code == code, (args, result.exit_code, result.output)
    assert needle.lower() in line.lower(), (needle, line)
    assert snapshot(work) == before, f"{args} changed the folder"
    return line


CASES = [
    # read-only output folder, every command that writes
    (["generate", "model", "-o", "ro/m.gguf"], 2, "not writable"),
    (["generate", "inventory", "deepseek-v3", "-o", "ro/i.json"], 2, "not writable"),
    (["plan", INV, "--device", "strixhalo-128g", "-o", "ro/p.json"], 2, "not writable"),
    (["inspect", INV, "--save", "ro/i.json"], 2, "not writable"),
    (["place", "model.gguf", "--device", "strixhalo-128g", "-o", "ro/p.json"], 2, "not writable"),
    (["report", "--history", "latin1.jsonl", "-o", "ro/r.html"], 2, "not writable"),
    (["build", "model.gguf", "--plan", "plan.json", "-o", "ro/o.gguf"], 2, "not writable"),
    (["prune", "model.gguf", "--keep", "2", "-o", "ro/o.gguf"], 2, "not writable"),
    (["measure", "model.gguf", "-o", "ro/meas"], 2, "ro/meas"),
    (["compress", "model.gguf", "--device", "strixhalo-128g", "-o", "ro/o.gguf"], 2, "not writable"),
    (["calibrate", "--device", "cpu", "-o", "ro/c.json"], 2, "not writable"),
    (["bench", "--model", "model.gguf", "--device", "cpu", "--history", "ro/h.jsonl"], 2, "not writable"),
    (["eval", "--model", "model.gguf", "--reference", "model.gguf", "--history", "ro/h.jsonl"], 2, "not writable"),
    # -o into a missing folder below a read-only one
    (["generate", "model", "-o", "ro/missing/m.gguf"], 2, "not writable"),
    # binary or non-UTF-8 text inputs
    (["devices", "binary.toml"], 2, "binary"),
    (["devices", "latin1.toml"], 2, "utf-8"),
    (["devices", "missing.toml"], 2, "does not exist"),
    (["plan", INV, "--device", "ro", "--budget-gb", "1"], 2, "unknown device"),
    (["plan", INV, "--device", "binary.toml"], 2, "binary"),
    (["place", "model.gguf", "--device", "latin1.toml"], 2, "utf-8"),
    (["serve", "--device", "binary.toml", "--dry-run"], 2, "binary"),
    (["report", "--history", "binary.jsonl", "-o", "r.html"], 2, "binary"),
    (["report", "--history", "latin1.jsonl", "-o", "r.html"], 2, "utf-8"),
    (["bench", "--device", "cpu", "--baseline", "binary.jsonl", "--no-history"], 2,
     "binary"),
    (["bench", "--device", "cpu", "--baseline", "latin1.jsonl", "--no-history"], 2,
     "utf-8"),
    (["generate", "model", "--tensor-types", "binary.txt", "-o", "m.gguf"], 2, "binary"),
    (["generate", "model", "--tensor-types", "latin1.txt", "-o", "m.gguf"], 2, "utf-8"),
    (["inspect", "binary.json"], 2, "binary"),
    (["prune", "model.gguf", "--keep", "2", "--calib", "binary.txt", "-o", "o.gguf"], 2, "binary"),
    (["measure", "model.gguf", "--calib", "latin1.txt", "-o", "meas"], 2, "utf-8"),
    (["compress", "model.gguf", "--device", "cpu", "--calib", "binary.txt", "-o", "o.gguf"], 2, "binary"),
    (["serve", "--device", "cpu", "--api-key-file", "binary.txt", "--dry-run"], 2, "binary"),
    (["build", "model.gguf", "--plan", "binary.json", "-o", "o.gguf"], 2, "binary"),
    (["place", "model.gguf", "--device", "cpu", "--stats", "binary.json"], 2, "binary"),
    (["place", "model.gguf", "--device", "cpu", "--calibration", "binary.json"], 2, "binary"),
    (["eval", "--model", "model.gguf", "--reference", "model.gguf", "--text", "binary.txt"], 2, "binary"),
    # option values
    (["serve", "--device", "cpu", "--port", "70000", "--dry-run"], 2, "port"),
    (["plan", INV, "--device", "strixhalo-128g", "--budget-gb", "nan"], 2, "budget"),
    (["plan", INV, "--device", "strixhalo-128g", "--budget-gb", "inf"], 2, "budget"),
    (["plan", INV, "--device", "strixhalo-128g", "--budget-gb", "0"], 2, "budget"),
    (["plan", INV, "--device", "strixhalo-128g", "--budget-gb", "-3"], 2, "budget"),
    (["compress", "model.gguf", "--device", "cpu", "--budget-gb", "nan", "-o", "o.gguf"], 2, "budget"),
    (["generate", "model", "--layers", "-1", "-o", "m.gguf"], 2, "layers"),
    (["generate", "model", "--skew", "nan", "-o", "m.gguf"], 2, "skew"),
    (["bench", "--max-regression", "nan", "--no-history"], 2, "regression"),
    (["prune", "model.gguf", "--keep-ratio", "nan", "-o", "o.gguf"], 2, "keep-ratio"),
    (["prune", "model.gguf", "--keep", "2", "--alpha", "inf", "-o", "o.gguf"], 2, "alpha"),
    (["generate", "model", "--experts", "100000", "--embd", "100000", "-o", "m.gguf"], 4, "free"),
    (["generate", "model", "--layers", "0", "-o", "m.gguf"], 2, "layers"),
    (["generate", "model", "--embd", "-8", "-o", "m.gguf"], 2, "embd"),
    (["generate", "model", "--embd", "40", "-o", "m.gguf"], 2, "32"),
    (["generate", "model", "--experts", "2", "--experts-used", "4", "-o", "m.gguf"], 2, "experts"),
    (["generate", "model", "--tensor-types", "existing.json", "-o", "m.gguf"], 2, "regex=type"),
    (["place", "model.gguf", "--device", "strixhalo-128g", "--parallel", "0"], 2, "parallel"),
    (["plan", INV, "--device", "strixhalo-128g", "--parallel", "0"], 2, "parallel"),
    (["place", "model.gguf", "--device", "strixhalo-128g", "--ctx", "8"], 2, "ctx"),
    (["plan", INV, "--device", "strixhalo-128g", "--ctx", "15"], 2, "ctx"),
    (["serve", "--device", "cpu", "--ctx", "4", "--dry-run"], 2, "ctx"),
    (["prune", "model.gguf", "--keep", "9", "-o", "o.gguf"], 2, "keep"),
    (["prune", "model.gguf", "--keep-ratio", "1.5", "-o", "o.gguf"], 2, "keep"),
    (["bench", "--runs", "0", "--no-history"], 2, "runs"),
    (["serve", "--device", "cpu", "--cors-origins", "", "--dry-run"], 2, "cors"),
    (["serve", "--device", "cpu", "--cors-origins", "example.com", "--dry-run"], 2, "cors"),
    (["report", "--history", "list.jsonl", "-o", "r.html"], 2, "list.jsonl"),
    (["bench", "--device", "cpu", "--baseline", "list.jsonl", "--no-history"], 2,
     "no bench result"),
    # refuse to overwrite without --force
    (["place", "model.gguf", "--device", "strixhalo-128g", "-o", "existing.json"], 2, "--force"),
    (["report", "--history", "latin1.jsonl", "-o", "existing.html"], 2, "--force"),
    (["generate", "inventory", "deepseek-v3", "-o", "existing.json"], 2, "--force"),
    (["inspect", INV, "--save", "existing.json"], 2, "--force"),
    (["plan", INV, "--device", "strixhalo-128g", "-o", "existing.json"], 2, "--force"),
    (["calibrate", "--device", "cpu", "-o", "existing.json"], 2, "--force"),
    (["generate", "model", "-o", "model.gguf"], 2, "--force"),
    (["build", "model.gguf", "--plan", "plan.json", "-o", "model.gguf"], 2, "--force"),
    # the output is a folder
    (["generate", "model", "-o", "ro"], 2, "directory"),
    (["report", "--history", "latin1.jsonl", "-o", "."], 2, "directory"),
    # not a model: the inventory's message, before any llama.cpp tool runs
    (["build", "empty.gguf", "--plan", "plan.json", "-o", "o.gguf"], 2, "empty.gguf"),
    (["build", "random.gguf", "--plan", "plan.json", "-o", "o.gguf"], 2, "random.gguf"),
    (["build", "truncated.gguf", "--plan", "plan.json", "-o", "o.gguf"], 2, "truncated.gguf"),
    (["eval", "--model", "empty.gguf", "--reference", "model.gguf"], 2, "empty.gguf"),
    (["eval", "--model", "model.gguf", "--reference", "random.gguf"], 2, "random.gguf"),
    (["eval", "--model", "truncated.gguf", "--reference", "model.gguf"], 2, "truncated.gguf"),
    (["inspect", "random.gguf"], 2, "random.gguf"),
    (["inspect", "truncated.gguf"], 2, "truncated.gguf"),
    (["prune", "empty.gguf", "--keep", "2", "-o", "o.gguf"], 2, "empty.gguf"),
    (["place", "truncated.gguf", "--device", "cpu"], 2, "truncated.gguf"),
    (["serve", "--model", "random.gguf", "--device", "cpu", "--dry-run"], 2, "random.gguf"),
    (["inspect", "missing.gguf"], 2, "missing.gguf"),
    # not a plan
    (["build", "model.gguf", "--plan", "existing.json", "-o", "o.gguf"], 2, "plan"),
    # hosts
    (["serve", "--device", "cpu", "--host", "no-such-host.invalid", "--dry-run"], 2, "resolve"),
    (["serve", "--device", "cpu", "--host", "no-such-host.invalid", "--no-warmup"], 2, "resolve"),
]


@pytest.mark.parametrize("args, code, needle", CASES, ids=[" ".join(c[0])[:70] for c in CASES])
def test_bad_input_ends_in_one_line_and_changes_nothing(work, args, code, needle):
    check(work, args, code, needle)


def test_a_plan_for_another_model_is_refused(work, tmp_path_factory):
    # why: build must check that the plan's tensors are the model's before llama-quantize runs
    result = CliRunner().invoke(main, ["plan", INV, "--device", "strixhalo-128g", "-o", "other-plan.json",
                                       "--no-png"])
    assert result.exit_code == 0, result.output
    check(work, ["build", "model.gguf", "--plan", "other-plan.json", "-o", "o.gguf"], 2, "plan")


def test_a_dense_model_is_refused_by_bench_and_serve(work, dense_model):
    (work / "dense.gguf").symlink_to(dense_model)
    check(work, ["bench", "--model", "dense.gguf", "--device", "cpu", "--no-history"], 2, "expert")
    check(work, ["serve", "--model", "dense.gguf", "--device", "cpu", "--dry-run"], 2, "expert")
    check(work, ["prune", "dense.gguf", "--keep", "1", "-o", "o.gguf"], 2, "expert")


@pytest.mark.parametrize("profile", ["cuda-rtx4090-24g", "apple-m3max-128g", "strixhalo-128g"])
def test_a_gpu_profile_without_its_hardware_names_device_auto(work, profile):
    # why: bench and calibrate measure this host; a profile of hardware that is not here is refused up front
    from ccmoe_runtime.devices.profiles import profile_names

    names = [n for n in profile_names() if n.split("-")[0] == profile.split("-")[0]]
    if not names:
        pytest.skip(f"no {profile.split('-')[0]} profile packaged")
    check(work, ["bench", "--model", "model.gguf", "--device", names[0], "--no-history"], 2, "--device auto")
    check(work, ["calibrate", "--device", names[0], "-o", "c.json"], 2, "--device auto")


def test_serve_dry_run_and_place_work_for_every_profile_without_its_engine(work):
    # why: planning a deployment for another machine needs neither its hardware nor its engine
    from ccmoe_runtime.devices.profiles import profile_names

    for name in profile_names():
        for args in (["place", "model.gguf", "--device", name, "--no-trial"],
                     ["serve", "--model", "model.gguf", "--device", name, "--dry-run", "--no-trial"]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, (args, result.output)
            assert "Traceback" not in result.output




@pytest.fixture()
def full_disk(work):
    disk = work / "disk"
    disk.mkdir()
    if not _mount(disk, "size=256k"):
        pytest.skip("mounting a tmpfs needs root")
    with open(disk / "filler", "wb", buffering=0) as f:     # fill it to the last block
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("args", [
    ["generate", "model", "-o", "disk/m.gguf"],
    ["plan", INV, "--device", "strixhalo-128g", "-o", "disk/p.json"],
    ["inspect", INV, "--save", "disk/i.json"],
    ["place", "model.gguf", "--device", "strixhalo-128g", "-o", "disk/p.json"],
    ["generate", "inventory", "deepseek-v3", "-o", "disk/i.json"],
    ["report", "--history", "none.jsonl", "-o", "disk/r.html"],
    ["build", "model.gguf", "--plan", "plan.json", "-o", "disk/b.gguf"],
    ["prune", "model.gguf", "--keep", "2", "--method", "random", "-o", "disk/p.gguf"],
    ["generate", "model", "--type", "q4_k", "-o", "disk/q.gguf"],
], ids=lambda a: " ".join(a[:2]))
def test_a_full_disk_exits_4_and_leaves_nothing(full_disk, work, args):
    before = snapshot(work)
    result = CliRunner().invoke(main, args)
    line = _one_error_line(result.output)
    assert result.exit_code == 4, result.output
    assert "disk" in line
    assert snapshot(work) == before


def test_a_file_size_limit_exits_4_in_a_subprocess(work):
    # why: EFBIG (RLIMIT_FSIZE) is a disk that cannot take the file, as ENOSPC is
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000));"
            "from ccmoe_runtime.cli import main; sys.argv = ['ccmoe-run'] + sys.argv[1:]; main()")
    before = snapshot(work)
    result = subprocess.run([sys.executable, "-c", code, "generate", "model", "-o", "big.gguf"],
                            capture_output=True, text=True, timeout=120)
    line = _one_error_line(result.stderr)
    assert result.returncode == 4, result.stderr
    assert "disk" in line or "file size" in line
    assert snapshot(work) == before


def test_llama_quantize_past_the_file_size_limit_exits_4_and_leaves_nothing(work, engine):
    # why: the real llama-quantize dies by SIGXFSZ mid-write (the pre-check passed); exit 4, no partial file
    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    (work / "out").mkdir()
    before = snapshot(work)
    result = subprocess.run([sys.executable, "-m", "ccmoe_runtime.cli", "build", "model.gguf", "--plan", "plan.json",
                             "-o", "out/b.gguf"], capture_output=True, text=True, timeout=300, preexec_fn=limit)
    line = _one_error_line(result.stderr)
    assert result.returncode == 4, result.stderr
    assert "file size limit" in line and "llama-quantize" in line
    assert snapshot(work) == before


@pytest.mark.parametrize("args", [
    ["bench", "--model", "model.gguf", "--device", "cpu", "--history", "disk/h.jsonl"],
    ["eval", "--model", "model.gguf", "--reference", "model.gguf", "--history", "disk/h.jsonl"],
], ids=lambda a: a[0])
def test_a_history_on_a_full_disk_is_refused_before_measuring(full_disk, work, args):
    # why: bench and eval lost minutes of measurements when the history could not take them at the end
    before = snapshot(work)
    result = CliRunner().invoke(main, args)
    line = _one_error_line(result.output)
    assert result.exit_code == 4 and "no room" in line, result.output
    assert snapshot(work) == before


def test_a_history_record_that_does_not_fit_leaves_the_history_as_it_was(work):
    from ccmoe_runtime.bench.history import append_history, read_history
    from ccmoe_runtime.core.errors import CcmoeError

    disk = work / "disk"
    disk.mkdir()
    if not _mount(disk, "size=64k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        history = disk / "h.jsonl"
        append_history(history, "eval", {"n": 1})
        with pytest.raises(CcmoeError) as e:
            append_history(history, "eval", {"blob": "x" * 200_000})
        assert e.value.exit_code == 4
        assert [r["n"] for r in read_history(history)] == [1]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
