"""Constrained decoding: a per-sequence token mask, built by llguidance from a JSON schema, any JSON
object, a regex or a tool-call grammar, applied to the logits before sampling.

The grammar is compiled against the bundle's own ``tokenizer.json`` (no torch, no transformers).
A ``TokenMask`` is a stateful logits processor of one sequence: it feeds the matcher each token the
sequence chose, and sets every token the grammar cannot take next to -inf. It can start only after
``</think>`` (Thinking checkpoints reason freely first), or lazily at a trigger token (``<tool_call>``
under ``tool_choice: auto``: free text until the model opens a call, then the call is held to a
valid call of a listed function, then free again). Special tokens (``<|im_start|>``, pads,
``<think>``) are never allowed inside JSON; the end-of-turn token only once the grammar is complete.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError

# JSON as Qwen writes it (and json.dumps does): ", " and ": " between items, no other whitespace.
# Fixed separators make a call's text canonical, so streamed argument fragments equal the whole.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
TOOL_CHOICES = ("auto", "none", "required")


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a base dependency
        raise UserError("constrained decoding needs llguidance: pip install llguidance") from None
    return llguidance


class GrammarCompiler:
    """llguidance's view of one tokenizer: building it parses the vocabulary (~1-2 s), so a process
    keeps one per tokenizer file (``for_tokenizer``); compiling a grammar then takes about a millisecond."""

    def __init__(self, tokenizer_json: str, eos_id: int, vocab_size: int, special: Mapping[str, int]):
        llg = _llguidance()
        self.tokenizer = llg.LLTokenizer(tokenizer_json, eos_token=eos_id)
        self.vocab_size = vocab_size  # the model's logits (the tokenizer's vocabulary may be shorter: padding ids)
        self.mask_words = (self.tokenizer.vocab_size + 31) // 32
        self.special = dict(special)  # added tokens the grammars name: <tool_call>, </tool_call>

    def check(self, grammar: str, what: str) -> str:
        """``grammar``, or a one-line error with the library's reason."""
        llg = _llguidance()
        err = llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if err and not err.startswith("WARNING"):
            raise UserError(f"{what}: {err.strip().splitlines()[0][:300]}")
        return grammar

    def matcher(self, grammar: str) -> Any:
        return _llguidance().LLMatcher(self.tokenizer, grammar, log_level=0)


_COMPILERS: dict[str, GrammarCompiler] = {}


def compiler_for(tokenizer_json: str, eos_id: int, vocab_size: int, special: Mapping[str, int]) -> GrammarCompiler:
    """One compiler per tokenizer content, eos and vocabulary size, built on first use."""
    key = hashlib.sha256(f"{eos_id}:{vocab_size}:".encode() + tokenizer_json.encode()).hexdigest()
    if key not in _COMPILERS:
        while len(_COMPILERS) >= 4:
            _COMPILERS.pop(next(iter(_COMPILERS)))
        _COMPILERS[key] = GrammarCompiler(tokenizer_json, eos_id, vocab_size, special)
    return _COMPILERS[key]


# ---- what a request asks for --------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name and the JSON schema of its arguments."""

    name: str
    parameters: Mapping[str, Any]


