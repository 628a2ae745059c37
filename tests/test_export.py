"""ONNX export against transformers: every head, two shapes each, the graph TensorRT wants, fp16, the CLI."""

import json

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers")

from mbexport.config import MegatronBertConfig  # noqa: E402
from mbexport.export import convert_fp16, export, export_onnx  # noqa: E402
from mbexport.fsutil import sha256_file  # noqa: E402
from mbexport.inputs import sample_batch  # noqa: E402
from mbexport.manifest import Manifest  # noqa: E402
from mbexport.model import MASK_VALUE, build_reference  # noqa: E402
from mbexport.runtime import ort_session  # noqa: E402
from mbexport.tasks import TASKS  # noqa: E402

CONFIG = MegatronBertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64, layer_norm_eps=1e-5, num_labels=3)
SHAPES = ((1, 5), (3, 19))  # (batch, sequence); the larger one has padding and an all-padding last row


def oracle(task):
    """A transformers model for ``task`` with every weight random (LayerNorms and biases too)."""
    hf_config = transformers.MegatronBertConfig(
        **{k: v for k, v in CONFIG.to_hf_dict().items() if k not in ("architectures", "id2label", "label2id")},
        num_labels=2 if task.name == "question-answering" else CONFIG.num_labels, is_decoder=task.causal)
    torch.manual_seed(0)
    model = getattr(transformers, task.hf_class)(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prefix = "bert." if isinstance(model, transformers.MegatronBertModel) else ""
    return model, {prefix + k: v for k, v in model.state_dict().items()}


def hf_outputs(model, task, feed):
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    return [getattr(out, spec.name).numpy() for spec in task.outputs]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """task name -> (oracle, reference, fp32 path): each head exported once for all tests here."""
    cache = {}

    def get(name):
        if name not in cache:
            task = TASKS[name]
            hf, state = oracle(task)
            model, _ = build_reference(task, CONFIG, state)
            cache[name] = hf, model, export_onnx(model, tmp_path_factory.mktemp(name) / "model.fp32.onnx")
        return cache[name]

    return get


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def producer(graph, name):
    return next(n for n in graph.node if name in n.output)


@pytest.mark.parametrize("name", list(TASKS))
def test_every_head_matches_transformers_in_onnx_runtime(name, exported):
    task = TASKS[name]
    hf, _, path = exported(name)
    session = ort_session(path)
    for batch, sequence in SHAPES:
        feed = sample_batch(task, CONFIG, batch, sequence, seed=batch, all_padding_row=batch > 1)
        got, want = session.run(None, feed), hf_outputs(hf, task, feed)
        real = slice(0, batch - 1) if batch > 1 else slice(None)  # transformers' all-padding row is arbitrary
        for spec, g, w in zip(task.outputs, got, want):
            assert g.shape == w.shape == spec.shape(CONFIG, batch=batch, sequence=sequence, num_choices=2)
            assert np.isfinite(g).all(), f"{name}.{spec.name}: NaN/Inf at {batch}x{sequence}"
            diff = float(np.abs(g[real] - w[real]).max())
            assert diff <= 1e-4, f"{name}.{spec.name} at {batch}x{sequence}: max abs diff {diff:.2e}"

    graph = onnx.load(str(path)).graph
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 17
    for spec, value in zip((*task.inputs, *task.outputs), (*graph.input, *graph.output)):
        assert value.name == spec.name
        assert [d if isinstance(d, str) else "static" for d in dims(value)] == [
            d if d in ("batch", "num_choices", "sequence") else "static" for d in spec.dims]
    ops = {n.op_type for n in graph.node}
    assert "LayerNormalization" in ops and ops <= {
        "Add", "Cast", "Concat", "Div", "Erf", "Gather", "LayerNormalization", "MatMul", "Mul", "Range", "Reshape",
        "Shape", "Slice", "Softmax", "Squeeze", "Tanh", "Transpose", "Unsqueeze", "Where", "Gemm", "Expand",
        "And", "Trilu", "ConstantOfShape", "Less", "LessOrEqual", "Constant", "Flatten", "Split"}, ops


def test_attention_is_matmul_softmax_matmul_with_scale_on_q_and_a_finite_mask(exported):
    graph = onnx.load(str(exported("question-answering")[2])).graph
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == CONFIG.num_hidden_layers
    for softmax in softmaxes:
        add = producer(graph, softmax.input[0])
        assert add.op_type == "Add"
        scores, mask = (producer(graph, i) for i in add.input)
        assert scores.op_type == "MatMul"
        scaled_q = producer(graph, scores.input[0])
        assert scaled_q.op_type == "Mul"
        scale = next(constants[i] for i in scaled_q.input if i in constants)
        assert float(scale) == pytest.approx(1 / np.sqrt(CONFIG.head_dim))
        assert producer(graph, scores.input[1]).op_type == "Transpose"  # K^T
        assert any(n.op_type == "MatMul" and softmax.output[0] in n.input for n in graph.node)  # probs @ V
        where = mask if mask.op_type == "Where" else producer(graph, mask.input[0])
        values = [constants[i] for i in where.input if i in constants]
        assert all(np.isfinite(v).all() for v in values) and MASK_VALUE in [float(v) for v in values]


def test_onnx_runtime_fuses_every_gelu(exported, tmp_path):
    """Each erf GELU (one per block, one in the masked-LM head) is written in the operand order ONNX Runtime
    fuses into one BiasGelu kernel: about 5% of CPU latency at the 345M shape."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(exported("masked-lm")[2]), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("BiasGelu") + ops.count("Gelu") == CONFIG.num_hidden_layers + 1 and "Erf" not in ops


def test_fp16_is_strongly_typed_and_finite_with_an_all_padding_row(exported, tmp_path):
    task = TASKS["masked-lm"]
    fp32 = exported(task.name)[2]
    fp16 = convert_fp16(fp32, tmp_path / "model.fp16.onnx")
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(fp16)))
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types |= {t.name: t.data_type for t in graph.initializer}
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [types[v.name] for v in graph.output] == [F32]
    assert all(types[n.input[1]] == F16 for n in graph.node if n.op_type == "MatMul" and n.input[1] in types
               and n.input[1] in {t.name for t in graph.initializer})
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types[node.input[0]] == F32 and types[node.output[0]] == F32
    # every residual add (the ones feeding a LayerNormalization) runs in fp32
    residual = [producer(graph, n.input[0].removesuffix(".fp32"))
                for n in graph.node if n.op_type == "LayerNormalization"]
    assert all(types[a.output[0]] == F32 for a in residual if a.op_type == "Add")
    weight_bytes = lambda path: sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer)  # noqa: E731
    assert weight_bytes(fp16) < 0.55 * weight_bytes(fp32)

    feed = sample_batch(task, CONFIG, 4, 33, seed=2, all_padding_row=True)
    half, full = ort_session(fp16).run(None, feed)[0], ort_session(fp32).run(None, feed)[0]
    assert half.dtype == np.float32 and np.isfinite(half).all()
    assert np.abs(half - full).max() < 0.05
    real = feed["attention_mask"][:-1].astype(bool)
    assert (half[:-1].argmax(-1) == full[:-1].argmax(-1))[real].mean() > 0.95


def test_fp16_keeps_a_large_residual_stream_finite(tmp_path):
    """Residual values beyond fp16's 65504 stay finite because the residual adds and LayerNorms are fp32."""
    task = TASKS["model"]
    state = oracle(task)[1]
    for i in range(CONFIG.num_hidden_layers):  # each block adds 4e4 to every hidden value
        state[f"bert.encoder.layer.{i}.output.dense.bias"] = torch.full((CONFIG.hidden_size,), 4e4)
    model, _ = build_reference(task, CONFIG, state)
    fp16 = convert_fp16(export_onnx(model, tmp_path / "m32.onnx"), tmp_path / "m16.onnx")
    feed = sample_batch(task, CONFIG, 2, 9)
    hidden, pooled = ort_session(fp16).run(None, feed)
    residual = []
    model.bert.encoder.ln.register_forward_hook(lambda module, args, out: residual.append(args[0].abs().max()))
    with torch.no_grad():
        want = model(*(torch.from_numpy(feed[n]) for n in task.input_names))
    assert residual[0] > 65504  # the stream really leaves fp16's range
    assert np.isfinite(hidden).all() and np.isfinite(pooled).all()
    want = want[0].numpy().ravel()
    cosine = hidden.ravel() @ want / (np.linalg.norm(hidden) * np.linalg.norm(want))
    assert cosine > 0.99  # fp16's resolution at 4e4 (32) blurs the bias adds, but the answer is the same


def test_external_data_beside_the_model_when_it_is_large(tmp_path, monkeypatch):
    import mbexport.export.onnxfile as onnxfile

    monkeypatch.setattr(onnxfile, "EXTERNAL_THRESHOLD", 0)  # pretend the tiny model passes 2 GB
    task = TASKS["sequence-classification"]
    model, _ = build_reference(task, CONFIG, oracle(task)[1])
    path = export_onnx(model, tmp_path / "model.fp32.onnx")
    data = tmp_path / "model.fp32.onnx.data"
    assert data.stat().st_size > path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fp32.onnx", "model.fp32.onnx.data"]
    onnx.checker.check_model(str(path), full_check=True)
    feed = sample_batch(task, CONFIG, 2, 8)
    with torch.no_grad():
        want = model(*(torch.from_numpy(feed[n]) for n in task.input_names))[0].numpy()
    assert np.abs(ort_session(path).run(None, feed)[0] - want).max() < 1e-5


def test_a_failed_check_leaves_nothing_behind(exported, tmp_path):
    from mbexport.export.onnxfile import checked_onnx

    model = onnx.load(str(exported("next-sentence")[2]))
    model.graph.node[0].input[0] = "undefined"  # a graph onnx.checker rejects
    with pytest.raises(Exception, match="fails onnx.checker"):
        with checked_onnx(tmp_path / "out" / "model.fp32.onnx") as staged:
            onnx.save_model(model, str(staged))
    assert list((tmp_path / "out").iterdir()) == []


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    from mbexport.checkpoint.example import make_example

    return make_example(tmp_path_factory.mktemp("example"), seed=0)


def test_missing_head_is_refused_and_leaves_no_artifact(example, cli, tmp_path):
    zip_path, _ = example
    code, _, err = cli("export", str(zip_path), "--task", "qa", "--out", str(tmp_path / "out"))
    assert code == 2
    assert "no 'question-answering' head" in err and "--init-missing-head" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_the_manifest_records_and_checks_external_data(example, cli, tmp_path, monkeypatch):
    """A model past 2 GB keeps its weights beside the graph: the manifest hashes that file too, and every
    stage that trusts the manifest (here validate) notices when it changes."""
    import mbexport.export.onnxfile as onnxfile

    monkeypatch.setattr(onnxfile, "EXTERNAL_THRESHOLD", 0)  # pretend the tiny model passes 2 GB
    out = tmp_path / "out"
    manifest = export(example[0], "masked-lm", out)
    (artifact,) = manifest.find("masked-lm", "fp32", "onnx")
    data = out / "masked-lm" / "model.fp32.onnx.data"
    assert artifact.details["external_data"] == {"path": data.name, "sha256": sha256_file(data)}
    assert manifest.verify(artifact) is None
    with open(data, "r+b") as f:  # same size, one weight byte flipped
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    assert "model.fp32.onnx.data (external data) is missing or changed" in manifest.verify(artifact)
    code, _, err = cli("validate", str(out))
    assert code == 1 and "masked-lm/model.fp32.onnx" in err
    assert "model.fp32.onnx.data (external data) is missing or changed" in (out / "validation.md").read_text()


def test_cli_export_records_everything_and_the_seeded_head_reproduces(example, cli, tmp_path):
    zip_path, vocab = example
    out = tmp_path / "out"
    code, stdout, err = cli("export", str(zip_path), "--task", "qa", "--out", str(out), "--precision", "fp32,fp16",
                            "--init-missing-head", "7", "--vocab", str(vocab))
    assert code == 0, err
    assert "warning" in err and "seed 7" in err and "seeded-head.safetensors" in err
    manifest = Manifest.load(out)
    assert manifest.source["sha256"] == sha256_file(zip_path) and manifest.source["format"] == "ngc-zip"
    assert manifest.config["num_hidden_layers"] > 0
    kinds = {(a.precision, a.kind): a for a in manifest.artifacts}
    assert set(kinds) == {("fp32", "onnx"), ("fp16", "onnx"), ("fp32", "weights"), ("-", "vocab")}
    onnx_fp32 = kinds[("fp32", "onnx")]
    assert onnx_fp32.path == "question-answering/model.fp32.onnx" and onnx_fp32.details["opset"] == 17
    assert onnx_fp32.io["inputs"][0] == {"name": "input_ids", "dtype": "int64", "dims": ["batch", "sequence"]}
    for artifact in manifest.artifacts:
        assert manifest.verify(artifact) is None
    assert json.loads((out / "manifest.json").read_text())["versions"]["onnx"] == onnx.__version__
    assert not [p for p in out.rglob(".*")]  # no temporary leftovers

    from safetensors.torch import load_file

    from mbexport.checkpoint import load_checkpoint
    from mbexport.validate import load_reference

    seeded = load_file(out / "question-answering" / "seeded-head.safetensors")
    checkpoint = load_checkpoint(zip_path)
    again, names = build_reference("qa", checkpoint.config, checkpoint.state_dict, init_missing_head=7)
    assert sorted(seeded) == names == ["qa_outputs.bias", "qa_outputs.weight"]
    assert torch.equal(seeded["qa_outputs.weight"], again.qa_outputs.weight)
    reference = load_reference(manifest, "qa")
    feed = sample_batch(TASKS["question-answering"], checkpoint.config, 2, 12, vocab=vocab)
    with torch.no_grad():
        want = [t.numpy() for t in reference(*(torch.from_numpy(feed[n]) for n in feed))]
    got = ort_session(out / onnx_fp32.path).run(None, feed)
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want)) < 1e-5


