"""The CPU this process runs on, as Linux's /proc/cpuinfo names it: the one reader of that file.

Torch-free, so the resume fingerprints (`resume.environment`) can use it without importing torch; the CPU
kernels' rules (`model.kernels`: the BLAS vendor rule, the bf16 units when torch cannot say) read it too.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass, field

CPUINFO = "/proc/cpuinfo"


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says of the first processor: x86's `vendor` ('GenuineIntel', 'AuthenticAMD', ...), Arm's
    `implementer` and `part` (hex codes), and the feature `flags` (x86 "flags", Arm "Features"). Empty off Linux,
    where `processor` holds platform.processor() instead."""

    vendor: str | None = None
    implementer: str | None = None
    part: str | None = None
    flags: frozenset[str] = field(default_factory=frozenset)
    processor: str | None = None

    def name(self) -> str | None:
        """The CPU kind in one string: Arm's implementer and part, then x86's vendor (absent fields left out)."""
        parts = [p for p in (self.implementer, self.part, self.vendor) if p]
        if not parts and self.processor:
            parts = [self.processor]
        return " ".join(parts) or None


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's fields of a /proc/cpuinfo text (x86 or Arm)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags") or fields.get("Features") or ""
    return CpuInfo(vendor=fields.get("vendor_id"), implementer=fields.get("CPU implementer"),
                   part=fields.get("CPU part"), flags=frozenset(flags.split()))


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's `CpuInfo` (read once per process)."""
    try:
        with open(CPUINFO) as f:
            return parse_cpuinfo(f.read())
    except OSError:  # not Linux
        return CpuInfo(processor=platform.processor() or None)