def parse_tools(tools: Any) -> tuple[Tool, ...]:
    """OpenAI-style ``tools`` (``[{"type": "function", "function": {"name", "parameters"}}]``), checked."""
    if not isinstance(tools, list | tuple):
        raise UserError(f"tools must be a list, got {type(tools).__name__}")
    out, seen = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(t, Mapping) or t.get("type", "function") != "function" or not isinstance(fn, Mapping):
            raise UserError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
        name, params = fn.get("name"), fn.get("parameters")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise UserError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '-', '.' or ':', got {name!r}")
        if name in seen:
            raise UserError(f"tools[{i}]: a second function named {name!r}")
        seen.add(name)
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, Mapping):
            raise UserError(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append(Tool(name, params))
    return tuple(out)


@dataclass(frozen=True)
class OutputSpec:
    """What the answer must be: free text, JSON (any object, or valid against ``schema``), text
    matching ``regex``, and/or calls of ``tools`` as ``tool_choice`` says (``auto``, ``none``,
    ``required``, or a function's name)."""

    json: bool = False
    schema: Mapping[str, Any] | None = None
    regex: str | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True

    @property
    def calls_possible(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def active(self) -> bool:
        return self.json or self.regex is not None or bool(self.tools)


def output_spec(response_format: Any = None, tools: Any = None, tool_choice: Any = None,
                parallel_tool_calls: bool = True) -> OutputSpec:  # fmt: skip
    """The OpenAI request fields as an :class:`OutputSpec`, each checked (a one-line error naming the field).

    ``response_format``: ``{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}``
    or this project's ``{"type": "regex", "regex": ...}``."""
    spec: dict[str, Any] = {}
    if response_format is not None:
        if not isinstance(response_format, Mapping) or not isinstance(response_format.get("type"), str):
            raise UserError("response_format must be an object with a type")
        kind = response_format["type"]
        if kind == "json_object":
            spec["json"] = True
        elif kind == "json_schema":
            js = response_format.get("json_schema")
            schema = js.get("schema") if isinstance(js, Mapping) else None
            if not isinstance(schema, Mapping):
                raise UserError("response_format json_schema needs json_schema.schema, a JSON schema object")
            spec.update(json=True, schema=schema)
        elif kind == "regex":
            if not isinstance(response_format.get("regex"), str):
                raise UserError("response_format regex needs a regex string")
            spec["regex"] = response_format["regex"]
        elif kind != "text":
            raise UserError(f"response_format type {kind!r} is not one of text, json_object, json_schema, regex")
    parsed = parse_tools(tools) if tools else ()
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise UserError('tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}')
        choice = name
        if name not in {t.name for t in parsed}:
            raise UserError(f"tool_choice names {name!r}, which is not among the tools")
    elif choice not in TOOL_CHOICES:
        raise UserError(f'tool_choice must be "auto", "none", "required" or a function, got {choice!r}')
    if choice != "auto" and choice != "none" and not parsed:
        raise UserError("tool_choice needs tools: send 'tools' with it, or leave it out")
    return OutputSpec(tools=parsed, tool_choice=choice, parallel_tool_calls=bool(parallel_tool_calls), **spec)


# ---- grammars ----------------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _answer_schema(spec: OutputSpec) -> dict[str, Any]:
    return {**(spec.schema or {"type": "object"}), "x-guidance": JSON_STYLE}


def _call_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """One call as Qwen writes it: ``{"name": NAME, "arguments": ARGS}``, ARGS valid for NAME."""
    one = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": dict(t.parameters)},
            "required": ["name", "arguments"], "additionalProperties": False} for t in tools]  # fmt: skip
    return {**(one[0] if len(one) == 1 else {"anyOf": one}), "x-guidance": JSON_STYLE}


def _calls_rules(spec: OutputSpec, open_id: int, close_id: int) -> str:
    """Lark rules for the calls a request allows: one, or (parallel) several a newline apart."""
    tools = [t for t in spec.tools if spec.tool_choice in TOOL_CHOICES or t.name == spec.tool_choice]
    many = spec.parallel_tool_calls and spec.tool_choice in TOOL_CHOICES
    calls = 'calls: call ("\\n" call)*' if many else "calls: call"
    return "\n".join([calls, 'call: open "\\n" body "\\n" close', f"open: <[{open_id}]>", f"close: <[{close_id}]>",
                      f"body: %json {_json(_call_schema(tools))}", ""])  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """How a sequence is held: ``grammar`` from its start (or from after ``</think>``), or
    ``call_grammar`` from each ``trigger`` token on; ``forbidden`` tokens never."""

    grammar: str | None = None
    trigger: int | None = None
    call_grammar: str | None = None
    forbidden: tuple[int, ...] = ()


