"""Video input against transformers (Qwen3VLVideoProcessor + Qwen3VLProcessor + the fp32 model):
frame choice, timestamps, grids, prompt tokens, pixels, vision features, logits and greedy tokens.

Pixel tolerance: transformers resizes frames with torchvision's uint8 bicubic, this project with
Pillow's in the same pass order; they differ by rounding only. Measured on these clips: identical
for two, at most 2 levels of 255 on 0.03-0.27% of values for the others (the test allows 2 levels
on < 1%). The model-level checks feed both sides the same pixels, at the parity tests' 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen3vl_onnx import Pipeline
from qwen3vl_onnx.errors import UserError
from qwen3vl_onnx.runtime.prompt import Prompt
from qwen3vl_onnx.runtime.video import VideoProcessorConfig, VideoRequest, preprocess_video

from .conftest import TEST_VIDEO_PREPROCESSOR, make_video, picture, transformers_prompt_ids

TOL = 1e-4
PIXEL_TOL = 2 * 2 / 255  # two levels of 255, normalised by std 0.5
CFG = VideoProcessorConfig.from_dict(TEST_VIDEO_PREPROCESSOR)

# (frames, fps, width, height, codec): lengths, rates, sizes and aspect ratios; 7 frames sampled
# at 2 fps from 3.5 s gives an odd count (the last frame repeated); libx264 is lossy with B-frames.
CLIPS = [
    (30, 10, 160, 96, "libx264"),
    (47, 24, 100, 180, "mpeg4"),
    (7, 2, 64, 64, "libx264"),
    (250, 25, 320, 180, "libx264"),
    (12, 7.5, 48, 200, "ffv1"),
]


@pytest.fixture(scope="module")
def processor(tiny_one):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_one.checkpoint))


def _reference(processor, path, fps=None, text="What happens?"):
    """transformers' own path: its PyAV reader, its sampling, its processor on the rendered template."""
    from transformers.video_utils import load_video

    def sample(metadata, **_):
        return processor.video_processor.sample_frames(metadata, fps=fps)

    video, meta = load_video(str(path), backend="pyav", sample_indices_fn=sample)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = processor(text=[prompt], videos=[video], video_metadata=[meta], do_sample_frames=False, cap_pixels_per_frame=True,
                    return_tensors="np")  # fmt: skip
    return out, list(meta.frames_indices), messages


def _messages(source, text="What happens?", **options):
    return [{"role": "user", "content": [{"type": "video", "video": source, **options}, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("clip", CLIPS, ids=str)
def test_preprocessing_and_prompt_match_transformers(clip, tiny_one, processor, tmp_path):
    n, fps, w, h, codec = clip
    path = make_video(tmp_path / f"clip.{'avi' if codec == 'ffv1' else 'mp4'}", n, fps, w, h, codec)
    ref, ref_indices, _ = _reference(processor, path)
    video = preprocess_video(VideoRequest(path), CFG)
    assert video.indices == ref_indices
    assert [video.grid] == [tuple(int(x) for x in g) for g in ref["video_grid_thw"]]
    assert video.pixel_values.shape == ref["pixel_values_videos"].shape
    diff = np.abs(video.pixel_values - ref["pixel_values_videos"])
    assert diff.max() <= PIXEL_TOL + 1e-6 and (diff > 1e-5).mean() < 0.01, (diff.max(), (diff > 1e-5).mean())
    prompt = Pipeline.from_bundle(tiny_one.bundle).prepare(_messages(path))
    assert prompt.ids == ref["input_ids"][0].tolist()  # timestamps, markers and pad counts, token for token
    assert prompt.videos == [True] and prompt.grids == [video.grid]


def test_several_videos_images_and_turns_render_as_transformers(tiny_one, processor, tmp_path):
    """Two videos (one at its own fps), images between them and a conversation whose later turn
    reuses the earlier ones: the prompt is transformers' token for token (no template markers left
    around a video, one ``<|vision_start|>``/``<|vision_end|>`` pair per frame block)."""
    v1 = make_video(tmp_path / "a.mp4", 20, 8, 96, 64)
    v2 = make_video(tmp_path / "b.mp4", 30, 10, 64, 96, seed=3)
    a, b = picture(64, 48, seed=1), picture(48, 80, seed=2)
    pipe = Pipeline.from_bundle(tiny_one.bundle)
    cfg = pipe.config
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "video", "video": str(v1)}, {"type": "image", "image": a},
                                     {"type": "text", "text": "What moves?"}]},
        {"role": "assistant", "content": "The blocks."},
        {"role": "user", "content": [{"type": "image", "image": b}, {"type": "video", "video": str(v2), "fps": 1},
                                     {"type": "text", "text": "And here?"}]},
    ]  # fmt: skip
    ours = pipe.prepare(messages)
    ref = transformers_prompt_ids(processor, messages, [(v1, None), (v2, 1)])
    assert ours.ids == ref
    assert ours.videos == [True, False, False, True]
    starts = sum(1 for i in ours.ids if i == cfg.vision_start_token_id)
    frame_blocks = sum(t for t, _, _ in ours.video_grids)
    assert starts == frame_blocks + len(ours.image_grids)  # images keep their pair; videos have one per frame block
    first = pipe.prepare(messages[:2])
    assert ours.ids[: len(first.ids) - 3] == first.ids[:-3]  # the first turn is a prefix of the second


