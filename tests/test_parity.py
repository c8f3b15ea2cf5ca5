"""Random-weight parity with transformers' Qwen3VLForConditionalGeneration, fp32.

Tolerance: 1e-4 absolute on logits and vision features. Both sides compute in fp32 with the same
weights; what differs is summation order inside matmuls/softmax, which for these widths stays
around 1e-6, so 1e-4 leaves room while still catching any real mistake (a wrong rotary axis,
a missed DeepStack add or an off-by-one position moves logits by 1e-2 or more).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen3vl_onnx import Pipeline

from .conftest import picture

TOL = 1e-4

# (t, h, w) patch grids: square, wide, tall, very wide, odd multiple, and one used nowhere else (10x22).
VISION_GRIDS = [(1, 4, 4), (1, 6, 8), (1, 8, 6), (1, 2, 16), (1, 14, 10), (1, 10, 22)]


@pytest.mark.parametrize("grids", [[g] for g in VISION_GRIDS] + [VISION_GRIDS[:3], [(2, 6, 4)]], ids=str)
def test_vision_and_deepstack(tiny, grids):
    cfg = tiny.model.config.vision_config
    n = sum(t * h * w for t, h, w in grids)
    pv = np.random.default_rng(1).standard_normal((n, 3 * 2 * 16 * 16), dtype=np.float32)
    pipe = Pipeline.from_bundle(tiny.bundle)
    embeds, deepstack = pipe.model.encode_images(pv, grids)
    ref = tiny.model.model.visual(torch.from_numpy(pv), grid_thw=torch.tensor(grids))
    assert embeds.shape == (n // 4, cfg.out_hidden_size)
    assert deepstack.shape[0] == len(cfg.deepstack_visual_indexes)
    np.testing.assert_allclose(embeds, ref.pooler_output.numpy(), atol=TOL, rtol=0)
    for k, feat in enumerate(ref.deepstack_features):
        np.testing.assert_allclose(deepstack[k], feat.numpy(), atol=TOL, rtol=0)


def _messages(images, text="Describe the picture."):
    return [{"role": "user", "content": [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]}]


def _ref_logits(tiny, prompt):
    ids = torch.tensor([prompt.ids])
    kw = {"mm_token_type_ids": (ids == 151655).long()}
    if prompt.pixel_values is not None:
        kw.update(pixel_values=torch.from_numpy(prompt.pixel_values), image_grid_thw=torch.tensor(prompt.grids))
    return tiny.model(input_ids=ids, **kw).logits[0].numpy(), kw


def _onnx_logits(pipe, prompt):
    m = pipe.model
    emb = ds = None
    if prompt.pixel_values is not None:
        emb, ds = m.encode_images(prompt.pixel_values, prompt.grids)
    return m.prefill(prompt.ids, emb, ds, prompt.grids, m.new_cache(), logits_to_keep=len(prompt.ids))[0]


def assert_prefill_logits(tiny, images) -> None:
    """The bundle's prompt logits equal transformers' within TOL (dense and MoE tests share it)."""
    pipe = Pipeline.from_bundle(tiny.bundle)
    prompt = pipe.prepare(_messages([picture(w, h, seed=i) for i, (w, h) in enumerate(images)]))
    assert len(prompt.grids) == len(images)
    ref, _ = _ref_logits(tiny, prompt)
    ours = _onnx_logits(pipe, prompt)
    assert np.abs(ref).max() > 0.5, "logits too small for the tolerance to mean anything"
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def assert_sixteen_greedy_tokens(tiny) -> None:
    """Sixteen greedy tokens after a picture equal transformers' generate."""
    pipe = Pipeline.from_bundle(tiny.bundle)
    messages = _messages([picture(80, 56, seed=3)], "What is here?")
    prompt = pipe.prepare(messages)
    _, kw = _ref_logits(tiny, prompt)
    ids = torch.tensor([prompt.ids])
    out = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                              do_sample=False, **kw)  # fmt: skip
    ref_tokens = out[0, len(prompt.ids) :].tolist()
    res = pipe.generate(messages, max_new_tokens=16, temperature=0.0, ignore_eos=True)
    assert res.token_ids == ref_tokens
    assert res.prompt_tokens == len(prompt.ids) and res.completion_tokens == 16


IMAGE_SETS = pytest.mark.parametrize("images", [[], [(64, 48)], [(96, 64), (40, 120)]],
                                     ids=["text_only", "one_image", "two_images_different_sizes"])  # fmt: skip


@IMAGE_SETS
def test_prefill_logits(tiny, images):
    assert_prefill_logits(tiny, images)


def test_sixteen_greedy_tokens(tiny):
    assert_sixteen_greedy_tokens(tiny)


def test_bf16_checkpoint_and_fp16_bundle(tmp_path, tokenizer_files):
    """Released weights are bf16: the reader widens them exactly; fp16 storage stays close."""
    from transformers import Qwen3VLForConditionalGeneration

    from qwen3vl_onnx.export.bundle import export
    from qwen3vl_onnx.export.options import ExportOptions

    from .conftest import GEOMETRIES, build_checkpoint

    torch.set_grad_enabled(False)
    ckpt = build_checkpoint(tmp_path / "ckpt", GEOMETRIES["tied_gqa2"], tokenizer_files, seed=5, bf16=True)
    ref_model = Qwen3VLForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="eager")
    for precision, tol in (("fp32", TOL), ("fp16", 0.05)):
        pipe = Pipeline.from_bundle(export(ckpt, tmp_path / precision, ExportOptions(precision)))
        prompt = pipe.prepare(_messages([picture(64, 64, seed=9)]))
        ids = torch.tensor([prompt.ids])
        ref = (
            ref_model(
                input_ids=ids,
                pixel_values=torch.from_numpy(prompt.pixel_values),
                image_grid_thw=torch.tensor(prompt.grids),
                mm_token_type_ids=(ids == 151655).long(),
            )
            .logits[0]
            .numpy()
        )
        np.testing.assert_allclose(_onnx_logits(pipe, prompt), ref, atol=tol, rtol=0)
