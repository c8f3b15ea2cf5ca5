"""The int8 KV cache: scales from measured ranges, the int8-cache graphs an export adds, and that
decoding over them tracks the float cache (pictures, a 2000-token prompt, a video, a conversation,
the server's slots and prompt cache) with one byte a value on every layer but the first.

Bounds: mean logit cosine against the float cache >= 0.999 and every position >= 0.99, over the
prompt's positions and 8 teacher-forced decode steps. Measured on these random checkpoints (int4
weights, head_dim 16): means 0.99982-0.99989, minima 0.99965-0.99979 (pictures, 2017 positions of
text, a video; with layer 0 int8 too: means 0.9993-0.9996, minima 0.9985-0.9992); on the trained
shapes model (docs/BENCHMARKS.md) mean 1.00000, min 0.99997.
"""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import onnx
import pytest

from qwen3vl_onnx import Pipeline
from qwen3vl_onnx.calibration import Calibrator
from qwen3vl_onnx.config import Qwen3VLConfig
from qwen3vl_onnx.errors import UserError
from qwen3vl_onnx.export.bundle import export
from qwen3vl_onnx.export.kv_int8 import AGREEMENT_BAR, FLOAT_LAYERS, FLOOR, HEADROOM, scales_from_ranges
from qwen3vl_onnx.export.options import ExportOptions
from qwen3vl_onnx.runtime.cache import KVCache
from qwen3vl_onnx.runtime.sampling import GenerationParams

from .conftest import build_checkpoint, make_video, picture


def test_scales_keep_headroom_and_a_floor_per_head():
    ranges = np.zeros((2, 2, 3, 8), np.float32)
    ranges[0, 0, 0] = np.arange(8)  # one head's channels 0..7: channel 0 never moved in calibration
    ranges[1, 1, 2] = 5.0
    s = scales_from_ranges(ranges)
    assert s.shape == ranges.shape and s.dtype == np.float32
    np.testing.assert_allclose(s[0, 0, 0, 7], 7 * HEADROOM / 127, rtol=1e-6)
    np.testing.assert_allclose(s[0, 0, 0, 0], 7 * FLOOR / 127, rtol=1e-6)  # the floor, not zero
    np.testing.assert_allclose(s[1, 1, 2], 5 * HEADROOM / 127, rtol=1e-6)
    assert (s[0, 1] == 1 / 127).all()  # a head that never moved gets a usable scale, not zero or inf
    with pytest.raises(ValueError, match="finite"):
        scales_from_ranges(np.full((1, 2, 1, 4), np.nan))


@pytest.fixture(scope="module")
def int4(tiny_models):
    tiny = tiny_models("tied_gqa2")
    return tiny.bundle_with(precision="int4")


def _logits(
    pipe: Pipeline, messages: list, forced: list[int] | None = None, steps: int = 8
) -> tuple[np.ndarray, list[int], KVCache]:
    """Every prompt position's logits and ``steps`` decode steps' (fed ``forced`` tokens, else greedy),
    the tokens fed, and the cache they filled."""
    m, p = pipe.model, pipe.prepare(messages)
    emb, ds = m.encode_images(p.pixel_values, p.grids) if p.pixel_values is not None else (None, None)
    cache = m.new_cache(capacity=len(p.ids) + steps)
    out = [m.prefill(p.ids, emb, ds, p.image_grids, cache, len(p.ids), p.video_grids)[0]]
    tokens = forced or []
    for i in range(steps):
        tok = forced[i] if forced else int(np.argmax(out[-1][-1]))
        if not forced:
            tokens.append(tok)
        out.append(m.step([tok], cache))
    return np.concatenate(out), tokens, cache


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("case", ["pictures", "long_text", "video"])
def test_int8_cache_tracks_the_float_cache(int4, tmp_path, case):
    if case == "pictures":
        content = [{"type": "image", "image": picture(96, 64, seed=4)}, {"type": "image", "image": picture(40, 120, seed=5)},
                   {"type": "text", "text": "Compare the two pictures."}]  # fmt: skip
    elif case == "long_text":
        content = [{"type": "text", "text": "A long report about rivers, bridges and floods. " * 200}]
    else:
        clip = make_video(tmp_path / "clip.mp4", frames=12, fps=6, width=64, height=48)
        content = [{"type": "video", "video": str(clip)}, {"type": "text", "text": "What moves?"}]
    messages = [{"role": "user", "content": content}]
    fp32, int8 = Pipeline.from_bundle(int4, kv_cache="fp32"), Pipeline.from_bundle(int4)
    assert int8.model.kv_cache == "int8"  # the int4 bundle's default
    ref, tokens, _ = _logits(fp32, messages)
    got, _, _ = _logits(int8, messages, tokens)
    if case == "long_text":
        assert len(ref) >= 2000
    cos = _cos(ref, got)
    print(f"{case}: {len(cos)} positions, cosine mean {cos.mean():.6f} min {cos.min():.5f}")
    assert cos.mean() >= 0.999 and cos.min() >= 0.99
    a, b = fp32.model.new_cache(capacity=512), int8.model.new_cache(capacity=512)
    a.ensure(512), b.ensure(512)
    # the first FLOAT_LAYERS layers keep four bytes a value, every other layer one
    layers = fp32.config.text.num_hidden_layers
    assert [k.dtype for k in b.keys] == [np.float32] * FLOAT_LAYERS + [np.int8] * (layers - FLOAT_LAYERS)
    kept = 4 * FLOAT_LAYERS + layers - FLOAT_LAYERS
    assert 4 * layers * b.nbytes == kept * a.nbytes
    assert 4 * layers * int8.model.cache_bytes(2, 512) == kept * fp32.model.cache_bytes(2, 512)


