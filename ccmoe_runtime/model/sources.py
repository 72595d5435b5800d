"""Model sources: a local GGUF, any shard of a split GGUF, a Hugging Face repo, or a built-in inventory."""

from __future__ import annotations

import fnmatch
import re
import sys
from pathlib import Path

from ..core.errors import CcmoeError
from ..core.paths import package_dir
from .convert import convert_cached, is_hf_folder
from .inventory import (
    Inspection,
    ModelInventory,
    load_inventory,
    read_gguf,
    save_inventory,
    shard_paths,
    summarize,
)
from .synth import builtin_inventory

HF_PREFIX = "hf:"
INVENTORY_PREFIX = "inventory:"
# what a safetensors repo needs for conversion: weights, config and tokenizer files (no remote code)
HF_FOLDER_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]
_SHARD = re.compile(r"^(?P<stem>.*)-\d{5}-of-(?P<n>\d{5})\.gguf$")


def bundled_model_path() -> Path:
    """The default model: small, trained by the project, shipped inside the package (testmodels/bundled/)."""
    return package_dir() / "testmodels" / "bundled" / "ccmoe-mini-moe-f16.gguf"


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """'hf:owner/repo[:file-or-pattern]' -> (repo id, pattern or None)."""
    body = spec[len(HF_PREFIX):]
    repo, _, pattern = body.partition(":")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise CcmoeError(f"{spec!r} is not a Hugging Face model spec", "write it as hf:owner/repo[:file-or-pattern]")
    return repo, pattern or None


def _hf_patterns(pattern: str | None) -> list[str]:
    if not pattern:
        return ["*.gguf"]
    m = _SHARD.match(Path(pattern).name)
    if m:  # one shard named: fetch the whole series
        return [str(Path(pattern).parent / f"{m.group('stem')}-*-of-{m.group('n')}.gguf").removeprefix("./")]
    if any(c in pattern for c in "*?[") or pattern.endswith(".gguf"):
        return [pattern]
    return [f"*{pattern}*.gguf", f"*{pattern}*/*.gguf"]   # a quant name such as Q4_K_M


def _snapshot(spec: str, repo: str, patterns: list[str]) -> Path:
    """Download (or find in the cache) the files of `repo` matching `patterns`; returns the snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id=repo, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise CcmoeError(f"Hugging Face repo {repo!r} was not found", "check the name, or log in for a gated repo") from None
    except LocalEntryNotFoundError:
        raise CcmoeError(f"{spec} is not in the local Hugging Face cache and the hub cannot be reached (offline)",
                         "connect and retry, or unset HF_HUB_OFFLINE") from None
    except (HfHubHTTPError, OSError) as e:
        raise CcmoeError(f"downloading {spec} failed ({e})", "retry; finished files are kept and resumed") from None


def resolve_hf(spec: str) -> Path:
    """Download (or find in the cache) the GGUF files of a hub spec; returns the first shard.

    A repo with no GGUF but safetensors weights (spec without a pattern) is downloaded and converted to BF16.
    """
    repo, pattern = parse_hf_spec(spec)
    patterns = _hf_patterns(pattern)
    folder = _snapshot(spec, repo, patterns)
    files = sorted(p for p in folder.rglob("*.gguf") if any(fnmatch.fnmatch(str(p.relative_to(folder)), pat) for pat in patterns))
    if not files and pattern is None:

        folder = _snapshot(spec, repo, HF_FOLDER_PATTERNS)
        if is_hf_folder(folder):
            return convert_cached(folder, progress=_progress)
    if not files:
        raise CcmoeError(f"{spec} matched no .gguf file in {repo}", "name a file or pattern after the second colon")
    firsts = sorted({str(shard_paths(f)[0]) for f in files})
    if len(firsts) > 1:
        names = ", ".join(Path(f).name for f in firsts[:5])
        raise CcmoeError(f"{spec} matches {len(firsts)} models ({names})", "add :FILE or :PATTERN to pick one")
    return Path(firsts[0])


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def resolve_model_path(spec: str | Path | None) -> Path:
    """A local GGUF path for a model spec (None means the bundled default model; HF folders are converted)."""
    if spec is None or str(spec) in ("", "bundled", "default"):
        path = bundled_model_path()
        if not path.is_file():
            raise CcmoeError(f"the bundled model {path} is missing", "restore models/ from git or run `ccmoe-run train-bundled`")
        return path
    spec = str(spec)
    if spec.startswith(HF_PREFIX):
        return resolve_hf(spec)
    if spec.startswith(INVENTORY_PREFIX):
        raise CcmoeError(f"{spec} is a weight-less inventory (shapes only) and this command needs the model's weights",
                         "pass the GGUF file or hf:owner/repo; `plan` and `compress --check` take inventories")
    path = Path(spec).expanduser()
    if not path.exists():
        raise CcmoeError(f"model {spec} does not exist", "check the path, or use hf:owner/repo[:file] for the hub")
    if path.is_dir():

        if not is_hf_folder(path):
            raise CcmoeError(f"{spec} is a folder without config.json and *.safetensors",
                             "pass a GGUF file or a Hugging Face safetensors folder")
        return convert_cached(path, progress=_progress)
    return shard_paths(path)[0]


def open_inventory(spec: str | Path | None) -> ModelInventory:
    """The inventory of any model spec, including built-in and saved weight-less inventories."""
    text = str(spec) if spec is not None else ""
    if text.startswith(INVENTORY_PREFIX):

        return builtin_inventory(text[len(INVENTORY_PREFIX):])
    if text.endswith(".json"):
        return load_inventory(Path(text))
    return read_gguf(resolve_model_path(spec))


def inspect_model(spec: str | Path | None, save: Path | None = None, force: bool = False) -> Inspection:
    """The inventory and MoE summary of any model spec; with `save`, the inventory artifact written too."""
    inv = open_inventory(spec)
    if save:
        save_inventory(inv, save, force=force)
    return Inspection(inv, summarize(inv))
