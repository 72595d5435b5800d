"""Expert usage statistics, the artifact `measure` writes (from llama-imatrix's counts) and `place` reads."""

from __future__ import annotations

from pathlib import Path

from ..core.artifacts import load_artifact

EXPERT_STATS_KIND = "expert-stats"
EXPERT_STATS_VERSION = 1


def load_expert_stats(path: Path) -> dict:
    """An expert-stats artifact: per MoE layer, each expert's token counts, share of tokens and entropy."""
    return load_artifact(path, EXPERT_STATS_KIND, EXPERT_STATS_VERSION)
