"""From token ids to the text a user reads: deltas that never split a character, reasoning apart
from the answer (Thinking checkpoints), and stop strings that end the answer without being shown."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer


class Detokenizer:
    """Turns a growing list of ids into text deltas, holding back split multi-byte characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # ids before this have been emitted
        self.emitted = 0  # characters handed out so far

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            self.emitted += len(after) - len(before)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever was held back (an incomplete character at the very end)."""
        rest = self.text()[self.emitted :]
        self.emitted += len(rest)
        return rest

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level vocabulary alphabet: the character that stands for each byte in a token."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(shifted)}


_BYTE_OF = _byte_level_alphabet()


class TokenBytes:
    """A token's own bytes. One token may hold part of a multi-byte character, which decodes to
    U+FFFD as text; its bytes (OpenAI's logprobs ``bytes``) let a client rebuild the character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self.byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"

    def __call__(self, token: int) -> bytes:
        if token in self.added:
            return self.added[token].encode("utf-8")
        piece = self.tokenizer.id_to_token(token)
        if self.byte_level and piece is not None and all(c in _BYTE_OF for c in piece):
            return bytes(_BYTE_OF[c] for c in piece)
        return self.tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")


class AnswerParts:
    """Detokenises reasoning (up to ``think_end``) and answer separately; after ``</think>`` the
    answer's leading newlines (the template's separator) are not part of it. Stop strings end
    either part; ``stopped`` says one did."""

    def __init__(self, tokenizer: Tokenizer, think_end: int | None, stop: Sequence[str] = ()):
        self.think_end = think_end
        self.reasoning = Detokenizer(tokenizer)
        self.text = Detokenizer(tokenizer) if think_end is None else _AnswerText(tokenizer)
        self.part = "text" if think_end is None else "reasoning"
        self.stops = {"reasoning": StopStrings(stop), "text": StopStrings(stop)}
        self.shown: dict[str, list[str]] = {"reasoning": [], "text": []}
        self.ids: list[int] = []

    @property
    def stopped(self) -> bool:
        return self.stops[self.part].stopped

    def _show(self, piece: str, part: str, last: bool = False) -> Delta:
        shown = self.stops[part].push(piece) + (self.stops[part].flush() if last else "")
        self.shown[part].append(shown)
        return Delta(shown, part)

    def push(self, token: int) -> Delta:
        self.ids.append(token)
        if self.part == "reasoning":
            if token == self.think_end:
                self.part = "text"
                return self._show(self.reasoning.flush(), "reasoning", last=True)
            return self._show(self.reasoning.push(token), "reasoning")
        return self._show(self.text.push(token), "text")

    def flush(self) -> Delta:
        if self.stopped:
            return Delta("", self.part)
        detok = self.reasoning if self.part == "reasoning" else self.text
        return self._show(detok.flush(), self.part, last=True)

    def answer_text(self) -> str:
        return "".join(self.shown["text"])

    def reasoning_text(self) -> str:
        return "".join(self.shown["reasoning"])


class _AnswerText(Detokenizer):
    """A Detokenizer whose text starts at the first character that is not a newline."""

    def push(self, token: int) -> str:
        return self._trim(super().push(token))

    def flush(self) -> str:
        return self._trim(super().flush())

    def _trim(self, piece: str) -> str:
        if self.started:
            return piece
        piece = piece.lstrip("\n")
        self.started = bool(piece)
        return piece

    started = False


class Delta(str):
    """A piece of streamed text that knows which part of the answer it belongs to: "text", or
    "reasoning" for what a Thinking checkpoint writes before ``</think>``. It is a ``str``, so code
    that only prints deltas needs to know nothing of parts."""

    part: str

    def __new__(cls, text: str, part: str = "text") -> Delta:
        d = super().__new__(cls, text)
        d.part = part
        return d


class StopStrings:
    """Holds back the end of the text that could still become a stop string, so a stop string split
    over several tokens is never shown; once one appears, the text before it is all there is."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """What of ``piece`` (after what was held) can be shown now."""
        if not self.stops or self.stopped:
            return "" if self.stopped else piece
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[: min(hits)]
        hold = next((k for k in range(min(self.longest - 1, len(text)), 0, -1)
                     if any(s.startswith(text[-k:]) for s in self.stops)), 0)  # fmt: skip
        self.pending = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        rest, self.pending = ("" if self.stopped else self.pending), ""
        return rest