def plan(spec: OutputSpec, compiler: GrammarCompiler) -> Plan:
    """The grammars ``spec`` asks for, compiled once per request (errors name the field at fault)."""
    llg = _llguidance()
    open_id, close_id = compiler.special.get("<tool_call>"), compiler.special.get("</tool_call>")
    if spec.calls_possible and (open_id is None or close_id is None):
        raise UserError("this bundle's tokenizer has no <tool_call> token: its checkpoint does not call tools")
    forbidden = (open_id,) if spec.tools and not spec.calls_possible and open_id is not None else ()
    if spec.regex is not None and not spec.calls_possible:
        return Plan(compiler.check(llg.LLMatcher.grammar_from_regex(spec.regex), "response_format regex"), forbidden=forbidden)
    if spec.json and not spec.calls_possible:
        grammar = llg.LLMatcher.grammar_from_json_schema(_answer_schema(spec))
        return Plan(compiler.check(grammar, "response_format schema"), forbidden=forbidden)
    if not spec.calls_possible:
        return Plan(forbidden=forbidden)
    for i, t in enumerate(spec.tools):  # each function's schema on its own, so an error names it
        compiler.check(llg.LLMatcher.grammar_from_json_schema(dict(t.parameters)), f"tools[{i}] ({t.name}) parameters")
    assert open_id is not None and close_id is not None
    rules = _calls_rules(spec, open_id, close_id)
    if spec.tool_choice == "auto" and not spec.json and spec.regex is None:
        call = "\n".join(['start: "\\n" body "\\n" close', f"close: <[{close_id}]>",
                          f"body: %json {_json(_call_schema(spec.tools))}", ""])  # fmt: skip
        return Plan(trigger=open_id, call_grammar=compiler.check(llg.LLMatcher.grammar_from_lark(call), "tools"))
    if spec.tool_choice == "auto":  # an answer in the asked format, or calls
        answer = f"%json {_json(_answer_schema(spec))}" if spec.json else f"%regex {_json({'regex': spec.regex})}"
        start = f"start: answer | calls\nanswer: {answer}\n"
    else:
        start = "start: calls\n"
    return Plan(compiler.check(llg.LLMatcher.grammar_from_lark(start + rules), "tools"))


# ---- the mask ----------------------------------------------------------------------------------


class TokenMask:
    """The logits processor of one constrained sequence (see the module doc). Called with the
    sequence's tokens so far, it first feeds the matcher those it has not seen, then masks in place.
    Without an active grammar it returns the logits untouched (no vocabulary-sized work)."""

    def __init__(self, compiler: GrammarCompiler, plan: Plan, start_after: int | None = None):
        self.compiler, self.plan = compiler, plan
        # </think> of a Thinking checkpoint: an answer's grammar holds only after it (a call may open anywhere)
        self.waiting_for = start_after if plan.grammar is not None else None
        self.matcher: Any = None
        self.seen = 0
        self.bits = np.full(compiler.mask_words, -1, np.int32)
        if plan.grammar is not None and start_after is None:
            self.matcher = compiler.matcher(plan.grammar)

    def __call__(self, logits: np.ndarray, prompt: Sequence[int], generated: Sequence[int]) -> np.ndarray:
        for token in generated[self.seen :]:
            self._advance(int(token))
        self.seen = len(generated)
        for t in self.plan.forbidden:
            logits[t] = -np.inf
        if self.matcher is None:
            return logits
        if self.matcher.is_error():
            raise UserError(f"constrained decoding failed: {self.matcher.get_error()}")
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        n = self.compiler.tokenizer.vocab_size
        banned = np.unpackbits(self.bits.view(np.uint8), count=n, bitorder="little") == 0
        np.putmask(logits[:n], banned, -np.inf)
        logits[n:] = -np.inf  # ids past the tokenizer's vocabulary: padding rows of the embedding table
        return logits

    def _advance(self, token: int) -> None:
        if self.matcher is not None:
            if not self.matcher.consume_token(token):
                raise UserError(f"constrained decoding failed: {self.matcher.get_error()}")
            if self.plan.trigger is not None and self.matcher.is_accepting():
                self.matcher = None  # the call is complete: free text again
            return
        if self.waiting_for is not None:
            if token == self.waiting_for:
                self.waiting_for = None
                if self.plan.grammar is not None:
                    self.matcher = self.compiler.matcher(self.plan.grammar)
            return
        if self.plan.trigger is not None and token == self.plan.trigger:
            assert self.plan.call_grammar is not None
            self.matcher = self.compiler.matcher(self.plan.call_grammar)

    @property
    def complete(self) -> bool:
        """The grammar has nothing left to ask (a trigger grammar: no call is open)."""
        return self.matcher is None or self.matcher.is_accepting()
