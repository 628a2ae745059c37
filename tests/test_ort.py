"""Artifacts shaped for ONNX Runtime (``build --runtime onnxruntime``): its fused operators and integer kernels.

The built-in example's QA head is built by the real ``build`` in fp32, fp16 and int8 for ONNX Runtime and
validated under the same gates as every artifact (the PyTorch reference is the oracle, padding and an
all-padding row included); the int8 file runs on ONNX Runtime's integer kernels, not as Q/DQ emulation.
Accuracy on the trained fixture is in test_accuracy_trained.py, Triton serving it in test_triton_server.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from mbexport.build import build
from mbexport.checkpoint.example import make_example
from mbexport.config import MegatronBertConfig
from mbexport.deploy.run import answer
from mbexport.deploy.triton import write_repository
from mbexport.errors import MbexportError, ValidationFailed
from mbexport.export import export
from mbexport.export.ort import fuse_for_ort
from mbexport.inputs import sample_batch
from mbexport.manifest import Manifest
from mbexport.precisions import DEFAULT_RUNTIME, ONNXRUNTIME, get_precision
from mbexport.recipes import Calibration, Recipe
from mbexport.runtime import ort_session
from mbexport.tasks import get_task
from mbexport.validate import load_reference, validate
from mbexport.validate.suite import SHAPES

QA = "question-answering"
BUILT = ("fp32", "fp16", "int8")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(checkpoint, vocab, output folder) with QA in fp32, fp16 and int8 for ONNX Runtime, each build validated."""
    base = tmp_path_factory.mktemp("ort")
    checkpoint, vocab = make_example(base / "checkpoint")
    out = base / "out"
    for precision in BUILT:
        build(checkpoint, Recipe(name="test", task=QA, precision=precision, runtime=ONNXRUNTIME,
                                 calibration=Calibration(size=8, sequence=32)),
              out_dir=out, vocab=vocab, init_missing_head=0)
    return checkpoint, vocab, out


def shaped(manifest: Manifest, precision: str):
    (artifact,) = manifest.find(QA, precision, "onnx", ONNXRUNTIME)
    return artifact


def test_each_passes_every_gate_of_its_precision(built):
    out = built[2]
    report = json.loads((out / "validation.json").read_text())
    results = {a["path"]: a for a in report["artifacts"]}
    gated = {"elementwise": "atol", "cosine": "cosine", "argmax": "agreement"}
    for precision in BUILT:
        path = f"{QA}/{get_precision(precision, ONNXRUNTIME).file_name('onnx')}"
        result = results[path]
        assert result["status"] == "pass" and result["tolerances"] == get_precision(precision).tolerances
        checks = {(c["output"], c["check"]): c for c in result["checks"]}
        for output in ("start_logits", "end_logits"):
            for check, tolerance in gated.items():
                assert checks[(output, check)]["passed"]
                if result["tolerances"][tolerance] is not None and check != "elementwise":
                    assert checks[(output, check)]["limit"] == result["tolerances"][tolerance]
            assert checks[(output, "finite")]["passed"]  # the all-padding row included
        if precision != "int8":  # int8's elementwise difference is reported, not gated, as for TensorRT's int8
            assert checks[("start_logits", "elementwise")]["atol"] == result["tolerances"]["atol"]
        assert [tuple(shape["input_ids"]) for shape in result["inputs"]] == [(b, s) for b, s, _ in SHAPES]


def test_a_fused_graph_that_ignores_padding_fails_validation(built, tmp_path):
    """The gates bite for these files too: the fused attention with its mask switched off (mask value 0, padded
    keys attended) fails on rows with padding."""
    out = built[2]
    manifest = Manifest.load(out)
    artifact = shaped(manifest, "fp32")
    model = onnx.load(str(manifest.path_of(artifact)))
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type == "Attention" and attribute.name == "mask_filter_value":
                attribute.f = 0.0
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("manifest.json", "vocab.txt"):
        (broken / name).write_bytes((out / name).read_bytes())
    (broken / QA).mkdir()
    (broken / QA / "seeded-head.safetensors").write_bytes((out / QA / "seeded-head.safetensors").read_bytes())
    onnx.save(model, str(broken / artifact.path))
    copy = Manifest.load(broken)
    copy.artifacts = [a for a in copy.artifacts if a.kind != "onnx"]
    copy.record(get_task(QA), "fp32", "onnx", broken / artifact.path, runtime=ONNXRUNTIME)
    copy.save()
    with pytest.raises(ValidationFailed) as failed:
        validate(broken)
    (result,) = [a for a in failed.value.report.artifacts if a.kind == "onnx"]
    failing = {c.check for c in result.checks if not c.passed}
    assert "elementwise" in failing and "cosine" in failing, result.checks


