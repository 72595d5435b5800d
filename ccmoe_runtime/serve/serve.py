"""`ccmoe-run serve`: place the model for the device, start llama-server with that placement, measure one
streamed request, and keep serving until Ctrl-C or SIGTERM (the server never outlives ccmoe-run)."""

from __future__ import annotations

import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from ..core.errors import EXIT_SERVER, CcmoeError
from ..devices.profiles import DeviceProfile
from ..engine.build import Engine
from ..engine.server import (
    LlamaServer,
    check_cors_origins,
    ServerConfig,
    is_loopback,
    resolve_host,
    serve_forever,
    server_command,
    streamed_chat,
)
from ..placement.layout import Settings
from ..placement.pinned import place_from_layout
from ..placement.search import PlacedModel, place_model, repredict
from ..placement.startcache import forget
from ..placement.summary import summary_lines

WARMUP_TOKENS = 48
_WARMUP_TEXT = ("Once upon a time a small machine served a very large model to everyone who asked, one token after "
                "another, and nobody noticed that most of the experts slept in the slow memory while the busy ones "
                "worked fast. ")


@dataclass
class ServerPlan:
    """The llama-server command a placement gives, before anything starts (what --dry-run prints)."""

    config: ServerConfig
    command: list[str]
    placed: PlacedModel
    warnings: list[str] = field(default_factory=list)
    placed_s: float = 0.0           # seconds from the process's start until the placement was made

    def to_dict(self) -> dict:
        return {"command": self.command, "placement": self.placed.placement.to_dict(), "warnings": self.warnings}

    def summary_lines(self) -> list[str]:
        return [" ".join(shlex.quote(a) for a in self.command), *summary_lines(self.placed.placement)]


@dataclass
class ServeReady:
    """What `serve` reports once the server answers: where, with which placement, and the warm-up's speed."""

    base_url: str
    model: str
    device: str
    engine: str
    pid: int
    log: str
    kv_type: str
    overrides: list[str]
    predicted_memory_bytes: dict[str, int]
    predicted_prompt_tokens_per_s: float
    predicted_generation_tokens_per_s: float
    start_cache: str = "off"        # hit: placement reused without measuring; stored: placed and kept; off
    placed_s: float = 0.0           # seconds from ccmoe-run's start to the placement (before llama-server starts)
    warmup: dict | None = None      # measured and predicted tok/s of one streamed request, llama-server's RSS

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "warmup"}, **(self.warmup or {})}

    def summary_lines(self, placed: PlacedModel) -> list[str]:
        lines = [f"serving {Path(self.model).name} on {self.device}; OpenAI base URL: {self.base_url}",
                 *summary_lines(placed.placement)]
        w = self.warmup
        if w:
            lines.append(f"warm-up ({w['warmup_prompt_tokens']}-token prompt, {w['warmup_generated_tokens']} tokens): "
                         f"prompt {w['prompt_tokens_per_s']} tok/s (predicted {w['warmup_predicted_prompt_tokens_per_s']}), "
                         f"generation {w['generation_tokens_per_s']} tok/s (predicted "
                         f"{w['warmup_predicted_generation_tokens_per_s']}); llama-server RSS "
                         f"{w['server_rss_bytes'] / 1e6:.0f} MB: {w['warmup_text'][:60]!r}")
        lines.append("Ctrl-C stops the server.")
        return lines


def plan_server(engine: Engine | None, model: Path, device: DeviceProfile, settings: Settings, host: str = "127.0.0.1",
                port: int = 8080, api_key: str | None = None, cors_origins: str = "localhost",
                stats_file: Path | None = None, calibration: Path | None = None, trial: bool = False,
                start_cache: bool = True) -> ServerPlan:
    """Place `model` (or take its placement from the start cache) and spell out the llama-server command (no server
    started)."""
    check_port(port)
    resolve_host(host, port)
    check_cors_origins(cors_origins)
    found, note = place_from_layout(engine, model, device, settings, stats_file, calibration)  # compress --device's
    placed = PlacedModel(*found) if found else place_model(engine, model, device, settings, stats_file, calibration,
                                                           trial, start_cache)
    p = placed.placement
    if note and not found:
        p.notes.append(note)
    cfg = ServerConfig(model=model, host=host, port=port, ctx=settings.ctx, parallel=settings.parallel,
                       threads=p.threads, api_key=api_key, cors_origins=cors_origins, extra_args=p.server_args())
    warnings = []
    if not is_loopback(host) and not api_key:
        warnings.append(f"llama-server listens on {host} without an API key: anyone who can reach this machine can "
                        "use the model (set CCMOE_API_KEY or --api-key-file)")
    if cors_origins == "*" and not api_key:
        warnings.append("--cors-origins '*' without an API key lets every web page you open use the model")
    return ServerPlan(cfg, server_command(engine, cfg), placed, warnings, round(process_age_s(), 3))


