"""The user-facing pipeline: chat messages with images in, text out (streamed or whole).

``Pipeline.from_bundle(dir).generate(messages)`` renders the checkpoint's chat template,
preprocesses the images, expands each image pad to its token count, and runs
:func:`~qwen3vl_onnx.runtime.generate.stream_generate` over the bundle.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from .chat import load_chat_template, render
from .generate import Result, Stream, prefill_input, stream_generate
from .model import BundleModel
from .preprocess import ImageProcessorConfig
from .prompt import Prompt, build_prompt, load_tokenizer
from .sampling import Sampler, check_sampling, make_sampler

if TYPE_CHECKING:
    from .conversation import Conversation


class Pipeline:
    """A bundle with its tokenizer, chat template, image processor and generation defaults."""

    def __init__(self, model: BundleModel, context_length: int | None = None):
        self.model = model
        self.config = model.config
        path = model.path
        self.tokenizer = load_tokenizer(path)
        self.chat_template = load_chat_template(path)
        self.image_config = ImageProcessorConfig.from_file(path / "preprocessor_config.json")
        gen = path / "generation_config.json"
        self.generation_config = json.loads(gen.read_text()) if gen.is_file() else {}
        eos = self.generation_config.get("eos_token_id", self.tokenizer.token_to_id("<|im_end|>"))
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.context_length = context_length or self.config.text.max_position_embeddings
        self.think_end = self._think_end()

    def _think_end(self) -> int | None:
        """The ``</think>`` id when the template's generation prompt opens ``<think>`` (a Thinking
        checkpoint: what it writes first is reasoning), else None. Read from the template, not the
        model's name, so a renamed or fine-tuned checkpoint is recognised as what it is."""
        opened = render(self.chat_template, [{"role": "user", "content": "x"}], True).rstrip().endswith("<think>")
        return self.tokenizer.token_to_id("</think>") if opened else None

    @property
    def thinking(self) -> bool:
        return self.think_end is not None

    @classmethod
    def from_bundle(cls, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
                    context_length: int | None = None, prefill_graph: bool = True) -> Pipeline:  # fmt: skip
        return cls(BundleModel(path, providers, threads, prefill_graph), context_length)

    def prepare(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> Prompt:
        """Token ids (image pads expanded) and preprocessed pixels for ``messages``."""
        return build_prompt(self.tokenizer, self.chat_template, self.image_config, self.config.image_token_id, messages,
                            add_generation_prompt)  # fmt: skip

    def sampler(self, temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                seed: int | None = None) -> Sampler:  # fmt: skip
        """A sampler for these settings; None takes the bundle's generation config (greedy when it
        does not sample)."""
        check_sampling(1, temperature, top_p, top_k, seed)
        g = self.generation_config
        if temperature is None:
            temperature = float(g.get("temperature", 1.0)) if g.get("do_sample") else 0.0
        top_p = float(g.get("top_p", 1.0)) if top_p is None else top_p
        top_k = int(g.get("top_k", 0)) if top_k is None else top_k
        return make_sampler(temperature, top_p, top_k, np.random.default_rng(seed))

    def stream(self, messages: list[dict[str, Any]], max_new_tokens: int = 256, temperature: float | None = None,
               top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
               ignore_eos: bool = False) -> Stream:  # fmt: skip
        """Answer ``messages`` as a :class:`Stream` of text deltas (its ``result`` set at the end)."""
        check_sampling(max_new_tokens, temperature, top_p, top_k, seed)
        t0 = time.perf_counter()
        sampler = self.sampler(temperature, top_p, top_k, seed)
        prompt = self.prepare(messages)
        max_new_tokens = self.room(len(prompt.ids), max_new_tokens)
        t1 = time.perf_counter()
        request = prefill_input(self.model, prompt)
        timings = {"preprocess_s": t1 - t0, "vision_s": time.perf_counter() - t1}
        cache = self.model.new_cache(capacity=len(prompt.ids) + max_new_tokens)
        eos = set() if ignore_eos else self.eos_ids
        events = stream_generate(self.model, self.tokenizer, request, cache, sampler, max_new_tokens, eos, timings, t0,
                                 self.think_end)  # fmt: skip
        return Stream(events)

    def room(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """``max_new_tokens`` cut to what the context leaves after the prompt (a one-line error when
        the prompt alone fills it)."""
        if prompt_tokens >= self.context_length:
            raise UserError(f"prompt is {prompt_tokens} tokens, the context holds {self.context_length}")
        return min(max_new_tokens, self.context_length - prompt_tokens)

    def chat(self, system: str | None = None, vision_cache_size: int = 32) -> Conversation:
        """A :class:`~qwen3vl_onnx.runtime.conversation.Conversation` that keeps its KV cache between turns."""
        from .conversation import Conversation

        return Conversation(self, system, vision_cache_size)

    def generate(self, messages: list[dict[str, Any]], max_new_tokens: int = 256, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None, stream: bool = False,
                 ignore_eos: bool = False) -> Result | Stream:  # fmt: skip
        """Answer ``messages``: a :class:`Result`, or with ``stream=True`` the same as :meth:`stream`."""
        s = self.stream(messages, max_new_tokens, temperature, top_p, top_k, seed, ignore_eos)
        return s if stream else s.finish()
