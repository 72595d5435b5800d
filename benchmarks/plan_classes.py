"""Two plans of one model side by side, tensor kind by kind: types chosen (layer counts), GB and bits per weight.

Usage: python benchmarks/plan_classes.py BEFORE.json AFTER.json
(plans written by `ccmoe-run plan`); prints a Markdown table for the docs.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from ccmoe_runtime.compress.priors import tensor_kind


def kinds(plan: dict) -> dict[str, dict]:
    """Per tensor kind: Counter of types, bytes and elements."""
    out: dict[str, dict] = {}
    for name, t in plan["tensors"].items():
        k = out.setdefault(tensor_kind(name), {"types": Counter(), "bytes": 0, "n": 0})
        k["types"][t["type"]] += 1
        k["bytes"] += t["bytes"]
        k["n"] += t["n_elements"]
    return out


def describe(k: dict) -> str:
    types = ", ".join(f"{t}×{c}" if c > 1 else t for t, c in k["types"].most_common())
    return f"{types} ({k['bytes'] / 1e9:.2f} GB, {8 * k['bytes'] / k['n']:.2f} bpw)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    a = ap.parse_args()
    b, c = (json.loads(p.read_text()) for p in (a.before, a.after))
    b, c = (d.get("data", d) for d in (b, c))
    kb, kc = kinds(b), kinds(c)
    print("| tensor kind | before | after |\n|---|---|---|")
    for kind in sorted(kb, key=lambda k: -kb[k]["bytes"]):
        print(f"| {kind} | {describe(kb[kind])} | {describe(kc[kind])} |")
    print(f"| total | {b['total_bytes'] / 1e9:.2f} GB | {c['total_bytes'] / 1e9:.2f} GB |")


if __name__ == "__main__":
    main()
