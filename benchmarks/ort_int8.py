"""CPU int8 for ONNX Runtime, 345M QA head: ours against our fp32 ONNX and ONNX Runtime's own quantize_dynamic.

    python benchmarks/ort_int8.py [--work /tmp/mbexport-bench] [--rounds 12] [--batches 1,8] [--every 1]

Every model is made from our fp32 export of the same seeded random 345M checkpoint (``export.py``'s):

- ``ours fp32``: mbexport's fp32 ONNX, shaped for TensorRT (plain standard ops), as every earlier figure;
- ``ours fp32-ort``: fp32 shaped for ONNX Runtime (fused attention);
- ``ours int8-ort``: int8 shaped for ONNX Runtime, the precision registry's own transform, as
  ``build --runtime onnxruntime --precision int8`` makes it: calibrated activation ranges (``max`` over 16
  seeded examples; over 64 of the fixture's calibration lines for accuracy);
- ``ours int8-ort dynamic``: the same graph with activation ranges taken at run time (DynamicQuantizeMatMul,
  DynamicQuantizeLinear before QAttention): the comparison behind choosing calibrated ranges;
- ``quantize_dynamic``: ONNX Runtime's ``quantize_dynamic(per_channel=True)``, int8 weights, of our fp32 export.

Timing: all models in one process with ONNX Runtime's default CPU settings, through IO binding; each round
runs each model once, each round starting one model later, so the slow phases of a shared machine fall on all
of them alike. Reported per batch x 128 tokens: the median latency of each model, and the median over rounds
of its ratio to ours fp32 and to quantize_dynamic. Accuracy: the trained fixture's protocol (masked-LM top-1
and classification, ``tests/accuracy_protocol.py``; every ``--every``-th dev line) for the fixture's fp32
export, its int8-ort, the dynamic twin and quantize_dynamic.
Targets (issue 13): int8-ort >= 3x ours fp32 at b1 and b8 x s128 on a CPU with VNNI, no slower than
quantize_dynamic, >= 99% of fp32's accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from common import CONFIG_345M, QA, REPO, arguments, checkpoint_345m, child, environment, measured, save
from export import OURS

sys.path.insert(0, str(REPO / "tests"))  # the trained fixture's accuracy protocol is test code
FIXTURE = REPO.parent / "shared" / "fixtures" / "tiny-trained"
FIXTURE_SOURCES = {"masked-lm": "megatron_bert_tiny_uncased.zip", "sequence-classification": "seqcls-hf"}
MODELS = ("ours fp32", "ours fp32-ort", "ours int8-ort", "ours int8-ort dynamic", "quantize_dynamic")


def make(fp32: Path, folder: Path, calibration) -> dict[str, Path]:
    """Every model's file beside ``fp32`` (made once); ``calibration()``: our int8's calibration feeds."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from mbexport.precisions import ONNXRUNTIME, get_precision

    paths = {"ours fp32": fp32}
    for name, precision in (("ours fp32-ort", get_precision("fp32", ONNXRUNTIME)),
                            ("ours int8-ort", get_precision("int8", ONNXRUNTIME))):
        paths[name] = folder / precision.file_name("onnx")
        if not paths[name].is_file():
            made = {"mode": "int8", "calibration": calibration(), "method": "max"} if precision.calibrated else {}
            precision.transform(fp32, paths[name], **made)
    paths["ours int8-ort dynamic"] = folder / "model.int8.ort.dynamic.onnx"
    if not paths["ours int8-ort dynamic"].is_file():
        dynamic_twin(paths["ours int8-ort"], paths["ours int8-ort dynamic"])
    paths["quantize_dynamic"] = folder / "model.int8.quantize_dynamic.onnx"
    if not paths["quantize_dynamic"].is_file():
        quantize_dynamic(str(fp32), str(paths["quantize_dynamic"]), per_channel=True, weight_type=QuantType.QInt8)
    return paths


