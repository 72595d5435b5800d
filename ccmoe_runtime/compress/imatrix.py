"""Importance matrices users already have: llama.cpp's GGUF imatrix and its legacy `.dat` layout, read, checked
against the model, written back as a GGUF imatrix and sliced to the experts `prune` keeps.

GGUF (tools/imatrix/imatrix.cpp, save_imatrix): keys general.type = "imatrix", imatrix.datasets,
imatrix.chunk_count, imatrix.chunk_size; per weight W two F32 tensors, W.in_sum2 [n_per_row, n_mat] (sums of
squared activations) and W.counts [1, n_mat] (tokens seen, per expert for *_exps).
Legacy .dat (save_imatrix_legacy): int32 n_entries; per entry int32 name length, the name, int32 ncall,
int32 nval, nval float32 = mean squared activation x ncall (1 x ncall for an unused expert); then int32
chunk count, int32 dataset name length and the name. It has no per-expert token counts.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import CcmoeError
from ..core.files import staged_output
from ..model.inventory import ModelInventory

_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(?:gate|up|down|gate_up)_(?:ch|)exps\.weight$")
_ROUTED_IN = re.compile(r"^blk\.(\d+)\.ffn_(?:up|gate|gate_up)_(?:ch|)exps\.weight$")   # one count per routed token


@dataclass
class Imatrix:
    """Per weight tensor: squared-activation sums (n_mat x n_per_row) and token counts (n_mat)."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False          # counts are the legacy `ncall`, not tokens per expert

    def means(self) -> dict[str, np.ndarray]:
        """Mean squared activation per column, (n_per_row,) or (n_mat, n_per_row); 1 where nothing was seen."""
        out = {}
        for name, s in self.sums.items():
            c = self.counts[name][:, None]
            m = np.where(c > 0, s / np.maximum(c, 1e-30), 1.0).astype(np.float32)
            out[name] = m[0] if m.shape[0] == 1 else m
        return out


def _bad(path: Path, why: str) -> CcmoeError:
    return CcmoeError(f"{path} is not a llama.cpp imatrix ({why})",
                      "pass an imatrix written by llama-imatrix (.gguf or legacy .dat), or leave out --imatrix")


