"""The OpenAI Python client against the real `ccmoe-run serve` (bundled model, CPU, --parallel 3): chat with and without
streaming, concurrent clients served at once, the API key, and llama-server's peak RSS within the predicted memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import run_cli

from ccmoe_runtime.engine.server import free_port

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow          # a real server and client; the dry run is in the fast subset of test_serve.py
API_KEY = "test-key"
PARALLEL = 3


class RssSampler:
    """Samples a process's resident memory every 20 ms in a thread; `peak` is the largest reading."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


@pytest.fixture(scope="module")
def server(engine):
    """`ccmoe-run serve` in a child process; yields its ready message (base URL, pid, predicted memory)."""
    cmd = [sys.executable, "-m", "ccmoe_runtime.cli", "serve", "--device", "auto", "--port", str(free_port()),
           "--ctx", "512", "--parallel", str(PARALLEL), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CCMOE_API_KEY": API_KEY})
    line = proc.stdout.readline()
    try:
        assert line, proc.stderr.read()
        ready = json.loads(line)
        sampler = RssSampler(ready["pid"])
        ready["sampler"] = sampler
        yield ready
        sampler.stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _client(server, key: str = API_KEY):
    return openai.OpenAI(base_url=server["base_url"], api_key=key, timeout=120, max_retries=0)


def test_chat_without_streaming(server):
    reply = _client(server).chat.completions.create(model="ccmoe-mini-moe-f16", max_tokens=24, temperature=0.7,
                                                      messages=[{"role": "user", "content": "Tell me a story."}])
    assert reply.choices[0].message.content      # sampled text of a tiny model: now and then only spaces
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens > 0
    assert [m.id for m in _client(server).models.list().data] == ["ccmoe-mini-moe-f16"]


def test_chat_with_streaming(server):
    stream = _client(server).chat.completions.create(model="ccmoe-mini-moe-f16", max_tokens=32, stream=True,
                                                       messages=[{"role": "user", "content": "Once upon a time"}])
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 3 and "".join(pieces)    # sampled text of a tiny model: now and then only spaces
    assert sum(1 for p in pieces if p) > 3        # streamed token by token, not in one piece at the end


def test_wrong_api_key_is_refused(server):
    with pytest.raises(openai.AuthenticationError):
        _client(server, "wrong").chat.completions.create(model="x", max_tokens=4,
                                                          messages=[{"role": "user", "content": "Hi"}])


def _stream_times(server, i: int, times: dict, errors: list) -> None:
    """One streamed chat: when its first and its last token arrived."""
    try:
        first = None
        stream = _client(server).chat.completions.create(
            model="ccmoe-mini-moe-f16", max_tokens=64, stream=True, temperature=0.8, seed=i,
            messages=[{"role": "user", "content": f"Story number {i}:"}])
        text = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic()
                text.append(chunk.choices[0].delta.content)
        times[i] = (first, time.monotonic(), "".join(text))
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(repr(e))


def test_concurrent_clients_are_served_at_once(server):
    """--parallel 3: three streams all start before any ends (queued requests would start only after one ends)."""
    times: dict = {}
    errors: list = []
    threads = [threading.Thread(target=_stream_times, args=(server, i, times, errors)) for i in range(PARALLEL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors and len(times) == PARALLEL
    assert all(text.strip() for _, _, text in times.values())
    assert max(first for first, _, _ in times.values()) < min(last for _, last, _ in times.values())


def test_more_clients_than_slots_all_get_answers(server):
    answers: list = []

    def ask(i: int) -> None:
        r = _client(server).chat.completions.create(model="ccmoe-mini-moe-f16", max_tokens=16, seed=i,
                                                      messages=[{"role": "user", "content": f"Question {i}?"}])
        answers.append(r.choices[0].message.content)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2 * PARALLEL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(answers) == 2 * PARALLEL and all(a.strip() for a in answers)


def test_peak_rss_stays_within_the_predicted_memory(server):
    """Sampled over all the requests above (this test runs last in the module)."""
    peak = server["sampler"].stop()
    predicted = server["predicted_memory_bytes"]["cpu"]
    assert 0 < peak <= predicted, (peak, predicted)


def test_dry_run_shows_placement_memory_and_speed(engine):
    result = run_cli("serve", "--dry-run", "--ctx", "512", "--parallel", "2", check=True)
    first, *rest = result.stdout.splitlines()
    assert first.split()[0].endswith("llama-server") and "--ctx-size 1024" in first and "--fit off" in first
    text = "\n".join(rest)
    assert "predicted: prompt" in text and "CPU" in text and "weights" in text and "layers  where" in text
    doc = json.loads(run_cli("serve", "--dry-run", "--json", "--ctx", "512", check=True).stdout)
    assert doc["command"][0].endswith("llama-server") and doc["placement"]["memory"]["cpu"]["total"] > 0