def dynamic_twin(static: Path, out: Path) -> None:
    """Our int8 graph with activation ranges taken at run time instead of calibrated ones (the operators of ORT's
    ``quantize_dynamic``): each QuantizeLinear -> MatMulIntegerToFloat becomes one DynamicQuantizeMatMul, and
    the QuantizeLinear before each QAttention a DynamicQuantizeLinear."""
    import onnx
    from onnx import helper

    from mbexport.export.ort import MS, prune

    model = onnx.load(str(static))
    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    nodes = []
    for node in graph.node:
        if node.op_type == "MatMulIntegerToFloat":
            _, weight, _, weight_scale, _, weight_zero, *bias = node.input
            nodes.append(helper.make_node("DynamicQuantizeMatMul", [producer[node.input[0]].input[0], weight,
                                                                    weight_scale, weight_zero, *bias],
                                          list(node.output), name=node.name, domain=MS))
        elif node.op_type == "QAttention":  # input, weight, bias, input scale, weight scale, mask, zero points
            x = [f"{node.name}_dynamic_{part}" for part in ("x", "x_scale", "x_zero")]
            nodes.append(helper.make_node("DynamicQuantizeLinear", [producer[node.input[0]].input[0]], x))
            node.input[0], node.input[3], node.input[6] = x
            nodes.append(node)
        elif node.op_type != "QuantizeLinear":
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    prune(graph)
    onnx.save(model, str(out))


def time_models(paths: dict[str, Path], batch: int, rounds: int) -> dict:
    """{model: latencies in ms} of ``rounds`` turns, every model once a turn, at batch x 128."""
    from mbexport.bench.timing import ort_timer
    from mbexport.inputs import sample_batch
    from mbexport.runtime import ort_session
    from mbexport.tasks import get_task

    feed = sample_batch(get_task(QA), CONFIG_345M, batch, 128, seed=0)
    timers = {}
    for name, path in paths.items():
        timers[name] = ort_timer(ort_session(path, shaped_for=shaped_for(name)), feed)
        timers[name]()  # warm-up (prepacked weights, allocations)
    latencies = {name: [] for name in paths}
    names = list(paths)
    for turn in range(rounds):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            latencies[name].append(timers[name]())
    return latencies


def fixture_accuracy(work: Path, every: int) -> dict:
    """{task: {model: (correct, total)}} on the trained fixture's dev set."""
    from accuracy_protocol import accuracy

    from mbexport.checkpoint import load_checkpoint
    from mbexport.export import export_onnx
    from mbexport.model import build_reference
    from mbexport.quantize import calibration_batches
    from mbexport.text import read_lines

    texts = read_lines(FIXTURE / "dev.txt")[::every]
    labels = [int(x) for x in (FIXTURE / "dev.labels").read_text().split()][::every]
    results = {}
    for task, source in FIXTURE_SOURCES.items():
        checkpoint = load_checkpoint(FIXTURE / source)
        folder = work / "fixture" / task
        fp32 = folder / "model.fp32.onnx"
        if not fp32.is_file():
            model, _ = build_reference(task, checkpoint.config, checkpoint.state_dict)
            export_onnx(model, fp32)
        paths = make(fp32, folder, lambda: calibration_batches(task, checkpoint.config, text=FIXTURE / "calib.txt",
                                                               vocab=FIXTURE / "vocab.txt", size=64))
        del paths["ours fp32-ort"]
        results[task] = {}
        for name, path in paths.items():
            score = accuracy(path, task, FIXTURE / "vocab.txt", texts, None if task == "masked-lm" else labels,
                             shaped_for=shaped_for(name))
            results[task][name] = (score.correct, score.total)
            print(f"{task} {name}: {score}", file=sys.stderr)
    return results


