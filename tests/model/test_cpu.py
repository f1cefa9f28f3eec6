"""The one /proc/cpuinfo reader (`mechdiff.cpu`): x86 and Arm texts, and the rules that use it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mechdiff.cpu import CpuInfo, cpu_info, parse_cpuinfo

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 sha_ni

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse2 avx2
"""

ARM = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes sve sve2 bf16 i8mm
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd4f
"""


def test_parse_reads_the_first_processor_of_x86_and_arm():
    x = parse_cpuinfo(X86)
    assert x.vendor == "AuthenticAMD" and x.implementer is None and x.part is None
    assert x.flags == {"fpu", "vme", "sse2", "avx2", "avx512f", "avx512_bf16", "sha_ni"}  # processor 0's
    assert x.name() == "AuthenticAMD"
    a = parse_cpuinfo(ARM)
    assert (a.vendor, a.implementer, a.part) == (None, "0x41", "0xd4f")
    assert {"sve", "bf16", "i8mm", "asimd"} <= a.flags and "avx2" not in a.flags
    assert a.name() == "0x41 0xd4f"
    assert parse_cpuinfo("") == CpuInfo() and CpuInfo().name() is None
    assert CpuInfo(processor="arm").name() == "arm"


def test_environment_and_kernels_read_the_same_cpu():
    from mechdiff.model import kernels
    from mechdiff.resume import ENV_CPU_FLAGS, _environment

    info = cpu_info()
    if Path("/proc/cpuinfo").is_file():
        assert info == parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    env = _environment()
    assert env["cpu"] == info.name()
    assert env["cpu_flags"] == [f for f in ENV_CPU_FLAGS if f in info.flags]
    assert kernels.cpu_vendor() == info.vendor


@pytest.mark.parametrize("flags, units", [({"avx2", "amx_bf16", "avx512_bf16"}, "AMX"),
                                          ({"avx512f", "avx512_bf16"}, "AVX512-BF16"), ({"avx2"}, None)])
def test_bf16_units_from_the_flags_when_torch_cannot_say(monkeypatch, flags, units):
    import torch

    from mechdiff.model import kernels

    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(kernels, "cpu_info", lambda: CpuInfo(vendor="GenuineIntel", flags=frozenset(flags)))
    assert kernels.cpu_bf16_units() == units
