"""The serving path as a gate measure: llama-server answering OpenAI chat requests, timed by its own `timings`.

"serve:tg" is `predicted_per_second`, "serve:pp" is `prompt_per_second` of one non-streamed
/v1/chat/completions request, the best of REQUESTS requests a round (noise only slows a request down), each round
on freshly started servers with A's and B's requests taken in turn (`served_round`): a prompt of about N_PROMPT tokens opened by a fresh random word (so llama-server's
prompt cache cannot reuse it; `cache_prompt` is off as well), N_GEN tokens generated with end-of-text ignored.
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request

from ..core.errors import EXIT_SERVER, CcmoeError
from ..engine.server import LlamaServer, ServerConfig

N_PROMPT, N_GEN = 64, 32          # as the gate's llama-bench measures (bench/gate.py)
REQUESTS = 5                      # a round's sample: the best of 5 requests, as llama-bench's best of 5 repetitions

TIMING = {"serve:tg": "predicted_per_second", "serve:pp": "prompt_per_second"}
WORDS = ("the quick brown fox jumps over the lazy dog while a slow river runs past old stone bridges and "
         "green hills under a wide grey sky ").split()


def prompt_text(n_words: int = N_PROMPT) -> str:
    """About `n_words` tokens of plain words, opened by a random one."""
    return " ".join([secrets.token_hex(4)] + [WORDS[i % len(WORDS)] for i in range(n_words - 1)])


def chat_timings(base_url: str, timeout: float = 300) -> dict:
    """One OpenAI chat request; llama-server's `timings` of it."""
    body = {"messages": [{"role": "user", "content": prompt_text()}], "max_tokens": N_GEN, "temperature": 0,
            "ignore_eos": True, "cache_prompt": False}
    req = urllib.request.Request(base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            doc = json.loads(r.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as e:
        raise CcmoeError(f"llama-server at {base_url} did not answer a chat request ({e})",
                         "run `ccmoe-run serve` on the same model to see why", EXIT_SERVER) from None
    timings = doc.get("timings") if isinstance(doc, dict) else None
    if not isinstance(timings, dict) or not all(timings.get(k, 0) > 0 for k in TIMING.values()):
        raise CcmoeError(f"llama-server at {base_url} answered without timings ({str(doc)[:120]})",
                         "use a llama.cpp build whose llama-server reports timings", EXIT_SERVER)
    return timings


class Served:
    """One llama-server for a contender (a gate.Side): its engine, model and threads (llama-bench flags do not
    apply)."""

    def __init__(self, side):
        cfg = ServerConfig(model=side.model, ctx=4 * (N_PROMPT + N_GEN), threads=side.threads)
        self.server = LlamaServer(side.engine, cfg)

    def start(self) -> "Served":
        self.server.start()
        try:
            chat_timings(self.server.base_url)          # a warm-up request, not counted
        except BaseException:
            self.stop()
            raise
        return self

    def one(self, measure: str) -> float:
        """One request's tokens/s of `measure`."""
        if not self.server.alive():
            raise CcmoeError(f"llama-server for {self.server.cfg.model} died while the gate ran",
                             f"see its log {self.server.log_path}", EXIT_SERVER)
        return float(chat_timings(self.server.base_url)[TIMING[measure]])

    def stop(self) -> None:
        self.server.stop()


def served_round(sides: dict, measure: str, order: tuple[str, ...]) -> dict[str, float]:
    """One round: a fresh llama-server per side (started in `order`), REQUESTS requests of each taken in turn,
    the servers stopped; each side's best. Fresh servers, as llama-bench rounds are fresh processes: a long-lived
    one keeps where the scheduler put it for seconds to minutes, and two long-lived servers gave A against A
    2.38 [1.95, 3.17] on the CI VM, an interval that more rounds of the same two processes cannot fix."""
    servers: dict[str, Served] = {}
    try:
        for who in order:
            servers[who] = Served(sides[who]).start()
        got: dict[str, list[float]] = {who: [] for who in order}
        for _ in range(REQUESTS):
            for who in order:
                got[who].append(servers[who].one(measure))
        return {who: max(v) for who, v in got.items()}
    finally:
        for srv in servers.values():
            srv.stop()


def paired_served(a, b, measure: str):
    """next_round for `decide` on a serve measure: A first on odd rounds, B first on even ones."""
    turn = [0]

    def one_round():
        turn[0] += 1
        got = served_round({"a": a, "b": b}, measure, ("a", "b") if turn[0] % 2 else ("b", "a"))
        return got["a"], got["b"]

    return one_round
