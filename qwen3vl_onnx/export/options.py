"""What an export can be asked for, as one value: the CLI, ``export()`` and the bench share it.

``ExportOptions.resolve()`` validates the combination once and replaces the "auto" choices by what
they stand for, so the manifest records what was built, not what was asked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import UserError
from . import defaults
from .quant import DEFAULT_BLOCK_SIZE
from .text import PROJECTIONS, DecoderOptions

PRECISIONS = ("fp32", "fp16", "int8", "int4")
VISION_PRECISIONS = ("auto", "fp32", "int8")
KV_CACHES = ("auto", "fp32", "int8")
BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class ExportOptions:
    """Export choices. ``vision_precision="auto"`` and ``int8_projections=None`` are resolved by
    ``resolve()`` (see there); ``portable`` writes standard-ONNX attention (float precisions only)."""

    precision: str = "fp32"
    block_size: int = DEFAULT_BLOCK_SIZE
    vision_precision: str = "auto"
    int8_projections: tuple[str, ...] | None = None
    prefill_int8: bool = False
    portable: bool = False
    kv_cache: str = "auto"

    @property
    def bits(self) -> int:
        """Decoder weight bits (0: float weights)."""
        return BITS.get(self.precision, 0)

    def resolve(self) -> ExportOptions:
        """These options validated (one-line ``UserError`` otherwise), "auto" choices resolved.

        - ``vision_precision`` "auto": int8 for int4/int8 bundles, else fp32. Why int8 there: the
          u8 x s8 GEMM runs the tower's matmuls several times faster than fp32 MatMul or MatMulNBits
          at cosine 0.9999 per matmul, and a user who asked for a quantized bundle wants the picture
          encoded fast too. Float bundles keep the reference-exact fp32 tower.
        - ``int8_projections`` None: for int4, what ``defaults`` measured best on this machine's CPU
          kind (v_proj and lm_head with VNNI, none on AVX2 only), nothing otherwise; an
          empty tuple: every projection at 4 bits.
        - ``kv_cache`` "auto": int8 for int4/int8 bundles, else fp32. An int8-cache bundle holds the
          float-cache decoder too (a second small graph file over the same weights), so the cache
          precision can still be chosen at run time; float bundles stay the reference-exact form,
          and portable graphs have no GroupQueryAttention to quantize for.
        - ``prefill_int8``: only for int4/int8 (never portable). Why the option exists: MatMulNBits'
          int8-compute path runs prompt-sized matmuls at about half the u8 x s8 GEMM's speed. The
          prefill graph stores every layer projection again as int8 per output channel (its lm_head
          a second copy of the decode graph's), so prompts and image tokens run on the fast GEMM
          while decode keeps the compact weights. The price is ~1 byte per decoder weight of memory,
          so it is off by default (figures: docs/BENCHMARKS.md).
        """
        if self.precision not in PRECISIONS:
            raise UserError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.vision_precision not in VISION_PRECISIONS:
            raise UserError(f"vision precision {self.vision_precision!r} is not one of {', '.join(VISION_PRECISIONS)}")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
            raise UserError(f"block size must be a power of two >= 16, got {b!r}")
        vision = self.vision_precision
        if vision == "auto":
            vision = "int8" if self.bits else "fp32"
        projections = self._projections()
        if self.kv_cache not in KV_CACHES:
            raise UserError(f"KV cache {self.kv_cache!r} is not one of {', '.join(KV_CACHES)}")
        kv = self.kv_cache
        if kv == "auto":
            kv = "int8" if self.bits else "fp32"
        if kv == "int8" and self.portable:
            raise UserError("--portable graphs keep a float KV cache (int8 needs GroupQueryAttention)")
        if self.prefill_int8 and not self.bits:
            raise UserError(f"--prefill-int8 applies to int4/int8 bundles, not {self.precision}")
        if self.portable and (self.bits or vision != "fp32"):
            raise UserError(f"--portable graphs cannot be {self.precision}: MatMulNBits is an ONNX Runtime contrib op")
        return dataclasses.replace(self, vision_precision=vision, int8_projections=projections, kv_cache=kv)

    def _projections(self) -> tuple[str, ...]:
        if self.int8_projections is None:
            return defaults.int8_projections() if self.precision == "int4" else ()
        chosen = set(self.int8_projections)
        if unknown := sorted(chosen - set(PROJECTIONS)):
            raise UserError(f"unknown projection(s) {', '.join(unknown)}: choose from {', '.join(PROJECTIONS)} or none")
        if chosen and self.precision != "int4":
            raise UserError(f"8-bit projections apply to int4 bundles only, not {self.precision}")
        return tuple(k for k in PROJECTIONS if k in chosen)

    def decoder(self, int8_rows: bool = False) -> DecoderOptions:
        """The decoder graph's options (``int8_rows``: the --prefill-int8 prompt graph). Call on resolved options."""
        return DecoderOptions(fused=not self.portable, bits=self.bits, block_size=self.block_size,
                              int8_projections=self.int8_projections or (), int8_rows=int8_rows)  # fmt: skip

    def argv(self) -> list[str]:
        """The ``qwen3vl-onnx export`` flags that ask for these options, resolved or as asked: an
        "auto" choice stays "auto", so the export makes it (the int8 cache's agreement check decides
        the default cache only when the cache is not named)."""
        args = ["--precision", self.precision, "--block-size", str(self.block_size), "--vision-precision", self.vision_precision]
        if self.precision == "int4" and self.int8_projections is not None:
            args += ["--int8-projections", ",".join(self.int8_projections) or "none"]
        args += ["--kv-cache", self.kv_cache]
        return args + ["--prefill-int8"] * self.prefill_int8 + ["--portable"] * self.portable
