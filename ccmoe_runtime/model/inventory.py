"""Model inventory: tensors, shapes, types and MoE structure of a GGUF (or of a weight-less description)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.artifacts import file_digest, load_artifact, save_artifact
from ..core.errors import CcmoeError
from ..core.units import human_count, human_size

INVENTORY_VERSION = 1

# Architectures whose MoE layout ccmoe-run understands (llama.cpp's names).
MOE_ARCHS = ("deepseek2", "qwen3moe", "qwen2moe", "llama", "gpt-oss", "glm4moe", "mixtral")

TENSOR_CLASSES = ("attention", "dense_ffn", "shared_expert", "router", "routed_expert", "embed_output", "norm", "other")

_LAYER = re.compile(r"^blk\.(\d+)\.")
_ROUTED = re.compile(r"\.ffn_(gate|up|down|gate_up)_(ch|)exps\.|\.ffn_(gate|up|down)\.\d+\.weight$")
_SHARED = re.compile(r"\.ffn_(gate|up|down)_shexp\.|\.ffn_gate_inp_shexp\.")
_ROUTER = re.compile(r"\.ffn_gate_inp\.|\.exp_probs_b\.")
_DENSE = re.compile(r"\.ffn_(gate|up|down)\.(weight|bias)$")


@dataclass
class TensorInfo:
    """One tensor: name, shape in ggml order (row length first), storage type and size."""

    name: str
    shape: list[int]
    ggml_type: str
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def layer(self) -> int | None:
        m = _LAYER.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def tensor_class(self) -> str:
        return classify_tensor(self.name)


@dataclass
class ModelInventory:
    """What a model is made of; the plain object every later stage starts from."""

    arch: str
    name: str
    source: str
    metadata: dict
    tensors: list[TensorInfo]
    file_bytes: int = 0
    shards: list[str] = field(default_factory=list)

    def key(self, suffix: str, default=None):
        """An architecture key such as `expert_count` (stored as `<arch>.expert_count`)."""
        return self.metadata.get(f"{self.arch}.{suffix}", default)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ModelInventory":
        tensors = [TensorInfo(**t) for t in d["tensors"]]
        return ModelInventory(arch=d["arch"], name=d["name"], source=d["source"], metadata=d["metadata"],
                              tensors=tensors, file_bytes=d.get("file_bytes", 0), shards=d.get("shards", []))


def classify_tensor(name: str) -> str:
    """The tensor class of a llama.cpp tensor name."""
    parts = name.split(".")
    base = parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[-1]
    if base.endswith("norm"):
        return "norm"
    if name.startswith(("token_embd.", "output.")):
        return "embed_output"
    if _ROUTED.search(name):
        return "routed_expert"
    if _SHARED.search(name):
        return "shared_expert"
    if _ROUTER.search(name):
        return "router"
    if ".attn_" in name:
        return "attention"
    if _DENSE.search(name):
        return "dense_ffn"
    return "other"


def save_inventory(inv: ModelInventory, path: Path, force: bool = True) -> Path:
    return save_artifact(path, "inventory", INVENTORY_VERSION, inv.to_dict(), force=force)


def load_inventory(path: Path) -> ModelInventory:
    doc = load_artifact(path, "inventory", INVENTORY_VERSION)
    return ModelInventory.from_dict(doc)


# ---------------------------------------------------------------- reading GGUF files

_SHARD = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def shard_paths(path: Path) -> list[Path]:
    """All shards of a split GGUF given any one of them (or [path] for a single file)."""
    m = _SHARD.match(path.name)
    if not m:
        return [path]
    n = int(m.group("n"))
    paths = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CcmoeError(f"split GGUF {path.name} is missing {len(missing)} of {n} shards ({', '.join(missing[:3])})",
                         "download every shard into the same folder")
    return paths


def is_quantized(inv: "ModelInventory") -> bool:
    """Whether any weight matrix is stored quantized (llama-quantize then needs --allow-requantize)."""
    return any(len(t.shape) >= 2 and t.ggml_type not in ("F32", "F16", "BF16") for t in inv.tensors)


def model_digest(path: Path) -> str:
    """A cheap identity of a model over every shard of a split GGUF (each shard's path, size and mtime)."""
    return "|".join(file_digest(p) for p in shard_paths(Path(path)))


def _field_value(field):
    """A reader field as a Python value (scalars, strings, or short arrays)."""
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(field.data) > 64:          # token lists and merges: keep only the length
            return {"array_len": len(field.data)}
        return [_part_value(field.parts[i], types[-1]) for i in field.data]
    return _part_value(field.parts[field.data[0]], types[0])


def _part_value(part, vtype):
    import gguf

    if vtype == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    value = part.tolist()
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def _check_gguf_header(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise CcmoeError(f"{path} does not exist", "check the path") from None
    except IsADirectoryError:
        raise CcmoeError(f"{path} is a folder, not a GGUF file", "pass the .gguf file inside it") from None
    if magic != b"GGUF":
        raise CcmoeError(f"{path} is not a GGUF file (it starts with {magic!r})",
                         "convert it first (llama.cpp convert_hf_to_gguf.py) or pass the .gguf file")


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _LONG_ARRAY = 8, 9, 64


def _parse_header(buf, size: int) -> tuple[dict, list[tuple[str, list[int], int, int]], int]:
    """Little-endian GGUF v2/v3 header: metadata (arrays over 64 items as their length only, without decoding
    them: a 129k-token vocabulary costs a skip, not a minute) and (name, shape, ggml type, offset) per tensor."""
    import struct

    pos = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, pos)
    pos += 16

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + n > size:
            raise ValueError(f"a string of {n} bytes past the end")
        text = bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace")
        pos += 8 + n
        return text

    def value(vtype: int, keep: bool = True):
        nonlocal pos
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            sub, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if n > _LONG_ARRAY and sub in _SCALARS:
                pos += n * struct.calcsize(_SCALARS[sub])
                return {"array_len": n}
            items = [value(sub, n <= _LONG_ARRAY) for _ in range(n)]
            return items if n <= _LONG_ARRAY else {"array_len": n}
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise ValueError(f"unknown value type {vtype}")
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v if keep else None

    metadata = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        metadata[key] = value(vtype)
    tensors = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        shape = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
        kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        tensors.append((name, shape, kind, offset))
    align = int(metadata.get("general.alignment", 32) or 32)
    return metadata, tensors, -(-pos // align) * align


def read_gguf_shard(path: Path) -> tuple[dict, list[TensorInfo]]:
    """Metadata and tensor list of one GGUF file, checked against the file's size."""
    import mmap
    import struct

    import gguf

    _check_gguf_header(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if struct.unpack_from("<I", buf, 4)[0] not in (2, 3):
                raise ValueError(f"GGUF version {struct.unpack_from('<I', buf, 4)[0]} (or big-endian)")
            metadata, infos, data_start = _parse_header(buf, size)
        tensors, end = [], 0
        for name, shape, kind, offset in infos:
            qtype = gguf.GGMLQuantizationType(kind)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n_bytes = math.prod(shape) // block * type_size
            tensors.append(TensorInfo(name, shape, qtype.name, n_bytes))
            end = max(end, data_start + offset + n_bytes)
    except (ValueError, struct.error, KeyError, OverflowError, MemoryError) as e:
        raise CcmoeError(f"{path} is a damaged or truncated GGUF ({type(e).__name__}: {e})",
                         "download or convert the file again") from None
    if end > size:
        raise CcmoeError(f"{path} is truncated: its tensors need {end} bytes but the file has {size}",
                         "download or convert the file again")
    return metadata, tensors


def _read_gguf_shard_gguf_py(path: Path) -> tuple[dict, list[TensorInfo]]:
    """read_gguf_shard through gguf-py's reader (slow on large vocabularies): what the fast parser must match."""
    import gguf

    _check_gguf_header(path)
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on damaged files
        raise CcmoeError(f"{path} is a damaged or truncated GGUF ({type(e).__name__}: {e})",
                         "download or convert the file again") from None
    metadata = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            metadata[name] = _field_value(fld)
        except Exception:  # an unreadable value should not hide the rest of the inventory
            metadata[name] = None
    tensors = []
    end = 0
    for t in reader.tensors:
        tensors.append(TensorInfo(t.name, [int(x) for x in t.shape], t.tensor_type.name, int(t.n_bytes)))
        end = max(end, int(t.data_offset) + int(t.n_bytes))
    if end > size:
        raise CcmoeError(f"{path} is truncated: its tensors need {end} bytes but the file has {size}",
                         "download or convert the file again")
    return metadata, tensors


def read_gguf(path: Path) -> ModelInventory:
    """Inventory of a GGUF model, reading every shard of a split model."""
    path = Path(path)
    shards = shard_paths(path)
    metadata: dict = {}
    tensors: list[TensorInfo] = []
    for i, shard in enumerate(shards):
        meta, ts = read_gguf_shard(shard)
        if i == 0:
            metadata = meta
        tensors.extend(ts)
    arch = metadata.get("general.architecture")
    if not arch:
        raise CcmoeError(f"{path} has no general.architecture key", "convert the model with a current llama.cpp")
    name = metadata.get("general.name") or shards[0].stem
    return ModelInventory(arch=str(arch), name=str(name), source=str(shards[0]), metadata=metadata, tensors=tensors,
                          file_bytes=sum(p.stat().st_size for p in shards), shards=[str(p) for p in shards])


# ---------------------------------------------------------------- MoE structure

@dataclass
class LayerSummary:
    layer: int
    kind: str                    # "dense" or "moe"
    params: int
    bytes_by_class: dict[str, int]


@dataclass
class MoeSummary:
    """Derived facts `inspect` prints and later stages use."""

    arch: str
    name: str
    is_moe: bool
    n_layers: int
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    n_dense_lead: int
    moe_layers: list[int]
    total_params: int
    active_params: int
    total_bytes: int
    params_by_class: dict[str, int]
    bytes_by_class: dict[str, int]
    types_by_class: dict[str, dict[str, int]]
    layers: list[LayerSummary]

    def to_dict(self) -> dict:
        return asdict(self)


def _count_experts_from_tensors(inv: ModelInventory) -> int:
    for t in inv.tensors:
        if t.tensor_class == "routed_expert" and "_exps." in t.name and len(t.shape) == 3:
            return t.shape[2]
    ids = {int(m.group(1)) for t in inv.tensors if (m := re.search(r"\.ffn_\w+\.(\d+)\.weight$", t.name))}
    return len(ids)


def summarize(inv: ModelInventory) -> MoeSummary:
    """Experts, parameter totals and per-class/per-layer bytes of an inventory."""
    n_expert = int(inv.key("expert_count", 0) or 0) or _count_experts_from_tensors(inv)
    n_used = int(inv.key("expert_used_count", 0) or 0)
    is_moe = n_expert > 0 and any(t.tensor_class == "routed_expert" for t in inv.tensors)
    if is_moe and n_used <= 0:
        raise CcmoeError(f"{inv.source}: {n_expert} experts but no {inv.arch}.expert_used_count key",
                         f"set it with `--override-kv {inv.arch}.expert_used_count=int:K` when converting")
    n_shared = int(inv.key("expert_shared_count", 0) or 0)
    if not n_shared and any(t.tensor_class == "shared_expert" for t in inv.tensors):
        n_shared = 1
    n_layers = int(inv.key("block_count", 0) or 0) or (1 + max((t.layer or 0) for t in inv.tensors))

    per_layer: dict[int, dict[str, int]] = {}
    params_layer: dict[int, int] = {}
    moe_layers: set[int] = set()
    params_by_class = dict.fromkeys(TENSOR_CLASSES, 0)
    bytes_by_class = dict.fromkeys(TENSOR_CLASSES, 0)
    types_by_class: dict[str, dict[str, int]] = {c: {} for c in TENSOR_CLASSES}
    active = 0.0
    fraction = (n_used / n_expert) if is_moe else 1.0
    for t in inv.tensors:
        cls = t.tensor_class
        params_by_class[cls] += t.n_elements
        bytes_by_class[cls] += t.n_bytes
        types_by_class[cls][t.ggml_type] = types_by_class[cls].get(t.ggml_type, 0) + t.n_bytes
        active += t.n_elements * (fraction if cls == "routed_expert" else 1.0)
        if t.layer is not None:
            per_layer.setdefault(t.layer, dict.fromkeys(TENSOR_CLASSES, 0))[cls] += t.n_bytes
            params_layer[t.layer] = params_layer.get(t.layer, 0) + t.n_elements
            if cls == "routed_expert":
                moe_layers.add(t.layer)
    layers = [LayerSummary(i, "moe" if i in moe_layers else "dense", params_layer[i], per_layer[i])
              for i in sorted(per_layer)]
    n_dense_lead = 0
    for layer in layers:
        if layer.kind == "moe":
            break
        n_dense_lead += 1
    if not is_moe:
        n_dense_lead = n_layers
    return MoeSummary(
        arch=inv.arch, name=inv.name, is_moe=is_moe, n_layers=n_layers, n_expert=n_expert if is_moe else 0,
        n_expert_used=n_used if is_moe else 0, n_expert_shared=n_shared, n_dense_lead=n_dense_lead,
        moe_layers=sorted(moe_layers), total_params=sum(params_by_class.values()), active_params=round(active),
        total_bytes=sum(bytes_by_class.values()), params_by_class=params_by_class, bytes_by_class=bytes_by_class,
        types_by_class={c: v for c, v in types_by_class.items() if v}, layers=layers)


def kv_bytes_per_token(inv: ModelInventory, kv_type_bytes: float = 2.0) -> float:
    """KV cache bytes one token of context takes (f16 by default); MLA stores the latent and the RoPE key."""
    n_layer = int(inv.key("block_count", 0) or 0)
    if inv.arch in ("deepseek2",) and inv.key("attention.kv_lora_rank"):
        rope = int(inv.key("rope.dimension_count", 64) or 64)
        return n_layer * (int(inv.key("attention.kv_lora_rank")) + rope) * kv_type_bytes
    heads = int(inv.key("attention.head_count", 1) or 1)
    heads_kv = int(inv.key("attention.head_count_kv", 0) or heads)
    head_dim = int(inv.key("attention.key_length", 0) or int(inv.key("embedding_length", 0)) // heads)
    return n_layer * 2 * heads_kv * head_dim * kv_type_bytes


def require_moe(summary: MoeSummary, source: str) -> None:
    """Stages that place or prune experts refuse dense models with one clear line."""
    if not summary.is_moe:
        raise CcmoeError(f"{source} is a dense model ({summary.arch}, no routed experts)",
                         "ccmoe-run works on Mixture-of-Experts models; use plain llama.cpp for dense ones")


# ---------------------------------------------------------------- in words

@dataclass
class Inspection:
    """`inspect`: a model's inventory and its MoE summary."""

    inventory: ModelInventory
    summary: MoeSummary

    def to_dict(self) -> dict:
        return {"source": self.inventory.source, "file_bytes": self.inventory.file_bytes, **self.summary.to_dict()}

    def summary_lines(self) -> list[str]:
        inv, s = self.inventory, self.summary
        shards = f", {len(inv.shards)} shards" if len(inv.shards) > 1 else ""
        lines = [f"model       {s.name} ({s.arch})  {inv.source}", f"size        {human_size(s.total_bytes)} of tensors{shards}"]
        if not s.is_moe:
            lines.append(f"layers      {s.n_layers}, dense model (no routed experts)")
        else:
            lines.append(f"layers      {s.n_layers}: {s.n_dense_lead} leading dense, {len(s.moe_layers)} MoE")
            lines.append(f"experts     {s.n_expert} routed, {s.n_expert_used} used per token, {s.n_expert_shared} shared")
        if inv.arch == "deepseek2" and inv.key("attention.kv_lora_rank"):
            q = inv.key("attention.q_lora_rank")
            lines.append(f"attention   multi-head latent (MLA): kv_lora_rank {inv.key('attention.kv_lora_rank')}"
                         + (f", q_lora_rank {q}" if q else "") + f", {inv.key('attention.head_count')} heads"
                         + (f"; gating {GATING.get(inv.key('expert_gating_func'), inv.key('expert_gating_func'))}"
                            if inv.key("expert_gating_func") else ""))
        lines.append(f"parameters  {human_count(s.total_params)} total, {human_count(s.active_params)} active per token")
        lines.append("by class    params       bytes        types")
        for cls, n in s.params_by_class.items():
            if n:
                types = ", ".join(sorted(s.types_by_class.get(cls, {})))
                lines.append(f"  {cls:<14}{human_count(n):>9}  {human_size(s.bytes_by_class[cls]):>12}   {types}")
        lines.append("per layer   kind   params     attention    dense_ffn    shared       router       routed")
        for layer in s.layers:
            b = layer.bytes_by_class
            lines.append(f"  {layer.layer:<9} {layer.kind:<6}{human_count(layer.params):>8}" + "".join(
                f" {human_size(b[c]):>12}" for c in ("attention", "dense_ffn", "shared_expert", "router", "routed_expert")))
        return lines


GATING = {1: "softmax", 2: "sigmoid with expert bias"}   # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE
