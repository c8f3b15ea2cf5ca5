"""Next-token choice: what a request may ask (``GenerationParams``), logits processors (penalties,
logit bias), samplers (greedy; temperature, top-k, top-p, min-p) and log-probabilities. Each piece
is a small pure function over numpy arrays, built once per request."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from .constrain import OutputSpec, output_spec


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
# (logits (V,), prompt ids, generated ids) -> logits to sample from
LogitsProcessor = Callable[[np.ndarray, Sequence[int], Sequence[int]], np.ndarray]


@dataclass(frozen=True)
class GenerationParams:
    """Everything a request can ask of generation. None for temperature/top_p/top_k: the bundle's
    ``generation_config.json`` decides (greedy when it does not sample)."""

    max_new_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the answer (divides positive logits)
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in what was generated
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()  # strings that end the answer (not included in it)
    stop_token_ids: tuple[int, ...] = ()  # token ids that end it, besides the end-of-turn ones
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n >= 0: the chosen token's log-probability and n alternatives
    # what the answer must be (OpenAI's fields; see runtime.constrain.output_spec): held by a grammar
    response_format: Mapping[str, Any] | None = None
    tools: Sequence[Mapping[str, Any]] | None = None
    tool_choice: str | Mapping[str, Any] | None = None
    parallel_tool_calls: bool = True

    def checked(self, vocab_size: int) -> GenerationParams:
        """These parameters, or a one-line ``UserError`` naming the first bad one."""
        check_sampling(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed)
        for name, lo, hi in (("min_p", 0.0, 1.0), ("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0)):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and lo <= v <= hi):
                raise UserError(f"{name} must be in [{lo:g}, {hi:g}], got {v!r}")
        rp = self.repetition_penalty
        if not (isinstance(rp, int | float) and 0 < rp <= 10):
            raise UserError(f"repetition_penalty must be in (0, 10], got {rp!r}")
        for tok, bias in self.logit_bias.items():
            if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab_size:
                raise UserError(f"logit_bias: {tok!r} is not a token id (0..{vocab_size - 1})")
            if not (isinstance(bias, int | float) and -100 <= bias <= 100):
                raise UserError(f"logit_bias: bias for {tok} must be in [-100, 100], got {bias!r}")
        if not all(isinstance(x, str) and x for x in self.stop):
            raise UserError("stop strings must be non-empty strings")
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in self.stop_token_ids):
            raise UserError(f"stop_token_ids must be token ids (0..{vocab_size - 1})")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):  # fmt: skip
            raise UserError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        self.output()
        return self

    def output(self) -> OutputSpec:
        """The answer's required form, checked (``response_format``, ``tools``, ``tool_choice``)."""
        return output_spec(self.response_format, self.tools, self.tool_choice, self.parallel_tool_calls)

    def with_defaults(self, generation_config: Mapping) -> GenerationParams:
        """Temperature, top-p and top-k filled from a ``generation_config.json``."""
        g = generation_config
        temperature = self.temperature
        if temperature is None:
            temperature = float(g.get("temperature", 1.0)) if g.get("do_sample") else 0.0
        top_p = float(g.get("top_p", 1.0)) if self.top_p is None else self.top_p
        top_k = int(g.get("top_k", 0)) if self.top_k is None else self.top_k
        return dataclasses.replace(self, temperature=temperature, top_p=top_p, top_k=top_k)


def make_logits_processor(repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                          logit_bias: Mapping[int, float] | None = None) -> LogitsProcessor | None:  # fmt: skip
    """Penalties and biases as one function, or None when there is nothing to do. The repetition
    penalty (as transformers applies it) counts prompt and answer tokens; presence and frequency
    penalties (as OpenAI defines them) count the answer's."""
    bias_ids = np.array(list((logit_bias or {}).keys()), np.int64)
    bias_values = np.array(list((logit_bias or {}).values()), np.float32)
    if repetition_penalty == 1.0 and presence_penalty == 0.0 and frequency_penalty == 0.0 and not len(bias_ids):
        return None

    def process(logits: np.ndarray, prompt: Sequence[int], generated: Sequence[int]) -> np.ndarray:
        z = np.array(logits, np.float32)
        if repetition_penalty != 1.0:
            seen = np.unique(np.asarray([*prompt, *generated], np.int64))
            z[seen] = np.where(z[seen] > 0, z[seen] / repetition_penalty, z[seen] * repetition_penalty)
        if (presence_penalty or frequency_penalty) and len(generated):
            ids, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)
            z[ids] -= presence_penalty + frequency_penalty * counts
        if len(bias_ids):
            z[bias_ids] += bias_values
        return z

    return process


def chain(first: LogitsProcessor, then: LogitsProcessor) -> LogitsProcessor:
    """Two processors as one: ``then`` sees what ``first`` made of the logits."""
    return lambda logits, prompt, generated: then(first(logits, prompt, generated), prompt, generated)


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the likeliest alternatives, likeliest first


def token_logprob(logits: np.ndarray, token: int, top_n: int) -> TokenLogprob:
    """log-softmax of the (processed) logits at ``token``, with the ``top_n`` likeliest tokens. Only
    the normaliser touches the whole vocabulary (a float64 log-softmax of all of it cost ~5 ms a token)."""
    z = np.asarray(logits)
    m = float(z.max())
    log_norm = m + math.log(float(np.exp(z - m).sum(dtype=np.float64)))
    top = _top(z, min(top_n, len(z))) if top_n > 0 else np.zeros(0, np.int64)
    # tokens a grammar ruled out (-inf) are no alternatives
    return TokenLogprob(int(token), float(z[token]) - log_norm,
                        [(int(t), float(z[t]) - log_norm) for t in top if np.isfinite(z[t])])  # fmt: skip


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 rng: np.random.Generator | None = None, min_p: float = 0.0) -> Sampler:  # fmt: skip
    """A function from logits (B, V) to one token id per row (B,), built once per request.

    Temperature 0 is greedy. Otherwise logits are scaled, cut to the ``top_k`` likeliest (0: all),
    to those at least ``min_p`` times as likely as the likeliest, then to the smallest set whose
    mass reaches ``top_p``, and each row draws from what is left.
    """
    check_sampling(1, temperature, top_p, top_k)
    if temperature <= 0:
        return lambda logits: np.argmax(logits, axis=-1)
    rng = rng if rng is not None else np.random.default_rng()

    scratch: list[np.ndarray] = []  # one vocabulary-sized buffer, reused token after token

    def sample(logits: np.ndarray) -> np.ndarray:
        rows = np.asarray(logits)
        if not scratch or len(scratch[0]) != rows.shape[-1]:
            scratch[:] = [np.empty(rows.shape[-1])]
        return np.array([_sample_row(row, temperature, top_p, top_k, min_p, rng, scratch[0]) for row in rows], np.int64)

    return sample


def _top(v: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` largest entries of ``v``, largest first, without sorting or partitioning
    all of ``v`` (a partition of 151k logits costs ~1.4 ms, a token's whole budget on a small model).
    Why it is exact: of 4m block maxima, the m-th largest is at most the m-th largest entry, so every
    one of the m largest entries is at least it."""
    n = len(v)
    if m * 4 >= n:
        return np.argsort(-v, kind="stable")[:m]
    maxima = np.maximum.reduceat(v, np.arange(0, n, -(-n // (4 * m))))
    threshold = np.partition(maxima, len(maxima) - m)[len(maxima) - m]
    cand = np.flatnonzero(v >= threshold)
    return cand[np.argsort(-v[cand], kind="stable")][:m]


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of likeliest entries of ``p`` (summing to 1) whose mass reaches
    ``top_p``, likeliest first. The nucleus is a prefix of the descending order, so once the likeliest
    m hold the mass it lies among them: m grows until they do, and nothing else is sorted."""
    m = min(64, len(p))
    while True:
        top = _top(p, m)
        cum = np.cumsum(p[top])
        if cum[-1] >= top_p or m == len(p):
            return top[cum - p[top] < top_p]  # a token stays while the mass before it is short of top_p
        m = min(m * 8, len(p))


def _sample_row(logits: np.ndarray, temperature: float, top_p: float, top_k: int, min_p: float, rng: np.random.Generator,
                buf: np.ndarray) -> int:  # fmt: skip
    """One draw. Why the care with memory: vocabulary-sized temporaries (1.2 MB each at 151k) were
    fresh pages on every token, and first-touch page faults made them cost ~0.6 ms each here."""
    cand: np.ndarray | None = None
    if 0 < top_k < len(logits):
        cand = np.flatnonzero(logits >= logits[_top(logits, top_k)[-1]])  # ties with the k-th stay, as in transformers
        z = np.asarray(logits[cand], np.float64) / temperature
        p = np.exp(z - z.max())
    else:
        p = buf
        np.copyto(p, logits)
        p -= p.max()
        p /= temperature
        np.exp(p, out=p)
    if min_p > 0:
        p[p < min_p] = 0.0  # p is relative to the likeliest (which is 1) here
    p /= p.sum()
    if top_p < 1.0:
        keep = _nucleus(p, top_p)
        cand, p = (keep if cand is None else cand[keep]), p[keep] / p[keep].sum()
    cdf = np.cumsum(p, out=p)  # p is a temporary or the scratch buffer
    i = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)
    return int(cand[i]) if cand is not None else i
