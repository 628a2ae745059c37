"""The ``mbexport`` command line: a thin layer over the pipeline stages.

Each command parses its options, calls one stage function and prints the result. Errors the user can act
on (``MbexportError``) become one line on stderr and a non-zero exit code; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys

import click
import typer
from rich.console import Console

from mbexport.errors import MbexportError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Megatron-BERT checkpoints to validated ONNX, TensorRT and Triton artifacts.")
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")):
    _state["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        exit_code = app(args=argv, standalone_mode=False)  # commands end with typer.Exit(code) or None
    except MbexportError as error:
        if _state["debug"]:
            raise
        err_console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except click.ClickException as error:  # usage errors
        error.show()
        sys.exit(error.exit_code)
    except click.Abort:
        sys.exit(130)
    sys.exit(exit_code if isinstance(exit_code, int) else 0)


# Commands are registered below, one block per pipeline stage.


# ---- bench ---------------------------------------------------------------------------------------------------
def _int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise MbexportError(f"{option} takes comma-separated integers such as 1,8,32, got '{text}'") from None


@app.command()
def bench(
    artifacts: str = typer.Argument(..., help="An mbexport output folder (with manifest.json)."),
    task: str | None = typer.Option(None, "--task", help="Only this task's artifacts (default: every task)."),
    backends: str = typer.Option("torch,ort-cpu,ort-cuda,trt", "--backends",
                                 help="Comma-separated: torch, ort-cpu, ort-cuda, trt. Unavailable ones are "
                                      "reported as skipped."),
    batch: str | None = typer.Option(None, "--batch", help="Batch sizes, e.g. 1,8,32 (default 1,8,32 on a GPU, "
                                                           "1 on a CPU)."),
    seq: str | None = typer.Option(None, "--seq", help="Sequence lengths, e.g. 128,384 (default 128,384 on a "
                                                       "GPU, 128 on a CPU)."),
    warmup: int | None = typer.Option(None, "--warmup", help="Untimed runs per shape (default 10 GPU, 2 CPU)."),
    iters: int | None = typer.Option(None, "--iters", help="Timed runs per shape (default 100 GPU, 10 CPU)."),
):
    """Time every artifact: p50/p90/p99 latency, sequences/s, TFLOP/s; writes bench.json and bench.png."""
    from mbexport.bench import bench as run_bench, summary

    report = run_bench(artifacts, task=task, backends=tuple(b.strip() for b in backends.split(",") if b.strip()),
                       batches=_int_list(batch, "--batch"), sequences=_int_list(seq, "--seq"), warmup=warmup,
                       iters=iters)
    console.print(summary(report))
    plot = f" and {report['plot']}" if report["plot"] else " (no plot: pip install 'mbexport[bench]')"
    console.print(f"wrote bench.json{plot} in {artifacts}", highlight=False)
    if any(row["status"] == "failed" for row in report["results"]):
        raise typer.Exit(1)
# ---- end bench -----------------------------------------------------------------------------------------------