def read_imatrix_file(path: Path) -> Imatrix:
    """A GGUF or legacy .dat imatrix (told apart by the GGUF magic)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except (FileNotFoundError, IsADirectoryError):
        raise CcmoeError(f"imatrix {path} does not exist or is a folder", "pass an imatrix file") from None
    return _read_gguf(path) if magic == b"GGUF" else _read_dat(path)


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:   # damaged or truncated: the reader raises ValueError, IndexError, struct errors
        raise _bad(path, f"damaged GGUF: {type(e).__name__}") from None
    kind = reader.get_field("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise _bad(path, "a GGUF without general.type = imatrix, perhaps a model")
    tensors = {t.name: t for t in reader.tensors}
    sums, counts = {}, {}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        weight = name[: -len(".in_sum2")]
        c = tensors.get(weight + ".counts")
        s = np.asarray(t.data, dtype=np.float64)
        s = s.reshape(-1, s.shape[-1])
        if c is None or np.asarray(c.data).size != s.shape[0]:
            raise _bad(path, f"{weight} has no counts for its {s.shape[0]} matrices")
        sums[weight], counts[weight] = s, np.asarray(c.data, dtype=np.float64).ravel()
    if not sums:
        raise _bad(path, "no .in_sum2 tensors")

    def value(key: str, default):
        f = reader.get_field(key)
        return f.contents() if f is not None else default

    return Imatrix(sums, counts, list(value("imatrix.datasets", [])), int(value("imatrix.chunk_count", 0)),
                   int(value("imatrix.chunk_size", 0)))


def _read_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise _bad(path, f"ends at byte {len(data)} inside an entry")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if not 0 < n_entries < 1 << 20:
        raise _bad(path, f"it starts with {data[:4]!r}, not an entry count")
    sums, counts = {}, {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise _bad(path, f"a tensor name of {length} bytes")
        try:
            name = data[pos:pos + length].decode("ascii")
        except UnicodeDecodeError:
            raise _bad(path, "a tensor name that is not ASCII") from None
        pos += length
        ncall, nval = take("<ii")
        if nval <= 0 or pos + 4 * nval > len(data):
            raise _bad(path, f"{name} has {nval} values past the end of the file")
        sums[name] = np.frombuffer(data, "<f4", nval, pos).astype(np.float64)[None, :]
        counts[name] = np.array([float(ncall)])
        pos += 4 * nval
    chunks, dataset = 0, []
    if pos + 8 <= len(data):
        chunks, length = struct.unpack_from("<ii", data, pos)
        dataset = [data[pos + 8:pos + 8 + length].decode("utf-8", "replace")] if length > 0 else []
    return Imatrix(sums, counts, dataset, chunks, 0, legacy=True)


def fit_to_model(imat: Imatrix, inv: ModelInventory, path: Path) -> Imatrix:
    """Check every entry names a weight of the model with its row length; legacy per-expert rows are reshaped."""
    tensors = {t.name: t for t in inv.tensors}
    known = [n for n in imat.sums if n in tensors]
    if not known:
        example = next(iter(imat.sums))
        raise CcmoeError(f"imatrix {path} names no tensor of {Path(inv.source).name} (e.g. {example})",
                         "pass the imatrix computed for this model")
    for name in known:
        shape, s = tensors[name].shape, imat.sums[name]
        n_mat = shape[2] if len(shape) == 3 else 1
        if s.size != shape[0] * n_mat:
            raise CcmoeError(f"imatrix {path} has {s.size} values for {name}, the model's {shape} needs "
                             f"{shape[0] * n_mat}", "pass the imatrix computed for this model (same experts)")
        if s.shape[0] != n_mat:
            imat.sums[name] = s.reshape(n_mat, shape[0])
            imat.counts[name] = np.broadcast_to(imat.counts[name][:1], (n_mat,)).copy()
    for name in [n for n in imat.sums if n not in tensors]:
        del imat.sums[name], imat.counts[name]
    return imat


def expert_token_counts(imat: Imatrix) -> dict[int, np.ndarray]:
    """Per MoE layer, tokens routed to each expert (the *_exps counts); none from a legacy file."""
    if imat.legacy:
        return {}
    out: dict[int, np.ndarray] = {}
    for name in sorted(imat.counts):
        m = _ROUTED_IN.match(name)
        if m and int(m.group(1)) not in out and imat.counts[name].size > 1:
            out[int(m.group(1))] = imat.counts[name].copy()
    return out


def write_imatrix_gguf(imat: Imatrix, path: Path, force: bool = True) -> Path:
    """The imatrix in llama.cpp's GGUF layout (what llama-quantize and this package read), atomically."""
    import gguf

    need = sum(s.size * 4 + c.size * 4 + 512 for s, c in zip(imat.sums.values(), imat.counts.values())) + (1 << 16)
    with staged_output(Path(path), force, need, "imatrix") as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)     # llama-imatrix writes none
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", imat.datasets or [""])
        w.add_uint32("imatrix.chunk_count", imat.chunk_count)
        w.add_uint32("imatrix.chunk_size", imat.chunk_size)
        for name in sorted(imat.sums):
            w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(imat.sums[name], dtype=np.float32))
            w.add_tensor(f"{name}.counts", np.ascontiguousarray(imat.counts[name], dtype=np.float32)[:, None])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(path)


def slice_experts(imat: Imatrix, kept: dict[int, list[int]]) -> Imatrix:
    """The imatrix of a pruned model: each *_exps entry keeps only the rows of the kept experts."""
    sums, counts = dict(imat.sums), dict(imat.counts)
    for name in imat.sums:
        m = _EXPS.match(name)
        if m and int(m.group(1)) in kept and imat.sums[name].shape[0] > 1:
            ids = np.asarray(kept[int(m.group(1))])
            sums[name], counts[name] = imat.sums[name][ids], imat.counts[name][ids]
    return Imatrix(sums, counts, imat.datasets, imat.chunk_count, imat.chunk_size, imat.legacy)