def test_any_padding_gives_the_references_numbers_everywhere(built):
    """Right padding, left padding, a hole and an all-padding row: the fused fp32 file computes what the PyTorch
    reference computes at every position, padded ones included (ORT adds the export's own mask value)."""
    out = built[2]
    manifest = Manifest.load(out)
    config = MegatronBertConfig.from_hf_dict(manifest.config)
    feed = sample_batch(get_task(QA), config, 4, 24, seed=3)
    feed["attention_mask"][:] = 1
    feed["attention_mask"][0, 17:] = 0  # right padding
    feed["attention_mask"][1, :5] = 0  # left padding
    feed["attention_mask"][2, 8:12] = 0  # a hole
    feed["attention_mask"][3] = 0  # all padding
    reference = load_reference(manifest, QA)
    with torch.no_grad():
        expected = reference(*(torch.from_numpy(feed[name]) for name in get_task(QA).input_names))
    session = ort_session(manifest.path_of(shaped(manifest, "fp32")), shaped_for=ONNXRUNTIME)
    for got, want in zip(session.run(None, feed), expected):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


def test_int8_runs_on_onnx_runtimes_integer_kernels(built, tmp_path):
    out = built[2]
    manifest = Manifest.load(out)
    path = manifest.path_of(shaped(manifest, "int8"))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QAttention", "MatMulIntegerToFloat", "QuantizeLinear"} <= ops and "DequantizeLinear" not in ops
    assert config(ort_session(path, shaped_for=DEFAULT_RUNTIME), "session.disable_quant_qdq") == "1"  # emulated
    ours = ort_session(path, shaped_for=ONNXRUNTIME)
    assert config(ours, "session.disable_quant_qdq") is None
    import onnxruntime as ort  # what ONNX Runtime really runs, after its own graph optimizations

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ran = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ran.count("QAttention") == 2 and ran.count("MatMulIntegerToFloat") == 6  # 2 layers: QKV; out, up, down


