"""`ccmoe-run eval`: a model's quality against the model it was made from, on held-out text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..compress.quality import Quality, cached_reference_logits, kl_divergence
from ..core.errors import CcmoeError
from ..core.files import read_text
from ..core.units import human_size
from ..engine.build import Engine
from ..model.inventory import read_gguf
from .history import append_history, check_history


@dataclass(kw_only=True)
class EvalResult(Quality):
    """What llama-perplexity measured (Quality: perplexity, KL-divergence, top-token agreement) and of which files."""

    model: str
    reference: str
    text: str
    ctx: int
    model_bytes: int
    reference_bytes: int

    def summary_lines(self) -> list[str]:
        p99 = f"{self.p99_kld:.5f}" if self.p99_kld is not None else "n/a (lost from llama.cpp's log)"
        return [f"model       {self.model} ({human_size(self.model_bytes)})",
                f"reference   {self.reference} ({human_size(self.reference_bytes)})",
                f"text        {self.text} ({self.chunks} chunks of {self.ctx} tokens)",
                f"perplexity  {self.ppl:.4f}{_pm(self.ppl_se, 4)} (reference {self.ppl_base:.4f})",
                f"mean KLD    {self.mean_kld:.5f} ± {self.mean_kld_se:.5f}",
                f"p99 KLD     {p99}",
                f"same top    {100 * self.same_top:.2f}{_pm(self.same_top_se and 100 * self.same_top_se, 2)} % of tokens"]


def _pm(se: float | None, digits: int) -> str:
    """' ± se' when llama.cpp reported a standard error, else nothing."""
    return f" ± {se:.{digits}f}" if se is not None else ""


def check_same_vocabulary(model: Path, reference: Path) -> None:
    """KL-divergence compares next-token distributions: both models must have the same vocabulary."""
    a, b = read_gguf(model), read_gguf(reference)
    va, vb = a.metadata.get("tokenizer.ggml.tokens"), b.metadata.get("tokenizer.ggml.tokens")
    if va != vb:
        raise CcmoeError(f"{Path(model).name} and {Path(reference).name} have different vocabularies",
                         "compare a model with the model it was quantized or pruned from")


def evaluate(engine: Engine, model: Path, reference: Path, text: Path, ctx: int = 256, threads: int | None = None,
             history: Path | None = None) -> EvalResult:
    """Quality of `model` against `reference` on `text` (the reference's logits are cached); appended to
    `history` when given (checked writable before the run)."""
    read_text(Path(text), "evaluation text")           # missing, a folder, binary or not UTF-8: one line now
    if history:
        check_history(history)
    check_same_vocabulary(model, reference)
    logits = cached_reference_logits(engine, reference, text, ctx, threads)
    q = kl_divergence(engine, model, logits, ctx=ctx, threads=threads)
    result = EvalResult(model=str(model), reference=str(reference), text=str(text), ctx=ctx,
                        model_bytes=Path(model).stat().st_size, reference_bytes=Path(reference).stat().st_size,
                        **q.to_dict())
    if history:
        append_history(history, "eval", result.to_dict())
    return result
