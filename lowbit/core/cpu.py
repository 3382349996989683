"""What this CPU's integer instructions can do without losing precision."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def has_vnni() -> bool:
    """Whether this CPU's int8 dot products cannot saturate on uint8 × int8 (VNNI on x86; other
    architectures have no int16 pair sums)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # unknown: take the safe choice
    return "avx512_vnni" in flags or "avx_vnni" in flags
