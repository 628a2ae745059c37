"""Validation: passes on good artifacts, fails on tampered ones, and its agreement checks judge real tokens only."""

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from safetensors.torch import load_file, save_file

from mbexport.errors import MbexportError, ValidationFailed
from mbexport.export import export
from mbexport.manifest import Manifest
from mbexport.tasks import TASKS
from mbexport.validate import tolerances_for, validate, validate_artifact
from mbexport.validate.checks import compare


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An output folder with masked-LM fp32 + fp16 and a seeded question-answering fp32, from the example zip."""
    from mbexport.checkpoint.example import make_example

    zip_path, vocab = make_example(tmp_path_factory.mktemp("example"), seed=0)
    out = tmp_path_factory.mktemp("out") / "artifacts"
    export(zip_path, "mlm", out, precisions=("fp32", "fp16"), vocab=vocab)
    with pytest.warns(UserWarning, match="seed 5"):
        export(zip_path, "qa", out, init_missing_head=5)
    return out


@pytest.fixture
def folder(exported, tmp_path):
    """A private copy to tamper with."""
    return shutil.copytree(exported, tmp_path / "artifacts")


def results(folder):
    return {a["path"]: a for a in json.loads((folder / "validation.json").read_text())["artifacts"]}


def check(result, output, name):
    return next(c for c in result["checks"] if c["output"] == output and c["check"] == name)


def test_good_artifacts_pass_with_numbers(folder, cli):
    code, out, err = cli("validate", str(folder))
    assert code == 0, out + err
    report = json.loads((folder / "validation.json").read_text())
    assert report["passed"] and [s["batch"] for s in report["inputs"]] == [1, 4, 2, 16]
    assert any(s["all_padding_row"] for s in report["inputs"])
    by_path = results(folder)
    fp32, fp16 = by_path["masked-lm/model.fp32.onnx"], by_path["masked-lm/model.fp16.onnx"]
    assert check(fp32, "logits", "elementwise")["max_abs_diff"] <= 1e-4
    assert 0 < check(fp16, "logits", "elementwise")["max_abs_diff"] <= 0.05
    assert check(fp32, "logits", "argmax")["agreement"] == 1.0 and check(fp16, "logits", "top5")["agreement"] >= 0.99
    assert check(fp16, "logits", "cosine")["cosine"] > 0.999
    qa = by_path["question-answering/model.fp32.onnx"]
    assert {c["check"] for c in qa["checks"]} >= {"integrity", "finite", "elementwise", "cosine", "argmax"}
    assert fp16["tolerances"] == tolerances_for("fp16")
    assert "PASSED" in (folder / "validation.md").read_text() and "validation passed" in out


def test_a_tampered_file_fails_with_exit_1(folder, cli):
    path = folder / "masked-lm" / "model.fp16.onnx"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    code, _, err = cli("validate", str(folder))
    assert code == 1 and "masked-lm/model.fp16.onnx" in err
    by_path = results(folder)
    assert by_path["masked-lm/model.fp16.onnx"]["status"] == "FAIL"
    assert "sha256 mismatch" in check(by_path["masked-lm/model.fp16.onnx"], "-", "integrity")["problem"]
    assert by_path["masked-lm/model.fp32.onnx"]["status"] == "pass"


def test_changed_weights_fail_even_with_a_matching_hash(folder):
    path = folder / "masked-lm" / "model.fp32.onnx"
    model = onnx.load(str(path))
    weight = next(t for t in model.graph.initializer if t.name.endswith("layer.1.output.dense.weight")
                  or (len(t.dims) == 2 and t.dims[0] == t.dims[1]))
    array = onnx.numpy_helper.to_array(weight) * 1.05
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(path))
    manifest = Manifest.load(folder)
    manifest.record(TASKS["masked-lm"], "fp32", "onnx", path, opset=17)  # the attacker also fixes the hash
    manifest.save()
    with pytest.raises(ValidationFailed) as failure:
        validate(folder, tasks=["mlm"], precisions=["fp32"])
    artifact = failure.value.report.artifacts[-1]
    failed = {c.check for c in artifact.checks if not c.passed}
    assert artifact.path == "masked-lm/model.fp32.onnx" and "elementwise" in failed
    assert "integrity" not in failed


def test_a_changed_seeded_head_fails(folder, cli):
    path = folder / "question-answering" / "seeded-head.safetensors"
    weights = load_file(path)
    save_file({k: v + 0.01 for k, v in weights.items()}, str(path))
    code, _, _ = cli("validate", str(folder), "--task", "qa")
    assert code == 1
    by_path = results(folder)
    assert set(by_path) == {"question-answering/seeded-head.safetensors", "question-answering/model.fp32.onnx"}
    assert check(by_path["question-answering/model.fp32.onnx"], "-", "reference")["passed"] is False


def test_tolerances_are_overridable_and_checked(folder, cli):
    with pytest.raises(ValidationFailed) as failure:
        validate(folder, tasks=["masked-lm"], tolerances={"fp16.atol": 1e-9, "fp16.rtol": 0})
    by_path = {a.path: a for a in failure.value.report.artifacts}
    assert by_path["masked-lm/model.fp32.onnx"].passed
    assert [c.check for c in by_path["masked-lm/model.fp16.onnx"].checks if not c.passed] == ["elementwise"]
    with pytest.raises(MbexportError, match="unknown tolerance 'fp16.max'"):
        validate(folder, tolerances={"fp16.max": 1})


def test_filters_and_single_artifact(folder, cli):
    code, _, _ = cli("validate", str(folder), "--task", "mlm", "--precision", "fp16")
    assert code == 0
    assert [a for a in results(folder) if a.endswith(".onnx")] == ["masked-lm/model.fp16.onnx"]
    manifest = Manifest.load(folder)
    result = validate_artifact(manifest, manifest.find("question-answering", "fp32", "onnx")[0])
    assert result.passed and result.path == "question-answering/model.fp32.onnx"


def test_bad_input_exits_2(folder, cli, tmp_path):
    assert cli("validate", str(tmp_path / "nowhere"))[0] == 2
    assert cli("validate", str(folder), "--device", "tpu")[0] == 2
    assert cli("validate", str(folder), "--precision", "int8")[0] == 2  # nothing to validate
    manifest = Manifest.load(folder)
    manifest.source["path"] = str(tmp_path / "moved.zip")
    manifest.save()
    code, _, err = cli("validate", str(folder))
    assert code == 2 and "moved.zip" in err and "Traceback" not in err


def test_an_engine_is_skipped_without_tensorrt(folder):
    pytest.importorskip("polygraphy")
    from conftest import missing

    if missing("tensorrt") is None:
        pytest.skip("TensorRT is installed here: the engine would really run")
    plan = folder / "masked-lm" / "model.fp16.plan"
    plan.write_bytes(b"not an engine; never loaded here")
    manifest = Manifest.load(folder)
    manifest.record(TASKS["masked-lm"], "fp16", "engine", plan,
                    profiles=[{"batch": [1, 2, 2], "sequence": [8, 16, 32]}])
    manifest.save()
    report = validate(folder, tasks=["mlm"])
    engine = next(a for a in report.artifacts if a.kind == "engine")
    assert engine.status == "skipped" and "TensorRT" in engine.skipped and report.passed
    onnx_fp16 = next(a for a in report.artifacts if a.kind == "onnx" and a.precision == "fp16")
    # every shape clamped inside the engine's profile
    assert [i["input_ids"] for i in onnx_fp16.inputs] == [[1, 16], [2, 32], [2, 32], [2, 32]]


@pytest.mark.tensorrt
@pytest.mark.gpu  # validates on CUDA: ONNX Runtime's CUDA provider too
def test_an_engine_validates_against_the_reference(folder):
    from mbexport.engine import build_engine, default_profiles

    manifest = Manifest.load(folder)
    config = manifest.config
    task = TASKS["masked-lm"]
    plan = folder / "masked-lm" / "model.fp16.plan"
    details = build_engine(folder / "masked-lm" / "model.fp16.onnx", plan, task,
                           default_profiles(config["max_position_embeddings"]), precision="fp16")
    manifest.record(task, "fp16", "engine", plan, **details)
    manifest.save()
    report = validate(folder, tasks=["mlm"], precisions=["fp16"], device="cuda")
    engine = next(a for a in report.artifacts if a.kind == "engine")
    assert engine.passed and not engine.skipped


def test_agreement_ignores_padding_and_judges_real_tokens():
    task = TASKS["question-answering"]
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    feed = {"attention_mask": mask}
    rng = np.random.default_rng(0)
    ref = {name: rng.normal(size=(3, 5)) for name in task.output_names}
    got = {name: value.copy() for name, value in ref.items()}
    for value in got.values():
        value[:, 3:] = 100.0  # padded positions: huge but not candidates
        value[2] = -5.0  # the all-padding row: no answer to agree on
    tol = tolerances_for("fp32", overrides={"atol": 1e3, "rtol": 0})
    checks = {(c.output, c.check): c for c in compare(task, [feed], [ref], [got], tol)}
    assert checks[("start_logits", "argmax")].passed
    assert checks[("start_logits", "argmax")].numbers == {"agreement": 1.0, "limit": 0.99, "count": 2}
    best = ref["end_logits"][0, :3].argmax()
    got["end_logits"][0, (best + 1) % 3] = 50.0  # a real position wins in row 0
    checks = {(c.output, c.check): c for c in compare(task, [feed], [ref], [got], tol)}
    assert checks[("end_logits", "argmax")].numbers["agreement"] == 0.5 and not checks[("end_logits", "argmax")].passed


def test_per_token_agreement_topk_and_non_finite():
    task = TASKS["masked-lm"]
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    rng = np.random.default_rng(1)
    ref = {"logits": rng.normal(size=(2, 3, 10))}
    got = {"logits": ref["logits"].copy()}
    got["logits"][0, 2] = rng.normal(size=10)  # a padded position: ignored
    best = ref["logits"][0, 1].argmax()
    got["logits"][0, 1, best] = -10.0  # a real token loses its top-1 entirely
    tol = tolerances_for("fp16", overrides={"atol": 1e3})
    checks = {c.check: c for c in compare(task, [{"attention_mask": mask}], [ref], [got], tol)}
    assert checks["argmax"].numbers["agreement"] == pytest.approx(2 / 3) and checks["argmax"].numbers["count"] == 3
    assert checks["top5"].numbers["agreement"] == pytest.approx(2 / 3)
    got["logits"][1, 0, 0] = np.nan
    checks = {c.check: c for c in compare(task, [{"attention_mask": mask}], [ref], [got], tol)}
    assert not checks["finite"].passed and checks["finite"].numbers["non_finite"] == 1


def test_quantized_elementwise_difference_is_reported_unless_a_recipe_gates_it():
    task = TASKS["sequence-classification"]
    feed = {"attention_mask": np.ones((4, 3), dtype=np.int64)}
    ref = {"logits": np.array([[4.0, 0.0], [0.0, 4.0], [5.0, 1.0], [1.0, 6.0]])}
    got = {"logits": ref["logits"] * 1.3}  # a 1.8 shift, same answers, cosine 1
    checks = {c.check: c for c in compare(task, [feed], [ref], [got], tolerances_for("int8"))}
    assert checks["elementwise"].passed and checks["elementwise"].numbers["max_abs_diff"] == pytest.approx(1.8)
    assert checks["argmax"].passed and checks["cosine"].passed
    gated = tolerances_for("int8", overrides={"int8.atol": 1.0})
    checks = {c.check: c for c in compare(task, [feed], [ref], [got], gated)}
    assert not checks["elementwise"].passed


def test_a_partial_run_keeps_earlier_results_only_for_unchanged_files(folder):
    validate(folder)
    first = results(folder)
    validate(folder, precisions=["fp16"])  # only masked-lm fp16 (and the non-runnable files) run again
    kept = results(folder)
    assert kept["question-answering/model.fp32.onnx"] == first["question-answering/model.fp32.onnx"]
    assert kept["masked-lm/model.fp32.onnx"] == first["masked-lm/model.fp32.onnx"]
    manifest = Manifest.load(folder)
    qa = manifest.find("question-answering", "fp32", "onnx")[0]
    qa.sha256 = "0" * 64  # as if re-exported since: its old result no longer describes the file
    manifest.save()
    validate(folder, precisions=["fp16"])
    assert "question-answering/model.fp32.onnx" not in results(folder)


def test_first_line_of_an_error_without_a_message():
    """Errors from ONNX Runtime, onnx.checker, Model Optimizer or TensorRT are reported by their first line;
    one with no message at all is named by its type instead of breaking the report."""
    from mbexport.errors import first_line

    assert first_line(ValueError("bad graph\nat node 3")) == "bad graph"
    assert first_line(AssertionError()) == "AssertionError"
    assert len(first_line(RuntimeError("x" * 1000))) == 300


def rendered(renderable, width: int) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, file=open(os.devnull, "w"), markup=False)
    console.print(renderable)
    return console.export_text()


def test_the_table_reads_at_80_columns_and_turns_into_lines_below():
    """No cell cut with an ellipsis, no file name broken across lines, every number whole: at 80 columns as a
    table (a row per file under its head), narrower as lines."""
    from pathlib import Path

    from mbexport.validate.checks import Check
    from mbexport.validate.report import ArtifactResult, Report

    def result(path, *checks, skipped=None):
        task = path.split("/")[0] if "/" in path else "sequence-classification"
        return ArtifactResult(task, "int8", "onnx", path, "0" * 64, checks=list(checks), skipped=skipped)

    numbers = [Check("logits", "elementwise", True, {"max_abs_diff": 0.0269, "mean_abs_diff": 0.001}),
               Check("logits", "cosine", False, {"cosine": 0.997721}),
               Check("logits", "argmax", False, {"agreement": 0.9091})]
    report = Report(Path("out"), "cpu", [], [
        result("sequence-classification/seeded-head.safetensors", Check("-", "integrity", True)),
        result("vocab.txt", Check("-", "integrity", True)),
        result("sequence-classification/model.int8.onnx", *numbers),
        result("sequence-classification/model.int8.plan",
               skipped="TensorRT is not installed (pip install tensorrt-cu12 from NVIDIA's index)")])
    wide, narrow = rendered(report.table(), 80), rendered(report.table(), 44)
    for text, width in ((wide, 80), (narrow, 44)):
        lines = text.splitlines()
        assert "…" not in text and max(map(len, lines)) <= width, text
        for name in ("seeded-head.safetensors", "vocab.txt", "model.int8.onnx", "model.int8.plan", "2.69e-02",
                     "0.997721", "90.91%", "FAIL:", "argmax", "tensorrt-cu12"):
            assert any(name in line for line in lines), (name, text)
    assert "agreement" in wide and "  model.int8.onnx  " in wide  # a table: headers, padded cells
    assert any(line.startswith("  model.int8.onnx: FAIL: logits cosine") for line in narrow.splitlines())
