"""The Triton model repository: every config parses into Triton's ModelConfig protobuf and agrees with the
artifact it serves, the ensembles are wired end to end, and the generated Python models answer like
`mbexport run`.

No Triton server can run here (no container engine, no server binaries). The ensemble is therefore executed
in-process: the repository's own ``model.py`` files run against a small stand-in for Triton's
``triton_python_backend_utils`` (the four calls they use), and the inference step runs the repository's
``1/model.onnx`` in ONNX Runtime, following the ensemble config's input/output maps.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

from mbexport.config import MegatronBertConfig
from mbexport.deploy.run import answer
from mbexport.deploy.triton import write_repository
from mbexport.errors import MbexportError
from mbexport.fsutil import sha256_file
from mbexport.manifest import Artifact, Manifest
from mbexport.runtime import ort_session
from test_deploy import CONFIG, TEXTS, shared_artifacts

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import json_format, text_format  # noqa: E402  (tritonclient[grpc] brings protobuf)

NUMPY = {"TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP32": np.float32, "TYPE_FP16": np.float16,
         "TYPE_STRING": np.object_}
ONNX_TYPES = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32",
              onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.INT32: "TYPE_INT32"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def repo(artifacts, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton") / "models"
    write_repository(artifacts, repo)
    return repo


def parse(folder: Path):
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == folder.name
    return config


def dtype_name(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


def check_inference_model(folder: Path, config, max_batch: int, vocab_size: int = CONFIG.vocab_size):
    """Names, dtypes and ranks against the ONNX graph Triton will load; warm-up files against the config."""
    assert config.max_batch_size == max_batch
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(config.dynamic_batching.preferred_batch_size)[-1] == max_batch
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    graph = onnx.load(str(folder / "1" / "model.onnx"), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    for tensors, values in ((config.input, [v for v in graph.input if v.name not in weights]),
                            (config.output, list(graph.output))):
        assert [t.name for t in tensors] == [v.name for v in values]
        for tensor, value in zip(tensors, values):
            shape = value.type.tensor_type.shape.dim
            assert dtype_name(tensor.data_type) == ONNX_TYPES[value.type.tensor_type.elem_type]
            assert len(tensor.dims) + 1 == len(shape)  # the batch dim is implicit
            for dim, onnx_dim in zip(tensor.dims, shape[1:]):
                assert dim == (onnx_dim.dim_value if onnx_dim.HasField("dim_value") else -1)
    assert [w.batch_size for w in config.model_warmup] == sorted({1, max_batch})
    for warmup in config.model_warmup:
        assert set(warmup.inputs) == {t.name for t in config.input}
        for name, spec in warmup.inputs.items():
            data = np.fromfile(folder / "warmup" / spec.input_data_file, dtype=NUMPY[dtype_name(spec.data_type)])
            assert data.size == np.prod(spec.dims) and all(d > 0 for d in spec.dims)
            if name == "input_ids":
                assert 0 <= data.min() and data.max() < vocab_size


def check_ensemble(repo: Path, config) -> list:
    """Every step's inputs come from the ensemble's inputs or an earlier step, with the same dtype and dims;
    every produced tensor is consumed; the ensemble's outputs are produced. Returns the steps' configs."""
    assert config.platform == "ensemble"
    available = {t.name: (t.data_type, list(t.dims)) for t in config.input}
    consumed, steps = set(), []
    for step in config.ensemble_scheduling.step:
        model = parse(repo / step.model_name)
        steps.append((step, model))
        assert model.max_batch_size == config.max_batch_size
        assert set(step.input_map) == {t.name for t in model.input}
        for t in model.input:
            source = step.input_map[t.name]
            assert available[source] == (t.data_type, list(t.dims)), (step.model_name, t.name)
            consumed.add(source)
        outputs = {t.name: t for t in model.output}
        assert set(step.output_map) <= set(outputs)
        for key, name in step.output_map.items():
            assert name not in available  # produced once
            available[name] = (outputs[key].data_type, list(outputs[key].dims))
    for t in config.output:
        assert available[t.name] == (t.data_type, list(t.dims))
    assert set(available) - {t.name for t in config.input} <= consumed | {t.name for t in config.output}
    assert {t.name for t in config.input} <= consumed
    return steps


def test_every_config_parses_and_matches_its_artifact(repo):
    folders = sorted(p for p in repo.iterdir() if p.is_dir())
    assert {p.name for p in folders} == {f"{task}-fp32{suffix}" for task in TEXTS
                                         for suffix in ("", "-tokenizer", "-postprocess", "-text")}
    for folder in folders:
        config = parse(folder)
        assert (folder / "1").is_dir()
        if config.platform == "onnxruntime_onnx":
            check_inference_model(folder, config, max_batch=32)
        elif config.platform == "ensemble":
            base = folder.name.removesuffix("-text")
            steps = check_ensemble(repo, config)
            assert [s.model_name for s, _ in steps] == [f"{base}-tokenizer", base, f"{base}-postprocess"]
        else:
            assert config.backend == "python" and config.parameters["role"].string_value in ("tokenizer", "postprocess")
            compile((folder / "1" / "model.py").read_text(), str(folder / "1" / "model.py"), "exec")
            settings = json.loads((folder / "1" / "pipeline.json").read_text())
            assert settings["max_length"] == CONFIG.max_position_embeddings  # min(384, positions) for ONNX


class FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


def fake_pb_utils():
    """A stand-in for the parts of Triton's triton_python_backend_utils that the generated model.py calls."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = FakeTensor
    pb.TritonError = type("TritonError", (Exception,), {})
    pb.InferenceResponse = lambda output_tensors, error=None: types.SimpleNamespace(
        outputs={t.name(): t.as_numpy() for t in output_tensors}, error=error)
    pb.get_input_tensor_by_name = lambda request, name: request.get(name)
    pb.triton_string_to_numpy = lambda name: NUMPY[name]
    return pb


def load_python_model(folder: Path, config, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    spec = importlib.util.spec_from_file_location(f"model_{folder.name.replace('-', '_')}", folder / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
                      "model_repository": str(folder), "model_version": "1", "model_name": folder.name,
                      "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    return model


def run_ensemble(repo: Path, name: str, request: dict, monkeypatch):
    """Execute an ensemble the way Triton does: step by step, tensors named by its input/output maps."""
    config = parse(repo / name)
    tensors = dict(request)
    for step, model_config in check_ensemble(repo, config):
        inputs = {key: FakeTensor(key, tensors[source]) for key, source in step.input_map.items()}
        folder = repo / step.model_name
        if model_config.backend == "python":
            [response] = load_python_model(folder, model_config, monkeypatch).execute([inputs])
            if response.error is not None:
                return response
            outputs = response.outputs
        else:
            session = ort_session(folder / "1" / "model.onnx")
            names = [t.name for t in model_config.output]
            outputs = dict(zip(names, session.run(names, {k: t.as_numpy() for k, t in inputs.items()})))
        for key, target in step.output_map.items():
            tensors[target] = outputs[key]
    return tensors["answer"]


def same(a, b):
    """Equal documents, floats to float32 noise."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            same(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-6)
    else:
        assert a == b


@pytest.mark.parametrize("task", list(TEXTS))
def test_ensemble_answers_like_mbexport_run(repo, artifacts, task, monkeypatch):
    texts = TEXTS[task]
    other = {field: "paris is in france" for field in texts}
    request = {field: np.array([[texts[field].encode()], [other[field].encode()]], dtype=np.object_)
               for field in texts}
    result = run_ensemble(repo, f"{task}-fp32-text", request, monkeypatch)
    assert result.shape == (2, 1) and result.dtype == np.object_
    for row, fields in zip(result[:, 0], (texts, other)):
        local = answer(artifacts, task, fields)
        for key in ("task", "backend", "precision", "artifact"):
            local.pop(key)
        same(json.loads(row.decode()), local)


def test_bad_request_gets_an_error_response(repo, monkeypatch):
    request = {"question": np.array([[b"where?"]], dtype=np.object_), "context": np.array([[b""]], dtype=np.object_)}
    response = run_ensemble(repo, "question-answering-fp32-text", request, monkeypatch)
    assert "context" in str(response.error)


def with_engine(artifacts: Path, root: Path, profiles: list[dict]) -> Path:
    """A copy of the artifacts whose QA head also has an fp32 engine entry with these profiles.

    The plan's bytes are a placeholder (TensorRT cannot be installed here): the writer only copies the file,
    and everything it derives comes from the manifest's profiles and the same-precision ONNX graph."""
    shutil.copytree(artifacts, root)
    manifest = Manifest.load(root)
    plan = root / "question-answering" / "model.fp32.plan"
    plan.write_bytes(b"placeholder engine bytes")
    onnx_entry = manifest.find(task="question-answering", kind="onnx")[0]
    manifest.add(Artifact("question-answering", "fp32", "engine", plan.relative_to(root).as_posix(),
                          sha256_file(plan), onnx_entry.io,
                          {"profiles": profiles}))
    manifest.save()
    return root


def test_engine_sizes_come_from_its_profiles(artifacts, tmp_path):
    profiles = [{"batch": [1, 4, 16], "sequence": [16, 48, 64]}, {"batch": [1, 2, 16], "sequence": [8, 16, 32]}]
    root = with_engine(artifacts, tmp_path / "out", profiles)
    repo = tmp_path / "repo"
    names = write_repository(root, repo, tasks=["qa"])
    assert names == [f"question-answering-fp32{s}" for s in ("", "-tokenizer", "-postprocess", "-text")]
    config = parse(repo / "question-answering-fp32")
    assert config.platform == "tensorrt_plan" and (repo / "question-answering-fp32/1/model.plan").is_file()
    assert not (repo / "question-answering-fp32/1/model.onnx").exists()
    assert config.max_batch_size == 16 and list(config.dynamic_batching.preferred_batch_size) == [2, 16]
    assert list(config.instance_group[0].profile) == ["0", "1"]
    assert [list(w.inputs["input_ids"].dims) for w in config.model_warmup] == [[64], [64]]
    assert [w.batch_size for w in config.model_warmup] == [1, 16]
    # The tokenizer pads every request to the longest sequence a profile accepts.
    assert json.loads((repo / "question-answering-fp32-tokenizer/1/pipeline.json").read_text())["max_length"] == 64
    check_ensemble(repo, parse(repo / "question-answering-fp32-text"))

    write_repository(root, repo, tasks=["qa"], max_batch=8, instances=2)  # replaces the repository
    config = parse(repo / "question-answering-fp32")
    assert config.max_batch_size == 8 and config.instance_group[0].count == 2
    with pytest.raises(MbexportError, match="exceeds the engine's profile max batch 16"):
        write_repository(root, repo, tasks=["qa"], max_batch=32)
    assert parse(repo / "question-answering-fp32").max_batch_size == 8  # untouched by the failed run


def test_refuses_foreign_folders_and_leaves_nothing_on_error(artifacts, tmp_path, cli):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, out, err = cli("triton", str(artifacts), "--repo", str(foreign))
    assert code == 2 and "not written by mbexport" in err and (foreign / "notes.txt").read_text() == "mine"
    code, out, err = cli("triton", str(artifacts), "--repo", str(foreign / "notes.txt"))
    assert code == 2 and "is a file, not a folder" in err and (foreign / "notes.txt").read_text() == "mine"

    code, out, err = cli("triton", str(artifacts), "--repo", str(tmp_path / "new"), "--vocab", str(tmp_path / "no.txt"))
    assert code == 2 and "no.txt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == ["home"]

    code, out, err = cli("triton", str(artifacts), "--repo", str(tmp_path / "mlm"), "--task", "mlm")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "mlm").iterdir() if p.is_dir()) == [
        "masked-lm-fp32", "masked-lm-fp32-postprocess", "masked-lm-fp32-text", "masked-lm-fp32-tokenizer"]


def test_builtin_example_answers_on_every_backend_here(tmp_path, cli):
    """The issue's done-when: the built-in example, exported for QA, answers from text on the CPU with ONNX
    Runtime exactly as the PyTorch reference (rebuilt by validate from the checkpoint and the seeded head), and
    its Triton repository passes the same checks."""
    from mbexport.checkpoint.synthetic import make_example
    from mbexport.export import export

    checkpoint, vocab = make_example(tmp_path / "checkpoint")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="no qa_outputs"):
        export(checkpoint, "qa", out, init_missing_head=0, vocab=vocab)
    args = ("run", str(out), "--task", "qa", "--question", "where do people work?",
            "--context", "the city is a place where many people work and the house is a home.", "--json")
    results = {}
    for backend in ("onnxruntime", "pytorch"):
        code, stdout, stderr = cli(*args, "--backend", backend)
        assert code == 0, stderr
        results[backend] = json.loads(stdout)
    ort, torch_answer = results["onnxruntime"], results["pytorch"]
    assert (ort["answer"], ort["start_token"], ort["end_token"]) == (
        torch_answer["answer"], torch_answer["start_token"], torch_answer["end_token"])
    assert ort["answer"] and ort["score"] == pytest.approx(torch_answer["score"], rel=1e-4)
    code, stdout, stderr = cli("triton", str(out), "--repo", str(tmp_path / "repo"))
    assert code == 0, stderr
    repo, vocab_size = tmp_path / "repo", MegatronBertConfig.from_hf_dict(Manifest.load(out).config).vocab_size
    check_inference_model(repo / "question-answering-fp32", parse(repo / "question-answering-fp32"), 32, vocab_size)
    check_ensemble(repo, parse(repo / "question-answering-fp32-text"))
