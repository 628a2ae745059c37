"""Showing a benchmark: the terminal tables and the latency and throughput figure."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from mbexport.fsutil import atomic_file
from mbexport.terminal import Fitted


# (header, format) after the runner; two-line headers keep the table inside 80 columns. The last, "% of
# peak", only where some device has a known peak.
COLUMNS = (("batch\nx seq", "{}x{}"), ("p50\nms", "{:.2f}"), ("p90\nms", "{:.2f}"), ("p99\nms", "{:.2f}"),
           ("seq/s", "{:.1f}"), ("TFLOP/s", "{:.3g}"), ("% of\npeak", "{:.1f}"))


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
        for header, _ in columns:
            table.add_column(header, justify="right", no_wrap=True)
        lines = [Text(title)]
        for row in rows:
            latency = row["latency_ms"]
            figures = ((row["batch"], row["sequence"]), latency["p50"], latency["p90"], latency["p99"],
                       row["sequences_per_s"], row["tflops_per_s"], row["percent_of_peak"])
            cells = [spec.format(*value) if isinstance(value, tuple) else spec.format(value)
                     for (_, spec), value in zip(columns, figures)]
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
    """Write ``figure(report)`` as a PNG; False when matplotlib (the ``bench`` extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    drawn = figure(report)
    with atomic_file(path) as tmp:
        drawn.savefig(tmp, format="png", dpi=100)
    plt.close(drawn)
    return True


def figure(report: dict):
    """Per task, p50 latency and throughput side by side, each runner in one colour throughout.

    Against batch size when several were timed (a line per runner and sequence length), else against
    sequence length, else (one shape) as bars with their values. The title says what was measured and where;
    the legend sits below the panels, where it covers nothing."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in report["results"] if r["status"] == "ok"]
    tasks = report["settings"]["tasks"]
    runners = list(dict.fromkeys(_runner(r) for r in rows))
    colours = {runner: plt.get_cmap("tab10")(i % 10) for i, runner in enumerate(runners)}
    batches, sequences = sorted({r["batch"] for r in rows}), sorted({r["sequence"] for r in rows})
    across = "batch" if len(batches) > 1 else "sequence" if len(sequences) > 1 else None
    dashes = {sequence: STYLES[i % len(STYLES)] if across == "batch" else "-" for i, sequence in enumerate(sequences)}
    drawn, axes = plt.subplots(len(tasks), 2, figsize=(11, 1.6 + 3.4 * len(tasks)), squeeze=False,
                               layout="constrained")
    for (latency_axis, throughput_axis), task in zip(axes, tasks):
        mine = [r for r in rows if r["task"] == task]
        for axis, (what, unit, value) in zip((latency_axis, throughput_axis), FIGURES):
            if across is None:
                _bars(axis, mine, colours, value)
                axis.set_xlabel(f"{what} ({unit})")
            else:
                _lines(axis, mine, colours, dashes, value, across)
                axis.set_ylabel(f"{what} ({unit})")
            axis.set_title(f"{task}: {what}", fontsize="medium")
    if across is not None and rows:
        handles = [Line2D([], [], color=colours[runner], marker="o", label=runner) for runner in runners]
        if across == "batch" and len(sequences) > 1:  # line styles tell sequence lengths apart
            handles += [Line2D([], [], color="grey", linestyle=dashes[sequence], label=f"{sequence} tokens")
                        for sequence in sequences]
        drawn.legend(handles=handles, loc="outside lower center", ncols=min(5, len(handles)), fontsize="small",
                     frameon=False)
    drawn.suptitle(_title(report, batches, sequences, across), fontsize="medium")
    return drawn


FIGURES = (("p50 latency", "ms", lambda r: r["latency_ms"]["p50"]),
           ("throughput", "sequences/s", lambda r: r["sequences_per_s"]))
RUNTIMES = ("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt")  # whose versions the title names
STYLES = ("-", "--", ":", "-.")  # one per sequence length, when lines run across batch sizes


def _title(report: dict, batches: list[int], sequences: list[int], across: str | None) -> str:
    """What ran where: the model, the device, the timing protocol, the versions and the date."""
    config, settings, device, versions = report["config"], report["settings"], report["device"], report["versions"]
    where = device["gpu"] or f"{device['cpu']} ({device['cpu_count']} CPU threads)"
    shape = (f"sequences of {', '.join(map(str, sequences))} tokens" if across == "batch" else
             f"batch {batches[0]}" if across == "sequence" else
             f"batch {batches[0]} x {sequences[0]} tokens" if batches else "nothing ran")
    libraries = ", ".join(f"{name} {versions[name]}" for name in RUNTIMES if name in versions)
    return (f"mbexport bench: Megatron-BERT (hidden {config['hidden_size']}, {config['num_hidden_layers']} layers) "
            f"on {where}\np50 of {settings['iters']} timed runs after {settings['warmup']} warm-up runs, {shape}; "
            f"{libraries}; {report['created'][:10]}")


def _lines(axis, rows: list[dict], colours: dict, dashes: dict, value, across: str) -> None:
    """One line per runner (and sequence length, when lines run across batch sizes), with its points."""
    from matplotlib.ticker import LogLocator, NullFormatter, NullLocator

    lines: dict[tuple, list[dict]] = {}
    for row in rows:
        lines.setdefault((_runner(row), row["sequence"] if across == "batch" else row["batch"]), []).append(row)
    for (runner, sequence), points in lines.items():
        points.sort(key=lambda r: r[across])
        axis.plot([r[across] for r in points], [value(r) for r in points], marker="o", color=colours[runner],
                  linestyle=dashes.get(sequence, "-"))
    ticks = sorted({r[across] for r in rows})
    axis.set_xscale("log", base=2)
    axis.xaxis.set_minor_locator(NullLocator())
    axis.set_xticks(ticks, labels=[str(t) for t in ticks])
    axis.set_xlabel("batch size (sequences)" if across == "batch" else "sequence length (tokens)")
    values = [value(r) for r in rows]
    if values and max(values) > 20 * min(values):  # runners orders of magnitude apart: a log axis, 1-2-5 ticks
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.yaxis.set_major_formatter(lambda y, _: f"{y:g}")
        axis.yaxis.set_minor_formatter(NullFormatter())
    else:
        axis.set_ylim(bottom=0)
    axis.grid(True, alpha=0.3)


def _bars(axis, rows: list[dict], colours: dict, value) -> None:
    """One shape timed: a bar per runner, labelled with its value (a column of dots says nothing)."""
    names = [_runner(r) for r in rows]
    values = [value(r) for r in rows]
    bars = axis.barh(names, values, color=[colours[n] for n in names])
    axis.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.2f}" for v in values], padding=3,
                   fontsize="small")
    axis.invert_yaxis()  # first runner on top, as in the table
    axis.set_xlim(0, 1.2 * max(values, default=1))  # room for the labels
    axis.grid(True, axis="x", alpha=0.3)
