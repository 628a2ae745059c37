"""CPU latency at the 345M shape, QA head, batch 1 x seq 128: our ONNX on ONNX Runtime against its peers.

    python benchmarks/cpu_latency.py [--work /tmp/mbexport-bench] [--warmup 3] [--iters 20]

Runners, each in a fresh process with the same realistic feed (``mbexport.inputs.sample_batch``):
our fp32 ONNX on ORT CPU (shaped for TensorRT, and shaped for ONNX Runtime), our PyTorch reference
(scaled_dot_product_attention), transformers' eager model,
a plain transformers ``torch.onnx.export`` on ORT CPU, and, when the quantize stage is present, our int8
Q/DQ artifact twice: as mbexport runs it (exact Q/DQ emulation) and with ORT's default optimizations (its
integer kernels). Reuses the checkpoint and exports of ``export.py``. Our int8 shaped for ONNX Runtime
against ``quantize_dynamic`` is ``ort_int8.py``.
Target (issue 6): ours no slower than the plain ONNX export (539 ms on the 2-core reference machine).
"""

from __future__ import annotations

import argparse
import json
import sys

from common import CONFIG_345M, QA, REPO, arguments, checkpoint_345m, child, environment, measured, save
from export import OURS, TRANSFORMERS

RUNNERS = {
    "ours-ort": "mbexport fp32 ONNX, ORT CPU",
    "ours-torch": "mbexport PyTorch reference (sdpa), fp32",
    "ours-ort-fused": "mbexport fp32 ONNX shaped for ONNX Runtime (build --runtime onnxruntime), ORT CPU",
    "hf-torch": "transformers MegatronBert eager, fp32",
    "hf-ort": "plain transformers ONNX export, ORT CPU",
    "ours-int8-exact": "mbexport int8 Q/DQ ONNX, ORT CPU, exact Q/DQ (as validated)",
    "ours-int8-ort": "mbexport int8 Q/DQ ONNX, ORT CPU, default optimizations (integer kernels)",
}


def time_one(name: str, work, warmup: int, iters: int) -> dict:
    """Build one runner, time it, return its latency summary (runs in its own process)."""
    import onnxruntime as ort
    import torch

    from mbexport.bench.timing import measure, ort_timer, summarize, torch_timer
    from mbexport.inputs import sample_batch
    from mbexport.manifest import Manifest
    from mbexport.runtime import ort_session
    from mbexport.tasks import get_task

    task = get_task(QA)
    feed = sample_batch(task, CONFIG_345M, 1, 128, seed=0)
    ours = work / "mbexport-qa"
    if name == "ours-ort":
        timer = ort_timer(ort_session(ours / QA / "model.fp32.onnx"), feed)
    elif name == "ours-ort-fused":
        from mbexport.precisions import ONNXRUNTIME, get_precision

        shaped = get_precision("fp32", ONNXRUNTIME)
        fused = work / "ort-fused" / shaped.file_name("onnx")
        if not fused.is_file():
            shaped.transform(ours / QA / "model.fp32.onnx", fused)
        timer = ort_timer(ort_session(fused, shaped_for=ONNXRUNTIME), feed)
    elif name == "ours-torch":
        from mbexport.validate import load_reference

        timer = torch_timer(load_reference(Manifest.load(ours), task), feed)
    elif name == "hf-torch":
        import transformers

        model = transformers.MegatronBertForQuestionAnswering.from_pretrained(str(checkpoint_345m(work))).eval()
        timer = torch_timer(model, feed)
    elif name == "hf-ort":
        timer = ort_timer(ort.InferenceSession(str(work / "hf-onnx" / "model.onnx"), providers=["CPUExecutionProvider"]),
                          feed)
    elif name == "ours-int8-exact":
        timer = ort_timer(ort_session(ours / QA / "model.int8.onnx"), feed)
    else:  # ours-int8-ort
        timer = ort_timer(ort.InferenceSession(str(ours / QA / "model.int8.onnx"), providers=["CPUExecutionProvider"]),
                          feed)
    return {**summarize(measure(timer, warmup, iters)), "torch_threads": torch.get_num_threads()}


def quantize_int8(work) -> None:
    """Quantize our fp32 export to ``model.int8.onnx`` and record it in its manifest (so ``mbexport bench``
    sees it too)."""
    target = work / "mbexport-qa" / QA / "model.int8.onnx"
    if not target.is_file():
        child(["-c", "from mbexport.quantize import calibration_batches, quantize_onnx\n"
                     "from mbexport.manifest import Manifest\n"
                     "from mbexport.config import MegatronBertConfig\n"
                     "from mbexport.tasks import get_task\n"
                     f"root = {str(work / 'mbexport-qa')!r}\n"
                     "config = MegatronBertConfig.from_hf_dict(Manifest.load(root).config)\n"
                     f"quantize_onnx(root + '/{QA}/model.fp32.onnx', {str(target)!r}, mode='int8',\n"
                     f"              calibration=calibration_batches(get_task({QA!r}), config, size=32))\n"
                     "manifest = Manifest.load(root)\n"
                     f"manifest.record(get_task({QA!r}), 'int8', 'onnx', {str(target)!r})\n"
                     "manifest.save()\n"])


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--one", choices=RUNNERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(time_one(args.one, args.work, args.warmup, args.iters)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    source = checkpoint_345m(args.work)
    if not (args.work / "mbexport-qa" / QA / "model.fp32.onnx").is_file():
        measured(["-c", OURS.format(src=str(source), task=QA, out=str(args.work / "mbexport-qa"))])
    if not (args.work / "hf-onnx" / "model.onnx").is_file():
        (args.work / "hf-onnx").mkdir(parents=True, exist_ok=True)
        measured(["-c", TRANSFORMERS.format(src=str(source), out=str(args.work / "hf-onnx" / "model.onnx"))])
    quantize_int8(args.work)
    names = list(RUNNERS)
    results = {}
    for name in names:
        out = child([str(REPO / "benchmarks" / "cpu_latency.py"), "--work", str(args.work), "--warmup",
                     str(args.warmup), "--iters", str(args.iters), "--one", name])
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(f"{RUNNERS[name]}: p50 {results[name]['p50']:.1f} ms", file=sys.stderr)
    env = environment()
    plain = results["hf-ort"]["p50"]
    print(f"\n345M QA head, batch 1 x seq 128, {env['cpu']}, {env['cores']} cores, "
          f"{args.iters} timed runs after {args.warmup} warm-up")
    print("| runner | p50 ms | p90 ms | p99 ms | vs plain ONNX |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {RUNNERS[name]} | {r['p50']:.1f} | {r['p90']:.1f} | {r['p99']:.1f} | {plain / r['p50']:.2f}x |")
    if "ours-int8-exact" not in results:
        print("int8: not measured (the quantize stage, mbexport.quantize, is not available)")
    met = results["ours-ort"]["p50"] <= plain
    print(f"target: our fp32 ONNX no slower than the plain ONNX export: {'met' if met else 'NOT met'} "
          f"({results['ours-ort']['p50']:.1f} vs {plain:.1f} ms)")
    print("wrote", save(args.work, "cpu_latency.json", {"environment": env, "iters": args.iters,
                                                         "warmup": args.warmup, "results": results}))


if __name__ == "__main__":
    main()
