"""Sizes for people: the one byte formatter of the CLI, the notebooks and the figures (decimal units, as
shard sizes and `max_shard_size` are counted), and its inverse for the CLI's and notebooks' budgets."""

from __future__ import annotations

import argparse
import math


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


def parse_size(text: str) -> int:
    """'512MB', '2GiB', '1.5e9', '1000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
        if not math.isfinite(value) or value >= 2**63:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}: use bytes or units like 512MB, 2GiB") from None
    if unit not in units or value < 0:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}: use bytes or units like 512MB, 2GiB")
    return int(value * units[unit])