def test_int8_gives_a_row_the_same_numbers_whatever_it_is_batched_with(built):
    """Calibrated activation ranges: a row alone and the same row padded in a batch with a longer, different row
    (what Triton's dynamic batcher does) get the same outputs at its positions. Ranges taken at run time (ORT's
    quantize_dynamic) would quantize the row with the batch's range and change them."""
    manifest = Manifest.load(built[2])
    config = MegatronBertConfig.from_hf_dict(manifest.config)
    session = ort_session(manifest.path_of(shaped(manifest, "int8")), shaped_for=ONNXRUNTIME)
    alone = sample_batch(get_task(QA), config, 1, 20, seed=4)
    other = sample_batch(get_task(QA), config, 1, 32, seed=5)
    other["input_ids"][:] = config.vocab_size - 1 - other["input_ids"]  # different tokens, other activations
    batched = {name: np.concatenate([np.pad(alone[name], ((0, 0), (0, 12))), other[name]]) for name in alone}
    for got, want in zip(session.run(None, batched), session.run(None, alone)):
        np.testing.assert_allclose(got[:1, :20], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("machine, flags, exact_u8u8", [
    ("x86_64", ("avx2", "avx512f"), True),  # VPMADDUBSW's 16-bit pair sums saturate: ORT's u8 x u8 instead
    ("x86_64", (), True),  # flags unknown: the exact way
    ("x86_64", ("avx2", "avx512f", "avx512_vnni"), False),  # VNNI sums in 32 bits; u8 x u8 has no VNNI kernel
    ("x86_64", ("avx2", "avx_vnni"), False),
    ("aarch64", (), False),  # x86 only
])
def test_u8_by_u8_only_where_u8_by_s8_can_saturate(built, monkeypatch, machine, flags, exact_u8u8):
    import mbexport.runtime as runtime

    monkeypatch.setattr(runtime.platform, "machine", lambda: machine)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    manifest = Manifest.load(built[2])
    session = ort_session(manifest.path_of(shaped(manifest, "int8")), shaped_for=ONNXRUNTIME)
    assert config(session, "session.x64quantprecision") == ("1" if exact_u8u8 else None)


def test_u8_by_u8_gives_the_integer_kernels_numbers(built):
    """Both ways are exact integer products here when this CPU has VNNI; without it, u8 x s8 may saturate and
    the u8 x u8 way is the right one: either way the two agree to float rounding where nothing saturates."""
    import onnxruntime as ort

    manifest = Manifest.load(built[2])
    path = manifest.path_of(shaped(manifest, "int8"))
    feed = sample_batch(get_task(QA), MegatronBertConfig.from_hf_dict(manifest.config), 2, 32, seed=1)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1")
    forced = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for got, want in zip(ort_session(path, shaped_for=ONNXRUNTIME).run(None, feed), forced.run(None, feed)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def config(session, key: str) -> str | None:
    try:
        return session.get_session_options().get_session_config_entry(key)
    except RuntimeError:  # ONNX Runtime's way of saying the entry is not set
        return None


def test_causal_heads_are_refused_in_one_line(built, cli, tmp_path):
    checkpoint = built[0]
    code, _, err = cli("build", str(checkpoint), "--task", "clm", "--precision", "int8", "--runtime", "onnxruntime",
                       "--init-missing-head", "0", "--out", str(tmp_path / "out"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "causal" in err
    assert not (tmp_path / "out").exists()
    manifest = export(checkpoint, "clm", tmp_path / "clm", init_missing_head=0)  # the transform refuses it too
    with pytest.raises(MbexportError, match="padding mask"):
        fuse_for_ort(manifest.path_of(manifest.find("causal-lm", "fp32", "onnx")[0]), tmp_path / "fused.onnx")
    assert not (tmp_path / "fused.onnx").exists()


def test_the_manifest_records_the_runtime(built, tmp_path):
    out = built[2]
    data = json.loads((out / "manifest.json").read_text())
    runtimes = {a["path"]: a["runtime"] for a in data["artifacts"]}
    assert runtimes == {f"{QA}/model.fp32.onnx": DEFAULT_RUNTIME, f"{QA}/model.fp32.ort.onnx": ONNXRUNTIME,
                        f"{QA}/model.fp16.ort.onnx": ONNXRUNTIME, f"{QA}/model.int8.ort.onnx": ONNXRUNTIME,
                        f"{QA}/seeded-head.safetensors": "-", "vocab.txt": "-"}
    older = tmp_path / "older"  # written before runtimes were recorded: every model was shaped for TensorRT
    older.mkdir()
    (older / "manifest.json").write_text(json.dumps({**data, "artifacts": [
        {k: v for k, v in a.items() if k != "runtime"} for a in data["artifacts"] if a["runtime"] != ONNXRUNTIME]}))
    assert {a.runtime for a in Manifest.load(older).artifacts} == {DEFAULT_RUNTIME, "-"}
    data["artifacts"][0]["runtime"] = "tflite"
    (older / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(MbexportError, match=r"artifacts\[0\].runtime 'tflite' is not one of"):
        Manifest.load(older)


def test_run_bench_and_triton_take_them_like_every_artifact(built, tmp_path):
    out = built[2]
    texts = {"question": "where do people work?", "context": "many people work in the city."}
    picked = answer(out, QA, texts, precision="int8")
    assert picked["artifact"] == f"{QA}/model.int8.ort.onnx" and picked["answer"]
    assert answer(out, QA, texts)["artifact"] == f"{QA}/model.fp32.ort.onnx"  # at fp32, the file shaped for ORT
    from mbexport.bench import bench

    rows = bench(out, backends=("ort-cpu",), batches=(1,), sequences=(16,), warmup=0, iters=1)["results"]
    assert {(r["label"], r["status"]) for r in rows} == {("fp32", "ok"), ("fp32-ort", "ok"), ("fp16-ort", "ok"),
                                                        ("int8-ort", "ok")}
    names = write_repository(out, tmp_path / "repo", precisions=["int8"])
    assert f"{QA}-int8-ort" in names
    config = (tmp_path / "repo" / f"{QA}-int8-ort" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config
