"""Whether this CPU computes bfloat16 in hardware (AVX-512 BF16, AMX), from its /proc/cpuinfo flags.

oneDNN runs mixed-bfloat16 convolutions and matmuls natively on x86 CPUs with AVX-512 BF16
(`avx512_bf16`) or AMX (`amx_bf16` with `amx_tile`); elsewhere it emulates them and bf16 is
slower than fp32. Pure text parsing, so it is testable on any machine; `detect()` reads the
real flags. Importing this module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses

CPUINFO = "/proc/cpuinfo"


@dataclasses.dataclass(frozen=True)
class Bf16Support:
    """The bfloat16 features of a CPU, as its flags report them."""

    avx512_bf16: bool = False
    amx: bool = False
    known: bool = True

    @property
    def fast(self) -> bool:
        """Whether mixed bfloat16 can be expected to beat fp32 on this CPU."""
        return self.avx512_bf16 or self.amx

    def describe(self) -> str:
        """One short phrase for a log line, e.g. `CPU bf16: AVX-512 BF16 + AMX`."""
        if not self.known:
            return "CPU bf16: unknown (no x86 flags in /proc/cpuinfo)"
        features = [
            name for name, on in (("AVX-512 BF16", self.avx512_bf16), ("AMX", self.amx)) if on
        ]
        if not features:
            return "CPU bf16: none (no AVX-512 BF16 or AMX; bf16 would be emulated)"
        return "CPU bf16: " + " + ".join(features)


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor listed in /proc/cpuinfo text (empty when none)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def bf16_support(cpuinfo: str) -> Bf16Support:
    """Reads the bfloat16 features from /proc/cpuinfo text.

    AMX counts only with its tile unit (`amx_tile`): `amx_bf16` names the instructions that
    run on the tiles, and a kernel that hides the tiles reports neither usable.
    """
    flags = cpu_flags(cpuinfo)
    if not flags:
        return Bf16Support(known=False)
    return Bf16Support(
        avx512_bf16="avx512_bf16" in flags,
        amx="amx_bf16" in flags and "amx_tile" in flags,
    )


def detect(path: str = CPUINFO) -> Bf16Support:
    """The bfloat16 features of the CPU this runs on (unknown when `path` cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return bf16_support(f.read())
    except OSError:
        return Bf16Support(known=False)
