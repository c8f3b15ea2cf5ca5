"""``POST /v1/completions``, OpenAI's legacy route: a raw prompt (text, or token ids), no chat
template, text out; ``echo`` puts the prompt before the answer, ``logprobs`` (0-5) in the route's
own shape (tokens, token_logprobs, top_logprobs, text_offset)."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..runtime.sampling import GenerationParams
from .completions import check_model, check_n, sampling_fields, seeded
from .engine import Finished, Job, Token
from .run import ApiError, Choices, respond
from .schemas import CompletionRequest

if TYPE_CHECKING:
    from starlette.requests import Request
    from tokenizers import Tokenizer

    from .state import State


class TextShaper:
    """One text choice: its text pieces as they come, and the whole text at the end."""

    def __init__(self, index: int, tokenizer: Tokenizer, echo: str, logprobs: bool):
        self.index, self.tokenizer, self.logprobs = index, tokenizer, logprobs
        self.text: list[str] = [echo] if echo else []
        self.lp: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.offset = len(echo)

    def _entry(self, text: str, lp: dict | None = None, finish: str | None = None) -> dict[str, Any]:
        return {"index": self.index, "text": text, "logprobs": lp, "finish_reason": finish}

    def _logprob(self, ev: Token) -> dict[str, list] | None:
        if not self.logprobs or ev.logprob is None:
            return None
        decode = lambda t: self.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
        one = {"tokens": [decode(ev.logprob.token)], "token_logprobs": [ev.logprob.logprob],
               "top_logprobs": [{decode(t): v for t, v in ev.logprob.top}], "text_offset": [self.offset]}  # fmt: skip
        for key, value in one.items():
            self.lp[key] += value
        return one

    def first(self) -> list[dict[str, Any]]:
        return [self._entry(self.text[0])] if self.text else []

    def push(self, ev: Token) -> list[dict[str, Any]]:
        lp, piece = self._logprob(ev), str(ev.delta)
        self.text.append(piece)
        self.offset += len(piece)
        return [self._entry(piece, lp)] if piece or lp else []

    def finish(self, ev: Finished) -> list[dict[str, Any]]:
        return [self._entry("", finish=ev.finish_reason)]

    def whole(self, ev: Finished) -> dict[str, Any]:
        return self._entry("".join(self.text), self.lp if self.logprobs else None, ev.finish_reason)


def _prompt_ids(body: CompletionRequest, tokenizer: Tokenizer) -> tuple[list[int], str]:
    """The prompt's token ids and its text (for ``echo``)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) > 1:
            raise ApiError(400, "one prompt per request here (a list of several prompts is not supported)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=False).ids, prompt
    ids = [int(t) for t in prompt]
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if any(t >= size for t in ids):
        raise ApiError(400, f"prompt token ids must be below {size}", "prompt")
    return ids, tokenizer.decode(ids, skip_special_tokens=False)


async def text_completion(body: CompletionRequest, state: State, request: Request) -> Any:
    engine, settings = state.ready(), state.settings
    check_model(body.model, settings)
    n = check_n(body.n, settings)
    if body.suffix:
        raise ApiError(400, "suffix (fill in the middle) is not supported", "suffix")
    if body.best_of not in (None, 1):
        raise ApiError(400, "best_of above 1 is not supported; use n", "best_of")
    tokenizer = engine.pipe.tokenizer
    ids, text = _prompt_ids(body, tokenizer)
    if not ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    explicit = body.max_tokens is not None
    params = GenerationParams(max_new_tokens=body.max_tokens or settings.ctx_size, logprobs=body.logprobs,
                              **sampling_fields(body, settings))  # fmt: skip
    try:
        params = engine.pipe.params(params)
    except UserError as e:
        raise ApiError(400, str(e)) from None
    choices = Choices(engine, lambda i, sink: Job([], seeded(params, i), sink, explicit_max=explicit, prompt_ids=ids), n)
    head = {"id": "cmpl-" + uuid.uuid4().hex[:24], "created": int(time.time()), "model": settings.model_name}
    shapers = [TextShaper(i, tokenizer, text if body.echo else "", body.logprobs is not None) for i in range(n)]

    def envelope(entries: list[dict], whole: bool) -> dict[str, Any]:
        return {**head, "object": "text_completion", "choices": entries}

    first = [e for s in shapers for e in s.first()]
    usage = body.stream_options is not None and bool(body.stream_options.include_usage)
    return await respond(choices, shapers, request, state.drain, bool(body.stream), envelope, first, usage)  # type: ignore[arg-type]
