"""Export defaults chosen by measurement per CPU kind (docs/BENCHMARKS.md, "Defaults by CPU kind").

Only what measurably differs between the two x86 kinds this project runs on is keyed here; the
rest is one choice for both (block 128, MatMulNBits accuracy level 4, int8 vision tower, int8 KV
cache for int4/int8 bundles). A bundle computes the same on every x86 CPU whichever kind it was
exported on; the kind only decides what is fastest there for the accuracy kept.
"""

from __future__ import annotations

from pathlib import Path

# int4 projections kept at 8 bits, per CPU kind. With VNNI, MatMulNBits' 8-bit path costs decode
# nothing measurable (4B, paired rounds 0.94-1.05x) and lm_head at 8 bits is most of the int4 logit
# accuracy on trained weights. Without it (AVX2 only), 8-bit MatMulNBits runs at half the 4-bit
# speed at one row (42 against 86 GOPS), so all-4-bit decodes 1.12x faster at the 4B shape in a
# bundle 8% smaller, for 0.5 points of the shapes model's held-out accuracy (95.25% against 95.75%).
# Other CPUs (not x86, or flags unreadable) get the choice that keeps the most accuracy.
INT8_PROJECTIONS = {"vnni": ("v_proj", "lm_head"), "avx2": (), "other": ("v_proj", "lm_head")}


def cpu_kind(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """ "vnni" where an x86 CPU has AVX-512 VNNI or AVX-VNNI, "avx2" where it has AVX2 without them,
    "other" for anything else (another architecture, or no readable flags)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "other"
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    if {"avx512_vnni", "avx_vnni"} & flags:
        return "vnni"
    return "avx2" if "avx2" in flags else "other"


def int8_projections(kind: str | None = None) -> tuple[str, ...]:
    """The int4 projections kept at 8 bits on CPU ``kind`` (default: this machine's)."""
    return INT8_PROJECTIONS[kind or cpu_kind()]
