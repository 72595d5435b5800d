"""Run llama.cpp's OpenAI-compatible llama-server: start, health, warm-up, clean shutdown."""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import EXIT_SERVER, CcmoeError
from ..core.paths import cache_root
from .build import Engine
from .tools import describe_exit

LOG_TAIL_LINES = 12


@dataclass
class ServerConfig:
    """What llama-server is started with; `extra_args` carries placement flags (-ot, -ngl...)."""

    model: Path
    host: str = "127.0.0.1"
    port: int = 0                 # 0: pick a free port
    ctx: int = 4096
    parallel: int = 1
    threads: int | None = None
    api_key: str | None = None    # passed in llama-server's environment (LLAMA_API_KEY), never on its command line
    alias: str | None = None
    cors_origins: str = "localhost"   # llama-server reflects only localhost origins; "*" allows every web page
    extra_args: list[str] = field(default_factory=list)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_host(host: str, port: int = 0) -> list:
    """`host`'s addresses (getaddrinfo), or one line saying it does not resolve."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise CcmoeError(f"the host {host!r} does not resolve ({getattr(e, 'strerror', None) or e})",
                         "pass --host 127.0.0.1, 0.0.0.0 or an address of this machine") from None


def check_cors_origins(origins: str) -> None:
    """`localhost`, `*` or a comma-separated list of origins such as https://app.example.com."""
    items = [o.strip() for o in origins.split(",")]
    if not origins.strip() or not all(items) or any(o not in ("localhost", "*") and "://" not in o for o in items):
        raise CcmoeError(f"--cors-origins {origins!r} is not localhost, '*' or a list of origins",
                         "pass localhost, '*' or origins such as https://app.example.com,http://localhost:3000")


def check_port_free(host: str, port: int) -> None:
    """The address resolves to this machine and the port is free there (else one line saying which)."""
    infos = resolve_host(host, port)
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise CcmoeError(f"{host} is not an address of this machine ({e.strerror})",
                                 "pass --host 127.0.0.1, 0.0.0.0 or one of this machine's addresses") from None
            raise CcmoeError(f"port {port} on {host} is in use ({e.strerror})",
                             "pass --port with a free port or stop the other server", EXIT_SERVER) from None


LOGS_KEPT = 20


def new_log_path() -> Path:
    """A fresh llama-server log file in the cache (logs/), keeping only the newest LOGS_KEPT."""
    folder = cache_root() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    old = sorted(folder.glob("llama-server-*.log"), key=lambda p: p.stat().st_mtime)
    for p in old[:max(0, len(old) - LOGS_KEPT + 1)]:
        p.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"llama-server-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log", dir=folder)
    os.close(fd)
    return Path(name)


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (127.0.0.0/8, ::1, localhost)."""

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_command(engine: Engine | None, cfg: ServerConfig) -> list[str]:
    """The exact llama-server argument list (no shell involved); `llama-server` on PATH when planning without an
    engine of the device's backend."""
    exe = str(engine.tool("llama-server")) if engine else "llama-server"
    cmd = [exe, "--model", str(cfg.model), "--host", cfg.host, "--port", str(cfg.port),
           "--ctx-size", str(cfg.ctx * cfg.parallel), "--parallel", str(cfg.parallel), "--metrics", "--no-webui"]
    if cfg.threads:
        cmd += ["--threads", str(cfg.threads)]
    cmd += ["--cors-origins", cfg.cors_origins, "--alias", cfg.alias or cfg.model.stem]
    return cmd + list(cfg.extra_args)


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM llama-server if ccmoe-run dies, so no server is orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LlamaServer:
    """A running llama-server child process; use as a context manager."""

    def __init__(self, engine: Engine, cfg: ServerConfig, log_path: Path | None = None):
        self.engine = engine
        self.cfg = cfg
        if cfg.port == 0:
            cfg.port = free_port(cfg.host)
        self.log_path = log_path or new_log_path()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"http://{host}:{self.cfg.port}"

    def start(self, timeout: float = 300.0) -> "LlamaServer":
        check_port_free(self.cfg.host, self.cfg.port)
        if not Path(self.cfg.model).is_file():
            raise CcmoeError(f"model {self.cfg.model} does not exist", "check the --model path")
        log = open(self.log_path, "wb")
        env = {**os.environ, "LLAMA_API_KEY": self.cfg.api_key} if self.cfg.api_key else \
            {k: v for k, v in os.environ.items() if k != "LLAMA_API_KEY"}
        self.proc = subprocess.Popen(server_command(self.engine, self.cfg), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        log.close()
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _failure(self, what: str) -> CcmoeError:
        tail = self.log_tail()
        reason = _explain(tail)
        return CcmoeError(f"llama-server {what}{': ' + reason if reason else ''}",
                          f"see its log {self.log_path}; last lines:\n{tail}", EXIT_SERVER)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise self._failure(f"ended while starting ({describe_exit(self.proc.returncode)})")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200 and json.loads(r.read() or b"{}").get("status") == "ok":
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
        raise self._failure(f"did not become healthy within {timeout:.0f} s")

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _explain(log_tail: str) -> str:
    """A short cause from llama-server's own log, when it names one."""
    low = log_tail.lower()
    for needle, why in (("failed to allocate", "out of memory"), ("out of memory", "out of memory"),
                        ("couldn't bind", "the port is in use"), ("address already in use", "the port is in use"),
                        ("failed to load model", "the model could not be loaded"),
                        ("error loading model", "the model could not be loaded")):
        if needle in low:
            return why
    return ""


# ---------------------------------------------------------------- HTTP client helpers

def _post(url: str, body: dict, api_key: str | None, timeout: float):
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    return urllib.request.urlopen(req, timeout=timeout)


def complete(base_url: str, prompt: str, n_predict: int = 32, api_key: str | None = None, timeout: float = 120) -> dict:
    """One non-streamed /v1/completions request; returns the JSON answer."""
    with _post(base_url + "/v1/completions", {"prompt": prompt, "max_tokens": n_predict, "temperature": 0},
               api_key, timeout) as r:
        return json.loads(r.read())


def streamed_chat(base_url: str, content: str, max_tokens: int = 64, api_key: str | None = None,
                  timeout: float = 300) -> tuple[str, dict]:
    """A streamed chat request; returns the text and llama-server's timings (prompt and generation tok/s)."""
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0.7, "seed": 1}
    text, timings = [], {}
    with _post(base_url + "/v1/chat/completions", body, api_key, timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            timings = chunk.get("timings", timings)
            for choice in chunk.get("choices", []):
                text.append((choice.get("delta") or {}).get("content") or "")
    return "".join(text), timings


def serve_forever(server: LlamaServer, on_ready=None) -> int:
    """Block until Ctrl-C or SIGTERM (then stop the server) or until the server dies (then say why)."""
    stop = {"signal": None}

    def handler(signum, _frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if on_ready:
            on_ready()
        while stop["signal"] is None:
            if not server.alive():
                raise server._failure(f"died ({describe_exit(server.proc.returncode)})")
            time.sleep(0.3)
        return 0
    finally:
        server.stop()
        for s, h in old.items():
            signal.signal(s, h)
