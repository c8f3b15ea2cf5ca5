"""The trained shapes model's int8 and int4 bundles: held-out accuracy and logit cosine against its
fp32 bundle (bounds and measured figures: test_shapes.py's docstring; where this CPU kind's int4
default is all 4-bit (AVX2 only), mean >= 0.998 and every prompt >= 0.97: measured mean 0.9984,
min 0.981). Apart from test_shapes.py
so the test runner can run the two beside each other."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3vl_onnx import Pipeline
from qwen3vl_onnx.export.defaults import int8_projections
from qwen3vl_onnx.shapes import task
from qwen3vl_onnx.shapes.evaluate import evaluate

from .test_parity import _onnx_logits
from .test_quant import _cos
from .test_shapes import N_ITEMS


@pytest.mark.parametrize("precision, prefill_int8, bound", [("int8", False, 0.93), ("int4", False, 0.90), ("int4", True, 0.90)])
def test_quantized_bundles_answer(shapes, precision, prefill_int8, bound):
    _, bundles = shapes
    pipe = Pipeline.from_bundle(bundles(precision=precision, prefill_int8=prefill_int8))
    assert (pipe.model.prefill_decoder is not None) is prefill_int8
    rep = evaluate(pipe, N_ITEMS)
    print(f"\n{precision}{' + int8 prefill' * prefill_int8}\n" + rep.table())
    assert rep.accuracy()["overall"] >= bound, rep.accuracy()

    ref = Pipeline.from_bundle(bundles())
    cos = []
    for it in task.eval_items(40):
        prompt = ref.prepare(task.messages(it))
        cos.append(_cos(_onnx_logits(pipe, prompt)[-1], _onnx_logits(ref, prompt)[-1]))
    print(f"{precision} logit cosine vs fp32: mean {np.mean(cos):.5f} min {min(cos):.5f}")
    all_4bit = precision == "int4" and not int8_projections()  # this CPU kind's int4 default
    mean_bound, min_bound = (0.998, 0.97) if all_4bit else (0.999, 0.99)
    assert np.mean(cos) >= mean_bound and min(cos) >= min_bound
