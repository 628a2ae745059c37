"""Requests/s and latency through a real Triton server against the same work in-process, on the CPU.

One-row requests from ``C`` concurrent clients (gRPC, one client per thread), each for ``--seconds`` after a
short warm-up, at C = 1, 4, 16, for:

- ``ensemble``: text in, answer out through the ``<task>-<precision>-text`` ensemble (tokenizer, model,
  postprocess; each request padded to the shortest of the repository's lengths (16, 32, ... up to its
  sequence) that holds it, so the batcher can stack requests of one length);
- ``raw``: the inference model alone, on pre-tokenized input padded the same way;
- ``in-process run``: what ``mbexport run`` does per request, with the session loaded once: encode (not
  padded), ONNX Runtime, answer;
- ``in-process raw``: ONNX Runtime on the same padded input as ``raw``;

each Triton row with the repository as written (dynamic batching) and with ``dynamic_batching`` removed.
``perf_analyzer`` is not used: PyPI's ``perf-analyzer`` resolves to 0.1.0 here, a placeholder without the
binary. The server is tests/tritonserver.py's (``make setup`` fetches what it needs). The model: the trained
fixture's classifier (``--source trained``, 14M parameters, 512 positions: the sequence is 384) or
the built-in example's QA head (``--source example``, hidden 64, 128 positions: Triton's own overhead).

    python benchmarks/triton_serving.py [--source trained|example] [--seconds 8] [--work DIR]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

from common import REPO, arguments, environment, save

sys.path.insert(0, str(REPO / "tests"))  # the test harness that assembles the server

import numpy as np  # noqa: E402

import tritonserver  # noqa: E402
from mbexport.checkpoint.example import make_example  # noqa: E402
from mbexport.config import MegatronBertConfig  # noqa: E402
from mbexport.deploy.run import padded_lengths, sequence_length, text_pipeline  # noqa: E402
from mbexport.deploy.triton import write_repository  # noqa: E402
from mbexport.manifest import Manifest  # noqa: E402
from mbexport.build import build  # noqa: E402
from mbexport.recipes import Recipe  # noqa: E402
from mbexport.runtime import ort_session  # noqa: E402
from mbexport.tasks import get_task  # noqa: E402

TRAINED = REPO.parent / "shared" / "fixtures" / "tiny-trained"
CONCURRENCY = (1, 4, 16)
WARMUP_S = 1.0


def artifacts(work: Path, source: str) -> tuple[Path, str, list[dict]]:
    """A built fp32 folder, its task, and the texts requests cycle through."""
    out = work / f"triton-{source}"
    if source == "trained":
        task = "sequence-classification"
        if not (out / "manifest.json").is_file():
            build(TRAINED / "seqcls-hf", Recipe(name="bench", task=task, precision="fp32", target="onnx"),
                  out_dir=out, vocab=TRAINED / "vocab.txt")
        lines = (TRAINED / "dev.txt").read_text(encoding="utf-8").splitlines()[:64]
        return out, task, [{"text": line, "text_pair": ""} for line in lines]
    task = "question-answering"
    if not (out / "manifest.json").is_file():
        checkpoint, vocab = make_example(work / "example-checkpoint")
        build(checkpoint, Recipe(name="bench", task=task, precision="fp32", target="onnx"), out_dir=out, vocab=vocab,
              init_missing_head=0)
    context = "the city is a place where many people work and the house is a home for a family."
    questions = ["where do people work?", "what is a home?", "who lives in the house?", "what is the city?"]
    return out, task, [{"question": q, "context": context} for q in questions]


def without_batching(repo: Path, into: Path, model: str) -> Path:
    """A copy of ``repo`` whose inference model has no dynamic_batching (Triton then runs requests one by one)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    shutil.rmtree(into, ignore_errors=True)
    shutil.copytree(repo, into)
    path = into / model / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    config.ClearField("dynamic_batching")
    path.write_text(text_format.MessageToString(config))
    return into


