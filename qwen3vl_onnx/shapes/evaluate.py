"""``qwen3vl-onnx eval BUNDLE``: accuracy of a bundle on the held-out shapes questions, per type."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..runtime.pipeline import Pipeline
from . import task


@dataclass
class EvalReport:
    per_kind: dict[str, list[bool]] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)

    def accuracy(self) -> dict[str, float]:
        acc = {k: sum(v) / len(v) for k, v in sorted(self.per_kind.items())}
        allv = [x for v in self.per_kind.values() for x in v]
        acc["overall"] = sum(allv) / max(len(allv), 1)
        return acc

    def table(self) -> str:
        rows = ["| type | items | accuracy |", "|---|---|---|"]
        for k, v in sorted(self.per_kind.items()):
            rows.append(f"| {k} | {len(v)} | {100 * sum(v) / len(v):.1f}% |")
        n = sum(len(v) for v in self.per_kind.values())
        rows.append(f"| overall | {n} | {100 * self.accuracy()['overall']:.1f}% |")
        return "\n".join(rows)


def normalize(text: str) -> str:
    return text.strip().strip(".").lower()


def evaluate(pipe: Pipeline, n: int = 200, seed: int = task.EVAL_SEED) -> EvalReport:
    rep = EvalReport()
    for it in task.eval_items(n, seed):
        res = pipe.generate(task.messages(it), max_new_tokens=4, temperature=0.0)
        rep.answers.append(res.text)
        rep.per_kind.setdefault(it.kind, []).append(normalize(res.text) == it.answer)
    return rep