def test_equalized_cache_holds_the_per_channel_codes(int4, tmp_path):
    """The per-tensor cache over channels equalized in the graph holds the codes a per-channel
    kernel scale writes, and the logits are the same: queries and outputs carry the inverse
    factors. Measured with these steps: the first int8 layer's codes all equal, logit cosine between
    the two forms 1.00000, against the float cache 0.99986 both.
    Bound 0.999 between them: with the export's own steps a few codes land on rounding ties (99.997%
    equal) and this random model turns them into a cosine of 0.99962 at worst."""
    import onnx
    from onnx import numpy_helper

    from qwen3vl_onnx.export.kv_int8 import int8_cache_graph, kv_scale_name

    forms = {form: tmp_path / form for form in ("PER_TENSOR", "PER_CHANNEL")}
    graph = onnx.load(str(int4 / "decoder.int8kv.onnx"), load_external_data=False)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer if t.name.startswith("kv_")}
    text = Qwen3VLConfig.from_manifest(json.loads((int4 / "manifest.json").read_text())["config"]).text
    layers, kv_heads = text.num_hidden_layers, text.num_key_value_heads
    # Steps that differ by channel up to 2.5x (whatever this export chose), each layer's widest kept.
    rng = np.random.default_rng(0)
    first = FLOAT_LAYERS  # the first layer with an int8 cache
    assert not any(kv_scale_name(i, "key") in inits for i in range(first))  # float layers have no scale
    scales = np.stack([[inits.get(kv_scale_name(i, kind), np.ones(1)) * rng.uniform(0.4, 1.0, (kv_heads, text.head_dim))
                        for kind in ("key", "value")] for i in range(layers)]).astype(np.float32)  # fmt: skip
    assert all(inits[kv_scale_name(i, "key")].shape == (1,) for i in range(first, layers))  # one scale per layer
    for form, path in forms.items():  # both forms written afresh from the same per-channel steps
        shutil.copytree(int4, path)
        int8_cache_graph(path / "decoder.onnx", path / "decoder.int8kv.onnx", scales, form)
    messages = [{"role": "user", "content": [{"type": "image", "image": picture(96, 64, seed=4)},
                                             {"type": "text", "text": "What is in the picture?"}]}]  # fmt: skip
    forced = [11, 12, 13]
    ref, _, _ = _logits(Pipeline.from_bundle(int4, kv_cache="fp32"), messages, forced, steps=len(forced))
    (eq, _, eq_cache), (pc, _, pc_cache) = (_logits(Pipeline.from_bundle(forms[f]), messages, forced, steps=len(forced))
                                            for f in ("PER_TENSOR", "PER_CHANNEL"))  # fmt: skip
    (k0, v0), (k1, v1) = eq_cache.bindings()[first], pc_cache.bindings()[first]
    assert k0.numpy().dtype == np.int8
    codes = np.abs(np.stack([k0.numpy(), v0.numpy()]).astype(np.int16) - np.stack([k1.numpy(), v1.numpy()]))
    assert codes.max() <= 1 and (codes == 0).mean() >= 0.9999, (codes.max(), (codes == 0).mean())
    ours, theirs, between = _cos(ref, eq), _cos(ref, pc), _cos(eq, pc)
    print(
        f"layer {first} codes equal {(codes == 0).mean():.5f}; cosine vs float cache {ours.mean():.5f} equalized, "
        f"{theirs.mean():.5f} per channel; between {between.mean():.5f} (min {between.min():.5f})"
    )
    assert ours.mean() >= theirs.mean() - 5e-4 and between.min() >= 0.999