def shaped_for(name: str) -> str:
    """How ONNX Runtime runs a model: our fp32 export as mbexport runs TensorRT's files, every int8 model on ORT's
    integer kernels, as its users run it (a session without Q/DQ emulation)."""
    from mbexport.precisions import DEFAULT_RUNTIME, ONNXRUNTIME

    return DEFAULT_RUNTIME if name == "ours fp32" else ONNXRUNTIME


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="turns per batch size (each times every model once)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--every", type=int, default=1, help="use every n-th line of the fixture's dev set")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # time one batch size (in its own process)
    args = parser.parse_args()
    paths_file = args.work / "ort-int8" / "paths.json"
    if args.one:
        paths = {name: Path(path) for name, path in json.loads(paths_file.read_text()).items()}
        print(json.dumps(time_models(paths, args.one, args.rounds)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    source = checkpoint_345m(args.work)
    fp32 = args.work / "mbexport-qa" / QA / "model.fp32.onnx"
    if not fp32.is_file():
        measured(["-c", OURS.format(src=str(source), task=QA, out=str(args.work / "mbexport-qa"))])
    paths_file.parent.mkdir(parents=True, exist_ok=True)
    child(["-c", "import json, sys\n"
                 f"sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
                 "from pathlib import Path\n"
                 "from ort_int8 import make, CONFIG_345M, QA\n"
                 "from mbexport.quantize import calibration_batches\n"
                 f"paths = make(Path({str(fp32)!r}), Path({str(paths_file.parent)!r}),\n"
                 "             lambda: calibration_batches(QA, CONFIG_345M, size=16))\n"
                 f"Path({str(paths_file)!r}).write_text(json.dumps({{k: str(v) for k, v in paths.items()}}))\n"])
    env = {**environment(), "load_before": os.getloadavg()}
    timings = {}
    for batch in (int(b) for b in args.batches.split(",")):
        out = child([str(REPO / "benchmarks" / "ort_int8.py"), "--work", str(args.work), "--rounds",
                     str(args.rounds), "--one", str(batch)])
        timings[batch] = json.loads(out.strip().splitlines()[-1])
    env["load_after"] = os.getloadavg()
    accuracy = fixture_accuracy(args.work, args.every) if FIXTURE.is_dir() else {}

    def ratio(name, base, batch):
        return statistics.median(b / a for a, b in zip(timings[batch][name], timings[batch][base]))

    print(f"\n345M QA head on ONNX Runtime {env.get('onnxruntime')}, {env['cpu']}, {env['cores']} cores, "
          f"flags {env['cpu_flags']}; load average "
          f"{env['load_before'][0]:.1f} before, {env['load_after'][0]:.1f} after; {args.rounds} rounds")
    print("| model | b x s | median ms | speed-up vs ours fp32 | vs quantize_dynamic |\n|---|---|---|---|---|")
    for batch, latencies in timings.items():
        for name in MODELS:
            print(f"| {name} | {batch} x 128 | {statistics.median(latencies[name]):.1f} | "
                  f"{ratio(name, 'ours fp32', batch):.2f}x | {ratio(name, 'quantize_dynamic', batch):.2f}x |")
    for task, scores in accuracy.items():
        fp32_correct, total = scores["ours fp32"]
        print(f"{task} on the fixture's dev set ({total} {'masked tokens' if task == 'masked-lm' else 'rows'}): "
              + ", ".join(f"{name} {100 * c / t:.2f}% ({100 * c / fp32_correct:.1f}% of fp32)"
                          for name, (c, t) in scores.items()))
    for batch in timings:
        speedup, versus = ratio("ours int8-ort", "ours fp32", batch), ratio("ours int8-ort", "quantize_dynamic", batch)
        print(f"target b{batch}: int8-ort >= 3x ours fp32: {speedup:.2f}x, {'met' if speedup >= 3 else 'NOT met'}; "
              f"no slower than quantize_dynamic: {versus:.2f}x, {'met' if versus >= 1 else 'NOT met'}")
    for task, scores in accuracy.items():
        kept = scores["ours int8-ort"][0] / scores["ours fp32"][0]
        print(f"target {task}: int8-ort keeps >= 99% of fp32: {100 * kept:.1f}%, "
              f"{'met' if kept >= 0.99 else 'NOT met'}")
    print("wrote", save(args.work, "ort_int8.json", {"environment": env, "rounds": args.rounds,
                                                     "latencies_ms": timings, "accuracy": accuracy}))


if __name__ == "__main__":
    main()
