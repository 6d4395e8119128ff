"""Sizes for people: the one byte formatter of the CLI, the notebooks and the figures (decimal units, as
shard sizes and `max_shard_size` are counted)."""

from __future__ import annotations


def format_bytes(n: float, short: bool = False) -> str:
    """1234567 -> '1.23 MB'; short (figure labels): 3 significant digits, '27.4 MB', '512 B', '70.5 GB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit == "B":
                return f"{n:.0f} B" if short else f"{n:,.0f} B"
            if short:
                return f"{n:.0f} {unit}" if n >= 100 else f"{n:.3g} {unit}"
            return f"{n:,.2f} {unit}"
        n /= 1000
    return f"{n} TB"
