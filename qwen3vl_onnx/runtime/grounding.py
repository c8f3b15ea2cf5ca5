"""Boxes and points out of a grounding answer, in the pixels of the picture they refer to.

Qwen3-VL answers "where is ..." with coordinates relative to the picture, 0 to 1000 on each axis:
as JSON (``[{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}, {"point_2d": [x, y], "label": "nose"}]``,
often inside a Markdown code fence) or in the older text form ``label(x1,y1),(x2,y2)`` (what is left
of ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`` once the
special tokens are dropped; kept, they are read too). An item may name its picture (``"picture"``,
1-based as the template's "Picture N:"); otherwise marks belong to the last picture given. Anything
malformed is skipped, never an error. The chat page's ``grounding.js`` reads answers the same way:
both are tested on the same recorded answers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

SCALE = 1000.0  # Qwen3-VL's relative coordinates run from 0 to this on each axis
_NUM = r"\s*(\d+(?:\.\d+)?)\s*"
_TEXT_BOX = re.compile(r"(?:<\|object_ref_start\|>([^<]*)<\|object_ref_end\|>)?\s*(?:<\|box_start\|>)?"
                       rf"\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)")  # fmt: skip


@dataclass(frozen=True)
class Mark:
    """A box ``(x1, y1, x2, y2)`` or a point ``(x, y)`` in pixels of picture ``picture`` (0-based)."""

    kind: str  # "box" or "point"
    label: str
    coords: tuple[float, ...]
    picture: int

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "label": self.label, "coords": [round(c, 2) for c in self.coords], "picture": self.picture}


def _numbers(value: Any, n: int) -> list[float] | None:
    if not isinstance(value, list) or len(value) != n:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return None
    return [min(max(float(v), 0.0), SCALE) for v in value]


def _json_values(text: str) -> list[Any]:
    """Every JSON object or array that starts somewhere in ``text`` and parses (outermost first)."""
    decoder, out, k = json.JSONDecoder(), [], 0
    while k < len(text):
        if text[k] in "[{":
            try:
                value, end = decoder.raw_decode(text, k)
            except ValueError:
                k += 1
                continue
            out.append(value)
            k = end
        else:
            k += 1
    return out


def _items(value: Any) -> list[dict]:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [x for v in value for x in _items(v)]
    return []


def relative_marks(text: str) -> list[tuple[str, str, list[float], int | None]]:
    """(kind, label, 0-1000 coordinates, picture number or None) of each mark in ``text``."""
    out: list[tuple[str, str, list[float], int | None]] = []
    for item in (i for v in _json_values(text) for i in _items(v)):
        label = item.get("label", "")
        label = label if isinstance(label, str) else str(label)
        pic = item.get("picture")
        pic = pic if isinstance(pic, int) and not isinstance(pic, bool) and pic >= 1 else None
        box, point = _numbers(item.get("bbox_2d"), 4), _numbers(item.get("point_2d"), 2)
        if box is not None:
            x1, y1, x2, y2 = box
            out.append(("box", label, [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], pic))
        elif point is not None:
            out.append(("point", label, point, pic))
    if out:
        return out
    end = 0
    for m in _TEXT_BOX.finditer(text):  # the text form, only where no JSON says anything
        label = m.group(1)
        if label is None:  # the text before it on its line, since the last box: "the red circle: (..."
            start = max(end, text.rfind("\n", 0, m.start()) + 1)
            label = text[start : m.start()].strip().rstrip(":,").strip()
        end = m.end()
        x1, y1, x2, y2 = (min(max(float(g), 0.0), SCALE) for g in m.groups()[1:])
        out.append(("box", label.strip(), [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], None))
    return out


def find_marks(text: str, sizes: list[tuple[int, int]]) -> list[Mark]:
    """The marks of ``text`` in pixels of the pictures of ``sizes`` ((width, height) each, in the
    order they were given); a mark naming a picture that is not there is skipped."""
    if not sizes:
        return []
    marks = []
    for kind, label, coords, pic in relative_marks(text):
        index = len(sizes) - 1 if pic is None else pic - 1
        if index >= len(sizes):
            continue
        w, h = sizes[index]
        scaled = tuple(c * (w if k % 2 == 0 else h) / SCALE for k, c in enumerate(coords))
        marks.append(Mark(kind, label, scaled, index))
    return marks


def draw_marks(picture: Any, marks: list[Mark]) -> Any:
    """A copy of ``picture`` (a PIL image) with its marks drawn and labelled."""
    from PIL import ImageDraw

    out = picture.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 200))
    colours = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]
    for k, m in enumerate(marks):
        colour = colours[k % len(colours)]
        if m.kind == "box":
            draw.rectangle(m.coords, outline=colour, width=width)
            anchor = (m.coords[0] + width, m.coords[1] + width)
        else:
            x, y = m.coords
            r = 3 * width
            draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=width)
            anchor = (x + r, y + r)
        if m.label:
            box = draw.textbbox(anchor, m.label)
            draw.rectangle(box, fill=colour)
            draw.text(anchor, m.label, fill="white")
    return out


def save_marked(text: str, pictures: list[Any], out: Any) -> tuple[list[Any], list[Mark]]:
    """Each picture the answer marks (the last one if it marks none), drawn to ``out`` (a Path);
    several pictures go to ``out`` with ``-2``, ``-3``... before the suffix, by picture number."""
    marks = find_marks(text, [p.size for p in pictures])
    marked = sorted({m.picture for m in marks}) or [len(pictures) - 1]
    paths = []
    for k in marked:
        path = out if len(marked) == 1 else out.with_name(f"{out.stem}-{k + 1}{out.suffix}")
        draw_marks(pictures[k], [m for m in marks if m.picture == k]).save(path)
        paths.append(path)
    return paths, marks
