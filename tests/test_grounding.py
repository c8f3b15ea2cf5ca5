"""Grounding answers to pixel marks, on recorded answers (tests/data/grounding_answers.json, which
the chat page's grounding.js is held to as well), and ``generate --boxes`` drawing them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen3vl_onnx.runtime.grounding import Mark, draw_marks, find_marks

CASES = json.loads((Path(__file__).parent / "data" / "grounding_answers.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["why"][:40] for c in CASES])
def test_recorded_answers(case):
    got = [m.to_dict() for m in find_marks(case["text"], [tuple(s) for s in case["sizes"]])]
    assert got == case["marks"], case["why"]


def test_marks_are_drawn_where_they_are():
    img = Image.new("RGB", (200, 100), "white")
    out = np.asarray(draw_marks(img, [Mark("box", "", (20.0, 10.0, 120.0, 60.0), 0), Mark("point", "", (170.0, 80.0), 0)]))
    assert (out[10, 20:120] != 255).any(axis=-1).all()  # the box's top edge
    assert (out[35, 24:116] == 255).all()  # nothing inside it (the lines are 2 px wide)
    assert (out[80, 160:180] != 255).any()  # the point's circle
    assert np.asarray(img).min() == 255  # the input is left as it was


def test_generate_draws_the_answers_boxes(run_cli, tiny_one, tmp_path):
    """generate --boxes OUT.png: the answer's marks on the picture it asked about (random weights
    answer no box: a logit bias writes one; the picture is saved all the same)."""
    from .conftest import picture

    picture(120, 90).save(tmp_path / "p.png")
    r = run_cli("generate", tiny_one.bundle, "--image", tmp_path / "p.png", "--prompt", "Where is it?", "--max-new-tokens", "4",
                "--temperature", "0", "--boxes", tmp_path / "out.png")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "out.png").size == (120, 90) and "boxes: 0 marks" in r.stderr
    one_line = run_cli("generate", tiny_one.bundle, "--prompt", "x", "--boxes", tmp_path / "o.png")
    assert one_line.returncode == 2 and "--boxes needs a picture (--image)" in one_line.stderr


def test_marks_go_to_the_picture_they_name(tmp_path):
    from qwen3vl_onnx.runtime.grounding import save_marked

    pics = [Image.new("RGB", (100, 100), "white"), Image.new("RGB", (50, 50), "white")]
    answer = '[{"bbox_2d": [100, 100, 900, 900], "label": "a", "picture": 1}, {"point_2d": [500, 500], "label": "b"}]'
    paths, marks = save_marked(answer, pics, tmp_path / "out.png")
    assert [p.name for p in paths] == ["out-1.png", "out-2.png"] and len(marks) == 2
    first = np.asarray(Image.open(paths[0]))
    assert (first[10, 10:90] != 255).any(axis=-1).all()  # the box, at 10% of 100 px
    paths, marks = save_marked("no boxes here", pics, tmp_path / "plain.png")
    assert [p.name for p in paths] == ["plain.png"] and marks == [] and Image.open(paths[0]).size == (50, 50)
