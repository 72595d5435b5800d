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
    return write_corpus(out_dir, "\n\n".join(train) + "\n", "\n\n".join(held) + "\n", source)


def write_corpus(out_dir: Path, train: str, heldout: str, source: str) -> Corpus:
    """train.txt, heldout.txt and SOURCE (where they came from and their sha256) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.txt").write_text(train)
    (out_dir / "heldout.txt").write_text(heldout)
    digest = hashlib.sha256((out_dir / "train.txt").read_bytes() + (out_dir / "heldout.txt").read_bytes()).hexdigest()
    (out_dir / "SOURCE").write_text(f"{source}\nsha256 {digest}\n")
    return Corpus(out_dir / "train.txt", out_dir / "heldout.txt", source, digest)


def cached_corpus(out: Path) -> Corpus | None:
    """The corpus already in `out`, if a fetch finished there."""
    if not ((out / "SOURCE").is_file() and (out / "train.txt").is_file()):
        return None
    source, digest_line = (out / "SOURCE").read_text().splitlines()[:2]
    return Corpus(out / "train.txt", out / "heldout.txt", source, digest_line.split()[-1])


def fetch_corpus(out: Path, packages: tuple[str, ...], build) -> Corpus:
    """Download and unpack Debian `packages`, `build(root, folder, debs)` the corpus, and move it into `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        debs = [_download_deb(tmp, p) for p in packages]
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
        corpus = build(tmp / "root", tmp / "corpus", debs)
        if out.exists():
            shutil.rmtree(out)
        (tmp / "corpus").rename(out)
    return Corpus(out / "train.txt", out / "heldout.txt", corpus.source, corpus.sha256)


def ensure_corpus() -> Corpus:
    """The English corpus, fetched once into the cache."""
    return cached_corpus(corpus_dir()) or fetch_corpus(
        corpus_dir(), (CORPUS_PACKAGE,), lambda root, folder, debs: build_corpus(root, folder, f"Debian package {debs[0].name}"))


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
    return write_corpus(out_dir, "\n\n".join(t for t in train if len(t) > 20) + "\n", "\n".join(held), source)


def ensure_reference_corpus() -> Corpus:
    """The reference model's corpus, fetched once into the cache."""
    def build(root: Path, folder: Path, debs: list[Path]) -> Corpus:
        source = f"Debian packages {debs[0].name} (train) and {debs[1].name} (held out)"
        return build_reference_corpus(root, folder, source)

    return cached_corpus(reference_corpus_dir()) or fetch_corpus(
        reference_corpus_dir(), (REFERENCE_TRAIN_PACKAGE, REFERENCE_HELDOUT_PACKAGE), build)