def test_a_container_without_a_frame_count(tmp_path):
    """Matroska headers carry no frame count (transformers' reader then samples nothing): the frames
    are counted by demuxing, and sampling proceeds as for any file."""
    path = make_video(tmp_path / "clip.mkv", 21, 6, 64, 64)
    video = preprocess_video(VideoRequest(path), CFG)
    assert video.indices == np.linspace(0, 20, 7).round().astype(int).tolist()  # int(21 / 6 * 2) = 7 frames
    assert video.grid[0] == 4 and video.timestamps[0] == pytest.approx((0 + 3 / 6) / 2)


def test_a_frame_list_matches_transformers(processor):
    """Frames given as images are used as they are, timestamps from the ``fps`` they were taken at."""
    from transformers.video_utils import VideoMetadata

    frames = [picture(90, 60, seed=s) for s in range(5)]
    ref = processor.video_processor(videos=[np.stack([np.asarray(f) for f in frames])], do_sample_frames=False,
                                    video_metadata=[VideoMetadata(total_num_frames=5, fps=3.0, frames_indices=list(range(5)))],
                                    cap_pixels_per_frame=True, return_tensors="np")  # fmt: skip
    video = preprocess_video(VideoRequest(frames, fps=3.0), CFG)
    assert [list(video.grid)] == ref["video_grid_thw"].tolist()
    np.testing.assert_allclose(video.pixel_values, ref["pixel_values_videos"], atol=PIXEL_TOL + 1e-6, rtol=0)
    assert video.timestamps == processor._calculate_timestamps(list(range(5)), 3.0, 2)


def test_sparse_sampling_seeks_and_gets_the_same_frames(processor, tmp_path):
    """At 0.1 fps from a 60 s, 25 fps clip the reader seeks between samples (keyframe every 12);
    the frames must be the ones a full decode picks."""
    path = make_video(tmp_path / "long.mp4", 1500, 25, 96, 64, keyint=12)
    ref, ref_indices, _ = _reference(processor, path, fps=0.1)
    video = preprocess_video(VideoRequest(path, fps=0.1), CFG)
    assert video.indices == ref_indices and len(ref_indices) == 6
    np.testing.assert_allclose(video.pixel_values, ref["pixel_values_videos"], atol=PIXEL_TOL + 1e-6, rtol=0)


def test_video_logits_features_and_greedy_tokens_match_transformers(tiny_one, processor, tmp_path):
    path = make_video(tmp_path / "v.mp4", 20, 8, 128, 80)
    pipe = Pipeline.from_bundle(tiny_one.bundle)
    messages = _messages(path, "Describe the motion.")
    prompt = pipe.prepare(messages)
    emb, ds = pipe.model.encode_images(prompt.pixel_values, prompt.grids)
    ref_vis = tiny_one.model.model.visual(torch.from_numpy(prompt.pixel_values), grid_thw=torch.tensor(prompt.grids))
    np.testing.assert_allclose(emb, ref_vis.pooler_output.numpy(), atol=TOL, rtol=0)
    for k, feat in enumerate(ref_vis.deepstack_features):
        np.testing.assert_allclose(ds[k], feat.numpy(), atol=TOL, rtol=0)

    ids = torch.tensor([prompt.ids])
    kw = dict(pixel_values_videos=torch.from_numpy(prompt.pixel_values), video_grid_thw=torch.tensor(prompt.grids),
              mm_token_type_ids=(ids == pipe.config.video_token_id).long() * 2)  # fmt: skip
    ref_logits = tiny_one.model(input_ids=ids, **kw).logits[0].numpy()
    m = pipe.model
    ours = m.prefill(prompt.ids, emb, ds, [], m.new_cache(), logits_to_keep=len(prompt.ids), video_grids=prompt.grids)[0]
    assert np.abs(ref_logits).max() > 0.5
    np.testing.assert_allclose(ours, ref_logits, atol=TOL, rtol=0)

    ref_out, _, _ = _reference(processor, path, text="Describe the motion.")  # transformers end to end, its own pixels
    rids = torch.from_numpy(ref_out["input_ids"])
    out = tiny_one.model.generate(input_ids=rids, attention_mask=torch.ones_like(rids), max_new_tokens=16, min_new_tokens=16,
                                  do_sample=False, pixel_values_videos=torch.from_numpy(ref_out["pixel_values_videos"]),
                                  video_grid_thw=torch.from_numpy(ref_out["video_grid_thw"]),
                                  mm_token_type_ids=torch.from_numpy(ref_out["mm_token_type_ids"]))  # fmt: skip
    res = pipe.generate(messages, max_new_tokens=16, temperature=0, ignore_eos=True)
    assert res.token_ids == out[0, rids.shape[1] :].tolist()


