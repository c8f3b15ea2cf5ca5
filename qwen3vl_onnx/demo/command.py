"""``qwen3vl-onnx demo``: the packaged shapes model (or random weights) exported once and asked about pictures."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..runtime.generate import stats_line


def demo_stamp(random_weights: bool) -> str:
    """Digest of what the cached demo bundle was made from: the weights' source and the exporter.

    Why: the cache outlives upgrades; a bundle from an older checkpoint or exporter would otherwise
    be reused silently (or refused for its format) after ``pip install -U``.
    """
    import hashlib

    from .. import demo, export
    from ..config import BUNDLE_FORMAT_VERSION
    from ..shapes.model import packaged_checkpoint

    h = hashlib.sha256(f"{BUNDLE_FORMAT_VERSION}".encode())
    sources = sorted(Path(export.__file__).parent.glob("*.py"))
    weights = Path(demo.__file__).with_name("checkpoint.py") if random_weights else packaged_checkpoint() / "model.safetensors"
    sources.append(weights)
    for f in sources:
        h.update(f.read_bytes())
    return h.hexdigest()


def demo_bundle(work: Path, random_weights: bool, rebuild: bool) -> Path:
    """Checkpoint (trained shapes model, or random weights) unpacked and exported under ``work``,
    made again when the package's checkpoint or exporter changed (``demo_stamp``)."""
    import shutil
    import time

    from ..calibration import Calibrator
    from ..export.bundle import export
    from ..shapes.model import unpack
    from .checkpoint import write_checkpoint

    work = work / ("random" if random_weights else "shapes")
    ckpt, bundle, stamp_file = work / "checkpoint", work / "bundle", work / "stamp"
    stamp = demo_stamp(random_weights)
    if rebuild or (work.exists() and (not stamp_file.is_file() or stamp_file.read_text() != stamp)):
        shutil.rmtree(work, ignore_errors=True)
    if not (ckpt / "model.safetensors").is_file():
        print(f"writing the {'random-weight' if random_weights else 'trained shapes'} checkpoint to {ckpt}", file=sys.stderr)
        write_checkpoint(ckpt) if random_weights else unpack(ckpt)
    if not (bundle / "manifest.json").is_file():
        t0 = time.perf_counter()
        export(ckpt, bundle, force=True, calibrator=Calibrator())
        print(f"exported {bundle} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    stamp_file.write_text(stamp)
    return bundle


def run_demo(args: argparse.Namespace) -> int:
    from ..runtime.pipeline import Pipeline
    from ..shapes.model import packaged_checkpoint

    work = Path(args.workdir).expanduser()
    if not args.random and not (packaged_checkpoint() / "model.safetensors").is_file():
        print("the trained shapes checkpoint is not in this installation; using random weights", file=sys.stderr)
        args.random = True
    pipe = Pipeline.from_bundle(demo_bundle(work, args.random, args.rebuild))
    if not args.random:
        return _ask_shapes(pipe, work, args)
    from .checkpoint import sample_image_path

    image = sample_image_path()
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": args.prompt}]}]
    print(f"user: [image {image.name}] {args.prompt}")
    print("assistant (random weights, so the words mean nothing): ", end="", flush=True)
    stream = pipe.generate(messages, max_new_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True, stream=True)
    for piece in stream:
        print(piece, end="", flush=True)
    res = stream.result
    assert res is not None
    print("\n" + stats_line(res))
    _where(work, args.random)
    return 0


def _ask_shapes(pipe, work: Path, args: argparse.Namespace) -> int:
    import random

    from ..shapes import task

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    pictures = _fresh_pictures_dir(work)
    right = 0
    for q in range(args.questions):
        item = task.make_item(seed + q, task.KINDS[q % len(task.KINDS)])
        paths = []
        for k, im in enumerate(item.images):
            paths.append(pictures / f"picture-{q}-{k}.png")
            im.save(paths[-1])
        res = pipe.generate(task.messages(item), max_new_tokens=4, temperature=0.0)
        ok = res.text.strip().lower() == item.answer
        right += ok
        print(f"[{', '.join(p.name for p in paths)}] {item.question}")
        print(f"  model: {res.text.strip()!r:12} expected: {item.answer!r:12} {'ok' if ok else 'WRONG'}")
    print(f"{right}/{args.questions} correct (seed {seed}; this run's pictures in {pictures})")
    _where(work, False)
    return 0


def _fresh_pictures_dir(work: Path) -> Path:
    """An empty folder for this run's pictures: only the last run's are kept (runs used to add up)."""
    pictures = work / "pictures"
    shutil.rmtree(pictures, ignore_errors=True)
    for old in work.glob("picture-*.png"):  # where earlier versions left them
        old.unlink(missing_ok=True)
    pictures.mkdir(parents=True)
    return pictures


def _where(work: Path, random_weights: bool) -> None:
    """Tell the user where the demo's checkpoint and bundle are, to reuse with the other commands."""
    d = work / ("random" if random_weights else "shapes")
    print(f"checkpoint: {d / 'checkpoint'}")
    print(f"bundle:     {d / 'bundle'}  (qwen3vl-onnx generate {d / 'bundle'} --image PICTURE --prompt QUESTION)")
