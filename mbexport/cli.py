"""The ``mbexport`` command line: a thin layer over the pipeline stages.

Each command parses its options, calls one stage function and prints the result. Errors the user can act
on (``MbexportError``) become one line on stderr and a non-zero exit code; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import typer

from mbexport import terminal
from mbexport.errors import MbexportError, own_warning
from mbexport.fsutil import OVERWRITE_FLAG
from mbexport.precisions import DEFAULT_RUNTIME, EXPORTED, NAMES, OPSET, PRECISIONS, RUNTIMES, made_by

# rich_markup_mode=None: help text prints literally, like every other message (terminal.py)
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Megatron-BERT checkpoints to validated ONNX, TensorRT and Triton artifacts.")
console, err_console = terminal.out, terminal.err
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")):
    _state["debug"] = debug


def _overwrite_option(what: str = "folder"):
    """The one flag every command that writes a folder takes (fsutil.check_output is the rule it lifts)."""
    return typer.Option(False, OVERWRITE_FLAG, help=f"Replace the output {what} when it is neither new, empty nor "
                                                    "mbexport's own (never an input).")


@contextlib.contextmanager
def _warnings_as_lines():
    """mbexport's own warnings (a seeded head, no calibration text) as one plain ``warning:`` line each on
    stderr; libraries' warnings (torch's pickle protocol, ONNX exporter notes) stay off the terminal unless
    --debug."""
    def show(message, category, filename, lineno, file=None, line=None):
        if own_warning(filename) or _state["debug"]:
            terminal.line(f"warning: {message}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. Usage errors, --help and typer.Exit are handled by click itself.

    Bad input (MbexportError) and what the file system refuses (OSError: a read-only folder, a full disk)
    end as one ``error:`` line naming the file, and exit code 2."""
    with _warnings_as_lines():
        try:
            app(args=argv, standalone_mode=True)
        except (MbexportError, OSError) as error:
            if _state["debug"]:
                raise
            terminal.error(str(error) if isinstance(error, MbexportError) else _os_error(error))
            sys.exit(getattr(error, "exit_code", 2))


def _os_error(error: OSError) -> str:
    """An OSError outside the writers (which name their own): a file that cannot be read, say."""
    what = (error.strerror or str(error)).rstrip(".")
    return f"{error.filename}: {what[:1].lower()}{what[1:]}" if error.filename else what


# ---- convert / inspect -----------------------------------------------------------------------------------------------
@app.command("convert")
def convert_command(
    src: str = typer.Argument(..., help="Checkpoint: NGC zip, Megatron folder or .pt, torch_dist folder, HF folder."),
    out: str = typer.Option(..., "--out", help="Output Hugging Face folder (written atomically)."),
    vocab: str | None = typer.Option(None, "--vocab", help="BERT WordPiece vocab.txt to add tokenizer files "
                                                           "(default: the checkpoint's own, if it has one)."),
    lowercase: bool = typer.Option(True, "--lowercase/--no-lowercase", help="Tokenizer lowercasing (uncased models)."),
    num_heads: int | None = typer.Option(None, "--num-heads", help="Attention heads when args are missing "
                                                                   "(default hidden/64)."),
    overwrite: bool = _overwrite_option(),
):
    """Convert a checkpoint to a Hugging Face MegatronBert folder (config.json, model.safetensors, tokenizer)."""
    from mbexport.checkpoint import load_checkpoint, save_hf_folder
    from mbexport.checkpoint.vocab import resolved_vocab
    from mbexport.fsutil import check_output

    check_output(out, overwrite=overwrite, sources=(src, vocab))  # before the (slow) read
    with resolved_vocab(src, vocab, terminal.line) as vocab:
        ckpt = load_checkpoint(src, num_attention_heads=num_heads, lazy=True)  # written one tensor at a time
        folder = save_hf_folder(ckpt, out, vocab=vocab, lowercase=lowercase, overwrite=overwrite)
    terminal.line(f"{ckpt.format} checkpoint -> {folder} ({ckpt.num_parameters:,} parameters, heads: "
                  f"{', '.join(ckpt.heads)})")


