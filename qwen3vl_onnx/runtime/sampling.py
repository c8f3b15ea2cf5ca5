"""Next-token choice from logits: greedy at temperature 0, else temperature / top-k / top-p sampling."""

from __future__ import annotations

import math
from collections.abc import Callable

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


Sampler = Callable[[np.ndarray], np.ndarray]


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 rng: np.random.Generator | None = None) -> Sampler:  # fmt: skip
    """A function from logits (B, V) to one token id per row (B,), built once per request.

    Temperature 0 is greedy. Otherwise logits are scaled, cut to the ``top_k`` likeliest (0: all),
    then to the smallest set whose mass reaches ``top_p``, and each row draws from what is left.
    """
    check_sampling(1, temperature, top_p, top_k)
    if temperature <= 0:
        return lambda logits: np.argmax(logits, axis=-1)
    rng = rng if rng is not None else np.random.default_rng()

    def sample(logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, np.float64) / temperature
        if 0 < top_k < z.shape[-1]:
            kth = np.partition(z, -top_k, axis=-1)[:, -top_k, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        if top_p < 1.0:
            order = np.argsort(-p, axis=-1)
            sorted_p = np.take_along_axis(p, order, axis=-1)
            cum = np.cumsum(sorted_p, axis=-1)
            keep_sorted = cum - sorted_p < top_p  # a token stays while the mass before it is short of top_p
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, axis=-1)
            p = np.where(keep, p, 0.0)
            p /= p.sum(axis=-1, keepdims=True)
        cdf = np.cumsum(p, axis=-1)
        u = rng.random((p.shape[0], 1)) * cdf[:, -1:]
        return np.minimum((cdf <= u).sum(axis=-1), p.shape[-1] - 1)

    return sample
