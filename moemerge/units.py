"""Sizes in bytes as users write them (`2GB`, `500MiB`): one parser for shard sizes and memory budgets."""

from __future__ import annotations

import re

_SCALE = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SCALE |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9 bytes, '500MiB' -> 500 * 2**20 (the units `save_pretrained` accepts); ints are bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"size {text!r}: expected a number of bytes or e.g. 2GB, 500MB, 1GiB")
    return int(float(match.group(1)) * _SCALE[(match.group(2) or "B").upper()])