@app.command("inspect")
def inspect_command(
    src: str = typer.Argument(..., help="Checkpoint to describe (any format convert reads)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    num_heads: int | None = typer.Option(None, "--num-heads", help="Attention heads when args are missing."),
):
    """Describe a checkpoint: format, version, TP/PP, architecture, parameters, vocab, heads, dtype, epsilon."""
    import json

    from rich.table import Table

    from mbexport.checkpoint import load_checkpoint
    from mbexport.checkpoint.vocab import bundled_vocab

    ckpt = load_checkpoint(src, num_attention_heads=num_heads, lazy=True)  # only shapes and dtypes are read
    c, info = ckpt.config, ckpt.info
    vocab_file = bundled_vocab(src)
    report = {
        "path": str(ckpt.path), "format": ckpt.format, "megatron_ckpt_format": info.get("ckpt_format"),
        "args_source": info.get("args_source"), "integrity": info.get("integrity"),
        "checkpoint_version": info.get("checkpoint_version"),
        "tensor_parallel": info.get("tensor_parallel"), "pipeline_parallel": info.get("pipeline_parallel"),
        "iteration": info.get("iteration"),
        "architecture": {"hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
                         "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
                         "max_position_embeddings": c.max_position_embeddings, "type_vocab_size": c.type_vocab_size},
        "num_attention_heads_source": info.get("num_attention_heads_source", "config"),
        "parameters": ckpt.num_parameters,
        "vocab": {"padded": info["padded_vocab_size"], "real": info.get("real_vocab_size")},
        "heads": list(ckpt.heads), "dtype": info["dtype"],
        "layer_norm_eps": c.layer_norm_eps, "layer_norm_eps_source": info["layer_norm_eps_source"],
        "vocab_file": str(vocab_file) if vocab_file else None,
        "fp8_scaling_ignored": info.get("fp8_scaling_ignored", False),
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title=str(ckpt.path), show_header=False)
    for key, value in report.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={'unknown' if v is None else v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(value)
        shown = "yes" if value is True else "no" if value is False else "-" if value is None else value
        table.add_row(key, f"{shown:,}" if isinstance(shown, int) else str(shown))
    console.print(table)


@app.command("example")
def example_command(
    out: str = typer.Argument("artifacts/example", help="Folder to write the example checkpoint and vocab into."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    overwrite: bool = _overwrite_option(),
):
    """Write the built-in example: a tiny random Megatron-BERT as an NGC-layout zip, and its vocab.txt."""
    from pathlib import Path

    from mbexport.checkpoint.example import make_example
    from mbexport.fsutil import atomic_dir

    with atomic_dir(out, overwrite=overwrite) as tmp:
        written = make_example(tmp, seed=seed)
    for path in written:
        console.print(str(Path(out) / path.name), soft_wrap=True)


# ---- export / validate -----------------------------------------------------------------------------------------------
def _names(values: list[str] | None) -> list[str] | None:
    """Repeatable options that also take comma lists: --precision fp32,fp16 --precision int8."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()] if values else None


@app.command("export")
def export_command(
    src: str = typer.Argument(..., help="Checkpoint (anything convert reads)."),
    task: str = typer.Option(..., "--task", help="Task head, e.g. question-answering (qa), masked-lm (mlm)."),
    out: str = typer.Option(..., "--out", help="Output folder (DIR/<task>/model.<precision>.onnx, manifest.json)."),
    precision: list[str] = typer.Option([EXPORTED], "--precision",
                                        help=f"{' and/or '.join(made_by('export'))} (repeat or comma list)."),
    init_missing_head: int | None = typer.Option(None, "--init-missing-head", metavar="SEED",
                                                 help="Seed random weights for a head the checkpoint lacks."),
    vocab: str | None = typer.Option(None, "--vocab", help="WordPiece vocab.txt to copy beside the artifacts "
                                                           "(default: the checkpoint's own, if it has one)."),
    opset: int = typer.Option(OPSET, "--opset", help=f"ONNX opset ({OPSET}+: native LayerNormalization)."),
    overwrite: bool = _overwrite_option(),
):
    """Export one task head to ONNX (fp32, optionally a strongly typed fp16) and record it in the manifest."""
    from mbexport.checkpoint.vocab import resolved_vocab
    from mbexport.export import export
    from mbexport.fsutil import output_folder
    from mbexport.manifest import MANIFEST
    from mbexport.text import load_tokenizer

    with resolved_vocab(src, vocab, terminal.line) as vocab:
        if vocab is not None:
            load_tokenizer(vocab)
        with output_folder(out, overwrite=overwrite, sources=(src, vocab), marker=MANIFEST, log=terminal.line):
            manifest = export(src, task, out, precisions=_names(precision), init_missing_head=init_missing_head,
                              vocab=vocab, opset=opset)
    for artifact in manifest.artifacts:
        console.print(f"{artifact.kind:8} {artifact.precision:5} {artifact.path}  {artifact.sha256[:12]}")


@app.command("validate")
def validate_command(
    out_dir: str = typer.Argument(..., help="Output folder with manifest.json."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, or auto (CUDA when onnxruntime-gpu has it)."),
    task: list[str] = typer.Option(None, "--task", help="Only these tasks (repeat or comma list)."),
    precision: list[str] = typer.Option(None, "--precision",
                                        help="Only these precisions (repeat or comma list)."),
):
    """Compare every artifact with the PyTorch reference (Polygraphy); exit 0 pass, 1 fail, 2 bad input."""
    from pathlib import Path

    from mbexport.errors import ValidationFailed
    from mbexport.fsutil import folder_lock
    from mbexport.manifest import Manifest
    from mbexport.validate import validate

    Manifest.load(out_dir)  # a folder that is not an output folder is refused before it is locked (and made)
    try:
        with folder_lock(Path(out_dir), log=terminal.line):  # validation.json: not while a build writes here
            report = validate(out_dir, device=device, tasks=_names(task), precisions=_names(precision))
    except ValidationFailed as error:
        console.print(error.report.table())
        raise
    console.print(report.table())
    console.print(f"validation passed; report in {report.root / 'validation.md'}")


# ---- bench -----------------------------------------------------------------------------------------------------------
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
    console.print(f"wrote bench.json{plot} in {artifacts}")
    if any(row["status"] == "failed" for row in report["results"]):
        raise typer.Exit(1)


# ---- deploy: triton / run --------------------------------------------------------------------------------------------
@app.command("triton")
def triton_command(
    artifacts: str = typer.Argument(..., help="Output folder of export/build (has manifest.json)."),
    repo: str = typer.Option(..., "--repo", help="Model repository folder to write (atomically; one written by "
                                                 "mbexport triton is replaced)."),
    task: list[str] | None = typer.Option(None, "--task", help="Heads to deploy (repeatable; default: all built)."),
    precision: list[str] | None = typer.Option(None, "--precision",
                                               help="Precisions to deploy (repeatable; default: what each head's "
                                                    "builds were for)."),
    device: str = typer.Option("auto", "--device", help="Instances of ONNX models: auto (Triton's KIND_AUTO: each "
                                                        "GPU, else the CPU), cpu or gpu. TensorRT plans: GPU only."),
    max_batch: int | None = typer.Option(None, "--max-batch", help="max_batch_size (default: the engine profile's "
                                                                   "max batch; 32 for ONNX models)."),
    instances: int = typer.Option(1, "--instances", help="Model instances per GPU (or on the CPU; also for the "
                                                         "Python models)."),
    vocab: str | None = typer.Option(None, "--vocab", help="WordPiece vocab.txt (default: the one in ARTIFACTS)."),
    overwrite: bool = _overwrite_option("repository"),
):
    """Write a Triton model repository: engines (or ONNX), plus a text-in ensemble per head."""
    from mbexport.deploy.triton import write_repository

    names = write_repository(artifacts, repo, tasks=task, precisions=precision, max_batch=max_batch,
                             instances=instances, vocab=vocab, device=device, overwrite=overwrite)
    console.print(f"{repo}: {len(names)} models: {', '.join(names)}", highlight=False, soft_wrap=True)
    console.print(f"serve it with: tritonserver --model-repository {repo}", highlight=False, soft_wrap=True)


@app.command("run")
def run_command(
    artifacts: str = typer.Argument(..., help="Output folder of export/build (has manifest.json)."),
    task: str = typer.Option(..., "--task", help="Head: qa, seq-cls, nsp, mlm, ner (or the canonical names)."),
    question: str | None = typer.Option(None, "--question", help="Question (qa)."),
    context: str | None = typer.Option(None, "--context", help="Passage holding the answer (qa)."),
    text: str | None = typer.Option(None, "--text", help="Input text (seq-cls, nsp, mlm with [MASK], ner)."),
    text_pair: str | None = typer.Option(None, "--text-pair", help="Second text (seq-cls pairs, nsp)."),
    backend: str = typer.Option("auto", "--backend", help="auto (a built TensorRT engine, else a built ONNX file), "
                                                          "tensorrt, onnxruntime or pytorch (the checkpoint's "
                                                          "reference)."),
    precision: str | None = typer.Option(None, "--precision",
                                         help="Artifact precision (default: the backend's preferred built one)."),
    top_k: int = typer.Option(5, "--top-k", help="Candidates per [MASK] (mlm)."),
    vocab: str | None = typer.Option(None, "--vocab", help="WordPiece vocab.txt (default: the one in ARTIFACTS)."),
    device: str = typer.Option("cpu", "--device", help="ONNX Runtime device: cpu, cuda or auto."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole answer as JSON."),
):
    """Answer from text: tokenize, run a built artifact, postprocess (Triton's ensemble, locally)."""
    import json

    from mbexport.deploy.run import answer, summary

    fields = {"question": question, "context": context, "text": text, "text_pair": text_pair}
    result = answer(artifacts, task, {k: v for k, v in fields.items() if v is not None}, backend=backend,
                    precision=precision, vocab=vocab, top_k=top_k, device=device)
    source = result["artifact"] or "the PyTorch reference rebuilt from the checkpoint"
    err_console.print(f"{result['task']}: {result['backend']} on {result['device']}, {result['precision']}, {source}",
                      highlight=False, soft_wrap=True, markup=False)
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        console.print(summary(result), highlight=False, soft_wrap=True, markup=False)


# ---- build / recipes -------------------------------------------------------------------------------------------------
BUILD_PRECISION = "fp16"  # build's default without a recipe


def _calibrated() -> list[str]:
    return list(dict.fromkeys(p.name for p in PRECISIONS.values() if p.calibrated))


def _build_precisions() -> str:
    """build's --precision help, from the precision registry."""
    return f"{', '.join(NAMES)} (default {BUILD_PRECISION})."


def _build_runtimes() -> str:
    """build's --runtime help: the runtimes and what each shapes its files for, from the precision registry."""
    shaped = {r: ", ".join(p.name for p in PRECISIONS.values() if p.runtime == r) for r in RUNTIMES}
    return (f"What the files are shaped for: {DEFAULT_RUNTIME} (default; plain ONNX and Q/DQ that TensorRT builds "
            f"from: {shaped[DEFAULT_RUNTIME]}) or "
            + ", ".join(f"{r} (its own fused and integer operators, model.PRECISION.{RUNTIMES[r].tag}.onnx: {names})"
                        for r, names in shaped.items() if r != DEFAULT_RUNTIME) + ".")


@app.command("build")
def build_command(
    src: str = typer.Argument(..., help="Checkpoint: NGC zip, Megatron folder or .pt, torch_dist folder, HF folder."),
    recipe: str | None = typer.Option(None, "--recipe", help="Recipe file or shipped name (see `mbexport recipes`); "
                                                             "the flags below override its fields."),
    task: str | None = typer.Option(None, "--task", help="Head: qa, mlm, seq-cls, ... (required without --recipe)."),
    precision: str | None = typer.Option(None, "--precision", help=_build_precisions()),
    runtime: str | None = typer.Option(None, "--runtime", help=_build_runtimes()),
    target: str | None = typer.Option(None, "--target", help="engine (TensorRT) or onnx; default engine when "
                                                             "TensorRT is importable, else onnx."),
    out: str | None = typer.Option(None, "--out", help="Output folder (default artifacts/<checkpoint name>)."),
    calib_text: str | None = typer.Option(None, "--calib-text", help=f"{'/'.join(_calibrated())} calibration text, "
                                                                     "one example a line."),
    calib_size: int | None = typer.Option(None, "--calib-size", help="Calibration examples (default 64)."),
    calib_method: str | None = typer.Option(None, "--calib-method", help="max or entropy (default max)."),
    vocab: str | None = typer.Option(None, "--vocab", help="WordPiece vocab.txt: copied to the output, tokenizes "
                                                           "--calib-text (default: the checkpoint's own, if any)."),
    init_missing_head: int | None = typer.Option(None, "--init-missing-head", help="Seed for a head the checkpoint "
                                                                                   "lacks (random weights)."),
    device: str = typer.Option("cpu", "--device", help="Validation device: cpu, cuda or auto."),
    overwrite: bool = _overwrite_option(),
):
    """Checkpoint to validated artifacts: ONNX export, fp16/int8/fp8, TensorRT engine; unchanged stages are cached."""
    from pathlib import Path

    from mbexport.build import build
    from mbexport.checkpoint.vocab import resolved_vocab
    from mbexport.errors import ValidationFailed
    from mbexport.recipes import Recipe, load_recipe

    if recipe is not None:
        base = load_recipe(recipe)
    elif task is not None:
        base = Recipe(name="command line", task=task, precision=precision or BUILD_PRECISION)
    else:
        raise MbexportError("give --task (and --precision), or --recipe")
    plan = base.override(task=task, precision=precision, runtime=runtime, target=target, out=out,
                         calib_text=Path(calib_text) if calib_text else None, calib_size=calib_size,
                         calib_method=calib_method)
    try:
        with resolved_vocab(src, vocab, terminal.line) as vocab:
            result = build(src, plan, vocab=vocab, init_missing_head=init_missing_head, device=device,
                           overwrite=overwrite, log=terminal.line, busy=terminal.StageDisplay().busy)
    except ValidationFailed as error:
        console.print(error.report.table())
        raise
    if result.report is not None:
        console.print(result.report.table())
    console.print(f"{result.out_dir}: {plan.task} {plan.precision} for {plan.runtime} ({result.target}); "
                  f"{len(result.built) or 'no'} stage(s) rebuilt; report in {result.out_dir / 'validation.md'}",
                  soft_wrap=True)


@app.command("recipes")
def recipes_command():
    """List the shipped build recipes."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from mbexport.recipes import RECIPES_DIR, load_recipe, shipped_recipes

    # Two columns, so 80 are enough: what it builds on one line (never cut: a task name with an ellipsis is no
    # name), the description wrapped under it.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("recipe", no_wrap=True)
    table.add_column("builds")
    for path in shipped_recipes():
        recipe = load_recipe(path)
        table.add_row(recipe.name, Text(f"{recipe.task}, {recipe.precision}, for {recipe.runtime}\n{recipe.description}"))
    console.print(table)
    console.print(f"in {RECIPES_DIR}: copy one, edit it, and pass --recipe FILE", soft_wrap=True)
