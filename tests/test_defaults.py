"""Export defaults by CPU kind: the kind read from /proc/cpuinfo's flags, and what it picks."""

from __future__ import annotations

import pytest

from qwen3vl_onnx.export import defaults
from qwen3vl_onnx.export.options import ExportOptions


@pytest.mark.parametrize(
    "flags, kind",
    [("fpu sse2 avx2 fma avx512f avx512bw avx512_vnni", "vnni"), ("avx2 fma avx_vnni", "vnni"),
     ("sse2 avx avx2 fma f16c", "avx2"),
     ("sse2 avx", "other"), (None, "other")],
)  # fmt: skip
def test_cpu_kind_from_flags(tmp_path, flags, kind):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: x\n" + ("" if flags is None else f"flags\t\t: {flags}\n"))
    assert defaults.cpu_kind(info) == kind
    assert defaults.cpu_kind(tmp_path / "missing") == "other"


@pytest.mark.parametrize("kind, eight", [("vnni", ("v_proj", "lm_head")), ("avx2", ()), ("other", ("v_proj", "lm_head"))])
def test_int4_defaults_follow_the_cpu_kind_and_flags_win(monkeypatch, kind, eight):
    monkeypatch.setattr(defaults, "cpu_kind", lambda: kind)
    assert ExportOptions("int4").resolve().int8_projections == eight
    assert ExportOptions("int4", int8_projections=("lm_head",)).resolve().int8_projections == ("lm_head",)
    assert ExportOptions("int4", int8_projections=()).resolve().int8_projections == ()
    assert ExportOptions("int8").resolve().int8_projections == ()
    for precision, kv in (("int4", "int8"), ("int8", "int8"), ("fp32", "fp32"), ("fp16", "fp32")):
        assert ExportOptions(precision).resolve().kv_cache == kv
