"""Quantization: Q/DQ placement, agreement with the reference, calibration batches, and error paths.

The tiny built-in example (hidden 64, 2 layers, 4 heads) with a seeded QA head is exported, quantized to
INT8 and FP8 with Model Optimizer and checked against the PyTorch reference by ``validate`` in ONNX Runtime
(exact Q/DQ emulation). Accuracy on a trained model is in test_accuracy_trained.py.
"""

import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mbexport.checkpoint.example import example_config, make_example
from mbexport.errors import MbexportError, MissingDependencyError
from mbexport.export import export
from mbexport.inputs import sample_batch
from mbexport.quantize import calibration_batches, quantize_onnx
from mbexport.tasks import get_task
from mbexport.text import encode, load_tokenizer
from mbexport.validate import validate_artifact

QA = get_task("qa")
LINES = [f"the {w} of line {i} was read by the model" for i, w in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth".split())]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    folder = tmp_path_factory.mktemp("example")
    checkpoint, vocab = make_example(folder, seed=0)
    text = folder / "calib.txt"
    text.write_text("\n".join(LINES) + "\n")
    return checkpoint, vocab, text


@pytest.fixture(scope="module")
def quantized(example, tmp_path_factory):
    """The QA export's manifest, with int8 and fp8 files calibrated on text and recorded beside fp32."""
    checkpoint, vocab, text = example
    with pytest.warns(UserWarning, match="qa_outputs"):  # the example has no QA head: seeded
        manifest = export(checkpoint, QA, tmp_path_factory.mktemp("qa") / "out", vocab=vocab, init_missing_head=0)
    fp32 = manifest.path_of(manifest.find(QA.name, "fp32", "onnx")[0])
    batches = calibration_batches(QA, example_config(len(vocab.read_text().split())), text=text, vocab=vocab,
                                  size=8, sequence=32)
    for mode in ("int8", "fp8"):
        path = quantize_onnx(fp32, fp32.parent / f"model.{mode}.onnx", mode=mode, calibration=batches)
        manifest.record(QA, mode, "onnx", path)
    manifest.save()
    return manifest


@pytest.mark.quant
def test_the_fp32_input_is_left_as_it_was(quantized):
    """Model Optimizer rewrites its input file in place: it must only ever see a copy."""
    fp32 = quantized.find(QA.name, "fp32", "onnx")[0]
    assert quantized.verify(fp32) is None
    assert [p.name for p in quantized.path_of(fp32).parent.iterdir() if p.name.startswith(".")] == []  # no tmp


@pytest.mark.quant
@pytest.mark.parametrize("mode, zero_point", [("int8", "int8"), ("fp8", "float8_e4m3fn")])
def test_qdq_placement_is_tensorrts(quantized, mode, zero_point):
    model = onnx.load(str(quantized.path_of(quantized.find(QA.name, mode, "onnx")[0])))
    graph = model.graph
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    producer = {out: node for node in graph.node for out in node.output}
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    def constant(name):  # an initializer, possibly transposed by the graph
        node = producer.get(name)
        return name in inits or (node is not None and node.op_type == "Transpose" and constant(node.input[0]))

    weights = 0
    for node in graph.node:
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            assert node.op_type == "MatMul", f"{node.op_type} {node.name} reads a quantized tensor"
            scale, zero = inits[dq.input[1]], inits[dq.input[2]]
            assert not zero.astype(np.float32).any() and zero.dtype.name == zero_point, "symmetric"
            assert scale.dtype == np.float16  # dequantizes into the fp16 remainder
            if dq.input[0] in inits:  # weight, stored quantized: one scale per output column
                weights += 1
                assert index == 1 and scale.shape in ((64,), (256,)) and inits[dq.input[0]].dtype.name == zero_point
                assert [a.i for a in dq.attribute if a.name == "axis"] == [1]
            else:  # activation, quantized as it runs: one scale per tensor
                assert producer[dq.input[0]].op_type == "QuantizeLinear" and not constant(
                    producer[dq.input[0]].input[0])
                assert scale.shape == ()
    assert weights == 6 * 2  # Q, K, V, attention output, FFN in and out, in each of the 2 layers
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert all(inits[n.input[1]].dtype == np.float32 for n in norms)  # fp32 islands of the fp16 remainder

    def consumers(name):  # looking through Casts
        nodes = [n for n in graph.node if name in n.input]
        return [c for n in nodes for c in (consumers(n.output[0]) if n.op_type == "Cast" else [n])]

    head = consumers(norms[-1].output[0])
    assert [n.op_type for n in head] == ["MatMul"] and not any(
        producer.get(x) is not None and producer[x].op_type == "DequantizeLinear" for x in head[0].input)


@pytest.mark.quant
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_qa_agrees_with_the_reference(quantized, mode):
    result = validate_artifact(quantized, quantized.find(QA.name, mode, "onnx")[0])
    assert result.passed, [c.as_dict() for c in result.checks if not c.passed]
    agreement = {c.output: c.numbers["agreement"] for c in result.checks if c.check == "argmax"}
    assert set(agreement) == {"start_logits", "end_logits"}
    assert min(agreement.values()) >= 0.9, agreement


@pytest.mark.parametrize("zero_point", ["int8", "float8_e4m3fn"])
def test_folding_computes_quantize_linear_exactly_as_onnx_runtime(zero_point):
    """Every fp16 value (infinities, subnormals, ties at x.5 included) against ONNX Runtime's own QuantizeLinear
    with per-channel scales from tiny to huge: bitwise the same int8 / float8e4m3fn."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from mbexport.quantize.weights import quantize_linear

    x = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(-1, 64)
    if zero_point == "int8":
        x = np.where(np.isnan(x), np.float16(0), x)  # NaN has no int8 (and a weight holding it is not folded)
    scale = np.concatenate([np.float16([1, 0.5, 2, 0.25, 2**-10, 2**-14, 6e-8, 3, 0.1, 1 / 3, 127, 65504]),
                            np.random.default_rng(0).uniform(1e-3, 0.05, 52)]).astype(np.float16)
    kind = TensorProto.INT8 if zero_point == "int8" else TensorProto.FLOAT8E4M3FN
    zero = helper.make_tensor("zero", kind, [64], [0] * 64)
    graph = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["y"], axis=1)], "q",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, list(x.shape))],
                              [helper.make_tensor_value_info("y", kind, list(x.shape))],
                              [numpy_helper.from_array(scale, "scale"), zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        folded = quantize_linear(numpy_helper.from_array(x), numpy_helper.from_array(scale), zero, axis=1)
    assert folded.dtype.name == zero_point
    assert np.array_equal(folded.view(np.uint8), expected.view(np.uint8))
    assert len(np.unique(folded.view(np.uint8))) >= 250  # the whole range was exercised


@pytest.mark.quant
def test_weights_are_stored_quantized_and_every_output_is_unchanged(quantized, monkeypatch):
    """The int8 / fp8 files store each quantized weight in one byte; the same graph with fp16 weights and
    their QuantizeLinear (the fold switched off) gives bitwise the same outputs in ONNX Runtime."""
    import mbexport.quantize.qdq as qdq
    from mbexport.runtime import ort_session

    fp32 = quantized.path_of(quantized.find(QA.name, "fp32", "onnx")[0])
    config = example_config(len(load_tokenizer(quantized.root / "vocab.txt").get_vocab()))
    with pytest.warns(UserWarning, match="no calibration text"):
        batches = calibration_batches(QA, config, text=None, vocab=None, size=8, sequence=32)
    feeds = [sample_batch(QA, config, batch, sequence) for batch, sequence in ((1, 8), (3, 64))]
    for mode in ("int8", "fp8"):
        folded = quantize_onnx(fp32, fp32.parent / f"folded.{mode}.onnx", mode=mode, calibration=batches)
        with monkeypatch.context() as patch:
            patch.setattr(qdq, "store_weights_quantized", lambda graph: 0)
            plain = quantize_onnx(fp32, fp32.parent / f"plain.{mode}.onnx", mode=mode, calibration=batches)
        graph = onnx.load(str(folded)).graph
        inits = {t.name: t for t in graph.initializer}
        assert not [n.name for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]
        stored = [inits[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
        kind = onnx.TensorProto.INT8 if mode == "int8" else onnx.TensorProto.FLOAT8E4M3FN
        assert len(stored) == 12 and {t.data_type for t in stored} == {kind}
        elements = sum(int(np.prod(t.dims)) for t in stored)
        assert plain.stat().st_size - folded.stat().st_size >= elements  # 2 bytes -> 1 per weight
        a, b = ort_session(folded), ort_session(plain)
        for feed in feeds:
            for x, y in zip(a.run(None, feed), b.run(None, feed)):
                assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), mode


def test_identical_initializers_are_stored_once():
    """Model Optimizer copies a weight two nodes read (the masked-LM decoder reads the word embeddings)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from mbexport.quantize.weights import store_weights_quantized

    table = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float16)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["embedded"]),
             helper.make_node("Transpose", ["table_copy"], ["decoder"], perm=[1, 0]),
             helper.make_node("MatMul", ["embedded", "decoder"], ["logits"])]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, [3, 16])],
                              [numpy_helper.from_array(table, "table"), numpy_helper.from_array(table, "table_copy")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    ids = {"ids": np.array([1, 5, 9], np.int64)}
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, ids)[0]
    assert store_weights_quantized(model.graph) == 0
    onnx.checker.check_model(model, full_check=True)
    assert [t.name for t in model.graph.initializer] == ["table"]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, ids)[0]
    assert np.array_equal(got, expected)


