"""GPU comparison at the 345M shape, QA head, fp16: mbexport's artifacts against transformers on one GPU.

Run on the device machine, in one command after staging onnxruntime-gpu there (see benchmarks/README.md):

    export PYTHONPATH=/tmp/site:$PWD; python benchmarks/gpu.py --work /tmp/mbx --out $OUT

In one process: transformers' MegatronBert eager fp16 and our PyTorch reference (scaled_dot_product_attention)
fp16, timed with CUDA events; `mbexport bench` over our artifacts on ONNX Runtime CUDA with IO binding: fp32/fp16
ONNX shaped for TensorRT (plain standard ops), int8/fp8 when the quantize stage can run there, and fp32/fp16
shaped for ONNX Runtime (`build --runtime onnxruntime`: fused Attention and Gelu, BiasGelu when ORT loads it),
made by the precision registry's own transforms. Targets (issue 6), at b32 x s384: reference >= 1.3x
transformers, fp16 ONNX on ORT CUDA >= 2x (and >= 3x at b1 x s128).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from common import CONFIG_345M, QA, arguments, checkpoint_345m, environment, save

SHAPES = ((1, 128), (8, 384), (32, 384))


def quantize(ours: Path, task) -> str:
    """Add int8 and fp8 Q/DQ artifacts to our manifest (the quantize stage, as `build` runs it)."""
    from mbexport.errors import MbexportError
    from mbexport.manifest import Manifest

    try:
        from mbexport.quantize import calibration_batches, quantize_onnx
    except ImportError as error:
        return f"not measured ({error})"
    manifest = Manifest.load(ours)
    calibration = calibration_batches(task, CONFIG_345M, size=32)
    for mode in ("int8", "fp8"):
        path = ours / QA / f"model.{mode}.onnx"
        try:
            if not path.is_file():
                quantize_onnx(ours / QA / "model.fp32.onnx", path, mode=mode, calibration=calibration)
        except MbexportError as error:
            return f"not measured ({error})"
        manifest.record(task, mode, "onnx", path)
    manifest.save()
    return "measured"


def shape_for_onnxruntime(ours: Path, task) -> dict[str, int]:
    """Add fp32 and fp16 shaped for ONNX Runtime to our manifest, made as `build --runtime onnxruntime` makes
    them (the registry's transforms); the fused operators in the fp16 file."""
    import onnx

    from mbexport.manifest import Manifest
    from mbexport.precisions import ONNXRUNTIME, get_precision

    manifest = Manifest.load(ours)
    fp32 = ours / QA / get_precision("fp32").file_name("onnx")
    for name in ("fp32", "fp16"):
        precision = get_precision(name, ONNXRUNTIME)
        path = ours / QA / precision.file_name("onnx")
        if not path.is_file():
            precision.transform(fp32, path)
        manifest.record(task, name, "onnx", path, runtime=ONNXRUNTIME)
    manifest.save()
    nodes = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return {op: nodes.count(op) for op in ("Attention", "Gelu")}


def time_peers(source: Path, task, warmup: int, iters: int) -> dict:
    """transformers eager fp16 (CUDA events) at every shape."""
    import torch
    import transformers

    from mbexport.bench.timing import measure, summarize, torch_timer
    from mbexport.inputs import sample_batch

    hf = transformers.MegatronBertForQuestionAnswering.from_pretrained(str(source), dtype=torch.float16)
    hf = hf.eval().cuda()
    return {f"transformers eager fp16 b{batch} s{sequence}": summarize(measure(
        torch_timer(hf, sample_batch(task, CONFIG_345M, batch, sequence, seed=0), "cuda"), warmup, iters))
        for batch, sequence in SHAPES}


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where gpu.json, bench.json and bench.png go")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from mbexport.bench import bench
    from mbexport.bench.flops import dense_peak, model_flops
    from mbexport.export import export
    from mbexport.inputs import sample_batch
    from mbexport.runtime import ort_session
    from mbexport.tasks import get_task

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this benchmark is for the device machine")
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit("onnxruntime-gpu is not importable: stage it first (benchmarks/README.md)")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    task, gpu = get_task(QA), torch.cuda.get_device_name(0)
    source = checkpoint_345m(args.work)
    ours = args.work / "mbexport-qa"
    if not (ours / QA / "model.fp16.onnx").is_file():
        shutil.rmtree(ours, ignore_errors=True)
        export(source, QA, ours, precisions=("fp32", "fp16"))
    quantized = quantize(ours, task)
    fused_ops = shape_for_onnxruntime(ours, task)
    check = sample_batch(task, CONFIG_345M, 8, 128, seed=1, all_padding_row=True)
    fused_diff = max(float(np.abs(a - b).max()) for a, b in  # every position: padding is exact in these files
                     zip(ort_session(ours / QA / "model.fp32.onnx", "cuda").run(None, check),
                         ort_session(ours / QA / "model.fp16.ort.onnx", "cuda", shaped_for="onnxruntime")
                         .run(None, check)))

    peers = time_peers(source, task, args.warmup, args.iters)
    torch.cuda.empty_cache()
    report = bench(ours, task=QA, backends=("torch", "ort-cuda"), batches=tuple(sorted({b for b, _ in SHAPES})),
                   sequences=tuple(sorted({s for _, s in SHAPES})), warmup=args.warmup, iters=args.iters)
    for name in ("bench.json", "bench.png"):
        if (ours / name).is_file():
            shutil.copy(ours / name, args.out / name)

    def ours_p50(backend, label, batch, sequence):
        for row in report["results"]:
            if (row["status"] == "ok" and row["backend"] == backend and row["label"] == label
                    and row["batch"] == batch and row["sequence"] == sequence):
                return row["latency_ms"]["p50"]
        return None

    lines = [f"345M QA head on {gpu}, p50 of {args.iters} runs (ms); speed-up vs transformers eager fp16",
             "| runner | " + " | ".join(f"b{b} x s{s}" for b, s in SHAPES) + " |", "|---" * (len(SHAPES) + 1) + "|"]
    table = {"transformers eager fp16": [peers[f"transformers eager fp16 b{b} s{s}"]["p50"] for b, s in SHAPES],
             "mbexport reference fp16 (torch, sdpa)": [ours_p50("torch", "fp16", b, s) for b, s in SHAPES],
             "mbexport fp16 ONNX (ort-cuda)": [ours_p50("ort-cuda", "fp16", b, s) for b, s in SHAPES],
             "mbexport fp16 for ONNX Runtime (ort-cuda)": [ours_p50("ort-cuda", "fp16-ort", b, s) for b, s in SHAPES]}
    for label in ("fp32", "fp32-ort", "int8", "fp8"):
        if any(ours_p50("ort-cuda", label, b, s) for b, s in SHAPES):
            table[f"mbexport {label} ONNX (ort-cuda)"] = [ours_p50("ort-cuda", label, b, s) for b, s in SHAPES]
    base = table["transformers eager fp16"]
    for name, values in table.items():
        cells = []
        for (b, s), value, ref in zip(SHAPES, values, base):
            if value is None:
                cells.append("-")
                continue
            tflops = model_flops(CONFIG_345M, task, b, s) / (value * 1e-3) / 1e12
            peak = dense_peak(gpu, next((p for p in ("fp32", "int8", "fp8") if f" {p}" in name), "fp16"))
            cells.append(f"{value:.2f} ({ref / value:.2f}x, {tflops:.0f} TFLOP/s"
                         + (f", {100 * tflops / peak:.0f}% peak)" if peak else ")"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def speedup(name, shape):
        value = table[name][SHAPES.index(shape)]
        return None if value is None else base[SHAPES.index(shape)] / value

    reference, fp16, shaped = ("mbexport reference fp16 (torch, sdpa)", "mbexport fp16 ONNX (ort-cuda)",
                               "mbexport fp16 for ONNX Runtime (ort-cuda)")
    targets = {
        "reference fp16 >= 1.3x transformers at b32 x s384": (speedup(reference, (32, 384)), 1.3),
        "fp16 ONNX on ORT CUDA >= 2x at b32 x s384": (speedup(fp16, (32, 384)), 2.0),
        "fp16 ONNX on ORT CUDA >= 3x at b1 x s128": (speedup(fp16, (1, 128)), 3.0),
        "fp16 for ONNX Runtime >= 2x at b32 x s384": (speedup(shaped, (32, 384)), 2.0),
        "fp16 for ONNX Runtime >= 3x at b1 x s128": (speedup(shaped, (1, 128)), 3.0),
    }
    for name, (value, goal) in targets.items():
        verdict = "not measured" if value is None else f"{value:.2f}x: {'met' if value >= goal else 'NOT met'}"
        lines.append(f"target {name}: {verdict}")
    lines.append(f"fp16 for ONNX Runtime: fused ops {fused_ops}; max abs diff of its logits vs our fp32 ONNX "
                 f"(b8 x s128, every position, an all-padding row included): {fused_diff:.3g}")
    lines.append(f"int8/fp8 artifacts: {quantized}")
    print("\n".join(lines))
    (args.out / "gpu.md").write_text("\n".join(lines) + "\n")
    save(args.out, "gpu.json", {"environment": {**environment(), "gpu": gpu}, "peers": peers, "table": table,
                                "fused_ops": fused_ops, "fused_max_abs_diff": fused_diff, "quantized": quantized,
                                "targets": {k: v[0] for k, v in targets.items()}})


if __name__ == "__main__":
    main()