def process_age_s() -> float:
    """Seconds since this process started (psutil), what a user waits before llama-server starts."""
    return max(time.time() - psutil.Process().create_time(), 0.0)


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise CcmoeError(f"--port {port} is outside 0..65535", "pass a port such as 8080 (0: any free port)")


def warmup_prompt(ctx: int, ctx_train: int) -> str:
    """A prompt long enough for its speed to mean something (up to a few hundred tokens) that still fits the
    slot's context with the 48-token answer (at least 2 characters a token, to be safe)."""
    chars = max(16, 2 * (min(ctx, ctx_train or ctx) - 64))
    text = _WARMUP_TEXT * 4
    return text[:chars].rsplit(" ", 1)[0]


def warm_up(server: LlamaServer, placed: PlacedModel, device: DeviceProfile) -> dict:
    """One streamed chat request: measured prompt and generation tok/s beside the predicted ones for its lengths."""
    p = placed.placement
    try:
        prompt = warmup_prompt(p.settings.ctx, int(placed.inventory.key("context_length", 0) or 0))
        text, timings = streamed_chat(server.base_url, prompt, WARMUP_TOKENS, server.cfg.api_key)
    except OSError as e:   # URLError, HTTPError, timeouts
        raise CcmoeError(f"the warm-up request to {server.base_url} failed ({e})",
                         f"see the server log {server.log_path}", EXIT_SERVER) from None
    n_prompt, n_gen = int(timings.get("prompt_n", 1) or 1), int(timings.get("predicted_n", 1) or 1)
    pred = repredict(p, placed.inventory, device, placed.factors, n_prompt, n_prompt + n_gen // 2, placed.stats)
    return {"warmup_text": text, "prompt_tokens_per_s": round(timings.get("prompt_per_second", 0.0), 1),
            "generation_tokens_per_s": round(timings.get("predicted_per_second", 0.0), 1),
            "warmup_prompt_tokens": n_prompt, "warmup_generated_tokens": n_gen,
            "warmup_predicted_prompt_tokens_per_s": round(pred.prompt_tps, 1),
            "warmup_predicted_generation_tokens_per_s": round(pred.decode_tps, 1),
            "server_rss_bytes": psutil.Process(server.proc.pid).memory_info().rss}


def ready_report(server: LlamaServer, engine: Engine, device: DeviceProfile, plan: ServerPlan,
                 warmup: bool) -> ServeReady:
    p = plan.placed.placement
    return ServeReady(base_url=server.base_url + "/v1", model=str(plan.config.model), device=device.name,
                      engine=engine.key or str(engine.bin_dir), pid=server.proc.pid, log=str(server.log_path),
                      kv_type=p.kv_type, overrides=p.overrides,
                      predicted_memory_bytes={k: u.total for k, u in p.memory.items()},
                      predicted_prompt_tokens_per_s=p.predicted_empty.prompt_tps,
                      predicted_generation_tokens_per_s=p.predicted_empty.decode_tps,
                      start_cache=plan.placed.start_cache, placed_s=plan.placed_s,
                      warmup=warm_up(server, plan.placed, device) if warmup else None)


def serve_model(engine: Engine, plan: ServerPlan, device: DeviceProfile, warmup: bool = True, on_ready=None) -> int:
    """Start the planned server, warm it up, hand the ready report to `on_ready`, and serve until stopped."""
    server = LlamaServer(engine, plan.config)
    try:
        server.start()
    except CcmoeError:
        if plan.placed.start_key:                 # a placement that did not start is not kept for the next one
            forget(plan.placed.start_key)
        raise
    return serve_forever(server, lambda: on_ready(ready_report(server, engine, device, plan, warmup))
                         if on_ready else None)
