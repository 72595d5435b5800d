"""llama.cpp's own per-tensor types for a file type (Q4_K_M, IQ2_XXS ...) at a model's layer count, as
`regex=type` lines for `python -m ccmoe_runtime.model.synth --tensor-types`.

llama-quantize decides a tensor's type from its name, its layer's index among the model's layers and a few
hyperparameters (expert count 8 or not, GQA ratio), not from its width. So the mix is read off llama-quantize's
output on a narrow model of the same architecture, layers, heads and (scaled-down) experts, and a generated
model of the full width can then be written with exactly llama.cpp's mix without quantizing tens of GB.

    python3 benchmarks/llama_mix.py --ftype Q4_K_M --n-layer 40 -o q4_k_m-40.txt
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ccmoe_runtime.compress.plan import type_lines  # noqa: E402
from ccmoe_runtime.engine.build import find_engine  # noqa: E402
from ccmoe_runtime.engine.tools import quantize  # noqa: E402
from ccmoe_runtime.model.inventory import read_gguf  # noqa: E402
from ccmoe_runtime.model.synth import SynthSpec, write_random_gguf  # noqa: E402
from ccmoe_runtime.placement.calibrate import NEEDS_IMATRIX, write_flat_imatrix  # noqa: E402


def proxy_spec(arch: str, n_layer: int, n_head: int, n_head_kv: int, head_dim: int, n_expert: int,
               n_expert_used: int) -> SynthSpec:
    """A narrow model whose names, layer count and the hyperparameters llama-quantize looks at are the real one's
    (expert count only as far as llama-quantize distinguishes it: 8 or not)."""
    experts = 8 if n_expert == 8 else 16
    return SynthSpec(arch=arch, name="mix-proxy", n_embd=256, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                     head_dim=head_dim, n_expert=experts, n_expert_used=min(n_expert_used, experts), n_ff_exp=256,
                     seed=1)


def mix_rules(engine, spec: SynthSpec, ftype: str, folder: Path) -> list[str]:
    """One `^name$=type` line per quantized tensor of llama-quantize's output for `ftype`."""
    source = write_random_gguf(spec, folder / "proxy-f16.gguf", force=True)
    imatrix = write_flat_imatrix(source, folder / "flat.imatrix.gguf") if ftype.lower() in NEEDS_IMATRIX else None
    out = quantize(engine, source, folder / f"proxy-{ftype}.gguf", ftype, [], imatrix=imatrix)
    return type_lines({t.name: t.ggml_type for t in read_gguf(out).tensors if t.ggml_type not in ("F32", "F16", "BF16")})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ftype", required=True, help="llama-quantize file type, e.g. Q4_K_M")
    ap.add_argument("--arch", default="qwen3moe")
    ap.add_argument("--n-layer", type=int, required=True)
    ap.add_argument("--n-head", type=int, default=32)
    ap.add_argument("--n-head-kv", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--n-expert", type=int, default=128)
    ap.add_argument("--n-expert-used", type=int, default=8)
    ap.add_argument("--backend", default=None)
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()
    spec = proxy_spec(a.arch, a.n_layer, a.n_head, a.n_head_kv, a.head_dim, a.n_expert, a.n_expert_used)
    with tempfile.TemporaryDirectory(prefix="ccmoe-mix-") as tmp:
        lines = mix_rules(find_engine(a.backend), spec, a.ftype, Path(tmp))
    a.out.write_text(f"# llama-quantize {a.ftype} for {a.arch}, {a.n_layer} layers (benchmarks/llama_mix.py)\n"
                     + "\n".join(lines) + "\n")
    counts = Counter(line.rsplit("=", 1)[1] for line in lines)
    print(f"wrote {a.out}: {len(lines)} tensors, " + ", ".join(f"{t} x{n}" for t, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