@pytest.mark.quant
def test_not_an_onnx_file_is_refused(tmp_path):
    bad = tmp_path / "model.fp32.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(MbexportError, match="model.fp32.onnx: not an ONNX model"):
        quantize_onnx(bad, tmp_path / "model.int8.onnx", calibration=[{}])


@pytest.mark.quant
def test_a_graph_without_a_trunk_is_refused(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    path = tmp_path / "model.fp32.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])), path)
    with pytest.raises(MbexportError, match="not a pre-LN Megatron-BERT export"):
        quantize_onnx(path, tmp_path / "model.int8.onnx", calibration=[{"x": np.ones((1, 4), np.float32)}])


@pytest.mark.quant
def test_a_failed_quantization_leaves_nothing_behind(quantized, tmp_path):
    fp32 = quantized.path_of(quantized.find(QA.name, "fp32", "onnx")[0])
    out = tmp_path / "out" / "model.int8.onnx"
    wrong = {"input_ids": np.full((2, 8), 5, np.int64)}  # the model needs three inputs
    with pytest.raises(MbexportError, match="model.fp32.onnx: Model Optimizer could not quantize it to int8"):
        quantize_onnx(fp32, out, calibration=[wrong])
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "int4"}, "cannot quantize to 'int4'"),
    ({"method": "percentile"}, "unknown calibration method"),
    ({"calibration": []}, "no calibration batches"),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    arguments = {"mode": "int8", "calibration": [{"input_ids": np.zeros((1, 4), np.int64)}], **kwargs}
    with pytest.raises(MbexportError, match=message):
        quantize_onnx(tmp_path / "model.fp32.onnx", tmp_path / "model.int8.onnx", **arguments)


