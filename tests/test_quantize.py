"""Quantization: Q/DQ placement, agreement with the reference, calibration batches, and error paths.

The tiny built-in example (hidden 64, 2 layers, 4 heads) with a seeded QA head is exported, quantized to
INT8 and FP8 and checked against the PyTorch reference by ``validate`` in ONNX Runtime (exact Q/DQ
emulation), and against NVIDIA Model Optimizer's placement and scales (the oracle, where it is installed).
Accuracy on a trained model is in test_accuracy_trained.py.
"""

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mbexport.checkpoint.example import example_config, make_example
from mbexport.errors import MbexportError
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


def test_the_fp32_input_is_left_as_it_was(quantized):
    """Quantization only reads the fp32 file, and leaves no temporary file beside it."""
    fp32 = quantized.find(QA.name, "fp32", "onnx")[0]
    assert quantized.verify(fp32) is None
    assert [p.name for p in quantized.path_of(fp32).parent.iterdir() if p.name.startswith(".")] == []  # no tmp


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


@pytest.fixture(scope="module", params=[(4, "example, head size 16"), (8, "head size 8")], ids=lambda p: p[1])
def small_fp32(request, tmp_path_factory):
    """(fp32 QA export, its config): the example's shape, and 8 heads of 8 (attention under the 16 a GEMM needs)."""
    import torch

    from mbexport.export import export_onnx
    from mbexport.model.modeling import MegatronBert

    config = dataclasses.replace(example_config(369), num_attention_heads=request.param[0])
    torch.manual_seed(0)
    model = MegatronBert(config, QA)
    return export_onnx(model, tmp_path_factory.mktemp("small") / "model.fp32.onnx"), config


