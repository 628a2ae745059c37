"""Wall time, peak memory and bytes of every stage at the Megatron-LM paper's BERT sizes (345M, 1.3B, 3.9B).

    python benchmarks/scaling.py 345m [--work /tmp/mbexport-scaling] [--stages convert,export,fp16,validate,build]
    python benchmarks/scaling.py 1.3b --stages convert,export,fp16,int8,fp8,validate,build [--calibration 32x128]
    python benchmarks/scaling.py 3.9b            # about 40 GB of disk and 20 GB of memory: on an idle machine

A random checkpoint (fp16 weights, as Megatron trains and saves them) is written in a tensor-parallel TP=4
Megatron-LM layout, one rank file at a time, so writing it never holds more than one rank. Then each stage
runs in a fresh process, measured from outside: wall and CPU seconds, peak RSS (``wait4``'s ``ru_maxrss``),
the bytes it moved through read()/write() (``/proc/PID/io`` rchar/wchar, polled; memory-mapped reads are not
counted there) and the largest file it reads or writes. Issue 14's bound is peak RSS <= 1.25 x that file.

Stages: ``convert`` (to a Hugging Face folder), ``export`` (fp32 ONNX of the QA head, seeded), ``fp16`` (the
fp32 ONNX to fp16, recorded like ``build`` records it), ``int8`` and ``fp8`` (calibration and Q/DQ for
TensorRT, with the ``qa-int8`` recipe's calibration, 128 seeded examples of 384 tokens, or ``--calibration``),
``int8-ort`` (the same for ONNX Runtime's integer kernels), ``validate`` (fp32 + fp16 against the reference),
and ``build`` (``mbexport build --recipe qa-fp16`` in one process, into a fresh folder). Everything under
``--work`` is deleted at the end unless ``--keep``; each stage's output that no later stage reads is deleted
as soon as it is measured.

Disk at the peak, at 3.9B: checkpoint 7.8 GB, fp32 ONNX 15.6 GB, fp16 ONNX 7.8 GB, plus the stage's staged
copy before it is moved into place: about 40 GB. ``build`` runs after the stage folder is deleted.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import zlib
from pathlib import Path

from common import REPO, arguments, environment, measured, save

import torch  # noqa: E402

from mbexport.config import MegatronBertConfig  # noqa: E402

from mbexport.checkpoint import names  # noqa: E402
from mbexport.recipes import load_recipe  # noqa: E402

# The checkpoint writers (the inverse of every reader) are test code (tests/checkpoints.py).
sys.path.insert(0, str(REPO / "tests"))
from checkpoints import megatron_shards, save as save_checkpoint  # noqa: E402

# The paper's three BERTs (Shoeybi et al. 2019, table 4), padded vocab 30592 (30522 -> multiple of 128 x TP 4).
SIZES = {
    "345m": MegatronBertConfig(vocab_size=30592, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                               intermediate_size=4096, max_position_embeddings=512),
    "1.3b": MegatronBertConfig(vocab_size=30592, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                               intermediate_size=8192, max_position_embeddings=512),
    "3.9b": MegatronBertConfig(vocab_size=30592, hidden_size=2560, num_hidden_layers=48, num_attention_heads=40,
                               intermediate_size=10240, max_position_embeddings=512),
}
STAGES = ("convert", "export", "fp16", "int8", "fp8", "int8-ort", "validate", "build")
DEFAULT_STAGES = ("convert", "export", "fp16", "validate", "build")
TP = 4
TASK = "question-answering"
BOUND = 1.25  # issue 14: peak RSS at most this times the largest file a stage reads or writes

FP16 = """
from mbexport.export import convert_fp16
from mbexport.manifest import Manifest
from mbexport.tasks import get_task
manifest, task = Manifest.load({out!r}), get_task({task!r})
fp32 = manifest.find(task.name, "fp32", "onnx")[0]
path = convert_fp16(manifest.path_of(fp32), manifest.root / task.name / "model.fp16.onnx")
manifest.record(task, "fp16", "onnx", path, converted_from=fp32.path)
manifest.save()
"""
QUANTIZE = """
import warnings
from mbexport.config import MegatronBertConfig
from mbexport.manifest import Manifest
from mbexport.precisions import get_precision
from mbexport.quantize import calibration_batches
from mbexport.tasks import get_task
manifest, task = Manifest.load({out!r}), get_task({task!r})
config = MegatronBertConfig.from_hf_dict(manifest.config)
warnings.simplefilter("ignore")  # seeded ids, not text: this measures memory and time
batches = calibration_batches(task, config, size={size}, sequence={sequence})
get_precision({mode!r}, {runtime!r}).transform(manifest.path_of(manifest.find(task.name, "fp32", "onnx")[0]),
                                               {target!r}, mode={mode!r}, calibration=batches)
