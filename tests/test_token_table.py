"""One quantized token table: lookups dequantize exactly the blocks MatMulNBits multiplies by, a
tied checkpoint's table is its lm_head's bytes (stored once), an untied one has its own, and the
embeddings stay close to the checkpoint's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwen3vl_onnx import Pipeline
from qwen3vl_onnx.export.quant import dequantize, quantize
from qwen3vl_onnx.runtime.token_table import TokenTable


@pytest.mark.parametrize("bits, block, cols", [(8, 32, 80), (4, 32, 80), (4, 16, 48), (8, 128, 64)])
def test_rows_are_the_blocks_dequantized(tmp_path, bits, block, cols):
    """Any rows, in any order, repeated: what ``dequantize`` (the MatMulNBits reference) gives,
    including a row count of blocks whose 4-bit zero points share a byte with padding."""
    w = np.random.default_rng(bits + cols).standard_normal((37, cols)).astype(np.float32)
    q = quantize(w, bits, block)
    entry = {"kind": "blocks", "bits": bits, "block_size": block, "rows": 37, "cols": cols, "file": "t.data"}
    with open(tmp_path / "t.data", "wb") as f:
        for key, arr in (("qweight", q.packed), ("scales", q.scales), ("zero_points", q.zero_points)):
            entry[key] = None if arr is None else {"offset": f.tell(), "shape": list(arr.shape)}
            if arr is not None:
                f.write(arr.tobytes())
    ids = [5, 0, 36, 5, 17]
    got = TokenTable(tmp_path, entry).rows(ids)
    assert got.dtype == np.float32 and got.shape == (5, cols)
    np.testing.assert_array_equal(got, dequantize(q)[ids])
    assert np.abs(got - w[ids]).max() < (0.03 if bits == 8 else 0.5)


def _checkpoint_table(ckpt) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(str(ckpt / "model.safetensors"))["model.language_model.embed_tokens.weight"].astype(np.float32)


@pytest.mark.parametrize("geometry, eight", [("tied_gqa2", ("v_proj", "lm_head")), ("untied_gqa4", ("v_proj", "lm_head")),
                                             ("tied_gqa2", ()), ("untied_gqa4", ())])  # fmt: skip
def test_quantized_bundles_keep_one_table(tiny_models, geometry, eight):
    tiny = tiny_models(geometry)
    bundle = tiny.bundle_with(precision="int4", int8_projections=eight)
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["embed_tokens"]
    bits = 8 if "lm_head" in eight else 4
    assert entry["kind"] == "blocks" and entry["bits"] == bits  # lm_head's bits
    assert not (bundle / "embed_tokens.npy").exists()
    if geometry.startswith("tied"):
        assert entry["file"] == "decoder.onnx.data" and not (bundle / "embed_tokens.data").exists()
    else:
        assert entry["file"] == "embed_tokens.data"
    table = _checkpoint_table(tiny.checkpoint)
    m = Pipeline.from_bundle(bundle).model
    ids = np.arange(0, table.shape[0], 97)
    got = m.embed(ids)
    cos = (got * table[ids]).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(table[ids], axis=-1)
    print(f"{geometry} {bits}-bit table: embedding cosine min {cos.min():.6f}")
    # blocks of 128 over 64-wide rows (one block a row, the worst case): measured min 0.99995 (8 bits), 0.991-0.992 (4)
    assert cos.min() > (0.9999 if bits == 8 else 0.985), cos.min()


def test_tied_table_is_the_lm_head_weight(tiny_one):
    """The lookup reads the very bytes the decoder's MatMulNBits lm_head multiplies by."""
    import onnx
    from onnx import numpy_helper

    bundle = tiny_one.bundle_with(precision="int4")
    entry = json.loads((bundle / "manifest.json").read_text())["embed_tokens"]
    model = onnx.load(str(bundle / "decoder.onnx"), load_external_data=True)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("lm_head.")}
    table = TokenTable(bundle, entry)
    np.testing.assert_array_equal(np.asarray(table.packed), weights["lm_head.qweight"])
    np.testing.assert_array_equal(np.asarray(table.scales).ravel(), weights["lm_head.scales"])


def test_float_bundles_keep_an_array(tiny_one):
    entry = json.loads((tiny_one.bundle / "manifest.json").read_text())["embed_tokens"]
    assert entry["kind"] == "array" and entry["dtype"] == "float32"
    m = Pipeline.from_bundle(tiny_one.bundle).model
    np.testing.assert_array_equal(m.embed([3, 1]), _checkpoint_table(tiny_one.checkpoint)[[3, 1]])
