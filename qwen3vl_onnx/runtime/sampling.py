"""Next-token choice from logits: greedy at temperature 0, else temperature / top-k / top-p sampling."""

from __future__ import annotations

import math

import numpy as np

from ..errors import UserError


def check_sampling(max_new_tokens: int, temperature: float | None = None, top_p: float | None = None,
                   top_k: int | None = None, seed: int | None = None) -> None:  # fmt: skip
    """Refuse, in one line naming the value, what no sampler can take (None: the generation config decides)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if temperature is not None and not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise UserError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise UserError(f"top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise UserError(f"seed must be an integer >= 0, got {seed!r}")


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> int:
    """Pick a token id from one row of logits (vocab,)."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]  # smallest set with mass >= top_p
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(len(probs), p=probs))