def test_a_bundle_with_every_layer_int8_still_runs(int4, tmp_path):
    """Bundles exported before layer 0 kept a float cache hold an int8 cache on every layer; the
    runtime reads each layer's cache type from the manifest's graph inputs, so they run as before."""
    import onnx

    from qwen3vl_onnx.export.bundle import io_entries
    from qwen3vl_onnx.export.kv_int8 import int8_cache_graph

    old = tmp_path / "old"
    shutil.copytree(int4, old)
    text = Qwen3VLConfig.from_manifest(json.loads((old / "manifest.json").read_text())["config"]).text
    steps = np.full((text.num_hidden_layers, 2, text.num_key_value_heads, text.head_dim), 0.05, np.float32)
    g = int8_cache_graph(old / "decoder.onnx", old / "decoder.int8kv.onnx", steps, float_layers=0).graph
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["graphs"]["decoder_int8kv"].update(inputs=io_entries(list(g.input)), outputs=io_entries(list(g.output)))
    del manifest["kv_cache"]["float_layers"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    graph_inputs = {v.name: v for v in onnx.load(str(old / "decoder.int8kv.onnx"), load_external_data=False).graph.input}
    assert graph_inputs["past_key.0"].type.tensor_type.elem_type == onnx.TensorProto.INT8
    pipe = Pipeline.from_bundle(old)
    cache = pipe.model.new_cache(capacity=64)
    assert {k.dtype for k in cache.keys} == {np.dtype(np.int8)}
    assert pipe.model.cache_bytes(1, 64) * 4 == Pipeline.from_bundle(old, kv_cache="fp32").model.cache_bytes(1, 64)
    res = pipe.generate([{"role": "user", "content": "Hello there"}], max_new_tokens=4, temperature=0, ignore_eos=True)
    assert len(res.token_ids) == 4


def test_the_bundle_holds_both_caches_and_says_which_is_default(int4, tiny_one):
    manifest = json.loads((int4 / "manifest.json").read_text())
    assert manifest["kv_cache"]["default"] == "int8" and manifest["export_options"]["kv_cache"] == "int8"
    for key in ("decoder", "decoder_int8kv"):
        assert (int4 / manifest["graphs"][key]["file"]).is_file()
    layers = Qwen3VLConfig.from_manifest(manifest["config"]).text.num_hidden_layers
    kinds = [manifest["graphs"]["decoder_int8kv"]["inputs"][f"past_key.{i}"]["dtype"] for i in range(layers)]
    assert kinds == ["float32"] * FLOAT_LAYERS + ["int8"] * (layers - FLOAT_LAYERS)
    assert manifest["kv_cache"]["float_layers"] == FLOAT_LAYERS
    check = manifest["kv_cache"]["agreement"]  # why int8 is the default: it met the bar
    assert AGREEMENT_BAR <= check["mean_cosine"] < 1 and check["min_cosine"] <= check["mean_cosine"]
    assert check["conversations"] == 5 and check["bar"] == AGREEMENT_BAR  # four conversations and a video
    assert manifest["graphs"]["decoder"]["inputs"]["past_key.0"]["dtype"] == "float32"
    assert not list(int4.glob("*.int8kv.onnx.data"))  # the twin references the same weights
    fp32 = tiny_one.bundle  # float weights: a float cache only
    assert Pipeline.from_bundle(fp32).model.kv_cache == "fp32"
    with pytest.raises(UserError, match=r"no int8 KV cache graphs .* export it with --kv-cache int8"):
        Pipeline.from_bundle(fp32, kv_cache="int8")


class _Squeezed(Calibrator):
    """Ranges a twentieth of what calibration saw: the int8 cache saturates and misses the bar."""

    def ranges(self, bundle):
        return super().ranges(bundle) / 20


def test_an_int8_cache_that_misses_the_bar_is_not_the_default(tiny_models, tmp_path, capfd):
    """Left to "auto", the export keeps the float cache as the default when the int8 cache's logits
    miss the bar on the calibration conversations (the int8 graph stays, for --kv-cache int8);
    asked for int8, int8 stays the default and the export says how far off it is."""
    ckpt = tiny_models("tied_gqa2").checkpoint
    capfd.readouterr()
    auto = export(ckpt, tmp_path / "auto", ExportOptions("int4"), calibrator=_Squeezed())
    kv = json.loads((auto / "manifest.json").read_text())["kv_cache"]
    assert kv["agreement"]["mean_cosine"] < AGREEMENT_BAR and kv["default"] == "fp32"
    assert "below the bar, so the bundle runs its float cache by default" in capfd.readouterr().err
    assert Pipeline.from_bundle(auto).model.kv_cache == "fp32"
    assert Pipeline.from_bundle(auto, kv_cache="int8").model.kv_cache == "int8"
    asked = export(ckpt, tmp_path / "asked", ExportOptions("int4", kv_cache="int8"), calibrator=_Squeezed())
    kv = json.loads((asked / "manifest.json").read_text())["kv_cache"]
    assert kv["agreement"]["mean_cosine"] < AGREEMENT_BAR and kv["default"] == "int8"
    assert "below the bar, but the default as --kv-cache int8 asks" in capfd.readouterr().err


class _Scripted(Calibrator):
    """Measured ranges; an agreement scripted by how many first layers the int8 graph keeps float."""

    def __init__(self, by_floats: dict[int, float]):
        super().__init__()
        self.by_floats, self.asked = by_floats, []

    def agreement(self, bundle, graph_file):
        inputs = onnx.load(str(bundle / graph_file), load_external_data=False).graph.input
        floats = sum(v.name.startswith("past_key.") and v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in inputs)
        self.asked.append(floats)
        return [self.by_floats[floats]] * 3


def test_export_keeps_as_few_float_layers_as_meet_the_bar(tmp_path, tokenizer_files):
    """One float layer first, then one more at a time up to an eighth of the layers (2 of 16): the
    fewest that meet the bar are kept, and the runtime's cache follows the graph; where none does,
    the most accurate graph tried stays and the float cache is the default."""
    geometry = dict(tie=True, heads=4, kv=2, layers=16, depth=1, deepstack=[0])
    ckpt = build_checkpoint(tmp_path / "ckpt", geometry, tokenizer_files)
    cal = _Scripted({1: 0.998, 2: 0.9995})
    met = export(ckpt, tmp_path / "met", ExportOptions("int4"), calibrator=cal)
    kv = json.loads((met / "manifest.json").read_text())["kv_cache"]
    assert cal.asked == [1, 2] and kv["float_layers"] == 2 and kv["default"] == "int8"
    assert kv["agreement"]["float_layers_tried"] == {"1": 0.998, "2": 0.9995} and kv["agreement"]["mean_cosine"] == 0.9995
    cache = Pipeline.from_bundle(met).model.new_cache(1, 32)
    assert [k.dtype for k in cache.keys] == [np.float32] * 2 + [np.int8] * 14
    cal = _Scripted({1: 0.99, 2: 0.995})
    missed = export(ckpt, tmp_path / "missed", ExportOptions("int4"), calibrator=cal)
    kv = json.loads((missed / "manifest.json").read_text())["kv_cache"]
    assert cal.asked == [1, 2] and kv["float_layers"] == 2 and kv["default"] == "fp32"
    cal = _Scripted({1: 0.9999})
    first = export(ckpt, tmp_path / "first", ExportOptions("int4"), calibrator=cal)
    assert cal.asked == [1] and json.loads((first / "manifest.json").read_text())["kv_cache"]["float_layers"] == 1


def test_cli_chooses_the_cache_at_run_time(int4, run_cli):
    answers = {}
    for kv in ("fp32", "int8"):
        r = run_cli("generate", str(int4), "--prompt", "Hello", "--max-new-tokens", "6", "--temperature", "0", "--json",
                    "--kv-cache", kv)  # fmt: skip
        assert r.returncode == 0, r.stderr
        answers[kv] = json.loads(r.stdout)["token_ids"]
    assert len(answers["int8"]) == len(answers["fp32"]) == 6


def test_conversation_and_server_slots_on_an_int8_cache(int4):
    """A second turn continues the int8 cache as a fresh prefill of the whole conversation would;
    the engine's slots, prompt cache and memory check count int8 bytes."""
    from qwen3vl_onnx.server.engine import Engine, Finished, Job, Token
    from qwen3vl_onnx.server.settings import ServerSettings

    pipe = Pipeline.from_bundle(int4)
    params = GenerationParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    conv = pipe.chat()
    first = conv.send([{"type": "image", "image": picture(64, 48)}, {"type": "text", "text": "What is it?"}], params).finish()
    second = conv.send("And its colour?", params).finish()
    whole = [{"role": "user", "content": [{"type": "image", "image": picture(64, 48)}, {"type": "text", "text": "What is it?"}]},
             {"role": "assistant", "content": first.text}, {"role": "user", "content": "And its colour?"}]  # fmt: skip
    again = pipe.generate(whole, max_new_tokens=6, temperature=0, ignore_eos=True)
    assert second.token_ids == again.token_ids

    engine = Engine(pipe, ServerSettings(model_name="tiny", parallel=2, ctx_size=256))
    states = engine.slot_states()
    assert [s["kv_cache"] for s in states] == ["int8", "int8"]
    assert states[0]["kv_cache_bytes"] == pipe.model.cache_bytes(2, 257) // 2 == engine.cache.nbytes // 2
    texts, done = [], threading.Event()

    def sink(ev):
        if isinstance(ev, Token):
            texts.append(str(ev.delta))
        elif isinstance(ev, Finished):
            done.set()

    for _ in range(2):  # the second request reuses the first's cached prompt
        texts.clear(), done.clear()
        engine.submit(Job(whole[:1], pipe.params(params), sink))
        assert done.wait(60)
        assert "".join(texts) == first.text
