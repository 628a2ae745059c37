"""What the benchmark scripts share: the 345M shape, its random-weights checkpoint, and measured subprocesses.

Not part of the package: these scripts compare mbexport with its peers (transformers, a plain
``torch.onnx.export``), so they may import ``transformers``; the package itself never does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python benchmarks/NAME.py` from a checkout

from mbexport.config import MegatronBertConfig  # noqa: E402

# Megatron-BERT 345M (NVIDIA's NGC megatron_bert_345m): 24 layers, hidden 1024, 16 heads, padded vocab.
CONFIG_345M = MegatronBertConfig(vocab_size=29056, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                 intermediate_size=4096, max_position_embeddings=512)
QA = "question-answering"


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("MBEXPORT_BENCH_WORK", "/tmp/mbexport-bench")),
                        help="scratch folder for checkpoints and exports, reused between scripts")
    return parser


def checkpoint_345m(work: Path) -> Path:
    """A Hugging Face folder (config.json + model.safetensors, 1.35 GB) of seeded random 345M weights with a
    QA head: the same bytes for our exporter and for transformers' ``from_pretrained``."""
    folder = work / "megatron-bert-345m-qa"
    if not (folder / "model.safetensors").is_file():
        child(["-c", f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); "
                     f"import common; common._write_checkpoint({str(folder)!r})"])
    return folder


def _write_checkpoint(folder: str) -> None:
    from safetensors.torch import save_file

    from mbexport.checkpoint.example import random_state_dict
    from mbexport.fsutil import atomic_dir, write_json_atomic

    state_dict = random_state_dict(CONFIG_345M, seed=0, heads=("qa",))
    with atomic_dir(folder) as tmp:
        write_json_atomic(tmp / "config.json", CONFIG_345M.to_hf_dict(["MegatronBertForQuestionAnswering"]))
        save_file(state_dict, str(tmp / "model.safetensors"), metadata={"format": "pt"})


def measured(argv: list[str]) -> dict:
    """Run ``python argv...`` in a fresh process: wall and CPU seconds, peak RSS, and read()/write() bytes."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, *argv], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL)
    io, anon = {}, 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        try:  # the last reading before it exits (a stage ends with its final writes and hashing: small)
            io = dict(line.split(": ") for line in Path(f"/proc/{process.pid}/io").read_text().splitlines())
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{process.pid}/status").read_text().splitlines())
            anon = max(anon, int(fields["RssAnon"].split()[0]) * 1024)
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(argv)[:160]} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,  # Linux reports KiB
            "peak_anon_gb": anon / 1e9,  # sampled every 50 ms: RSS less memory-mapped file pages
            "read_gb": int(io.get("rchar", 0)) / 1e9, "written_gb": int(io.get("wchar", 0)) / 1e9}


def child(argv: list[str]) -> str:
    """Run ``python argv...`` in a fresh process (its memory is returned when it ends); its stdout."""
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, text=True, check=True)
    return result.stdout


def environment() -> dict:
    from mbexport.bench.timing import cpu_name
    from mbexport.manifest import library_versions
    from mbexport.runtime import CPU_FLAGS, cpu_flags

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(),
            "cpu_flags": " ".join(cpu_flags()) or f"none of {', '.join(CPU_FLAGS)}", "cores": os.cpu_count(), "platform": platform.platform(), **library_versions(),
            "transformers": _version("transformers")}


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def save(work: Path, name: str, data: dict) -> Path:
    path = work / name
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
