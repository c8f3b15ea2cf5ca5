"""Train the tiny "shapes" Qwen3-VL with transformers on CPU, reproducibly, and save it into the package.

    python scripts/train_shapes.py                      # full run (3800 steps, 27-30 minutes on 2 cores)
    python scripts/train_shapes.py --steps 3 --out /tmp/x --eval 8   # smoke test

The model is transformers' Qwen3VLForConditionalGeneration at SHAPES_CONFIG (real tokenizer, tied
embeddings, interleaved MRoPE, 2 DeepStack layers). Prompts are built with the same code the
runtime uses (chat template, processor, pad expansion), so training and inference see identical
token ids. Loss is taken on the answer tokens and the closing <|im_end|> only.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from qwen3vl_onnx.demo.checkpoint import chat_template
from qwen3vl_onnx.demo.tokenizer import build_tokenizer
from qwen3vl_onnx.export.weights import Checkpoint, save_safetensors
from qwen3vl_onnx.runtime.preprocess import ImageProcessorConfig
from qwen3vl_onnx.runtime.prompt import Processors, build_prompt
from qwen3vl_onnx.shapes import task
from qwen3vl_onnx.shapes.model import GENERATION, PREPROCESSOR, SHAPES_CONFIG, packaged_checkpoint

IM_END, PAD, IMG = 151645, 151643, 151655


class PatchLinear(torch.nn.Module):
    """The patch embedding's Conv3d as the matmul it is (kernel == stride), same ``weight``/``bias``.

    CPU Conv3d backward took 70 ms of a 500 ms step; a linear layer over flattened patches gives the
    same numbers and the same state dict, so the saved checkpoint is unchanged.
    """

    def __init__(self, conv: torch.nn.Conv3d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, out = x.shape[0], self.weight.shape[0]
        return torch.nn.functional.linear(x.reshape(n, -1), self.weight.reshape(out, -1), self.bias).view(n, out, 1, 1, 1)


ASSISTANT = [151644, 77091, 198]  # "<|im_start|>assistant\n"
# Question kinds of the single-question items, cycled through each batch, drawn with 2-3 shapes
# (``crowded``: a colour question about a lone shape needs no binding); the dialogues ask every kind
# about 1-3 shapes. The three binding kinds get equal weight: when colour and position had 5 of 16
# and shape 2, the model bound kind -> colour (100%) but not colour -> kind (72.5%).
KIND_MIX = ["color", "position", "shape"] * 4 + ["count", "compare"] * 2


class Encoder:
    def __init__(self):
        self.tokenizer = build_tokenizer()
        self.template = chat_template()
        self.processors = Processors(ImageProcessorConfig.from_dict(PREPROCESSOR), image_token_id=IMG)

    def item(self, it: task.Item) -> tuple[list[int], list[bool], np.ndarray, list, list]:
        """Prompt+answer ids, which ids are supervised, pixel values, grids, scenes."""
        p = build_prompt(self.tokenizer, self.template, self.processors, task.messages(it))
        answer = self.tokenizer.encode(it.answer, add_special_tokens=False).ids + [IM_END]
        return p.ids + answer, [False] * len(p.ids) + [True] * len(answer), p.pixel_values, p.grids, it.scenes

    def dialogue(self, seed: int) -> tuple[list[int], list[bool], np.ndarray, list, list]:
        """A multi-turn conversation about one picture; every assistant answer is supervised."""
        images, qas, objs = task.conversation(seed)
        msgs: list[dict] = []
        for i, (q, a) in enumerate(qas):
            content = ([{"type": "image", "image": im} for im in images] if i == 0 else []) + [{"type": "text", "text": q}]
            msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
        p = build_prompt(self.tokenizer, self.template, self.processors, msgs, add_generation_prompt=False)
        target, inside = [], False
        for j, t in enumerate(p.ids):  # answer tokens: after "<|im_start|>assistant\n", through <|im_end|>
            if j >= 3 and p.ids[j - 3 : j] == ASSISTANT:
                inside = True
            target.append(inside)
            if t == IM_END:
                inside = False
        return p.ids, target, p.pixel_values, p.grids, [objs]

    def batch(self, items: list, dialogues: list[int] = ()) -> dict[str, torch.Tensor]:
        enc = [self.item(it) for it in items] + [self.dialogue(s) for s in dialogues]
        longest = max(len(e[0]) for e in enc)
        ids = torch.full((len(enc), longest), PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)
        for b, (seq, sup, *_) in enumerate(enc):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            target[b, : len(seq)] = torch.tensor(sup)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "target": target,
            "pixel_values": torch.from_numpy(np.concatenate([e[2] for e in enc])),
            "image_grid_thw": torch.tensor([g for e in enc for g in e[3]]),
            "token_labels": torch.from_numpy(
                np.concatenate([token_labels(objs, g) for e in enc for objs, g in zip(e[4], e[3], strict=True)])
            ),
        }


def token_labels(objs: list[task.Obj], grid, merge: int = 2) -> np.ndarray:
    """(tokens, 6) per merged image token: kind and colour index of the shape under it, then whether
    that shape is the one clearly furthest left, right, up, down (``task.extreme``; 1/0). -1 where
    there is no shape, and for a side with no clear extreme or a single shape.

    A token is labelled when its centre lies within 0.6 radius of a shape's centre, and each shape
    labels at least its nearest token. Training-only targets for ``TokenProbe.loss``.
    """
    _, h, w = (int(x) for x in grid)
    rows, cols = h // merge, w // merge
    ty, tx = np.meshgrid((np.arange(rows) + 0.5) / rows, (np.arange(cols) + 0.5) / cols, indexing="ij")
    ty, tx = ty.ravel(), tx.ravel()
    labels = np.full((rows * cols, 2 + len(task.SIDES)), -1, np.int64)
    ends = [task.extreme(objs, side) for side in task.SIDES]
    r = min(h, w) / 6.5  # task.draw's radius, in patches
    for o in objs:
        d = np.hypot((tx - o.cx) * w / r, (ty - o.cy) * h / r)
        near = d < 0.6
        near[int(d.argmin())] = True
        flags = [-1 if e is None else int(e is o) for e in ends]
        labels[near] = [task.SHAPES.index(o.shape), list(task.COLORS).index(o.color), *flags]
    return labels


class TokenProbe(torch.nn.Module):
    """Linear classifier on the merged vision tokens (kind, colour, which side's extreme), training only.

    Why: recognising the kind of shape is what the language loss teaches last (held-out shape
    answers at 55% after 1000 steps, while counting is at 95%); the probe gives the vision tower a
    direct, per-token signal for it. The side flags ask the tower, which sees the whole picture, to
    mark the leftmost/rightmost/top/bottom shape on its own tokens, so that a position question
    becomes a lookup for the decoder like "What shape is the red one?" (answered 100%) instead of a
    comparison across tokens (answered ~68% without them). It reads the tower's output through a
    forward hook and is not part of the saved checkpoint.
    """

    def __init__(self, model, width: int):
        super().__init__()
        self.head = torch.nn.Linear(width, len(task.SHAPES) + len(task.COLORS) + len(task.SIDES))
        self.tokens: torch.Tensor | None = None
        model.model.visual.register_forward_hook(lambda _m, _i, out: setattr(self, "tokens", out.pooler_output))

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        sel = labels[:, 0] >= 0
        logits = self.head(self.tokens[sel])
        k, c = len(task.SHAPES), len(task.SHAPES) + len(task.COLORS)
        f = torch.nn.functional
        loss = f.cross_entropy(logits[:, :k], labels[sel, 0]) + f.cross_entropy(logits[:, k:c], labels[sel, 1])
        flags, known = labels[sel, 2:].float(), labels[sel, 2:] >= 0
        if known.any():
            loss = loss + f.binary_cross_entropy_with_logits(logits[:, c:][known], flags[known])
        return loss


def hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The text model's last hidden states (batch, seq, hidden) for an ``Encoder.batch``."""
    ids = batch["input_ids"]
    return model.model(
        input_ids=ids,
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        mm_token_type_ids=(ids == IMG).long(),
    ).last_hidden_state


def loss_fn(model, batch, negatives: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy on the answer tokens.

    With ``negatives`` > 0 the softmax runs over a sampled vocabulary: every id in the batch (prompt
    and answers, whose tied embeddings move) plus that many uniform random ids. The 151936-way head
    is otherwise half of each step's time on this model; uniform sampling shifts every logit by the
    same constant, and the random ids keep pushing unused tokens down, so full-vocabulary argmax
    (what evaluation and the runtime use) still lands on the answers.
    """
    ids = batch["input_ids"]
    sel = batch["target"][:, 1:]
    hidden = hidden_states(model, batch)[:, :-1][sel]  # positions that predict an answer token
    target = ids[:, 1:][sel]
    if negatives <= 0:
        return torch.nn.functional.cross_entropy(model.lm_head(hidden), target)
    vocab = model.lm_head.weight.shape[0]
    cand = torch.unique(torch.cat([ids.flatten(), torch.randint(vocab, (negatives,), generator=generator)]))  # sorted
    logits = hidden @ model.lm_head.weight[cand].T
    return torch.nn.functional.cross_entropy(logits, torch.searchsorted(cand, target))


@torch.no_grad()
def first_token_accuracy(model, enc: Encoder, items: list[task.Item]) -> dict[str, float]:
    """Answers are one word then <|im_end|>: argmax at the answer's first position decides."""
    hits: dict[str, list[int]] = {}
    for i in range(0, len(items), 32):
        chunk = items[i : i + 32]
        batch = enc.batch(chunk)
        ids, hidden = batch["input_ids"], hidden_states(model, batch)
        for b, it in enumerate(chunk):
            start = int(batch["target"][b].nonzero()[0])  # single-question items: the answer's first token
            pred = int(model.lm_head(hidden[b, start - 1]).argmax())
            hits.setdefault(it.kind, []).append(int(pred == ids[b, start]))
    acc = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    acc["overall"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return acc


def save(model, config: dict, out: Path) -> None:
    """fp16 safetensors plus configs, written next to OUT and renamed in place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".shapes."))
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        ck = Checkpoint(Path(d))
        save_safetensors(tmp / "model.safetensors", {n: ck[n] for n in sorted(ck)}, fp16=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps(GENERATION, indent=1))
    (tmp / "chat_template.jinja").write_text(chat_template())
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3800)
    ap.add_argument("--batch", type=int, default=16, help="single-question items per step")
    ap.add_argument("--dialogues", type=int, default=16, help="multi-turn conversations per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--negatives", type=int, default=8192, help="sampled-softmax negatives (0: full vocabulary)")
    ap.add_argument("--probe", type=float, default=0.5, help="weight of the training-only vision token probe loss")
    ap.add_argument("--minutes", type=float, default=0, help="experiments: stop at this wall time (cosine runs to --steps)")
    ap.add_argument("--eval", type=int, default=200, help="held-out items checked at the end")
    ap.add_argument("--out", type=Path, default=packaged_checkpoint())
    ap.add_argument("--text-layers", type=int, help="experiments: override SHAPES_CONFIG's text depth")
    ap.add_argument("--vision-depth", type=int, help="experiments: override SHAPES_CONFIG's vision depth")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    # sdpa is the same maths as eager and ~20% faster here; the saved weights do not depend on it.
    config = copy.deepcopy(SHAPES_CONFIG)
    if args.text_layers:
        config["text_config"]["num_hidden_layers"] = args.text_layers
    if args.vision_depth:
        config["vision_config"]["depth"] = args.vision_depth
    model = Qwen3VLForConditionalGeneration._from_config(Qwen3VLConfig(**config), attn_implementation="sdpa")
    model.model.visual.patch_embed.proj = PatchLinear(model.model.visual.patch_embed.proj)
    model.train()
    enc = Encoder()
    probe = TokenProbe(model, config["vision_config"]["out_hidden_size"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n] + [probe.head.weight]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)] + [probe.head.bias]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=args.lr, fused=True
    )
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    gen = torch.Generator().manual_seed(args.seed)
    t0, seed = time.time(), args.seed * 10_000_000
    for step in range(args.steps):
        items = [task.make_item(seed + i, KIND_MIX[i % len(KIND_MIX)], crowded=True) for i in range(args.batch)]
        dialogues = list(range(seed + args.batch, seed + args.batch + args.dialogues))
        seed += args.batch + args.dialogues
        batch = enc.batch(items, dialogues)
        loss = loss_fn(model, batch, args.negatives, gen)
        if args.probe:
            loss = loss + args.probe * probe.loss(batch["token_labels"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *probe.parameters()], 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:7.1f}s", flush=True)
        if args.minutes and time.time() - t0 > args.minutes * 60:
            print(f"stopped at step {step} (--minutes)", flush=True)
            break
        if step and step % 500 == 0:
            model.eval()
            print("  held-out (first 100):", first_token_accuracy(model, enc, task.eval_items(100)), flush=True)
            model.train()
    model.eval()
    acc = first_token_accuracy(model, enc, task.eval_items(args.eval))
    print(f"trained {args.steps} steps in {time.time() - t0:.0f}s; held-out accuracy {acc}", flush=True)
    save(model, config, args.out)
    print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
