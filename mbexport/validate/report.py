"""Validation results: per artifact, per check, with the numbers; as JSON, Markdown and a terminal table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mbexport.fsutil import write_json_atomic, write_text_atomic
from mbexport.validate.checks import Check


@dataclass
class ArtifactResult:
    task: str
    precision: str
    kind: str
    path: str
    sha256: str
    tolerances: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    skipped: str | None = None  # why it was not run (e.g. no TensorRT here); not a failure
    inputs: list[dict] = field(default_factory=list)  # the feeds' shapes, after fitting engine profiles

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else ("pass" if self.passed else "FAIL")

    def as_dict(self) -> dict:
        return {"task": self.task, "precision": self.precision, "kind": self.kind, "path": self.path,
                "sha256": self.sha256, "status": self.status, "skipped": self.skipped,
                "tolerances": self.tolerances, "inputs": self.inputs, "checks": [c.as_dict() for c in self.checks]}

    @classmethod
    def from_dict(cls, data: dict) -> "ArtifactResult":
        return cls(data["task"], data["precision"], data["kind"], data["path"], data["sha256"], data["tolerances"],
                   [Check.from_dict(c) for c in data["checks"]], data["skipped"], data["inputs"])


@dataclass
class Report:
    root: Path
    device: str
    shapes: list[dict]  # the nominal feeds; each artifact lists the shapes it really ran
    artifacts: list[ArtifactResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(a.passed for a in self.artifacts)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "device": self.device, "inputs": self.shapes,
                "artifacts": [a.as_dict() for a in self.artifacts]}

    def save(self) -> None:
        write_json_atomic(self.root / "validation.json", self.as_dict())
        write_text_atomic(self.root / "validation.md", self.markdown())

    def rows(self) -> list[list[str]]:
        """One row per check: artifact, check, value, limit, status."""
        rows = []
        for a in self.artifacts:
            if a.skipped:
                rows.append([a.path, "-", "-", "-", f"skipped: {a.skipped}"])
            for c in a.checks:
                rows.append([a.path, c.label, _value(c), _limit(c), "pass" if c.passed else "FAIL"])
        return rows

    def markdown(self) -> str:
        lines = [f"# Validation: {'PASSED' if self.passed else 'FAILED'}", "",
                 f"Compared with the PyTorch fp32 reference on {self.device}, inputs (batch x sequence): "
                 + ", ".join(f"{s['batch']}x{s['sequence']}" + (" with an all-padding row" if s["all_padding_row"]
                                                                 else "") for s in self.shapes) + ".", ""]
        lines += ["Tolerances per artifact: elementwise |a - b| <= atol + rtol |b|; cosine of each output; "
                  "agreement = fraction of real tokens/rows with the reference's answer.", ""]
        for a in self.artifacts:
            tol = ", ".join(f"{k} {'reported only' if v is None else f'{v:g}'}" for k, v in a.tolerances.items())
            lines.append(f"- `{a.path}` ({a.task}, {a.precision} {a.kind}): {a.status}" + (f"; {tol}" if tol else ""))
        lines += ["", "| artifact | check | value | limit | result |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        return "\n".join(lines) + "\n"

    def table(self):
        """For the terminal: under each head, one row per file (named inside the head's folder) with its worst
        numbers and what failed; as lines instead where the terminal is too narrow for that table."""
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        from mbexport.terminal import Fitted

        title = f"validation: {'passed' if self.passed else 'FAILED'}"
        table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("artifact", no_wrap=True)
        for header in ("max abs\ndiff", "min\ncosine", "min\nagreement"):
            table.add_column(header, justify="right", no_wrap=True)
        table.add_column("result")  # the one column that wraps: between words
        lines = [Text(title)]
        heads = {a.task: [r for r in self.artifacts if r.task == a.task] for a in self.artifacts}
        for task, results in heads.items():
            table.add_row(Text(task, style="bold"))
            lines.append(Text(task, style="bold"))
            for a in results:
                name = a.path.removeprefix(f"{task}/")
                numbers = _worst(a, "max_abs_diff", max), _worst(a, "cosine", min), _worst(a, "agreement", min)
                cells = ["" if n is None else spec.format(n) for n, spec in zip(numbers, NUMBER_FORMATS)]
                failed = [c.label for c in a.checks if not c.passed]
                result = f"skipped: {a.skipped}" if a.skipped else "FAIL: " + ", ".join(failed) if failed else "pass"
                style = "red" if failed else ("yellow" if a.skipped else None)
                table.add_row(f"  {name}", *cells, result, style=style)
                said = ", ".join(f"{label} {cell}" for label, cell in zip(NUMBER_LABELS, cells) if cell)
                lines.append(Text(f"  {name}: {result}" + (f" ({said})" if said else ""), style=style or ""))
        return Fitted(table, Group(*lines))


NUMBER_LABELS = ("max abs diff", "min cosine", "min agreement")  # the table's worst-case columns
NUMBER_FORMATS = ("{:.2e}", "{:.6f}", "{:.2%}")


def _worst(result: ArtifactResult, key: str, pick) -> float | None:
    return pick((c.numbers[key] for c in result.checks if key in c.numbers), default=None)


def _value(check: Check) -> str:
    n = check.numbers
    if "max_abs_diff" in n:
        return f"max {n['max_abs_diff']:.2e}, mean {n['mean_abs_diff']:.2e}"
    if "agreement" in n:
        return f"{100 * n['agreement']:.2f}% of {n['count']}"
    if "cosine" in n:
        return f"{n['cosine']:.6f}"
    if "non_finite" in n:
        return f"{n['non_finite']} NaN/Inf"
    return n.get("problem", "")


def _limit(check: Check) -> str:
    n = check.numbers
    if "atol" in n:
        return "reported only" if n["atol"] is None else f"atol {n['atol']:g} + rtol {n['rtol']:g}"
    if "limit" in n:
        return f">= {100 * n['limit']:g}%" if "agreement" in n else f">= {n['limit']:g}"
    return "0" if "non_finite" in n else ""
