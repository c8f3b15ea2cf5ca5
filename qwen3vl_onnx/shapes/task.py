"""Procedural pictures of 1-3 coloured shapes and questions with one- or two-word answers.

Used for training (scripts/train_shapes.py), for the held-out evaluation (``qwen3vl-onnx eval``)
and by the demo. Each item is fully determined by its seed, so the held-out set is reproducible
and disjoint from training by seed range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (148, 60, 189),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three")
SIZES = ((128, 128), (160, 128), (128, 160), (144, 112), (112, 144), (160, 160))
SIDES = ("left", "right", "top", "bottom")
KINDS = ("color", "shape", "count", "position", "compare")
EVAL_SEED = 1_000_000_007  # training draws from other seeds


@dataclass
class Obj:
    shape: str
    color: str
    cx: float
    cy: float


@dataclass
class Item:
    images: list[Image.Image]
    question: str
    answer: str
    kind: str
    scenes: list[list[Obj]] = field(default_factory=list)


def draw(objs: list[Obj], size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    bg = tuple(int(x) for x in rng.integers(225, 250, 3))
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    r = min(w, h) / 6.5  # a shape spans about 3x3 patches
    for o in objs:
        x, y, c = o.cx * w, o.cy * h, COLORS[o.color]
        if o.shape == "circle":
            d.ellipse((x - r, y - r, x + r, y + r), fill=c)
        elif o.shape == "square":
            # square 4r^2, circle 3.1r^2, triangle 2r^2: kinds differ in area as well as outline
            d.rectangle((x - r, y - r, x + r, y + r), fill=c)
        else:
            d.polygon([(x, y - r), (x - r * 1.1, y + r * 0.8), (x + r * 1.1, y + r * 0.8)], fill=c)
    return img


def scene(rng: np.random.Generator, n: int) -> list[Obj]:
    """n shapes in distinct cells of a 3x3 grid, with distinct (shape, colour) pairs."""
    cells = rng.choice(9, size=n, replace=False)
    pairs = rng.choice(len(SHAPES) * len(COLORS), size=n, replace=False)
    out = []
    for cell, pair in zip(cells, pairs, strict=True):
        jx, jy = rng.uniform(-0.03, 0.03, 2)
        out.append(
            Obj(
                SHAPES[pair % len(SHAPES)],
                list(COLORS)[pair // len(SHAPES)],
                (cell % 3 + 0.5) / 3 + jx,
                (cell // 3 + 0.5) / 3 + jy,
            )
        )
    return out


def _unique(objs: list[Obj], key) -> list[Obj]:
    values = [key(o) for o in objs]
    return [o for o, v in zip(objs, values, strict=True) if values.count(v) == 1]


def make_item(seed: int, kind: str | None = None, crowded: bool = False) -> Item:
    """One question about fresh picture(s). ``crowded`` (training only) draws 2-3 shapes for every
    single-image kind, where a question has to pick one shape out of several."""
    rng = np.random.default_rng(seed)
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    if kind == "compare":
        a, b = rng.choice([1, 2, 3], size=2, replace=False)
        scenes = [scene(rng, int(a)), scene(rng, int(b))]
        q = "Which image has more shapes?"
        return Item([draw(s, size, rng) for s in scenes], q, "first" if a > b else "second", kind, scenes)
    for _ in range(100):
        n = int(rng.integers(2, 4)) if kind == "position" or crowded else int(rng.integers(1, 4))
        objs = scene(rng, n)
        qa = _question(kind, objs, rng)
        if qa:
            return Item([draw(objs, size, rng)], qa[0], qa[1], kind, [objs])
    raise RuntimeError("could not build a question")  # pragma: no cover


def _question(kind: str, objs: list[Obj], rng: np.random.Generator) -> tuple[str, str] | None:
    if kind == "count":
        return "How many shapes are there?", NUMBERS[len(objs)]
    if kind == "color":
        cands = _unique(objs, lambda o: o.shape)
        if not cands:
            return None
        o = cands[int(rng.integers(len(cands)))]
        return f"What color is the {o.shape}?", o.color
    if kind == "shape":
        cands = _unique(objs, lambda o: o.color)
        if not cands:
            return None
        o = cands[int(rng.integers(len(cands)))]
        return f"What shape is the {o.color} one?", o.shape
    if len(objs) < 2:
        return None
    side = SIDES[int(rng.integers(4))]
    o = extreme(objs, side)
    if o is None:
        return None
    if rng.integers(2):
        return f"What color is the shape on the {side}?" if side in (
            "left",
            "right",
        ) else f"What color is the shape at the {side}?", o.color
    return f"Which shape is on the {side}?" if side in ("left", "right") else f"Which shape is at the {side}?", o.shape


def extreme(objs: list[Obj], side: str) -> Obj | None:
    """The shape clearly furthest to ``side`` (by 0.2 of the picture over the next), or None."""
    if len(objs) < 2:
        return None
    key = {"left": lambda o: o.cx, "right": lambda o: -o.cx, "top": lambda o: o.cy, "bottom": lambda o: -o.cy}[side]
    ranked = sorted(objs, key=key)
    return ranked[0] if key(ranked[1]) - key(ranked[0]) >= 0.2 else None


def describe(objs: list[Obj]) -> str:
    """Every shape, left to right (top to bottom on ties): a training-only, densely supervised answer."""
    return ", ".join(f"{o.color} {o.shape}" for o in sorted(objs, key=lambda o: (round(o.cx * 3), o.cy)))


def conversation(seed: int, turns: int = 4) -> tuple[list[Image.Image], list[tuple[str, str]], list[Obj]]:
    """One picture, several question/answer turns about it and its shapes (training only: more signal
    per image)."""
    rng = np.random.default_rng(seed)
    size = SIZES[int(rng.integers(len(SIZES)))]
    objs = scene(rng, int(rng.integers(1, 4)))
    qas = [("List the shapes from left to right.", describe(objs))]
    for kind in rng.permutation(["color", "shape", "count", "position", "color", "shape"]):
        qa = _question(str(kind), objs, rng)
        if qa and qa not in qas:
            qas.append(qa)
    order = 1 + rng.permutation(len(qas) - 1)[: turns - 1]  # the list turn always, at a random place
    picked = [qas[i] for i in order]
    picked.insert(int(rng.integers(len(picked) + 1)), qas[0])
    return [draw(objs, size, rng)], picked, objs


def messages(item: Item) -> list[dict]:
    content = [{"type": "image", "image": im} for im in item.images] + [{"type": "text", "text": item.question}]
    return [{"role": "user", "content": content}]


def eval_items(n: int, seed: int = EVAL_SEED) -> list[Item]:
    """The held-out set: item i has seed ``seed + i``, kinds in rotation so every type is covered."""
    return [make_item(seed + i, KINDS[i % len(KINDS)]) for i in range(n)]
