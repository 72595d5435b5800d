"""Sizes and rates: the unit constants and how every command writes them."""

from __future__ import annotations

KB, MB, GB = 1000, 1000**2, 1000**3          # decimal: disks, device memory figures, bandwidth (GB/s)
KIB, MIB, GIB = 1024, 1024**2, 1024**3       # binary: llama.cpp's buffers and tools


def human_size(n: float) -> str:
    """Bytes in binary units: 512 B, 1.50 KiB ... 2.00 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: float) -> str:
    """A parameter count: 8.14M, 671.03B."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def gb_text(n: float) -> str:
    """Bytes in decimal units: GB from 0.1 GB, else MB (2.40 GB, 0.25 GB, 12.3 MB)."""
    return f"{n / GB:.2f} GB" if abs(n) >= 0.1 * GB else f"{n / MB:.1f} MB"


def gib_text(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def tps_text(tps: float) -> str:
    """Tokens per second as the summaries print them."""
    return f"{tps:,.1f} tok/s"
