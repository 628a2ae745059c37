"""Showing a benchmark: the terminal tables and the latency/throughput-against-batch plot."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from mbexport.fsutil import atomic_file
from mbexport.terminal import Fitted


# (header, the figure's label in a line, its format); "% of peak" only where some device has a known peak
COLUMNS = (("batch\nx seq", "", "{}x{}"), ("p50\nms", "p50", "{:.2f}"), ("p90\nms", "p90", "{:.2f}"),
           ("p99\nms", "p99", "{:.2f}"), ("seq/s", "", "{:.1f}"), ("TFLOP/s", "", "{:.3g}"),
           ("% of\npeak", "", "{:.1f}"))


def summary(report: dict) -> Group:
    """One table per task (a row per measurement; lines where the terminal is too narrow for it), then one
    line per backend that was skipped or failed, and why, naming the tasks it concerns."""
    device = report["device"]["gpu"] or report["device"]["cpu"]
    parts = []
    for task in report["settings"]["tasks"]:
        rows = [row for row in report["results"] if row["task"] == task and row["status"] == "ok"]
        columns = COLUMNS if any(row["percent_of_peak"] is not None for row in rows) else COLUMNS[:-1]
        title = f"{task} on {device}, latency p50/p90/p99 of {report['settings']['iters']} runs"
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("runner", no_wrap=True)
        for header, _, _ in columns:
            table.add_column(header, justify="right", no_wrap=True)
        lines = [Text(title)]
        for row in rows:
            latency = row["latency_ms"]
            figures = ((row["batch"], row["sequence"]), latency["p50"], latency["p90"], latency["p99"],
                       row["sequences_per_s"], row["tflops_per_s"], row["percent_of_peak"])
            cells = [spec.format(*value) if isinstance(value, tuple) else spec.format(value)
                     for (_, _, spec), value in zip(columns, figures)]
            table.add_row(_runner(row), *cells)
            lines.append(Text(f"  {_runner(row)} {cells[0]}: p50 {cells[1]} ms (p90 {cells[2]}, p99 {cells[3]}), "
                              f"{cells[4]} seq/s, {cells[5]} TFLOP/s"
                              + (f", {cells[6]}% of peak" if len(cells) > 6 else "")))
        parts.append(Fitted(table, Group(*lines)))
    problems: dict[tuple, list[str]] = {}
    for row in report["results"]:
        if row["status"] != "ok":
            shape = f" {row['batch']}x{row['sequence']}" if "batch" in row else ""
            problems.setdefault((row["status"], f"{_runner(row)}{shape}", row["reason"]), []).append(row["task"])
    for (status, what, reason), tasks in problems.items():
        colour = "yellow" if status == "skipped" else "red"
        parts.append(Text.assemble((status, colour), f" {what} ({', '.join(tasks)}): {reason}"))
    return Group(*parts)


def _runner(row: dict) -> str:
    """``ort-cuda fp16``: the backend and the precision (the artifact is ``TASK/model.PRECISION.onnx|plan``)."""
    return f"{row['backend']} {row['precision']}" if "precision" in row else row["backend"]


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
