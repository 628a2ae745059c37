"""The Triton model repository as files: every config parses into Triton's ModelConfig protobuf and agrees with
the artifact it serves, the ensembles are wired end to end, the Python models are the standalone serving file,
and the repository holds what users asked for with the modes they expect. A real server loads and answers
from these repositories in test_triton_server.py.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from mbexport.config import MegatronBertConfig
from mbexport.deploy import serving
from mbexport.deploy.triton import REQUESTED, write_repository
from mbexport.errors import MbexportError
from mbexport.fsutil import sha256_file
from mbexport.manifest import Artifact, Manifest
from test_deploy import CONFIG, TEXTS, shared_artifacts

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402  (tritonclient[grpc] brings protobuf)

KINDS = model_config_pb2.ModelInstanceGroup
NUMPY = {"TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP32": np.float32, "TYPE_FP16": np.float16,
         "TYPE_STRING": np.object_}
# What Triton's Python models may import: the serving image has numpy and tokenizers, nothing of mbexport.
SERVING_IMPORTS = {"__future__", "json", "dataclasses", "pathlib", "typing", "numpy", "tokenizers",
                   "triton_python_backend_utils"}
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
    assert config.instance_group[0].kind == KINDS.KIND_AUTO  # the default: each GPU, else the CPU
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


def test_every_config_parses_and_matches_its_artifact(repo, artifacts):
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
            assert config.instance_group[0].kind == KINDS.KIND_CPU
            assert (folder / "1" / "model.py").read_bytes() == Path(serving.__file__).read_bytes()
            settings = json.loads((folder / "1" / serving.SETTINGS).read_text())
            assert settings["max_length"] == CONFIG.max_position_embeddings  # min(384, positions) for ONNX
            assert settings["pad_lengths"] == [16, 32, 64]
            assert (folder / "1" / serving.VOCAB).read_bytes() == (artifacts / "vocab.txt").read_bytes()


def test_python_models_need_only_numpy_and_tokenizers():
    """The serving file imports nothing a stock Triton image lacks (no torch, no mbexport)."""
    tree = ast.parse(Path(serving.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= SERVING_IMPORTS, imported - SERVING_IMPORTS


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
    settings = json.loads((repo / "question-answering-fp32-tokenizer/1/serving.json").read_text())
    assert settings["max_length"] == 64 and settings["pad_lengths"] == [16, 32, 64]  # each inside a profile
    assert config.instance_group[0].kind == KINDS.KIND_GPU  # a plan runs on a GPU only, whatever --device says
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
    from mbexport.checkpoint.example import make_example
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


def kinds(repo: Path) -> dict[str, str]:
    return {folder.name: KINDS.Kind.Name(parse(folder).instance_group[0].kind)
            for folder in repo.iterdir() if folder.is_dir() and not folder.name.endswith("-text")}


def test_device_chooses_instance_kinds_and_plans_stay_on_gpus(artifacts, tmp_path, cli):
    for device, kind in (("cpu", "KIND_CPU"), ("gpu", "KIND_GPU"), ("auto", "KIND_AUTO")):
        write_repository(artifacts, tmp_path / device, tasks=["qa"], device=device)
        assert kinds(tmp_path / device) == {"question-answering-fp32": kind, "question-answering-fp32-tokenizer":
                                            "KIND_CPU", "question-answering-fp32-postprocess": "KIND_CPU"}
    root = with_engine(artifacts, tmp_path / "out", [{"batch": [1, 4, 16], "sequence": [16, 48, 64]}])
    code, out, err = cli("triton", str(root), "--repo", str(tmp_path / "plans"), "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "question-answering fp32 is a TensorRT plan, which runs on a GPU only" in err
    assert not (tmp_path / "plans").exists() and not list(tmp_path.glob(".plans*"))
    code, out, err = cli("triton", str(root), "--repo", str(tmp_path / "plans"), "--device", "tpu")
    assert code == 2 and "unknown device 'tpu' (choose auto, cpu, gpu)" in err


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_repository_modes_follow_the_umask(artifacts, tmp_path, umask):
    """A server running as another user (NVIDIA's container) reads what the umask lets it: 0755/0644 by default."""
    old = os.umask(umask)
    try:
        write_repository(artifacts, tmp_path / "repo", tasks=["qa"])
    finally:
        os.umask(old)
    paths = [tmp_path / "repo", *(tmp_path / "repo").rglob("*")]
    assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_dir()} == {oct(0o777 & ~umask)}
    assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_file()} == {oct(0o666 & ~umask)}


def test_deploys_what_the_builds_were_for(artifacts, tmp_path):
    """A head with build-requested artifacts deploys those, not the fp32 export they came from; an only-exported
    head deploys its export; --precision deploys exactly what it names."""
    root = Path(shutil.copytree(artifacts, tmp_path / "out"))
    manifest = Manifest.load(root)
    qa = manifest.find("question-answering", "fp32", "onnx")[0]
    int8 = root / "question-answering" / "model.int8.onnx"
    shutil.copyfile(manifest.path_of(qa), int8)  # the bytes do not matter to the writer, only the records
    manifest.add(Artifact("question-answering", "int8", "onnx", "question-answering/model.int8.onnx",
                          sha256_file(int8), qa.io, {REQUESTED: True}))
    manifest.save()
    write_repository(root, tmp_path / "repo")
    deployed = {p.name for p in (tmp_path / "repo").iterdir() if p.is_dir() and parse(p).platform == "onnxruntime_onnx"}
    assert deployed == {"question-answering-int8", *(f"{task}-fp32" for task in TEXTS if task != "question-answering")}
    write_repository(root, tmp_path / "repo", precisions=["fp32"])
    assert "question-answering-fp32" in {p.name for p in (tmp_path / "repo").iterdir()}
    with pytest.raises(MbexportError, match=r"matches --task/--precision \(built: .*question-answering fp32, int8"):
        write_repository(root, tmp_path / "repo", precisions=["fp8"])
