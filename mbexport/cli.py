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


# ---- build / recipes (helper-4) --------------------------------------------------------------------------------
@app.command("build")
def build_command(
    src: str = typer.Argument(..., help="Checkpoint: NGC zip, Megatron folder or .pt, torch_dist folder, HF folder."),
    recipe: str | None = typer.Option(None, "--recipe", help="Recipe file or shipped name (see `mbexport recipes`); "
                                                             "the flags below override its fields."),
    task: str | None = typer.Option(None, "--task", help="Head: qa, mlm, seq-cls, ... (required without --recipe)."),
    precision: str | None = typer.Option(None, "--precision", help="fp16, int8, fp8 or fp32 (default fp16)."),
    target: str | None = typer.Option(None, "--target", help="engine (TensorRT) or onnx; default engine when "
                                                             "TensorRT is importable, else onnx."),
    out: str | None = typer.Option(None, "--out", help="Output folder (default artifacts/<checkpoint name>)."),
    calib_text: str | None = typer.Option(None, "--calib-text", help="int8/fp8 calibration text, one example a line."),
    calib_size: int | None = typer.Option(None, "--calib-size", help="Calibration examples (default 64)."),
    calib_method: str | None = typer.Option(None, "--calib-method", help="max or entropy (default max)."),
    vocab: str | None = typer.Option(None, "--vocab", help="WordPiece vocab.txt: copied to the output, tokenizes "
                                                           "--calib-text."),
    init_missing_head: int | None = typer.Option(None, "--init-missing-head", help="Seed for a head the checkpoint "
                                                                                   "lacks (random weights)."),
    device: str = typer.Option("cpu", "--device", help="Validation device: cpu, cuda or auto."),
):
    """Checkpoint to validated artifacts: ONNX export, fp16/int8/fp8, TensorRT engine; unchanged stages are cached."""
    from pathlib import Path

    from mbexport.errors import MbexportError
    from mbexport.pipeline import build
    from mbexport.recipes import Recipe, load_recipe

    if recipe is not None:
        base = load_recipe(recipe)
    elif task is not None:
        base = Recipe(name="command line", task=task, precision=precision or "fp16")
    else:
        raise MbexportError("give --task (and --precision), or --recipe")
    plan = base.override(task=task, precision=precision, target=target, out=out,
                         calib_text=Path(calib_text) if calib_text else None, calib_size=calib_size,
                         calib_method=calib_method)
    result = build(src, plan, vocab=vocab, init_missing_head=init_missing_head, device=device,
                   log=lambda line: err_console.print(line, highlight=False, markup=False))
    console.print(f"{result.out_dir}: {plan.task} {plan.precision} ({result.target}); "
                  f"{len(result.built) or 'no'} stage(s) rebuilt; report in {result.out_dir / 'validation.md'}",
                  highlight=False, soft_wrap=True)


@app.command("recipes")
def recipes_command():
    """List the shipped build recipes."""
    from rich.table import Table

    from mbexport.recipes import load_recipe, shipped_recipes

    table = Table("name", "task", "precision", "description")
    for path in shipped_recipes():
        recipe = load_recipe(path)
        table.add_row(recipe.name, recipe.task, recipe.precision, recipe.description)
    console.print(table)
# ---- end build / recipes ---------------------------------------------------------------------------------------
