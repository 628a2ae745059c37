"""What "agrees with the reference" means, per precision: the numbers behind every pass and fail.

Three kinds of check per output: ``finite`` (no NaN/Inf anywhere, the all-padding row included),
``elementwise`` (every |candidate - reference| <= atol + rtol * |reference|) and ``cosine`` (of each feed's
whole output), plus the task's ``Agreement`` entries from the registry (same argmax / top-k / per-row
cosine), judged at real tokens only: padded positions and all-padding rows have no answer to agree on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mbexport.errors import MbexportError
from mbexport.precisions import get_precision
from mbexport.tasks import Agreement, Task

KEYS = ("atol", "rtol", "cosine", "agreement")


def tolerances_for(precision: str, kind: str = "onnx", overrides: dict | None = None) -> dict[str, float | None]:
    """The precision registry's defaults for ``precision`` (an engine's own where it has them), then overrides:
    ``{"atol": x}`` for all, ``{"fp16.atol": x}`` for one precision, ``{"engine:fp32.atol": x}`` for its engines."""
    entry = get_precision(precision)
    result = dict(entry.engine_tolerances if kind == "engine" and entry.engine_tolerances else entry.tolerances)
    for key, value in (overrides or {}).items():
        scope, _, name = key.rpartition(".")
        if name not in KEYS:
            raise MbexportError(f"unknown tolerance '{key}' (known: {', '.join(KEYS)}, optionally as precision.key)")
        if scope in ("", entry.name, f"{kind}:{entry.name}"):
            result[name] = float(value)
    return result


@dataclass
class Check:
    output: str
    check: str  # integrity | run | present | shape | finite | elementwise | cosine | argmax | top5 | row-cosine
    passed: bool
    numbers: dict = field(default_factory=dict)  # max_abs_diff, mean_abs_diff, cosine, agreement, limit, ...

    @property
    def label(self) -> str:
        return self.check if self.output == "-" else f"{self.output} {self.check}"

    def as_dict(self) -> dict:
        return {"output": self.output, "check": self.check, "passed": self.passed, **self.numbers}

    @classmethod
    def from_dict(cls, data: dict) -> "Check":
        numbers = {k: v for k, v in data.items() if k not in ("output", "check", "passed")}
        return cls(data["output"], data["check"], data["passed"], numbers)


def compare(task: Task, feeds: list[dict], reference: list[dict], candidate: list[dict], tol: dict) -> list[Check]:
    """All checks of one artifact's outputs against the reference's, over every feed."""
    checks = []
    for spec in task.outputs:
        name = spec.name
        if any(name not in c for c in candidate):
            checks.append(Check(name, "present", False, {"problem": f"no output named {name}"}))
            continue
        ref = [r[name].astype(np.float64) for r in reference]
        got = [c[name].astype(np.float64) for c in candidate]
        if any(g.shape != r.shape for g, r in zip(got, ref)):
            shapes = next((g.shape, r.shape) for g, r in zip(got, ref) if g.shape != r.shape)
            checks.append(Check(name, "shape", False, {"got": list(shapes[0]), "expected": list(shapes[1])}))
            continue
        finite = all(np.isfinite(g).all() for g in got)
        checks.append(Check(name, "finite", finite, {"non_finite": int(sum((~np.isfinite(g)).sum() for g in got))}))
        if not finite:
            continue
        diff = np.concatenate([np.abs(g - r).ravel() for g, r in zip(got, ref)])
        gated = tol["atol"] is not None
        rtol = tol["rtol"] or 0.0
        excess = np.concatenate([(np.abs(g - r) - rtol * np.abs(r)).ravel() for g, r in zip(got, ref)])
        checks.append(Check(name, "elementwise", not gated or bool(excess.max() <= tol["atol"]), {
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "atol": tol["atol"], "rtol": tol["rtol"]}))
        cosine = min(_cosine(g.ravel(), r.ravel()) for g, r in zip(got, ref))
        checks.append(Check(name, "cosine", cosine >= tol["cosine"], {"cosine": cosine, "limit": tol["cosine"]}))
    for agreement in task.agreement:
        if all(c.passed for c in checks if c.output == agreement.output and c.check in ("present", "shape", "finite")):
            checks.append(_agreement(task, agreement, feeds, reference, candidate, tol))
    return checks


def _agreement(task: Task, agreement: Agreement, feeds, reference, candidate, tol) -> Check:
    spec = next(s for s in task.outputs if s.name == agreement.output)
    scores = []
    for feed, ref, got in zip(feeds, reference, candidate):
        r, g = (_answers(spec.dims, feed["attention_mask"], out[spec.name]) for out in (ref, got))
        scores.append(_score(agreement, r, g))
    values = np.concatenate(scores)
    kind = "cosine" if agreement.kind == "cosine" else "agreement"
    value = float(values.min() if kind == "cosine" else values.mean())
    limit = tol[kind]
    name = {"argmax": "argmax", "topk": f"top{agreement.k}", "cosine": "row-cosine"}[agreement.kind]
    return Check(agreement.output, name, value >= limit, {kind: value, "limit": limit, "count": int(values.size)})


def _answers(dims: tuple[str, ...], attention_mask: np.ndarray, output: np.ndarray) -> np.ndarray:
    """[items, candidates]: one row per real token ([b, s, x] outputs) or per row that is not all padding.

    For [batch, sequence] outputs (QA span logits) the candidates are positions: padded ones are excluded.
    """
    mask = attention_mask.astype(bool)
    rows = mask.reshape(mask.shape[0], -1).any(axis=1)
    if dims[:2] == ("batch", "sequence") and len(dims) == 3:
        return output[mask]
    if dims == ("batch", "sequence"):
        return np.where(mask, output, -np.inf)[rows]
    return output[rows]


def _score(agreement: Agreement, ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per item: 1/0 for argmax and top-k (the reference's top-1 among the candidate's top k), or the cosine."""
    if agreement.kind == "cosine":
        return np.array([_cosine(g, r) for g, r in zip(got, ref)])
    best = ref.argmax(axis=-1)
    if agreement.kind == "argmax":
        return (got.argmax(axis=-1) == best).astype(float)
    k = min(agreement.k, got.shape[-1])
    top = np.argpartition(-got, k - 1, axis=-1)[:, :k]
    return (top == best[:, None]).any(axis=1).astype(float)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))
