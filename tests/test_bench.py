"""``mbexport bench``: FLOP counts by hand, the statistics, and the command on a tiny exported model (CPU)."""

import json
import os
import shutil

import numpy as np
import pytest

from mbexport.bench import dense_peak, model_flops
from mbexport.bench.timing import measure, summarize
from mbexport.cli import main
from mbexport.config import MegatronBertConfig
from mbexport.manifest import Manifest
from mbexport.tasks import get_task

TINY = MegatronBertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, max_position_embeddings=64, num_labels=3)
FAST = ["--batch", "1,2", "--seq", "16", "--warmup", "1", "--iters", "4"]


def run_cli(*args):
    with pytest.raises(SystemExit) as stop:
        main(["bench", *map(str, args)])
    return stop.value.code


def test_flops_match_a_hand_count():
    # QA, batch 2 x seq 16: per layer 2*32*(4*64*64 + 2*64*128) linears + 2*2*2*16*16*64 attention; head 2*32*64*2.
    per_layer = 2 * 32 * (16384 + 16384) + 131072
    assert per_layer == 2_228_224
    assert model_flops(TINY, get_task("qa"), 2, 16) == 2 * per_layer + 8192
    # The pooler (2*b*h*h) and a 3-label classifier on it; multiple-choice runs batch * choices rows.
    assert model_flops(TINY, get_task("seq-cls"), 2, 16) == 2 * per_layer + 2 * 2 * 64 * 64 + 2 * 2 * 64 * 3
    assert model_flops(TINY, get_task("mc"), 1, 16, num_choices=2) == model_flops(TINY, get_task("model"), 2, 16) + 2 * 2 * 64
    # The MLM head: transform dense plus the tied decoder over the vocab, per token.
    assert model_flops(TINY, get_task("mlm"), 2, 16) == 2 * per_layer + 2 * 32 * (64 * 64 + 64 * 256)
    # The 345M shape at batch 32 x seq 384 is the 7.9 TFLOP that ../shared/GPU.md quotes.
    big = MegatronBertConfig(vocab_size=29056)
    assert model_flops(big, get_task("qa"), 32, 384) / 1e12 == pytest.approx(7.886, abs=0.001)


def test_dense_peaks_by_device_name():
    assert dense_peak("NVIDIA H100 80GB HBM3", "fp16") == 989.0
    assert dense_peak("NVIDIA H100 80GB HBM3", "fp8") == 1979.0
    assert dense_peak("NVIDIA H100 PCIe", "fp16") == 756.0
    assert dense_peak("NVIDIA A100-SXM4-80GB", "fp8") is None  # Ampere has no FP8
    assert dense_peak("NVIDIA L40S", "fp16") == 362.0 and dense_peak("NVIDIA L4", "fp16") == 121.0
    assert dense_peak("NVIDIA H100 80GB HBM3", "fp32") is None  # TF32 or not depends on the runtime
    assert dense_peak("Some Future GPU", "fp16") is None and dense_peak(None, "fp16") is None


def test_measure_and_percentiles():
    calls = []
    latencies = measure(lambda: calls.append(1) or float(len(calls)), warmup=3, iters=100)
    assert len(calls) == 103 and latencies == [float(i) for i in range(4, 104)]
    stats = summarize([float(i) for i in range(1, 101)])  # numpy's linear interpolation over 1..100
    assert stats == pytest.approx({"mean": 50.5, "min": 1.0, "p50": 50.5, "p90": 90.1, "p99": 99.01})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from mbexport.checkpoint.example import make_example
    from mbexport.export import export

    work = tmp_path_factory.mktemp("bench")
    checkpoint, vocab = make_example(work / "src", seed=0)
    export(checkpoint, "question-answering", work / "out", precisions=("fp32", "fp16"), init_missing_head=0,
           vocab=vocab)
    return work / "out"


