"""Real English text for training, calibration and quality tests, taken from a registry package at set-up."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import CcmoeError
from ..core.paths import cache_root

# Debian's `fortunes` package: ~2.4 MB of English quotations, jokes, definitions and literature excerpts.
CORPUS_PACKAGE = "fortunes"
SKIPPED_FILES = {"ascii-art"}
HELDOUT_EVERY = 20   # one entry in 20 is held out from training


@dataclass
class Corpus:
    """Train and held-out text files and where they came from."""

    train: Path
    heldout: Path
    source: str
    sha256: str

    def to_dict(self) -> dict:
        return {"train": str(self.train), "heldout": str(self.heldout), "source": self.source, "sha256": self.sha256}

    def summary_lines(self) -> list[str]:
        return [f"{k:<8} {v}" for k, v in self.to_dict().items()]


def corpus_dir() -> Path:
    return cache_root() / "corpus" / CORPUS_PACKAGE


def _download_deb(dest: Path, package: str = CORPUS_PACKAGE) -> Path:
    if not shutil.which("apt-get"):
        raise CcmoeError(f"apt-get is not available to fetch Debian's {package!r} package for the English corpus",
                         "run on a Debian/Ubuntu machine, or pass --calib FILE (plain English text) to commands that take it")
    for attempt in range(2):
        out = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)
        debs = list(dest.glob(f"{package}_*.deb"))
        if out.returncode == 0 and debs:
            return debs[0]
        if attempt == 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
    raise CcmoeError(f"could not download Debian package {package!r} ({out.stderr.strip()[-200:]})",
                     "run `apt-get update`, or pass --calib FILE (plain English text) to commands that take it")


def split_entries(texts: list[str]) -> list[str]:
    """Fortune files separate entries with lines holding a single '%'."""
    entries = []
    for text in texts:
        for entry in text.split("\n%\n"):
            entry = entry.strip("%\n ").replace("\t", "    ")
            if len(entry) > 20:
                entries.append(entry)
    return entries


def _entry_is_heldout(entry: str) -> bool:
    return int(hashlib.sha1(entry.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def build_corpus(package_root: Path, out_dir: Path, source: str) -> Corpus:
    """Write train.txt and heldout.txt from an unpacked fortunes package."""
    files = sorted(p for p in (package_root / "usr/share/games/fortunes").iterdir()
                   if p.is_file() and not p.is_symlink() and p.suffix == "" and p.name not in SKIPPED_FILES)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    entries = split_entries(texts)
    train = [e for e in entries if not _entry_is_heldout(e)]
    held = [e for e in entries if _entry_is_heldout(e)]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.txt").write_text("\n\n".join(train) + "\n")
    (out_dir / "heldout.txt").write_text("\n\n".join(held) + "\n")
    digest = hashlib.sha256((out_dir / "train.txt").read_bytes() + (out_dir / "heldout.txt").read_bytes()).hexdigest()
    (out_dir / "SOURCE").write_text(f"{source}\nsha256 {digest}\n")
    return Corpus(out_dir / "train.txt", out_dir / "heldout.txt", source, digest)


def ensure_corpus() -> Corpus:
    """The English corpus, fetched once into the cache."""
    out = corpus_dir()
    if (out / "SOURCE").is_file() and (out / "train.txt").is_file():
        source, digest_line = (out / "SOURCE").read_text().splitlines()[:2]
        return Corpus(out / "train.txt", out / "heldout.txt", source, digest_line.split()[-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        deb = _download_deb(tmp)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
        staged = tmp / "corpus"
        corpus = build_corpus(tmp / "root", staged, f"Debian package {deb.name}")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    return Corpus(out / "train.txt", out / "heldout.txt", corpus.source, corpus.sha256)


def calibration_text(path: Path | None) -> Path:
    """The user's calibration text, else the corpus's training part (fetched once)."""
    return Path(path) if path else ensure_corpus().train


# The reference model's corpus: Python's documentation sources (reStructuredText, ~9.4 MB of technical
# English) for training, and the GNU Coding Standards and Maintainers' guide (plain text) held out: a
# different source, so held-out perplexity measures English, not memorised documents.
REFERENCE_TRAIN_PACKAGE = "python3.11-doc"
REFERENCE_HELDOUT_PACKAGE = "gnu-standards"


def reference_corpus_dir() -> Path:
    return cache_root() / "corpus" / "reference"


def build_reference_corpus(root: Path, out_dir: Path, source: str) -> Corpus:
    """train.txt from the .rst sources of python3.11-doc, heldout.txt from gnu-standards' text manuals."""
    sources = sorted((root / "usr/share/doc/python3.11/html/_sources").rglob("*.rst.txt"))
    train = [p.read_text(encoding="utf-8", errors="replace").strip() for p in sources]
    gnu = root / "usr/share/doc/gnu-standards"
    held = [gzip.decompress((gnu / f"{name}.text.gz").read_bytes()).decode("utf-8", "replace")
            for name in ("maintain", "standards")]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.txt").write_text("\n\n".join(t for t in train if len(t) > 20) + "\n")
    (out_dir / "heldout.txt").write_text("\n".join(held))
    digest = hashlib.sha256((out_dir / "train.txt").read_bytes() + (out_dir / "heldout.txt").read_bytes()).hexdigest()
    (out_dir / "SOURCE").write_text(f"{source}\nsha256 {digest}\n")
    return Corpus(out_dir / "train.txt", out_dir / "heldout.txt", source, digest)


def ensure_reference_corpus() -> Corpus:
    """The reference model's corpus, fetched once into the cache."""
    out = reference_corpus_dir()
    if (out / "SOURCE").is_file() and (out / "train.txt").is_file():
        source, digest_line = (out / "SOURCE").read_text().splitlines()[:2]
        return Corpus(out / "train.txt", out / "heldout.txt", source, digest_line.split()[-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        debs = [_download_deb(tmp, p) for p in (REFERENCE_TRAIN_PACKAGE, REFERENCE_HELDOUT_PACKAGE)]
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
        source = f"Debian packages {debs[0].name} (train) and {debs[1].name} (held out)"
        build_reference_corpus(tmp / "root", tmp / "corpus", source)
        if out.exists():
            shutil.rmtree(out)
        (tmp / "corpus").rename(out)
    return ensure_reference_corpus()
