"""Showing a benchmark: the terminal tables and the latency/throughput-against-batch plot."""

from __future__ import annotations

from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from mbexport.fsutil import atomic_file


def summary(report: dict) -> Group:
    """One table per task (a row per measurement), then a line per skipped or failed backend and why."""
    device = report["device"]["gpu"] or report["device"]["cpu"]
    parts = []
    for task in report["settings"]["tasks"]:
        out = Table(title=f"{task} on {device}, p50/p90/p99 of {report['settings']['iters']} runs",
                    title_justify="left")
        out.add_column("runner", no_wrap=True)
        for column in ("b x s", "p50 ms", "p90 ms", "p99 ms", "seq/s", "TFLOP/s", "% peak"):
            out.add_column(column, justify="right")
        for row in report["results"]:
            if row["task"] == task and row["status"] == "ok":
                latency, peak = row["latency_ms"], row["percent_of_peak"]
                out.add_row(_runner(row), f"{row['batch']} x {row['sequence']}",
                            f"{latency['p50']:.2f}", f"{latency['p90']:.2f}", f"{latency['p99']:.2f}",
                            f"{row['sequences_per_s']:.1f}", f"{row['tflops_per_s']:.3g}",
                            "-" if peak is None else f"{peak:.1f}")
        parts.append(out)
    for row in report["results"]:
        if row["status"] != "ok":
            colour = "yellow" if row["status"] == "skipped" else "red"
            shape = f" {row['batch']} x {row['sequence']}" if "batch" in row else ""
            what = f"{row['task']} {_runner(row)}{shape}"
            parts.append(Text.from_markup(f"[{colour}]{row['status']}[/{colour}] {what}: ") + Text(row["reason"]))
    return Group(*parts)


def _runner(row: dict) -> str:
    """``ort-cuda fp16``, ``ort-cpu int8-ort``: the backend and the precision, marked with the runtime the file is
    shaped for unless that is the default (the artifact is ``TASK/model.PRECISION[.TAG].onnx|plan``)."""
    return f"{row['backend']} {row.get('label', row['precision'])}" if "precision" in row else row["backend"]


def plot(report: dict, path: str | Path) -> bool:
    """Write a PNG of p50 latency and throughput against batch size, one line per backend, artifact and
    sequence length; False when matplotlib (the ``bench`` extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: no display on servers and CI
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter
    except ImportError:
        return False
    rows = [r for r in report["results"] if r["status"] == "ok"]
    tasks = report["settings"]["tasks"]
    figure, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.5 * len(tasks)), squeeze=False)
    for (latency_axis, throughput_axis), task in zip(axes, tasks):
        lines: dict[tuple, list[dict]] = {}
        for row in rows:
            if row["task"] == task:
                lines.setdefault((row["backend"], row["precision"], row["sequence"]), []).append(row)
        for (_, _, sequence), points in lines.items():
            points.sort(key=lambda r: r["batch"])
            batches = [r["batch"] for r in points]
            label = f"{_runner(points[0])} s{sequence}"
            latency_axis.plot(batches, [r["latency_ms"]["p50"] for r in points], marker="o", label=label)
            throughput_axis.plot(batches, [r["sequences_per_s"] for r in points], marker="o", label=label)
        batches = sorted({r["batch"] for r in rows if r["task"] == task})
        for axis, ylabel in ((latency_axis, "p50 latency (ms)"), (throughput_axis, "sequences / s")):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")  # backends differ by orders of magnitude
            for ticks in (axis.yaxis.set_major_formatter, axis.yaxis.set_minor_formatter):
                ticks(FormatStrFormatter("%g"))
            axis.set_xticks(batches, labels=[str(b) for b in batches])
            axis.set_xlabel("batch size")
            axis.set_ylabel(ylabel)
            axis.set_title(task)
            axis.grid(True, alpha=0.3)
        if lines:
            throughput_axis.legend(fontsize="small")
    figure.suptitle(f"{report['device']['gpu'] or report['device']['cpu']}")
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return True