def test_images_and_videos_mixed_equal_transformers(tiny_one, tmp_path):
    """Image, video, image in one prompt: positions and features land in prompt order."""
    path = make_video(tmp_path / "v.mp4", 9, 3, 64, 96)
    pipe = Pipeline.from_bundle(tiny_one.bundle)
    content = [{"type": "image", "image": picture(64, 48, seed=1)}, {"type": "video", "video": str(path)},
               {"type": "image", "image": picture(48, 80, seed=2)}, {"type": "text", "text": "Compare."}]  # fmt: skip
    prompt = pipe.prepare([{"role": "user", "content": content}])
    assert prompt.videos == [False, True, False]
    rows = np.cumsum([0] + [t * h * w for t, h, w in prompt.grids])
    img = np.concatenate([prompt.pixel_values[rows[0] : rows[1]], prompt.pixel_values[rows[2] : rows[3]]])
    ids = torch.tensor([prompt.ids])
    types = (ids == pipe.config.image_token_id).long() + (ids == pipe.config.video_token_id).long() * 2
    ref = tiny_one.model(input_ids=ids, pixel_values=torch.from_numpy(img), image_grid_thw=torch.tensor(prompt.image_grids),
                         pixel_values_videos=torch.from_numpy(prompt.pixel_values[rows[1] : rows[2]]),
                         video_grid_thw=torch.tensor(prompt.video_grids), mm_token_type_ids=types).logits[0].numpy()  # fmt: skip
    m = pipe.model
    emb, ds = m.encode_images(prompt.pixel_values, prompt.grids)
    ours = m.prefill(prompt.ids, emb, ds, prompt.image_grids, m.new_cache(), len(prompt.ids), prompt.video_grids)[0]
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_a_conversation_with_images_then_a_video_equals_transformers_and_reuses_its_cache(tiny_one, tmp_path):
    """Images in turns one and two, a video and the first image again in turn three: every turn's
    greedy answer equals a fresh call on the whole history; the third turn's logits from the kept
    prefix plus the new suffix equal transformers on the full history (1e-4); the repeated image
    is encoded once."""
    from qwen3vl_onnx.runtime.generate import images_before, prefill_input

    a, b = picture(64, 40, seed=1), picture(40, 96, seed=2)
    path = make_video(tmp_path / "v.mp4", 16, 8, 96, 64)
    pipe = Pipeline.from_bundle(tiny_one.bundle)
    conv = pipe.chat()
    turns = [[{"type": "image", "image": a}, {"type": "text", "text": "What is this?"}],
             [{"type": "image", "image": b}, {"type": "text", "text": "And this?"}],
             [{"type": "video", "video": str(path)}, {"type": "image", "image": a},
              {"type": "text", "text": "Same?"}]]  # fmt: skip
    greedy = dict(max_new_tokens=6, temperature=0, ignore_eos=True)
    for n, content in enumerate(turns):
        history = [*conv.messages, {"role": "user", "content": content}]
        if n == 2:
            kept = list(conv.cached_ids)
        res = conv.send(content, **greedy).finish()
        assert res.token_ids == pipe.generate(history, **greedy).token_ids, n
    assert conv.vision.misses == 3 and conv.vision.hits == 1  # a, b, the video; a again from the cache

    prompt = pipe.prepare(history)
    assert prompt.videos == [False, False, True, False] and res.cached_tokens >= len(kept) - 1
    ids = torch.tensor([prompt.ids])
    rows = np.cumsum([0] + [t * h * w for t, h, w in prompt.grids])
    pv = [prompt.pixel_values[rows[i] : rows[i + 1]] for i in range(4)]
    types = (ids == pipe.config.image_token_id).long() + (ids == pipe.config.video_token_id).long() * 2
    ref = tiny_one.model(input_ids=ids, pixel_values=torch.from_numpy(np.concatenate([pv[0], pv[1], pv[3]])),
                         image_grid_thw=torch.tensor(prompt.image_grids), pixel_values_videos=torch.from_numpy(pv[2]),
                         video_grid_thw=torch.tensor(prompt.video_grids), mm_token_type_ids=types).logits[0].numpy()  # fmt: skip
    m = pipe.model
    keep = res.cached_tokens
    cache = m.new_cache()
    assert images_before(pipe.config, prompt, keep) == 2  # the kept prefix holds the first two images
    pre = prefill_input(m, Prompt(prompt.ids[:keep], np.concatenate(pv[:2]), prompt.grids[:2], [False, False]))
    m.prefill(pre.ids, pre.image_embeds, pre.deepstack, pre.grids, cache)
    rest = prefill_input(m, prompt, keep)
    tail = m.prefill(rest.ids, rest.image_embeds, rest.deepstack, rest.image_grids, cache, len(rest.ids), rest.video_grids)[0]
    np.testing.assert_allclose(tail, ref[keep:], atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A good clip (2 s), an empty file, garbage bytes, a text file, pictures, and a 5 s MP4 with its
    index at the front cut in half (the header still says 5 s)."""
    d = tmp_path_factory.mktemp("clips")
    make_video(d / "ok.mp4", 12, 6, 64, 48)
    whole = make_video(d / "whole.mp4", 50, 10, 96, 64, faststart=True).read_bytes()
    (d / "half.mp4").write_bytes(whole[: len(whole) // 2])
    picture(40, 30).save(d / "pic.png")
    picture(40, 30).save(d / "pic.jpg")
    (d / "empty.mp4").write_bytes(b"")
    (d / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (d / "notes.txt").write_text("not a video at all\n" * 20)
    return d


@pytest.mark.parametrize("args, says", [
    (["--video", "{d}/missing.mp4"], "missing.mp4: video file not found"),
    (["--video", "{d}/empty.mp4"], "empty.mp4: video file is empty"),
    (["--video", "{d}/garbage.mp4"], "garbage.mp4: cannot read video"),
    (["--video", "{d}/notes.txt"], "notes.txt: cannot read video"),
    (["--video", "{d}/ok.mp4", "--video-start", "5"], "ok.mp4: no frames between 5.0s and 2s (the video lasts 2.00s)"),
    (["--video", "{d}/ok.mp4", "--video-start", "1.5", "--video-end", "1"], "video end (1.0) must come after its start (1.5)"),
    (["--video", "{d}/ok.mp4", "--video-max-frames", "769"], "argument --video-max-frames: must be <= 768"),
    (["--video", "{d}/ok.mp4", "--video-fps", "0"], "argument --video-fps: must be a positive number, got 0"),
    (["--video", "{d}/pic.png"], "pic.png: a picture (png), not a video: give it as an image"),
    (["--video", "{d}/pic.jpg"], "pic.jpg: a picture"),
    (["--video", "{d}/half.mp4"], "half.mp4: the video's frames stop at "),
])  # fmt: skip
def test_bad_videos_are_one_line_errors(run_cli, setup, clips, args, says):
    from .conftest import one_line_error

    one_line_error(run_cli("generate", setup / "bundle", "--prompt", "hi", *(a.format(d=clips) for a in args)), says)


def test_a_video_cut_short_reads_up_to_where_it_ends(clips):
    """The cut MP4's first half second is there: asked for it, it is read, each frame its own (not
    the last good one repeated, as the whole clip was before it was refused)."""
    with pytest.raises(UserError, match="of the 10 frames sampled over the length its header gives"):
        preprocess_video(VideoRequest(clips / "half.mp4"), CFG)
    video = preprocess_video(VideoRequest(clips / "half.mp4", end=0.5), CFG)
    whole = preprocess_video(VideoRequest(clips / "whole.mp4", end=0.5), CFG)
    assert video.indices == whole.indices and video.grid == whole.grid
    np.testing.assert_array_equal(video.pixel_values, whole.pixel_values)


def test_video_limits_and_a_bundle_without_a_video_processor(setup, clips, tmp_path):
    import shutil

    from qwen3vl_onnx.errors import UserError

    frames = [picture(64, 48, seed=i) for i in range(17)]
    with pytest.raises(UserError, match="video has 17 frames, the limit is 16"):
        preprocess_video(VideoRequest(frames), CFG)
    with pytest.raises(UserError, match="video max_pixels must be an integer at least 1024, got 100"):
        preprocess_video(VideoRequest(frames[:4], max_pixels=100), CFG)
    with pytest.raises(UserError, match="video frames differ in size"):
        preprocess_video(VideoRequest([picture(64, 48), picture(48, 64)]), CFG)
    small = preprocess_video(VideoRequest(clips / "ok.mp4", max_pixels=32 * 32), CFG)
    assert small.grid[1:] == (2, 2)  # max_pixels of one merged token per frame: 32x32 frames
    bundle = shutil.copytree(setup / "bundle", tmp_path / "bundle")
    (bundle / "video_preprocessor_config.json").unlink()
    with pytest.raises(UserError, match="no video_preprocessor_config.json: it does not take video"):
        Pipeline.from_bundle(bundle).prepare(_messages(str(clips / "ok.mp4")))