def test_missing_input_file_is_named(tmp_path):
    with pytest.raises(MbexportError, match="model.fp32.onnx: ONNX file not found"):
        quantize_onnx(tmp_path / "model.fp32.onnx", tmp_path / "q.onnx", calibration=[{}])


def test_missing_model_optimizer_says_how_to_install(tmp_path, monkeypatch):
    source = tmp_path / "model.fp32.onnx"
    source.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", None)  # import now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'mbexport\[quant\]'"):
        quantize_onnx(source, tmp_path / "q.onnx", calibration=[{}])


def test_text_calibration_is_the_vocab_encoding_of_seeded_lines(example):
    _, vocab, text = example
    config = example_config(len(vocab.read_text().split()))
    full = encode(load_tokenizer(vocab), LINES, max_length=32)
    every = calibration_batches(QA, config, text=text, vocab=vocab, size=len(LINES), sequence=32)
    width = every[0]["input_ids"].shape[1]
    assert len(every) == 1 and width == full["attention_mask"].sum(axis=1).max() < 32  # padded to the longest
    assert all(np.array_equal(every[0][k], full[k][:, :width]) for k in QA.input_names)

    def picked(seed):
        ids = calibration_batches(QA, config, text=text, vocab=vocab, size=5, sequence=32, seed=seed)[0]["input_ids"]
        return [int(np.flatnonzero((full["input_ids"][:, :ids.shape[1]] == row).all(axis=1))[0]) for row in ids]

    assert picked(3) == picked(3) == sorted(picked(3)) and len(set(picked(3))) == 5
    assert picked(3) != picked(4)


def test_text_calibration_takes_every_line_when_there_are_few_and_pairs_choices(example):
    _, vocab, text = example
    config = example_config(len(vocab.read_text().split()))
    batches = calibration_batches(QA, config, text=text, vocab=vocab, size=100, sequence=16)
    assert sum(len(b["input_ids"]) for b in batches) == len(LINES)
    choices = calibration_batches("multiple-choice", config, text=text, vocab=vocab, size=100, sequence=16)
    assert [b["input_ids"].shape[:2] for b in choices] == [(len(LINES) // 2, 2)]


def test_without_text_it_warns_and_uses_seeded_sample_batches():
    config = example_config(512)
    with pytest.warns(UserWarning, match="not represented"):
        batches = calibration_batches(QA, config, size=20, sequence=24, seed=5)
    assert [len(b["input_ids"]) for b in batches] == [16, 4]
    expected = sample_batch(QA, config, 16, 24, seed=5)
    assert all(np.array_equal(batches[0][k], expected[k]) for k in QA.input_names)


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 0}, "at least 1"),
    ({"sequence": 4096}, "sequence length must be"),
    ({"text": "calib.txt"}, "needs the checkpoint's vocab"),
])
def test_bad_calibration_settings_are_refused(kwargs, message):
    with pytest.raises(MbexportError, match=message):
        calibration_batches(QA, example_config(512), **kwargs)