def test_bench_on_cpu_writes_sane_json_and_a_png(artifacts, capsys):
    assert run_cli(artifacts, *FAST) == 0
    report = json.loads((artifacts / "bench.json").read_text())
    config = MegatronBertConfig.from_hf_dict(Manifest.load(artifacts).config)
    ok = [r for r in report["results"] if r["status"] == "ok"]
    runners = {(r["backend"], r["precision"]) for r in ok}
    assert runners == {("torch", "fp32"), ("ort-cpu", "fp32"), ("ort-cpu", "fp16")}
    assert len(ok) == 3 * 2  # every runner at batch 1 and 2 x seq 16
    for row in ok:
        latency = row["latency_ms"]
        assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"]
        assert row["sequences_per_s"] == pytest.approx(row["batch"] * 1000 / latency["p50"])
        flops = model_flops(config, get_task("qa"), row["batch"], row["sequence"])
        assert row["gflop"] == pytest.approx(flops / 1e9)
        assert row["tflops_per_s"] == pytest.approx(flops / (latency["p50"] / 1e3) / 1e12)
        assert row["percent_of_peak"] is None and row["device"] == "cpu"  # no GPU, no peak
    skipped = {r["backend"]: r["reason"] for r in report["results"] if r["status"] == "skipped"}
    assert set(skipped) == {"ort-cuda", "trt"} and "CUDA" in skipped["ort-cuda"] and "TensorRT" in skipped["trt"]
    assert report["settings"]["iters"] == 4 and report["device"]["gpu"] is None
    assert (artifacts / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "ort-cpu fp16" in out and "skipped" in out and "bench.json" in out
    assert "TFLOP/s" in out and "…" not in out and max(map(len, out.splitlines())) <= 80  # captured: 80 columns


def test_the_summary_reads_at_80_columns_and_turns_into_lines_below():
    """A GPU's widest figures (five-digit throughput, % of peak) at 80 columns: every header and cell whole;
    narrower, one line per measurement; a backend skipped for every task is said once."""
    from rich.console import Console

    from mbexport.bench import summary

    def row(backend, precision, task="question-answering"):
        return {"task": task, "backend": backend, "precision": precision, "status": "ok", "batch": 32,
                "sequence": 384, "latency_ms": {"p50": 1234.56, "p90": 1250.0, "p99": 1299.99},
                "sequences_per_s": 25919.9, "tflops_per_s": 312.5, "percent_of_peak": 31.6}

    tasks = ["question-answering", "sequence-classification"]
    report = {"device": {"gpu": "NVIDIA H100 80GB HBM3", "cpu": "x86"}, "settings": {"tasks": tasks, "iters": 100},
              "results": [row("ort-cuda", "fp16"), row("trt", "int8", tasks[1])]
              + [{"task": t, "backend": "torch", "status": "skipped", "reason": "the source checkpoint is not at "
                  "/data/checkpoints/megatron_bert_345m_v0_1_uncased.zip"} for t in tasks]}
    for width in (80, 50):
        console = Console(width=width, record=True, file=open(os.devnull, "w"))
        console.print(summary(report))
        text = console.export_text()
        lines = text.splitlines()
        assert "…" not in text and max(map(len, lines)) <= width, text
        for cell in ("ort-cuda fp16", "32x384", "1234.56", "1299.99", "25919.9", "312", "31.6"):
            assert any(cell in line for line in lines), (cell, text)
        assert sum("skipped torch" in line for line in lines) == 1, text
        table = any(line.startswith("ort-cuda fp16   32x384") for line in lines)
        assert table == (width == 80) and "TFLOP/s" in text and "% of" in text, text


def test_an_artifact_the_runtime_refuses_is_a_failed_row_and_exit_1(artifacts, tmp_path):
    folder = shutil.copytree(artifacts, tmp_path / "out")
    bogus = folder / "question-answering" / "model.int8.onnx"
    bogus.write_bytes(b"not an onnx model")
    manifest = Manifest.load(folder)
    manifest.record(get_task("qa"), "int8", "onnx", bogus)
    manifest.save()
    assert run_cli(folder, "--backends", "ort-cpu", "--batch", "1", "--seq", "8", "--iters", "1") == 1
    rows = json.loads((folder / "bench.json").read_text())["results"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["precision"] for r in failed] == ["int8"] and "cannot load" in failed[0]["reason"]
    assert sum(r["status"] == "ok" for r in rows) == 2  # fp32 and fp16 still measured


def test_a_moved_checkpoint_skips_only_the_reference(artifacts, tmp_path):
    folder = shutil.copytree(artifacts, tmp_path / "out", ignore=shutil.ignore_patterns("bench.*"))
    manifest = Manifest.load(folder)
    manifest.source["path"] = str(tmp_path / "moved.zip")
    manifest.save()
    assert run_cli(folder, "--backends", "torch,ort-cpu", "--batch", "1", "--seq", "8", "--iters", "1") == 0
    rows = json.loads((folder / "bench.json").read_text())["results"]
    assert [(r["backend"], r["status"]) for r in rows] == [("torch", "skipped"), ("ort-cpu", "ok"), ("ort-cpu", "ok")]
    assert "moved.zip" in rows[0]["reason"]


@pytest.mark.parametrize("args, message", [
    (["--batch", "1,x"], "--batch takes comma-separated integers"),
    (["--batch", "0"], "batch sizes must be positive"),
    (["--seq", "4096"], "longer than the model's 128 positions"),
    (["--backends", "torch,onnx"], "unknown backend 'onnx'"),
    (["--task", "ner"], "no 'token-classification' artifacts here"),
    (["--task", "nonsense"], "unknown task 'nonsense'"),
    (["--iters", "0"], "iters >= 1"),
])
def test_bad_options_exit_2_in_one_line(artifacts, tmp_path, capsys, args, message):
    folder = shutil.copytree(artifacts, tmp_path / "out", ignore=shutil.ignore_patterns("bench.*"))
    assert run_cli(folder, *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (folder / "bench.json").exists()


def test_missing_folder_and_tampered_artifact_exit_2(artifacts, tmp_path, capsys):
    assert run_cli(tmp_path / "nowhere") == 2
    assert "no manifest.json here" in capsys.readouterr().err
    folder = shutil.copytree(artifacts, tmp_path / "out", ignore=shutil.ignore_patterns("bench.*"))
    model = folder / "question-answering" / "model.fp32.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    assert run_cli(folder, *FAST) == 2
    err = capsys.readouterr().err
    assert "model.fp32.onnx changed since it was written" in err and len(err.strip().splitlines()) == 1
    assert not (folder / "bench.json").exists()


def test_ort_timer_runs_the_session_it_times(artifacts):
    """The timed callable really computes the model: its bound outputs equal a direct run's, run after run
    (the IO binding code is the one the CUDA provider uses, on the CPU device)."""
    from mbexport.bench.timing import ort_timer
    from mbexport.inputs import sample_batch
    from mbexport.runtime import ort_session

    session = ort_session(artifacts / "question-answering" / "model.fp32.onnx")
    config = MegatronBertConfig.from_hf_dict(Manifest.load(artifacts).config)
    feed = sample_batch(get_task("qa"), config, 2, 16)
    expected = session.run(None, feed)
    bindings, calls = [], []
    make_binding, run_bound = session.io_binding, session.run_with_iobinding
    session.io_binding = lambda: bindings.append(make_binding()) or bindings[-1]
    session.run_with_iobinding = lambda binding: calls.append(binding) or run_bound(binding)
    timer = ort_timer(session, feed)
    for _ in range(2):
        assert timer() > 0
        for got, want in zip(bindings[0].copy_outputs_to_cpu(), expected):
            np.testing.assert_array_equal(got, want)
    assert len(bindings) == 1 and len(calls) == 3  # one untimed run allocates the outputs, then two timed


@pytest.mark.gpu
def test_bench_on_gpu_uses_cuda_for_torch_and_onnx_runtime(artifacts, tmp_path):
    folder = shutil.copytree(artifacts, tmp_path / "out", ignore=shutil.ignore_patterns("bench.*"))
    assert run_cli(folder, "--backends", "torch,ort-cuda", *FAST) == 0
    report = json.loads((folder / "bench.json").read_text())
    ok = [r for r in report["results"] if r["status"] == "ok"]
    assert {(r["backend"], r["precision"]) for r in ok} == {("torch", "fp32"), ("torch", "fp16"),
                                                            ("ort-cuda", "fp32"), ("ort-cuda", "fp16")}
    assert all(r["device"] == "cuda" and 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p99"] for r in ok)
    peak = dense_peak(report["device"]["gpu"], "fp16")
    for row in ok:
        if row["precision"] == "fp16" and peak:
            assert row["percent_of_peak"] == pytest.approx(100 * row["tflops_per_s"] / peak)


@pytest.mark.tensorrt
def test_bench_times_an_engine_within_its_profiles(artifacts, tmp_path):
    from mbexport.engine import Profile, build_engine

    folder = shutil.copytree(artifacts, tmp_path / "out", ignore=shutil.ignore_patterns("bench.*"))
    task = get_task("qa")
    plan = folder / task.name / "model.fp32.plan"
    details = build_engine(folder / task.name / "model.fp32.onnx", plan, task,
                           [Profile(batch=(1, 1, 2), sequence=(8, 16, 16))], precision="fp32", root=folder)
    manifest = Manifest.load(folder)
    manifest.record(task, "fp32", "engine", plan, **details)
    manifest.save()
    assert run_cli(folder, "--backends", "trt", "--batch", "1,4", "--seq", "16", "--iters", "5") == 0
    rows = {r["batch"]: r for r in json.loads((folder / "bench.json").read_text())["results"]}
    assert rows[1]["status"] == "ok" and rows[1]["device"] == "cuda" and rows[1]["latency_ms"]["p50"] > 0
    assert rows[4]["status"] == "skipped" and "optimization profiles" in rows[4]["reason"]


def bench_report(batches, sequences, runners, tasks=("question-answering",)):
    """A bench.json as ``bench`` writes it, with made-up latencies: the plot's input."""
    rows = [{"task": task, "backend": backend, "precision": precision, "status": "ok", "batch": batch,
             "sequence": sequence, "latency_ms": {"p50": ms * batch * sequence / 128},
             "sequences_per_s": 1000 * 128 / (ms * sequence)}
            for task in tasks for (backend, precision), ms in runners.items() for batch in batches
            for sequence in sequences]
    return {"created": "2026-12-03T10:00:00+00:00", "device": {"cpu": "Some CPU", "cpu_count": 2, "gpu": None},
            "versions": {"onnxruntime": "1.32.0", "torch": "2.13.0"}, "config": {"hidden_size": 64,
            "num_hidden_layers": 2}, "settings": {"tasks": list(tasks), "iters": 10, "warmup": 2}, "results": rows}


def test_the_plot_says_what_was_measured_where_and_in_what_units():
    from mbexport.bench.report import figure

    drawn = figure(bench_report([1, 8, 32], [128, 384], {("torch", "fp32"): 40.0, ("trt", "fp8"): 0.5},
                                tasks=("question-answering", "masked-lm")))
    axes = drawn.axes
    titles = [axis.get_title() for axis in axes]
    assert len(set(titles)) == 4 and titles[0] == "question-answering: p50 latency"
    title = drawn.get_suptitle()
    assert "Some CPU" in title and "hidden 64, 2 layers" in title and "p50 of 10 timed runs" in title
    assert [axis.get_ylabel() for axis in axes[:2]] == ["p50 latency (ms)", "throughput (sequences/s)"]
    assert all(axis.get_xlabel() == "batch size (sequences)" for axis in axes)
    # a line per runner and sequence length, each through every batch size; one legend, outside the panels
    assert all(len(line.get_xdata()) == 3 for axis in axes for line in axis.get_lines())
    assert all(axis.get_legend() is None for axis in axes) and len(drawn.legends) == 1
    drawn.canvas.draw()
    renderer = drawn.canvas.get_renderer()
    legend = drawn.legends[0].get_window_extent(renderer)
    assert all(legend.y1 <= axis.get_tightbbox(renderer).y0 + 1 for axis in axes)
    assert {t.get_text() for t in drawn.legends[0].get_texts()} == {"torch fp32", "trt fp8", "128 tokens",
                                                                    "384 tokens"}
    # 80x apart: a log axis whose labelled ticks do not overlap
    latency = axes[0]
    assert latency.get_yscale() == "log"
    boxes = [t.get_window_extent(renderer) for t in latency.get_yticklabels() if t.get_visible() and t.get_text()]
    assert len(boxes) >= 3 and not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_one_shape_is_drawn_as_labelled_bars():
    """A single-batch, single-length run (bench's CPU default) gives bars with their values, not dots."""
    from mbexport.bench.report import figure

    drawn = figure(bench_report([1], [128], {("torch", "fp32"): 0.64, ("ort-cpu", "fp32"): 0.44,
                                             ("ort-cpu", "int8"): 1.3}))
    latency, throughput = drawn.axes
    assert not latency.get_lines() and len(latency.patches) == 3
    assert [t.get_text() for t in latency.get_yticklabels()] == ["torch fp32", "ort-cpu fp32", "ort-cpu int8"]
    assert [t.get_text() for t in latency.texts] == ["0.64", "0.44", "1.30"]
    assert [t.get_text() for t in throughput.texts] == ["1,562", "2,273", "769"]
    assert latency.get_xlabel() == "p50 latency (ms)" and "batch 1 x 128 tokens" in drawn.get_suptitle()
