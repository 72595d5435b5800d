"""A placement as data: where each tensor lives, the llama.cpp flags that say so, memory and predicted speed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.artifacts import load_artifact, save_artifact
from .costmodel import Prediction

PLACEMENT_VERSION = 1
PLACEMENT_KIND = "placement"


@dataclass
class Settings:
    """What the user asks of a placement."""

    ctx: int = 4096                  # context per slot
    parallel: int = 1
    kv_type: str = "auto"            # f16, q8_0 or auto
    batch: int = 2048
    ubatch: int = 512
    threads: int | None = None
    margin_bytes: int | None = None  # None: DEFAULT_MARGIN, TRIAL_MARGIN after a trial run
    ubatch_auto: bool = True         # may halve -ub when weights stay in host memory and that frees GPU room
    depth: int | None = None         # context depth the decode prediction is for (default: ctx)
    n_prompt: int = 512
    load_mode: str | None = None     # llama.cpp --load-mode; None: calibration's choice for host-memory weights
    cpu_repack: bool | None = None   # host-memory weights in llama.cpp's CPU buffers (--no-host); None: when faster


@dataclass
class PoolUse:
    """Bytes one pool holds under a placement."""

    where: str                       # gpu | cpu
    capacity: int
    weights: int = 0
    kv: int = 0
    compute: int = 0
    overhead: int = 0
    margin: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.overhead + self.margin

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


@dataclass
class Placement:
    """A placement as plain data: where each tensor lives, the llama.cpp flags, memory and predicted speed."""

    model: str
    device: str
    backend: str
    settings: Settings
    kv_type: str
    flash_attn: str
    n_gpu_layers: int
    threads: int
    tensors: dict[str, str]          # tensor name -> gpu | cpu
    overrides: list[str]             # -ot rules, first match wins
    memory: dict[str, PoolUse]
    predicted: Prediction
    predicted_empty: Prediction      # decode at an empty context (what llama-bench tg measures)
    memory_source: str               # "llama-fit-params" or "estimate" (+ " and a trial run")
    factors_source: str
    load_mode: str = "auto"          # llama.cpp --load-mode (none: host-memory weights in llama.cpp's own buffers)
    cpu_repack: bool = False         # --no-host: host-memory weights in llama.cpp's CPU buffers, repacked where it can
    notes: list[str] = field(default_factory=list)

    def server_args(self) -> list[str]:
        """llama-server flags (besides model, host, port, ctx and parallel, which ServerConfig sets)."""
        args = self.common_args()
        return args[:2] + ["--fit", "off"] + args[2:]

    def common_args(self, rule_separator: str = ",") -> list[str]:
        """The placement's flags as every llama.cpp tool spells them (no context, no threads); llama-bench
        separates -ot rules with ';' instead of ',' and gives --no-host a value."""
        args = ["-ngl", str(self.n_gpu_layers), "-fa", self.flash_attn,
                "-b", str(self.settings.batch), "-ub", str(self.settings.ubatch)]
        if self.overrides:
            args += ["-ot", rule_separator.join(self.overrides)]
        if self.kv_type != "f16":
            args += ["-ctk", self.kv_type, "-ctv", self.kv_type]
        if self.load_mode != "auto":
            args += ["-lm", self.load_mode]
        if self.cpu_repack:
            args += ["--no-host", "1"] if rule_separator == ";" else ["--no-host"]
        return args

    def launch_args(self) -> list[str]:
        """All llama-server flags of the placement, context, slots and threads included."""
        s = self.settings
        return ["-c", str(s.ctx * s.parallel), "-np", str(s.parallel), "-t", str(self.threads), *self.server_args()]

    def bench_args(self) -> list[str]:
        """The same placement as llama-bench flags."""
        return self.common_args(rule_separator=";")

    @property
    def has_host_weights(self) -> bool:
        """Some weights (besides token_embd) stay in host memory while the layers run on a GPU."""
        return self.n_gpu_layers > 0 and bool(self.overrides)

    @property
    def cpu_expert_tensors(self) -> list[str]:
        """The routed-expert tensors that stay in host memory."""
        return [n for n, w in self.tensors.items() if w == "cpu" and "_exps" in n]

    @property
    def cpu_expert_layers(self) -> int:
        """How many layers keep at least one routed-expert tensor in host memory (--n-cpu-moe's unit)."""
        return len({int(n.split(".")[1]) for n in self.cpu_expert_tensors})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory"] = {k: v.to_dict() for k, v in self.memory.items()}
        d["server_args"] = self.launch_args()
        d["bench_args"] = self.bench_args()
        return d


def save_placement(p: Placement, path: Path, force: bool = False) -> Path:
    return save_artifact(path, PLACEMENT_KIND, PLACEMENT_VERSION, p.to_dict(), force=force)


def load_placement(path: Path) -> dict:
    """A placement artifact as data (the per-tensor pools under `tensors`)."""
    return load_artifact(path, PLACEMENT_KIND, PLACEMENT_VERSION)


def placement_from_dict(d: dict) -> Placement:
    """A Placement back from its `to_dict()` (a saved placement or start-cache entry)."""
    fields = {k: v for k, v in d.items() if k in Placement.__dataclass_fields__}
    fields["settings"] = Settings(**d["settings"])
    fields["memory"] = {k: PoolUse(**{f: v for f, v in u.items() if f != "total"}) for k, u in d["memory"].items()}
    fields["predicted"] = Prediction(**d["predicted"])
    fields["predicted_empty"] = Prediction(**d["predicted_empty"])
    return Placement(**fields)
