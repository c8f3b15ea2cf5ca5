"""``bench --serve``'s in-process figure: decoder steps of 1 and several rows at given cached lengths."""

from __future__ import annotations

from qwen3vl_onnx.bench.serve import _step_line, step_scaling


def test_step_scaling_times_each_cached_length_and_reports_the_bound(tiny_one):
    res = step_scaling(tiny_one.bundle, cached=(5, 40), rows=3, pairs=3)
    assert res["rows"] == 3 and [s["cached"] for s in res["steps"]] == [5, 40]
    for s in res["steps"]:
        assert s["step_1_row_ms"] > 0 and s["step_rows_ms"] > 0 and s["pairs"] == 3
        assert 0 < s["scaling"] < 3 * 50, s  # 3 rows' tokens over one row's, per pair of steps
    line = _step_line(res)
    assert line.startswith("decoder step alone (in process), 1 row / 3 rows") and "40 cached: " in line, line