@pytest.mark.parametrize("args, message", [
    (["--task", "qa", "--precision", "int8"], "export writes fp32 and fp16, not 'int8'"),
    (["--task", "nope"], "unknown task 'nope'"),
    (["--task", "mlm", "--vocab", "/no/such/vocab.txt"], "vocab file not found"),
    (["--task", "mlm", "--opset", "13"], "opset 13 is too old"),
])
def test_cli_export_bad_input_exits_2(example, cli, tmp_path, args, message):
    code, _, err = cli("export", str(example[0]), "--out", str(tmp_path / "out"), *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_export_missing_checkpoint_exits_2(cli, tmp_path):
    code, _, err = cli("export", str(tmp_path / "absent.zip"), "--task", "mlm", "--out", str(tmp_path / "out"))
    assert code == 2 and "absent.zip" in err and "no such file" in err


def test_a_folder_of_another_checkpoint_is_refused_and_stale_derivatives_are_dropped(example, tmp_path):
    from mbexport.checkpoint.example import make_example

    other, _ = make_example(tmp_path / "other", seed=1)
    with pytest.warns(UserWarning):
        export(example[0], "qa", tmp_path / "out", precisions=("fp32", "fp16"), init_missing_head=1)
    with pytest.warns(UserWarning):
        manifest = export(example[0], "qa", tmp_path / "out", init_missing_head=2)  # a different head
    assert {(a.precision, a.kind) for a in manifest.find("question-answering")} == {("fp32", "weights"),
                                                                                     ("fp32", "onnx")}
    with pytest.raises(Exception, match="another checkpoint"):
        export(other, "qa", tmp_path / "out", init_missing_head=1)
