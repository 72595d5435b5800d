"""Results history (JSON lines) and the one-page HTML report: tokens/s over time, size vs quality, placement."""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from pathlib import Path

from ..compress.plan import tensor_label
from ..core.files import check_writable, write_atomic
from .history import read_history


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def speed_chart(records: list[dict]) -> str | None:
    """Generation and prompt tokens/s of each (model, contender) over the bench runs."""
    runs = [r for r in records if r["kind"] == "bench"]
    if not runs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, title in ((axes[0], "tg", "generation (tokens/s)"), (axes[1], "pp", "prompt processing (tokens/s)")):
        series: dict[str, list[tuple[str, float]]] = {}
        for r in runs:
            for name, c in r.get("contenders", {}).items():
                if c.get(key) is not None:
                    series.setdefault(f"{Path(r['model']).name}: {name}", []).append((r["time"], c[key]["median"]))
        for label, points in sorted(series.items()):
            ax.plot([p[0][5:19] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _png(fig)


def quality_chart(records: list[dict]) -> str | None:
    """Size against mean KL-divergence of every evaluated model."""
    evals = [r for r in records if r["kind"] == "eval"]
    if not evals:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in evals:
        ax.scatter(r["model_bytes"] / 1e6, r["mean_kld"], color="tab:blue")
        ax.annotate(Path(r["model"]).name.removesuffix(".gguf"), (r["model_bytes"] / 1e6, r["mean_kld"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL-divergence vs reference")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return _png(fig)


def placement_chart(placement: dict) -> str:
    """Where each tensor lives (GPU or CPU), by layer and tensor kind."""
    import numpy as np

    where = {n: w for n, w in placement["tensors"].items() if n.startswith("blk.")}
    layers = sorted({int(n.split(".")[1]) for n in where})
    kinds = sorted({tensor_label(n) for n in where})
    grid = np.full((len(layers), len(kinds)), np.nan)
    row, col = {l: i for i, l in enumerate(layers)}, {k: j for j, k in enumerate(kinds)}
    for n, w in where.items():
        grid[row[int(n.split(".")[1])], col[tensor_label(n)]] = 1.0 if w == "gpu" else 0.0
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    fig, ax = plt.subplots(figsize=(8, max(3, 0.14 * len(layers) + 1.5)))
    ax.imshow(grid, aspect="auto", cmap=ListedColormap(["tab:orange", "tab:green"]), vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds, rotation=60, ha="right", fontsize=7)
    step = max(1, len(layers) // 20)
    ax.set_yticks(range(0, len(layers), step), [str(l) for l in layers[::step]], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(f"placement of {Path(placement.get('model', '')).name}: green GPU, orange CPU")
    return _png(fig)


def _section(title: str, png: str | None, empty: str) -> str:
    body = f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">' if png else f"<p>{html.escape(empty)}</p>"
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _table(records: list[dict]) -> str:
    rows = []
    for r in records[-20:]:
        if r["kind"] == "bench":
            best = ", ".join(f"{n}: tg {c['tg']['median']:.1f}" for n, c in r.get("contenders", {}).items() if c.get("tg"))
            rows.append((r["time"], "bench", Path(r["model"]).name, best))
        elif r["kind"] == "eval":
            rows.append((r["time"], "eval", Path(r["model"]).name,
                         f"mean KLD {r['mean_kld']:.5f}, same top {100 * r['same_top']:.1f} %, ppl {r['ppl']:.3f}"))
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr><th>time</th><th>kind</th><th>model</th><th>result</th></tr>{cells}</table>"


def write_report(history: Path, out: Path, placement: dict | None = None, force: bool = False) -> Path:
    """One self-contained HTML page (charts as inline PNG) from the history and, optionally, a placement."""
    check_writable(out, force, what="report")
    records = read_history(history)
    parts = [_section("Tokens per second over time", speed_chart(records), "no bench runs recorded yet"),
             _section("Size against quality", quality_chart(records), "no evaluations recorded yet"),
             _section("Placement per layer", placement_chart(placement) if placement else None,
                      "no placement given (--placement)")]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ccmoe-runtime report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} img{{max-width:100%;border:1px solid #ddd}}
table{{border-collapse:collapse;font-size:13px}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}</style>
</head><body><h1>ccmoe-runtime report</h1>
<p>{len(records)} records from {html.escape(str(history))}, written {dt.datetime.now().isoformat(timespec="seconds")}</p>
{''.join(parts)}<section><h2>Latest records</h2>{_table(records)}</section>
<script>window.addEventListener("load", () => {{ const imgs = [...document.images];
document.body.dataset.chartsShown = imgs.filter(i => i.complete && i.naturalWidth > 0).length + "/" + imgs.length; }});
</script></body></html>
"""
    return write_atomic(Path(out), page.encode(), force=force)