"""


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.set_defaults(work=Path(os.environ.get("MBEXPORT_BENCH_WORK", "/tmp/mbexport-scaling")))
    parser.add_argument("size", choices=sorted(SIZES))
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                        help=f"comma list of {', '.join(STAGES)} (default: all but int8)")
    parser.add_argument("--keep", action="store_true", help="leave the checkpoint and outputs under --work")
    parser.add_argument("--calibration", default=None, metavar="EXAMPLESxTOKENS",
                        help="calibration of the int8/fp8 stages (default: the qa-int8 recipe's, 128x384)")
    args = parser.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage {unknown[0]}")
    config = SIZES[args.size]
    work = args.work / args.size
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rows, results = [], {}
    recipe = load_recipe("qa-int8").calibration
    size, _, sequence = (args.calibration or f"{recipe.size}x{recipe.sequence}").partition("x")
    calibration = (int(size), int(sequence))
    try:
        start = time.perf_counter()
        checkpoint = write_checkpoint(work / "checkpoint", config)
        print(f"checkpoint: {gb(tree_size(checkpoint)):.2f} GB in {time.perf_counter() - start:.0f} s "
              f"({parameters(config) / 1e9:.2f}B parameters, TP={TP}, fp16)", flush=True)
        out = work / "stages"
        for stage in stages:
            result = run_stage(stage, checkpoint, out, work, calibration)
            results[stage] = result
            rows.append(row(stage, result))
            print(rows[-1], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    env = environment()
    print(f"\n{args.size}: {parameters(config) / 1e9:.2f}B parameters, fp32 weights {gb(4 * parameters(config)):.2f} GB "
          f"({env['cpu']}, {env['cores']} cores, {env['cpu_flags']})")
    print("| stage | wall s | CPU s | peak RSS GB | peak anon GB | largest file GB | RSS / file | read GB | written GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    report = {"size": args.size, "calibration": calibration, "parameters": parameters(config), "environment": env, "stages": results}
    print("wrote", save(args.work, f"scaling-{args.size}.json", report))


def run_stage(stage: str, checkpoint: Path, out: Path, work: Path, calibration: tuple[int, int]) -> dict:
    """Run one stage in a fresh process; its figures and the files it read and wrote."""
    qa = ["--task", TASK, "--init-missing-head", "0"]
    if stage == "convert":
        hf = work / "hf"
        result = measured(["-m", "mbexport", "convert", str(checkpoint), "--out", str(hf)])
        result["files"] = sizes(rank_files(checkpoint) + list(hf.iterdir()))
        shutil.rmtree(hf)
    elif stage == "export":
        result = measured(["-m", "mbexport", "export", str(checkpoint), "--out", str(out), *qa])
        result["files"] = sizes(rank_files(checkpoint) + onnx_files(out, "fp32"))
    elif stage == "fp16":
        result = measured(["-c", FP16.format(out=str(out), task=TASK)])
        result["files"] = sizes(onnx_files(out, "fp32") + onnx_files(out, "fp16"))
    elif stage in ("int8", "fp8", "int8-ort"):
        mode, _, runtime = stage.partition("-")
        target = work / "quantized" / f"model.{stage}.onnx"
        result = measured(["-c", QUANTIZE.format(out=str(out), task=TASK, target=str(target), mode=mode,
                                                 runtime="onnxruntime" if runtime else "tensorrt",
                                                 size=calibration[0], sequence=calibration[1])])
        result["calibration"] = calibration
        result["files"] = sizes(onnx_files(out, "fp32") + list(target.parent.iterdir()))
        shutil.rmtree(target.parent)
    elif stage == "validate":
        result = measured(["-m", "mbexport", "validate", str(out)])
        result["files"] = sizes(rank_files(checkpoint) + onnx_files(out, "fp32") + onnx_files(out, "fp16"))
    else:
        shutil.rmtree(out, ignore_errors=True)  # disk: the build writes its own fp32 and fp16
        folder = work / "build"
        result = measured(["-m", "mbexport", "build", str(checkpoint), "--recipe", "qa-fp16", "--out", str(folder),
                           "--init-missing-head", "0"])
        result["files"] = sizes(rank_files(checkpoint) + onnx_files(folder, "fp32") + onnx_files(folder, "fp16"))
        shutil.rmtree(folder)
    result["largest_file_gb"] = max(result["files"].values())
    result["rss_over_file"] = result["peak_rss_gb"] / result["largest_file_gb"]
    return result


def row(stage: str, r: dict) -> str:
    mark = "" if r["rss_over_file"] <= BOUND else " (over 1.25)"
    return (f"| {stage} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_gb']:.2f} | "
            f"{r['peak_anon_gb']:.2f} | {r['largest_file_gb']:.2f} | {r['rss_over_file']:.2f}{mark} | "
            f"{r['read_gb']:.2f} | {r['written_gb']:.2f} |")


def write_checkpoint(folder: Path, config: MegatronBertConfig) -> Path:
    """A TP=4 Megatron-LM checkpoint of seeded random fp16 weights, written one rank at a time.

    Each tensor is drawn from a generator seeded by its name, so every rank sees the same full tensor (and
    replicated tensors agree) while holding only its own slice: the synthetic writers split one layer at a
    time, and only this rank's pieces are kept.
    """
    groups = names.expected_shapes(config, {})
    shapes = {**groups["trunk"], **groups["pooler"], **groups["lm"], **groups["nsp"]}
    chunks: dict[str, list[str]] = {}
    for name in shapes:
        layer = name.split(".")[3] if name.startswith("bert.encoder.layer.") else "rest"
        chunks.setdefault(layer, []).append(name)
    release = folder / "release"
    for rank in range(TP):
        rel = f"mp_rank_{rank:02d}/model_optim_rng.pt"
        saved, model = None, {}
        for chunk in chunks.values():
            weights = {name: random_tensor(name, shapes[name]) for name in chunk}
            files = megatron_shards(weights, config, style="2021", version=3.0, tp=TP)
            saved = files[rel]
            merge_trees(model, saved["model"])
            del files, weights
        saved["model"] = model
        (release / rel).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(saved, release / rel)
        del saved, model
    (folder / "latest_checkpointed_iteration.txt").write_text("release")
    return folder


def random_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    tensor = torch.randn(shape, generator=generator) * 0.02
    if len(shape) == 1 and name.endswith("weight") and ("ln." in name or "LayerNorm." in name):
        tensor += 1.0
    return tensor.half()


def merge_trees(into: dict, tree: dict) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            merge_trees(into.setdefault(key, {}), value)
        else:
            into[key] = value


def parameters(config: MegatronBertConfig) -> int:
    groups = names.expected_shapes(config, {})
    return sum(int(torch.Size(s).numel()) for g in ("trunk", "qa") for s in groups[g].values())


def rank_files(checkpoint: Path) -> list[Path]:
    return sorted(checkpoint.rglob("*.pt"))


def onnx_files(out: Path, precision: str) -> list[Path]:
    return sorted((out / TASK).glob(f"model.{precision}.onnx*"))


def sizes(files: list[Path]) -> dict[str, float]:
    return {str(f): gb(f.stat().st_size) for f in files}


def tree_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def gb(size: int) -> float:
    return size / 1e9


if __name__ == "__main__":
    main()
