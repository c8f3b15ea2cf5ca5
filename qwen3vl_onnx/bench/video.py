"""Video figures (``bench --video``): a 10-second 640x360 clip at the checkpoint's default video
budget (2 fps: 20 frames) read from its file, and the peak memory of a 60-second one, each in a
fresh child process; with ``--compare``, first token for the same 20 frames against OpenVINO
GenAI's ``VLMPipeline``, the two taken in turns (bench/turns.py).

The clips are synthetic (coloured shapes moving over a noisy background, H.264 at 25 fps), written
once into the work directory.

    python -m qwen3vl_onnx.bench.video BUNDLE CLIP REPEATS          (timing child)
    python -m qwen3vl_onnx.bench.video --memory BUNDLE CLIP         (memory child: one first token)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from .procstats import failure_reason, peak_rss_gb, stats
from .run import dir_size, timed

CLIP_WIDTH, CLIP_HEIGHT, CLIP_FPS = 640, 360, 25
QUESTION = "What happens in this video?"


def write_clip(path: Path, seconds: int) -> Path:
    """A ``seconds``-long H.264 clip, written once (kept beside the bench's checkpoints)."""
    import av

    if path.is_file():
        return path
    rng = np.random.default_rng(seconds)
    background = rng.integers(0, 80, (CLIP_HEIGHT, CLIP_WIDTH, 3), dtype=np.uint8)
    tmp = path.with_name(path.name + ".partial.mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(CLIP_FPS))
        stream.width, stream.height, stream.pix_fmt = CLIP_WIDTH, CLIP_HEIGHT, "yuv420p"
        for i in range(seconds * CLIP_FPS):
            frame = background.copy()
            for k, colour in enumerate(((230, 40, 40), (40, 200, 60), (50, 80, 240))):
                x = int((i * (3 + k) + 150 * k) % (CLIP_WIDTH - 60))
                y = int(60 + 80 * k + 30 * np.sin(i / (10 + 5 * k)))
                frame[y : y + 50, x : x + 60] = colour
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    tmp.rename(path)
    return path


def video_question(video: object, fps: float | None = None, text: str = QUESTION) -> list[dict]:
    part: dict = {"type": "video", "video": video}
    if fps is not None:
        part["fps"] = fps
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


def sampled_frames(bundle: Path, clip: Path) -> tuple[np.ndarray, float]:
    """The frames our preprocessing samples from ``clip`` at full size, and the sampling rate: what
    both systems get in the comparison."""
    from ..runtime.video import VideoProcessorConfig, sample_indices
    from ..runtime.video_decode import probe, read_frames

    cfg = VideoProcessorConfig.from_file(bundle / "video_preprocessor_config.json") or VideoProcessorConfig()
    info = probe(clip)
    idx = sample_indices(info.total_frames, info.fps, cfg.fps, cfg.min_frames, cfg.max_frames).tolist()
    frames = np.empty((len(idx), info.height, info.width, 3), np.uint8)
    read_frames(clip, idx, info.fps, lambda k, rgb: frames.__setitem__(k, rgb))
    return frames, cfg.fps


def measure_video(bundle: Path, clip: Path, repeats: int) -> dict:
    """Decode + preprocess, vision encode and first token for a question about ``clip`` (a file)."""
    from ..runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle)
    q = video_question(str(clip))
    res: dict = {"clip": clip.name, "preprocess_s": stats(timed(lambda: pipe.prepare(q), repeats))}
    p = pipe.prepare(q)
    res.update(frames_sampled=p.grids[0][0] * 2, grid=list(p.grids[0]), prompt_tokens=len(p.ids),
               visual_tokens=int(np.prod(p.grids[0])) // 4)  # fmt: skip
    res["vision_s"] = stats(timed(lambda: pipe.model.encode_images(p.pixel_values, p.grids), repeats))
    res["ttft_s"] = stats(timed(lambda: pipe.generate(q, max_new_tokens=1, temperature=0), repeats))
    res["peak_rss_gb"] = peak_rss_gb()
    return res


def measure_memory(bundle: Path, clip: Path) -> dict:
    """One first token for ``clip`` in a fresh process: peak RSS against the bundle's size, with the
    KV cache the prompt needs (keys and values at the bundle's cache precision) and the clip's float pixels."""
    from ..runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle)
    t0 = time.perf_counter()
    res = pipe.generate(video_question(str(clip)), max_new_tokens=1, temperature=0)
    kv = res.prompt_tokens * pipe.model.cache_position_bytes
    return {"clip": clip.name, "ttft_s": time.perf_counter() - t0, "prompt_tokens": res.prompt_tokens,
            "bundle_gb": dir_size(bundle) / 2**30, "kv_cache_gb": kv / 2**30, "peak_rss_gb": peak_rss_gb()}  # fmt: skip


def _child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "qwen3vl_onnx.bench.video", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"video bench child failed: {failure_reason(r.stderr)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_video(bundle: Path, work: Path, repeats: int) -> dict:
    """The 10-second figures and the 60-second memory figure, each from its own child process."""
    clips = work / "clips"
    short, long = write_clip(clips / "clip-10s.mp4", 10), write_clip(clips / "clip-60s.mp4", 60)
    print("measuring the 10 s clip", file=sys.stderr)
    res = {"video_10s": _child([str(bundle), str(short), str(repeats)])}
    print("measuring peak memory with the 60 s clip", file=sys.stderr)
    res["video_60s_memory"] = _child(["--memory", str(bundle), str(long)])
    return res


def frames_file(bundle: Path, work: Path) -> Path:
    """The 10-second clip's sampled frames as .npy (uint8, T x H x W x 3) plus their fps, for the workers."""
    clip = write_clip(work / "clips" / "clip-10s.mp4", 10)
    frames, fps = sampled_frames(bundle, clip)
    path = work / "clips" / "clip-10s-frames.npy"
    np.save(path, frames)
    path.with_suffix(".json").write_text(json.dumps({"fps": fps}))
    return path


def video_markdown(result: dict) -> str:
    """The video figures as a short markdown report, machine named first."""
    m = result["machine"]
    v, mem = result["video"]["video_10s"], result["video"]["video_60s_memory"]
    lines = [f"Video, {result['shape']} {result['precision']} on {m['cpu']} ({m['cores']} cores; {' '.join(m['cpu_flags'])}), "
             f"onnxruntime {m['onnxruntime']}", "",
             f"10 s 640x360 clip, {v['frames_sampled']} frames -> grid {v['grid']}, {v['prompt_tokens']} prompt tokens "
             f"({v['visual_tokens']} visual):", "",
             "| figure | median (min-max) s |", "|---|---|"]  # fmt: skip
    labels = {"preprocess_s": "decode + preprocess", "vision_s": "vision encode", "ttft_s": "first token (from the file)"}
    for key, label in labels.items():
        s = v[key]
        lines.append(f"| {label} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) |")
    extra = mem["peak_rss_gb"] - mem["bundle_gb"]
    lines += ["", f"60 s clip: {mem['prompt_tokens']} prompt tokens, first token {mem['ttft_s']:.1f} s, peak RSS "
              f"{mem['peak_rss_gb']:.2f} GiB = bundle {mem['bundle_gb']:.2f} GiB + {extra:.2f} GiB "
              f"(of which the KV cache {mem['kv_cache_gb']:.2f} GiB)"]  # fmt: skip
    for name, t in result.get("video_turns", {}).items():
        if "skipped" in t:
            lines += ["", f"{name}: skipped ({t['skipped']})"]
            continue
        a, b, r = t["ttft_video_s"]["ours"], t["ttft_video_s"]["peer"], t["ttft_video_s"]["pair_ratios"]
        tok = t["video_input_tokens"]
        lines += ["", f"Same {v['frames_sampled']} frames, first token in turns with {name}: ours {a['median']:.2f} s "
                  f"({tok['ours']:.0f} prompt tokens), theirs {b['median']:.2f} s ({tok['peer']:.0f} prompt tokens), "
                  f"pair ratio {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1] == "--memory":
        print(json.dumps(measure_memory(Path(sys.argv[2]), Path(sys.argv[3]))))
    else:
        print(json.dumps(measure_video(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))))
