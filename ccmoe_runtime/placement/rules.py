"""llama.cpp `-ot` rules: the fewest regular expressions that send exactly the chosen tensors to a buffer."""

from __future__ import annotations

import re

from ..core.errors import CcmoeError

MAX_OVERRIDES = 4096                 # llama.cpp's limit on tensor buffer overrides


def _digits(a: int, b: int) -> str:
    return str(a) if a == b else f"[{a}-{b}]"


def _same_length(a: str, b: str) -> list[str]:
    """Patterns matching exactly the digit strings from a to b (same length, a <= b)."""
    if a == b:
        return [a]
    if len(a) == 1:
        return [_digits(int(a), int(b))]
    if a[0] == b[0]:
        return [a[0] + p for p in _same_length(a[1:], b[1:])]
    n = len(a) - 1
    out, first, last = [], int(a[0]), int(b[0])
    if a[1:] != "0" * n:
        out += [a[0] + p for p in _same_length(a[1:], "9" * n)]
        first += 1
    if b[1:] != "9" * n:
        last -= 1
    if first <= last:
        out.append(_digits(first, last) + "[0-9]" * n)
    if b[1:] != "9" * n:
        out += [b[0] + p for p in _same_length("0" * n, b[1:])]
    return out


def int_range_patterns(lo: int, hi: int) -> list[str]:
    """Regex alternatives matching exactly the integers lo..hi (no leading zeros)."""
    if lo > hi:
        return []
    if len(str(lo)) < len(str(hi)):
        top = 10 ** len(str(lo)) - 1
        return int_range_patterns(lo, top) + int_range_patterns(top + 1, hi)
    return _same_length(str(lo), str(hi))


def runs(values: list[int]) -> list[tuple[int, int]]:
    """Sorted integers as maximal runs (first, last)."""
    out: list[tuple[int, int]] = []
    for v in sorted(set(values)):
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def layers_pattern(layers: list[int]) -> str:
    parts = [p for lo, hi in runs(layers) for p in int_range_patterns(lo, hi)]
    return parts[0] if len(parts) == 1 else "(" + "|".join(parts) + ")"


def override_rules(cpu_tensors: list[str], buffer: str = "CPU") -> list[str]:
    """Compact -ot rules putting exactly these tensors in `buffer`: one rule per group of tensor kinds that sit
    on the same layers, e.g. blk\\.([0-9]|1[0-7])\\.(ffn_up_exps|ffn_gate_exps)\\.weight=CPU."""
    by_kind: dict[str, list[int]] = {}
    rules = []
    for name in sorted(cpu_tensors):
        m = re.match(r"^blk\.(\d+)\.(.+)$", name)
        if m:
            by_kind.setdefault(m.group(2), []).append(int(m.group(1)))
        else:
            rules.append(f"^{re.escape(name)}$={buffer}")
    by_layers: dict[tuple[int, ...], list[str]] = {}
    for kind, layers in sorted(by_kind.items()):
        by_layers.setdefault(tuple(sorted(layers)), []).append(kind)
    for layers, kinds in sorted(by_layers.items()):
        stems = [k.removesuffix(".weight") for k in kinds]
        if all(k.endswith(".weight") for k in kinds):
            body = (stems[0] if len(stems) == 1 else "(" + "|".join(stems) + ")") + r"\.weight"
        else:
            body = "(" + "|".join(re.escape(k) for k in kinds) + ")"
        rules.insert(0, rf"blk\.{layers_pattern(list(layers))}\.{body}={buffer}")
    if len(rules) > MAX_OVERRIDES:
        raise CcmoeError(f"the placement needs {len(rules)} tensor overrides, llama.cpp allows {MAX_OVERRIDES}",
                         "report this model; fewer distinct tensor kinds per layer would help")
    return rules


def rule_matches(rules: list[str], names: list[str]) -> set[str]:
    """Names the rules send somewhere (regex search, as llama.cpp does)."""
    patterns = [re.compile(r.rsplit("=", 1)[0]) for r in rules]
    return {n for n in names if any(p.search(n) for p in patterns)}
