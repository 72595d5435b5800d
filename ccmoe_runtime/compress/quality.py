"""Quality against a reference model: llama-perplexity's KL-divergence, top-token agreement and perplexity."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.artifacts import file_digest
from ..model.inventory import model_digest
from ..core.errors import EXIT_ENGINE, CcmoeError
from ..core.files import temp_beside
from ..core.paths import cache_root
from ..engine.build import Engine
from ..engine.tools import run_perplexity


@dataclass
class Quality:
    """What llama-perplexity --kl-divergence reports of a model against the reference logits."""

    mean_kld: float
    mean_kld_se: float
    p99_kld: float | None    # None when llama.cpp's logger lost the percentile lines at exit
    same_top: float          # share of tokens whose most likely next token agrees with the reference (0..1)
    ppl: float
    ppl_base: float
    chunks: int              # chunks evaluated (the last may be missing from the log, see run_perplexity)
    same_top_se: float | None = None    # llama.cpp's standard errors of the two (None when the summary was lost)
    ppl_se: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def save_reference_logits(engine: Engine, model: Path, text: Path, out: Path, ctx: int = 256,
                          threads: int | None = None, chunks: int | None = None) -> Path:
    """Run the reference model over `text` and keep its logits for later KL-divergence runs."""
    if not Path(text).is_file():
        raise CcmoeError(f"evaluation text {text} does not exist", "pass a plain-text file")
    tmp = temp_beside(out)
    args = ["-m", str(model), "-f", str(text), "-c", str(ctx), "-b", str(ctx), "--kl-divergence-base", str(tmp)]
    args += ["--chunks", str(chunks)] if chunks else []
    try:
        run_perplexity(engine, args + (["-t", str(threads)] if threads else []), str(model))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _stat(out: str, label: str) -> float | None:
    m = re.search(rf"^{label}\s*:\s*(-?[\d.]+)", out, re.MULTILINE)
    return float(m.group(1)) if m else None


_NUM = r"(-?[\d.]+)"
_CHUNK = re.compile(rf"^\s*(\d+)\s+{_NUM} ± +{_NUM}\s+{_NUM} ± +{_NUM}\s+{_NUM} ± +{_NUM}\s+{_NUM} ± +{_NUM} %"
                    rf"\s+{_NUM} ± +{_NUM} %", re.MULTILINE)


def _last_chunk(out: str) -> dict | None:
    """The running totals on the last chunk line printed: the summary's figures without the percentiles."""
    rows = _CHUNK.findall(out)
    if not rows:
        return None
    r = [float(x) for x in rows[-1]]
    return {"chunks": int(r[0]), "ppl": r[1], "ppl_se": r[2], "ppl_base": r[1] / math.exp(r[3]), "kld": r[5],
            "kld_se": r[6], "same_top": r[9], "same_top_se": r[10]}


def kl_divergence(engine: Engine, model: Path, reference_logits: Path, ctx: int = 256,
                  threads: int | None = None) -> Quality:
    """Mean and p99 KL-divergence, top-token agreement and perplexity of `model` against saved reference logits."""
    args = ["-m", str(model), "--kl-divergence-base", str(reference_logits), "--kl-divergence",
            "-c", str(ctx), "-b", str(ctx)] + (["-t", str(threads)] if threads else [])
    out = run_perplexity(engine, args, str(model), last_line="Same top p")
    last = _last_chunk(out)
    mean = _stat(out, r"Mean\s+KLD")
    if mean is None and last is None:
        tail = next((x for x in reversed(out.splitlines()) if x.strip()), "")
        raise CcmoeError(f"llama-perplexity printed no KL-divergence figures for {model} (last line: {tail.strip()})",
                         "check that the text is longer than two contexts and the engine build is complete", EXIT_ENGINE)
    total = re.search(r"computing over (\d+) chunks", out)
    se = re.search(r"^Mean\s+KLD:\s+[-\d.]+\s+±\s+([\d.]+)", out, re.MULTILINE)
    same = _stat(out, r"Same top p")
    return Quality(mean_kld=mean if mean is not None else last["kld"],
                   mean_kld_se=float(se.group(1)) if se else last["kld_se"],
                   p99_kld=_stat(out, r"99\.0%\s+KLD"),
                   same_top=(same if same is not None else last["same_top"]) / 100,
                   ppl=_stat(out, r"Mean PPL\(Q\)") or last["ppl"],
                   ppl_base=_stat(out, r"Mean PPL\(base\)") or last["ppl_base"],
                   chunks=int(total.group(1)) if mean is not None and total else last["chunks"],
                   same_top_se=_percent(_first(_se(out, r"Same top p"), last and last["same_top_se"])),
                   ppl_se=_first(_se(out, r"Mean PPL\(Q\)"), last and last["ppl_se"]))


def _first(*values):
    return next((v for v in values if v is not None), None)


def _percent(value: float | None) -> float | None:
    return None if value is None else value / 100


def _se(out: str, label: str) -> float | None:
    """The ± figure after a summary line's value."""
    m = re.search(rf"^{label}\s*:\s*-?[\d.]+\s*±\s*([\d.]+)", out, re.MULTILINE)
    return float(m.group(1)) if m else None


def cached_reference_logits(engine: Engine, reference: Path, text: Path, ctx: int = 256,
                            threads: int | None = None) -> Path:
    """The reference model's logits over `text`, kept in the cache by (model, text, ctx, engine)."""
    import hashlib

    key = hashlib.sha256("\n".join([model_digest(reference), file_digest(text), str(ctx), engine.key]).encode())
    path = cache_root() / "eval" / f"{key.hexdigest()[:24]}.kld"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_reference_logits(engine, reference, text, path, ctx=ctx, threads=threads)
    return path