@pytest.mark.modelopt
@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("method", ["max", "entropy"])
def test_placement_and_scales_are_model_optimizers(small_fp32, mode, method, tmp_path):
    """The oracle: Model Optimizer on the same fp32 file and calibration. The same inputs get Q/DQ: every trunk
    MatMul's, the attention's batched MatMuls only in INT8 and only with a head size of 16 or more. INT8 scales
    are Model Optimizer's to the bit (weights and activations, max and entropy); FP8 scales map the calibrated
    range to 448, where Model Optimizer's are its INT8 scales times 448 / 127 (see quantize/qdq.py)."""
    from modelopt_oracle import model_optimizer_qdq, placement

    fp32, config = small_fp32
    with pytest.warns(UserWarning, match="no calibration text"):  # 32 tokens: over Model Optimizer's 16
        batches = calibration_batches(QA, config, size=8, sequence=32)
    ours = placement(quantize_onnx(fp32, tmp_path / "ours.onnx", mode=mode, calibration=batches, method=method))
    theirs = placement(model_optimizer_qdq(fp32, tmp_path / "theirs.onnx", mode=mode, calibration=batches,
                                           method=method))
    assert sorted(ours) == sorted(theirs)
    batched = {name for name, _ in ours if not ours[(name, 1)][0]}
    assert len(batched) == (4 if mode == "int8" and config.hidden_size // config.num_attention_heads >= 16 else 0)
    assert sum(weight for weight, _ in ours.values()) == 12
    factor = 1.0 if mode == "int8" else (448 / 127) ** 2
    for key, (weight, scale) in ours.items():
        expected = (theirs[key][1] / factor).astype(np.float16).astype(np.float32)
        assert theirs[key][0] == weight and scale.shape == expected.shape
        np.testing.assert_allclose(scale, expected, rtol=0 if mode == "int8" else 1e-3, err_msg=str(key))


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_qa_agrees_with_the_reference(quantized, mode):
    result = validate_artifact(quantized, quantized.find(QA.name, mode, "onnx")[0])
    assert result.passed, [c.as_dict() for c in result.checks if not c.passed]
    agreement = {c.output: c.numbers["agreement"] for c in result.checks if c.check == "argmax"}
    assert set(agreement) == {"start_logits", "end_logits"}
    assert min(agreement.values()) >= 0.9, agreement


@pytest.mark.parametrize("zero_point", ["int8", "float8_e4m3fn"])
def test_stored_weights_are_quantize_linear_exactly_as_onnx_runtime_computes_it(zero_point):
    """Every fp16 value (infinities, subnormals, ties at x.5 included) against ONNX Runtime's own QuantizeLinear
    with per-channel scales from tiny to huge: bitwise the same int8 / float8e4m3fn."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from mbexport.quantize.weights import quantize_linear

    x = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(-1, 64)
    if zero_point == "int8":
        x = np.where(np.isnan(x), np.float16(0), x)  # NaN has no int8 (and a weight holding it is refused)
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
        folded = quantize_linear(x, scale, "int8" if zero_point == "int8" else "fp8", axis=1)
    assert folded.dtype.name == zero_point
    assert np.array_equal(folded.view(np.uint8), expected.view(np.uint8))
    assert len(np.unique(folded.view(np.uint8))) >= 250  # the whole range was exercised


def test_weights_are_stored_quantized_and_every_output_is_unchanged(quantized):
    """The int8 / fp8 files store each quantized weight in one byte; the same graph with the fp16 weight and
    its QuantizeLinear instead gives bitwise the same outputs in ONNX Runtime."""
    from onnx import helper

    from mbexport.export.fp16 import saturated_fp16
    from mbexport.runtime import ort_session

    fp32 = quantized.path_of(quantized.find(QA.name, "fp32", "onnx")[0])
    originals = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(fp32)).graph.initializer}
    config = example_config(len(load_tokenizer(quantized.root / "vocab.txt").get_vocab()))
    feeds = [sample_batch(QA, config, batch, sequence) for batch, sequence in ((1, 8), (3, 64))]
    for mode in ("int8", "fp8"):
        path = quantized.path_of(quantized.find(QA.name, mode, "onnx")[0])
        model = onnx.load(str(path))
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        stored = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
        kind = onnx.TensorProto.INT8 if mode == "int8" else onnx.TensorProto.FLOAT8E4M3FN
        assert len(stored) == 12 and {inits[n.input[0]].data_type for n in stored} == {kind}
        for node in stored:  # the fp16 weight the graph dequantizes, quantized at run time instead
            weight = node.input[0].removesuffix(".quantized")
            graph.initializer.append(numpy_helper.from_array(saturated_fp16(originals[weight]), f"{weight}.fp16"))
            graph.node.insert(0, helper.make_node("QuantizeLinear", [f"{weight}.fp16", *node.input[1:]],
                                                  [node.input[0]], axis=1))
            graph.initializer.remove(inits[node.input[0]])
        plain = path.parent / f"plain.{mode}.onnx"
        onnx.save(model, str(plain))
        elements = sum(int(np.prod(inits[n.input[0]].dims)) for n in stored)
        assert plain.stat().st_size - path.stat().st_size >= elements  # 2 bytes -> 1 per weight
        a, b = ort_session(path), ort_session(plain)
        for feed in feeds:
            for x, y in zip(a.run(None, feed), b.run(None, feed)):
                assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), mode


def test_not_an_onnx_file_is_refused(tmp_path):
    bad = tmp_path / "model.fp32.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(MbexportError, match="model.fp32.onnx: not an ONNX model"):
        quantize_onnx(bad, tmp_path / "model.int8.onnx", calibration=[{}])


def test_a_graph_without_a_trunk_is_refused(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    path = tmp_path / "model.fp32.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])), path)
    with pytest.raises(MbexportError, match="not a pre-LN Megatron-BERT export"):
        quantize_onnx(path, tmp_path / "model.int8.onnx", calibration=[{"x": np.ones((1, 4), np.float32)}])


def test_a_failed_quantization_leaves_nothing_behind(quantized, tmp_path):
    fp32 = quantized.path_of(quantized.find(QA.name, "fp32", "onnx")[0])
    out = tmp_path / "out" / "model.int8.onnx"
    wrong = {"input_ids": np.full((2, 8), 5, np.int64)}  # the model needs three inputs
    with pytest.raises(MbexportError, match="model.fp32.onnx: ONNX Runtime cannot run the calibration batches"):
        quantize_onnx(fp32, out, calibration=[wrong])
    assert not any(out.parent.glob("*"))


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
