"""Side-by-side check of a bundle against transformers (needs the optional ``torch`` extra).

Both sides see the same token ids and pixel values (from this package's processor). Reported:
max |logit difference| over the prefill, over a few greedy decode steps (the bundle is fed the
tokens transformers chose, so one early disagreement cannot hide later ones), at how many steps
both would choose the same greedy token, and the logit cosine per position. This is what a user runs to trust an export.

Float bundles must match within an absolute tolerance and agree on every greedy token. Quantized
bundles cannot (int4 moves logits by ~10% of their spread, and a near-tie may flip a greedy
token), so they pass on the mean logit cosine over every compared position instead: >= 0.999 for
int8, >= 0.99 for int4, what the trained shapes model keeps on every held-out prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .runtime.pipeline import Pipeline

DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
MIN_MEAN_COSINE = {"int8": 0.999, "int4": 0.99}


@dataclass
class Report:
    prefill_max_abs: float
    decode_max_abs: float
    tokens_agree: int
    tokens_total: int
    tolerance: float
    cosines: list[float]  # per compared position: every prefill row, then each decode step
    min_mean_cosine: float | None = None  # quantized bundles pass on this instead of the tolerance

    @property
    def mean_cosine(self) -> float:
        return float(np.mean(self.cosines))

    @property
    def ok(self) -> bool:
        if self.min_mean_cosine is not None:
            return self.mean_cosine >= self.min_mean_cosine
        return max(self.prefill_max_abs, self.decode_max_abs) <= self.tolerance and self.tokens_agree == self.tokens_total


def _cosines(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Row-wise cosine of two (positions, vocab) logit arrays, in float64."""
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    return list(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("verify needs torch and transformers: pip install -e '.[torch]' in the project's clone") from None


def load_reference(checkpoint: Path):
    """transformers' model of the checkpoint's architecture (dense or MoE), in fp32."""
    _require_torch()
    import torch
    import transformers

    from .config import Qwen3VLConfig

    model_class = getattr(transformers, Qwen3VLConfig.from_file(checkpoint / "config.json").architecture)
    torch.set_grad_enabled(False)
    model = model_class.from_pretrained(str(checkpoint), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def verify(checkpoint: str | Path, bundle: str | Path, images: list[str], prompt: str, steps: int = 8,
           tolerance: float | None = None, min_mean_cosine: float | None = None) -> Report:  # fmt: skip
    _require_torch()
    import torch

    from .export.bundle import open_checkpoint

    pipe = Pipeline.from_bundle(bundle)
    with open_checkpoint(checkpoint) as src:
        ref = load_reference(src)
    content = [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": prompt}]
    p = pipe.prepare([{"role": "user", "content": content}])
    ids = torch.tensor([p.ids])
    cfg = pipe.config
    kwargs = {"mm_token_type_ids": (ids == cfg.image_token_id).long()}
    if p.pixel_values is not None:
        kwargs.update(pixel_values=torch.from_numpy(p.pixel_values), image_grid_thw=torch.tensor(p.grids))
    ref_prefill = ref(input_ids=ids, **kwargs).logits[0].numpy()
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                       do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)  # fmt: skip
    ref_tokens = out.sequences[0, len(p.ids) :].tolist()
    ref_logits = [lg[0].numpy() for lg in out.logits]

    m = pipe.model
    emb, ds = m.encode_images(p.pixel_values, p.grids) if p.pixel_values is not None else (None, None)
    cache = m.new_cache(capacity=len(p.ids) + steps)
    logits = m.prefill(p.ids, emb, ds, p.grids, cache, logits_to_keep=len(p.ids))[0]
    prefill_diff = float(np.abs(logits - ref_prefill).max())
    cosines = _cosines(logits, ref_prefill)
    decode_diff, agree, last = 0.0, 0, logits[-1]
    for step, tok in enumerate(ref_tokens):
        decode_diff = max(decode_diff, float(np.abs(last - ref_logits[step]).max()))
        if step:  # step 0 compares the last prefill row again
            cosines += _cosines(last, ref_logits[step])
        # the reference's choice from its raw logits: generate's own token is forced past the end of
        # turn (min_new_tokens masks it) once a trained model would stop, which no bundle should copy
        agree += int(np.argmax(last)) == int(np.argmax(ref_logits[step]))
        last = m.step([tok], cache)[0]
    precision = m.manifest["precision"]
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(precision, 1e-3)
    if min_mean_cosine is None:
        min_mean_cosine = MIN_MEAN_COSINE.get(precision)
    return Report(prefill_diff, decode_diff, agree, len(ref_tokens), tol, cosines, min_mean_cosine)