def drive(concurrency: int, seconds: float, request) -> dict:
    """``concurrency`` threads calling ``request(thread, i)`` for ``seconds`` after a warm-up; latency stats."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    barrier = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def loop(n: int) -> None:
        barrier.wait()
        i = 0
        while (now := time.perf_counter()) < stop_at[0]:
            try:
                request(n, i)
            except Exception as error:  # counted, and shown in the table
                errors.append(repr(error))
            if now >= stop_at[0] - seconds:  # past the warm-up
                latencies[n].append(time.perf_counter() - now)
            i += 1

    threads = [threading.Thread(target=loop, args=(n,)) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + WARMUP_S + seconds
    barrier.wait()
    for thread in threads:
        thread.join()
    flat = sorted(x for row in latencies for x in row)
    return {"concurrency": concurrency, "requests": len(flat), "errors": len(errors),
            "rps": len(flat) / seconds, "p50_ms": 1e3 * statistics.median(flat),
            "p99_ms": 1e3 * flat[min(len(flat) - 1, int(0.99 * len(flat)))]}


def triton_rows(repo: Path, home: Path, model: str, spec, rows: list[dict], feeds: list[dict], seconds: float,
                batching: str) -> list[dict]:
    import tritonclient.grpc as grpcclient

    results = []
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    with tritonserver.TritonServer(home, [repo]) as server:
        clients = [grpcclient.InferenceServerClient(server.grpc_url) for _ in range(max(CONCURRENCY))]
        try:
            def text_inputs(k: int) -> list:
                inputs = []
                for field, value in rows[k].items():
                    tensor = grpcclient.InferInput(field, [1, 1], "BYTES")
                    tensor.set_data_from_numpy(np.array([[value.encode()]], dtype=np.object_))
                    inputs.append(tensor)
                return inputs

            texts = [text_inputs(k) for k in range(len(rows))]
            raw = []
            for feed in feeds:
                inputs = []
                for name in spec.input_names:
                    tensor = grpcclient.InferInput(name, list(feed[name].shape), "INT64")
                    tensor.set_data_from_numpy(feed[name])
                    inputs.append(tensor)
                raw.append(inputs)
            for mode, name, inputs in (("ensemble", f"{model}-text", texts), ("raw", model, raw)):
                for concurrency in CONCURRENCY:
                    before = _stats(clients[0], model)
                    row = drive(concurrency, seconds,
                                lambda n, i: clients[n].infer(name, inputs[(n + i) % len(inputs)]))
                    after = _stats(clients[0], model)
                    row.update(mode=mode, batching=batching,
                               executions=after[1] - before[1], inferences=after[0] - before[0])
                    results.append(row)
                    print(_line(row), flush=True)
        finally:
            for client in clients:
                client.close()
    return results


def _stats(client, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def in_process_rows(onnx: Path, pipeline, rows: list[dict], feeds: list[dict], spec, seconds: float) -> list[dict]:
    session = ort_session(onnx)
    results = []

    def run_style(n: int, i: int) -> None:
        row = rows[(n + i) % len(rows)]
        encoded = pipeline.encode({k: [v] for k, v in row.items()}, pad_to_max=False)
        outputs = dict(zip(spec.output_names, session.run(spec.output_names, encoded)))
        pipeline.answers(encoded, outputs)

    def raw(n: int, i: int) -> None:
        session.run(spec.output_names, feeds[(n + i) % len(feeds)])

    for mode, request in (("in-process run", run_style), ("in-process raw", raw)):
        for concurrency in CONCURRENCY:
            row = drive(concurrency, seconds, request)
            row.update(mode=mode, batching="-", executions=None, inferences=None)
            results.append(row)
            print(_line(row), flush=True)
    return results


def _line(row: dict) -> str:
    batches = (f"{row['inferences']} in {row['executions']} executions" if row["executions"] is not None else "")
    return (f"| {row['mode']} | {row['batching']} | {row['concurrency']} | {row['requests']} | {row['rps']:.1f} | "
            f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {batches} |" + (f" {row['errors']} errors" if row["errors"]
                                                                          else ""))


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("trained", "example"), default="trained")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per row (after 1 s warm-up)")
    args = parser.parse_args()
    reason = tritonserver.missing()
    if reason:
        raise SystemExit(f"no Triton server here: {reason}")
    warnings.simplefilter("ignore")
    work = args.work / "triton"
    work.mkdir(parents=True, exist_ok=True)
    out, task, rows = artifacts(work, args.source)
    manifest, spec = Manifest.load(out), get_task(task)
    model = f"{spec.name}-fp32"
    repo = work / f"repo-{args.source}"
    write_repository(out, repo, precisions=["fp32"])
    config = MegatronBertConfig.from_hf_dict(manifest.config)
    lengths = padded_lengths(config, None)
    pipeline, _ = text_pipeline(manifest, spec, max_length=sequence_length(config, None), pad_lengths=lengths)
    feeds = [pipeline.encode({k: [v] for k, v in row.items()}) for row in rows]  # padded as Triton's tokenizer does
    print(f"{args.source}: {model}, requests padded to one of {lengths} tokens in Triton; {environment()}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| mode | dynamic batching | concurrency | requests | req/s | p50 ms | p99 ms | server batches |")
    print("|---|---|---|---|---|---|---|---|")
    results = in_process_rows(manifest.trusted_path(manifest.find(spec.name, "fp32", "onnx")[0]), pipeline, rows,
                              feeds, spec, args.seconds)
    results += triton_rows(repo, work / "server", model, spec, rows, feeds, args.seconds, "on")
    plain = without_batching(repo, work / f"repo-{args.source}-no-batching", model)
    results += triton_rows(plain, work / "server", model, spec, rows, feeds, args.seconds, "off")
    saved = save(work, f"triton-{args.source}.json", {"environment": environment(), "rows": results})
    print(f"load average {os.getloadavg()[0]:.1f}; wrote {saved}")


if __name__ == "__main__":
    main()
