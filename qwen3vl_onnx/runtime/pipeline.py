"""The user-facing pipeline: chat messages with images in, text out (streamed or whole).

``Pipeline.from_bundle(dir).generate(messages)`` renders the checkpoint's chat template,
preprocesses the images, expands each image pad to its token count, and runs
:func:`~qwen3vl_onnx.runtime.generate.stream_generate` over the bundle.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .chat import load_chat_template, render
from .constrain import GrammarCompiler, TokenMask, compiler_for, plan
from .conversation import Conversation
from .generate import Decoding, Result, Stream, prefill_input, stream_generate
from .model import BundleModel
from .prompt import Processors, Prompt, build_prompt, load_tokenizer
from .sampling import GenerationParams, Sampler, chain, make_logits_processor, make_sampler


class Pipeline:
    """A bundle with its tokenizer, chat template, image processor and generation defaults."""

    def __init__(self, model: BundleModel, context_length: int | None = None):
        self.model = model
        self.config = model.config
        path = model.path
        self.tokenizer = load_tokenizer(path)
        self.chat_template = load_chat_template(path)
        self.processors = Processors.from_bundle(path, self.config)
        self.image_config = self.processors.image
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
                    context_length: int | None = None, prefill_graph: bool = True, kv_cache: str | None = None,
                    ) -> Pipeline:  # fmt: skip
        return cls(BundleModel(path, providers, threads, prefill_graph, kv_cache), context_length)

    def prepare(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                tools: Sequence[Mapping[str, Any]] | None = None) -> Prompt:  # fmt: skip
        """Token ids (image and video pads expanded) and preprocessed pixels for ``messages``, with
        ``tools`` (OpenAI's function list) rendered by the checkpoint's template."""
        return build_prompt(self.tokenizer, self.chat_template, self.processors, messages, add_generation_prompt, tools)

    def params(self, params: GenerationParams | None = None, **overrides: Any) -> GenerationParams:
        """``params`` (default: all defaults) with ``overrides`` (GenerationParams fields), checked."""
        try:
            p = dataclasses.replace(params or GenerationParams(), **overrides)
        except TypeError as e:
            raise UserError(f"unknown generation parameter ({e})") from None
        return p.checked(self.config.text.vocab_size)

    def sampler(self, params: GenerationParams) -> Sampler:
        """The sampler ``params`` ask for, the bundle's generation config filling what they leave open."""
        p = params.with_defaults(self.generation_config)
        assert p.temperature is not None and p.top_p is not None and p.top_k is not None
        return make_sampler(p.temperature, p.top_p, p.top_k, np.random.default_rng(p.seed), p.min_p)

    def decoding(self, params: GenerationParams, prompt_tokens: int) -> Decoding:
        """How a request with these (checked) parameters and this many prompt tokens is decoded."""
        eos = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_ids))
        processor = make_logits_processor(params.repetition_penalty, params.presence_penalty, params.frequency_penalty,
                                          params.logit_bias)  # fmt: skip
        spec = params.output()
        if spec.active:
            mask = TokenMask(self.grammars(), plan(spec, self.grammars()), start_after=self.think_end)
            processor = mask if processor is None else chain(processor, mask)
        return Decoding(self.sampler(params), self.room(prompt_tokens, params.max_new_tokens), eos, processor, params.stop,
                        params.logprobs, self.think_end, calls=bool(spec.tools))  # fmt: skip

    def grammars(self) -> GrammarCompiler:
        """The grammar compiler for this bundle's tokenizer (built on first use, ~1-2 s, then shared)."""
        text = (self.model.path / "tokenizer.json").read_text()
        special = {t: i for t in ("<tool_call>", "</tool_call>") if (i := self.tokenizer.token_to_id(t)) is not None}
        eos = self.tokenizer.token_to_id("<|im_end|>")
        return compiler_for(text, eos if eos is not None else min(self.eos_ids), self.config.text.vocab_size, special)

    def stream(self, messages: list[dict[str, Any]], params: GenerationParams | None = None, **overrides: Any) -> Stream:
        """Answer ``messages`` as a :class:`Stream` of text deltas (its ``result`` set at the end).
        ``overrides`` are :class:`GenerationParams` fields (``max_new_tokens=64, temperature=0``)."""
        t0 = time.perf_counter()
        params = self.params(params, **overrides)
        prompt = self.prepare(messages, tools=params.tools)
        decoding = self.decoding(params, len(prompt.ids))
        t1 = time.perf_counter()
        request = prefill_input(self.model, prompt)
        timings = {"preprocess_s": t1 - t0, "vision_s": time.perf_counter() - t1}
        cache = self.model.new_cache(capacity=len(prompt.ids) + decoding.max_new_tokens)
        return Stream(stream_generate(self.model, self.tokenizer, request, cache, decoding, timings, t0))

    def room(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """``max_new_tokens`` cut to what the context leaves after the prompt (a one-line error when
        the prompt alone fills it)."""
        if prompt_tokens >= self.context_length:
            raise UserError(f"prompt is {prompt_tokens} tokens, the context holds {self.context_length}")
        return min(max_new_tokens, self.context_length - prompt_tokens)

    def chat(self, system: str | None = None, vision_cache_size: int = 32) -> Conversation:
        """A :class:`~qwen3vl_onnx.runtime.conversation.Conversation` that keeps its KV cache between turns."""
        return Conversation(self, system, vision_cache_size)

    def generate(self, messages: list[dict[str, Any]], params: GenerationParams | None = None, stream: bool = False,
                 **overrides: Any) -> Result | Stream:  # fmt: skip
        """Answer ``messages``: a :class:`Result`, or with ``stream=True`` the same as :meth:`stream`."""
        s = self.stream(messages, params, **overrides)
        return s if stream else s.finish()
