"""Resumable stages: which stages of a `compress` work folder finished, from which inputs, with which outputs.

OUT.ccmoe/stages.json records per stage a key (a hash of its inputs: the engine, the model's digest, the
settings and the previous stage's outputs) and the digest (path, size, mtime) of every file it wrote. A stage
whose key and outputs still match is skipped, so a killed `compress` resumes from the last finished stage; any
change upstream changes every later key.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..core.artifacts import file_digest, load_artifact, save_artifact
from ..core.errors import CcmoeError

STAGES = ("statistics", "sensitivity", "impact", "plan", "build")
STOP_STAGES = STAGES[:-1]
STAGES_KIND, STAGES_VERSION = "compress-stages", 1


def peak_rss_bytes() -> int:
    """The largest resident set so far of this process or of any tool it waited for (Linux: ru_maxrss in KiB)."""
    return 1024 * max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


@dataclass
class StageLog:
    """The stage records of one work folder (`path` None: nothing is skipped or recorded, times still said)."""

    path: Path | None
    say: Callable[[str], None] | None = None
    records: dict = field(default_factory=dict)
    started: dict = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path, fresh: bool = False, say: Callable[[str], None] | None = None) -> "StageLog":
        """The log of `folder` (a fresh one with `fresh`, e.g. --force)."""
        path = Path(folder) / "stages.json"
        records = {}
        if path.is_file() and not fresh:
            try:
                records = load_artifact(path, STAGES_KIND, STAGES_VERSION).get("stages", {})
            except CcmoeError:
                records = {}        # unreadable: every stage runs again
        return cls(path, say, records)

    def key(self, *parts) -> str:
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()

    def outputs_of(self, name: str) -> dict[str, str]:
        return dict(self.records.get(name, {}).get("outputs", {}))

    def done(self, name: str, key: str) -> bool:
        """True (and said) when `name` finished from these inputs and its outputs are unchanged; else starts it."""
        rec = self.records.get(name)
        if self.path and rec and rec.get("key") == key and all(
                Path(p).is_file() and file_digest(Path(p)) == d for p, d in rec.get("outputs", {}).items()):
            self._say(f"{name}: finished earlier from the same inputs ({rec.get('seconds', 0):.0f} s then), skipped")
            return True
        self.start(name)
        return False

    def start(self, name: str) -> None:
        """`name` runs now: its record and those of the later stages are dropped."""
        self.records.pop(name, None)
        for later in STAGES[STAGES.index(name) + 1:] if name in STAGES else ():
            self.records.pop(later, None)
        self.started[name] = time.monotonic()
        self._say(f"{name}: running")

    def finish(self, name: str, key: str, outputs: list[Path]) -> None:
        """Record `name` as finished with the files it wrote (those that exist)."""
        seconds = time.monotonic() - self.started.pop(name, time.monotonic())
        self._say(f"{name}: done in {seconds:.1f} s (peak RSS so far {peak_rss_bytes() / 2**30:.2f} GiB)")
        if self.path is None:
            return
        self.records[name] = {"key": key, "seconds": round(seconds, 3), "peak_rss_bytes": peak_rss_bytes(),
                              "outputs": {str(p): file_digest(Path(p)) for p in outputs if Path(p).is_file()}}
        save_artifact(self.path, STAGES_KIND, STAGES_VERSION, {"stages": self.records})

    def _say(self, line: str) -> None:
        if self.say:
            self.say(line)
