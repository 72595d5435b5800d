"""Pictures of a plan (bits per weight of every tensor by layer, and bits per tensor class) and of a frontier
(predicted tok/s against predicted KLD) as PNG."""

from __future__ import annotations

from pathlib import Path

from ..core.files import write_atomic
from .frontier import Frontier
from .plan import Plan, bits, class_bits, layer_grid, tensor_label


def plan_png(plan: Plan, path: Path) -> Path:
    """A heat map of bits per weight per (layer, tensor kind) beside a bar chart of bits per class."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, kinds, _ = layer_grid(plan)
    grid = np.full((len(layers), len(kinds)), np.nan)
    row, col = {l: i for i, l in enumerate(layers)}, {k: j for j, k in enumerate(kinds)}
    for name, t in plan.tensors.items():
        if t.layer is not None:
            grid[row[t.layer], col[tensor_label(name)]] = bits(t.bytes, t.n_elements)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, max(4, 0.16 * len(layers) + 2)),
                                 gridspec_kw={"width_ratios": [3, 1.3]})
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=1.5, vmax=8.5, interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds, rotation=60, ha="right", fontsize=8)
    step = max(1, len(layers) // 20)
    ax.set_yticks(range(0, len(layers), step), [str(l) for l in layers[::step]], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title("bits per weight by layer and tensor")
    fig.colorbar(im, ax=ax, label="bits per weight")
    classes = sorted(class_bits(plan).items(), key=lambda kv: kv[0])
    bx.barh([c for c, _ in classes], [v["bpw"] for _, v in classes], color="tab:blue")
    for i, (_, v) in enumerate(classes):
        bx.text(v["bpw"], i, f" {v['bpw']:.2f}", va="center", fontsize=8)
    bx.set_xlabel("bits per weight")
    bx.set_title(f"{plan.file_bytes / 1e9:.2f} GB on {plan.budget.device}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def frontier_png(f: Frontier, path: Path) -> Path:
    """Predicted decode tok/s against predicted KLD for every frontier point, sizes written beside them; the
    chosen point and the knee marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    x = [q.kld for q in f.points]
    y = [q.decode_tps for q in f.points]
    ax.plot(x, y, "o-", color="tab:blue", label="frontier")
    for i, q in enumerate(f.points):
        ax.annotate(f"#{i} {q.file_bytes / 1e9:.1f} GB", (q.kld, q.decode_tps), textcoords="offset points",
                    xytext=(6, -10), fontsize=7)
    ax.plot([x[f.knee]], [y[f.knee]], "s", ms=11, mfc="none", mec="tab:green", label="knee")
    ax.plot([x[f.chosen]], [y[f.chosen]], "*", ms=14, color="tab:red", label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel(f"{f.objective} (log scale)")
    ax.set_ylabel("predicted decode tok/s (empty context)")
    ax.set_title(f"{Path(f.model).name} on {f.device}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())
