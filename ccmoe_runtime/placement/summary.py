"""A placement in words: flags, memory per pool, predicted speed, and where each layer's tensors live."""

from __future__ import annotations

import re
from pathlib import Path

from ..core.units import gb_text
from .layout import Placement


def _short(name: str) -> str:
    return name.split(".", 2)[2].removesuffix(".weight") if name.startswith("blk.") else name.removesuffix(".weight")


def layer_rows(p: Placement) -> list[tuple[str, str]]:
    """One row per run of layers placed alike: ("0-17", "GPU: attn_*, ... | CPU: ffn_up_exps, ...")."""
    layers: dict[int, dict[str, list[str]]] = {}
    for name, w in p.tensors.items():
        m = re.match(r"^blk\.(\d+)\.", name)
        if m:
            layers.setdefault(int(m.group(1)), {"gpu": [], "cpu": []})[w].append(_short(name))
    rows: list[tuple[list[int], str]] = []
    for layer in sorted(layers):
        d = layers[layer]
        text = " | ".join(f"{w.upper()}: {_compact(sorted(d[w]))}" for w in ("gpu", "cpu") if d[w])
        if rows and rows[-1][1] == text and rows[-1][0][-1] == layer - 1:
            rows[-1][0].append(layer)
        else:
            rows.append(([layer], text))
    return [(f"{r[0][0]}" if len(r[0]) == 1 else f"{r[0][0]}-{r[0][-1]}", r[1]) for r in rows]


def _compact(names: list[str]) -> str:
    """attn_q, attn_k, attn_v -> attn_{k,q,v}; ffn_up_exps, ffn_gate_exps -> ffn_{gate,up}_exps."""
    groups: dict[tuple[str, str], list[str]] = {}
    for n in names:
        m = re.match(r"^(attn|ffn)_([a-z0-9]+)(.*)$", n)
        key = (m.group(1), m.group(3)) if m else (n, "")
        groups.setdefault(key, []).append(m.group(2) if m else "")
    out = []
    for (head, tail), mids in groups.items():
        mids = [x for x in mids if x]
        out.append(f"{head}_{mids[0]}{tail}" if len(mids) == 1 else f"{head}_{{{','.join(mids)}}}{tail}" if mids else head)
    return ", ".join(out)


def summary_lines(p: Placement) -> list[str]:
    """A readable summary: flags, memory per pool, predicted speed, and where each layer's tensors live."""
    s = p.settings
    lines = [f"placement of {Path(p.model).name} on {p.device} ({p.backend}): ctx {s.ctx} x {s.parallel} slot(s), "
             f"KV {p.kv_type}, flash attention {p.flash_attn}, {p.threads} threads, -b {s.batch} -ub {s.ubatch}"]
    for u in p.memory.values():
        lines.append(f"  {u.where.upper():<4} {gb_text(u.total)} of {gb_text(u.capacity)}: weights {gb_text(u.weights)}, "
                     f"KV {gb_text(u.kv)}, compute {gb_text(u.compute)}, overhead {gb_text(u.overhead)}, margin {gb_text(u.margin)}")
    lines.append(f"  memory from {p.memory_source}; speed factors from {p.factors_source}")
    if s.load_mode:
        lines.append(f"  --load-mode {p.load_mode}: as asked")
    elif p.load_mode != "auto" and p.backend != "hip":
        lines.append(f"  --load-mode {p.load_mode}: host-memory weights in llama.cpp's own buffers (chosen by calibration)")
    lines += [f"  note: {n}" for n in p.notes]
    pe, pf = p.predicted_empty, p.predicted
    lines.append(f"  predicted: prompt {pe.prompt_tps:,.0f} tok/s ({pe.n_prompt}-token prompt), generation "
                 f"{pe.decode_tps:,.1f} tok/s (empty context), {pf.decode_tps:,.1f} tok/s at {pf.depth} tokens")
    reads = ", ".join(f"{k.upper()} {gb_text(v)}" for k, v in pf.bytes_per_token.items())
    lines.append(f"  bytes read per generated token at {pf.depth} tokens: {reads}; CPU<->GPU splits {pf.splits}")
    if p.overrides:
        lines.append(f"  -ot {','.join(p.overrides)}")
    lines.append("  layers  where")
    lines += [f"  {span:<7} {text}" for span, text in layer_rows(p)]
    other = {_short(n): w for n, w in p.tensors.items() if not n.startswith("blk.")}
    if other:
        lines.append("  other   " + ", ".join(f"{n} {w.upper()}" for n, w in sorted(other.items())))
    return lines
