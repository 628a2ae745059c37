"""Memory and I/O that grow with the largest tensor, not the model (issue 14): tests that fail if streaming breaks.

The figures themselves (seconds, GB at 345M/1.3B/3.9B) are in ``benchmarks/scaling.py``; these tests check
the mechanisms on small models: the checkpoint is hashed once per build, passes read one tensor at a time
(checked by their peak RSS in a child process), and their outputs equal the in-memory way's.
"""

from pathlib import Path

import pytest

from mbexport.build import build
from mbexport.checkpoint.example import make_example
from mbexport.manifest import Manifest
from mbexport.recipes import Recipe


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return make_example(tmp_path_factory.mktemp("example"), seed=0)  # (checkpoint zip, vocab.txt)


def test_a_build_hashes_the_checkpoint_once(example, tmp_path, monkeypatch):
    """Its cache key, the manifest and the reference's integrity check all need the checkpoint's sha256."""
    import mbexport.build
    import mbexport.export.folder as folder
    import mbexport.manifest

    checkpoint, _ = example
    hashed = []
    real = folder.sha256_file

    def counting(path, *args):
        hashed.append(Path(path).resolve())
        return real(path, *args)

    for module in (folder, mbexport.build, mbexport.manifest):
        monkeypatch.setattr(module, "sha256_file", counting)
    folder._remembered_sha256.cache_clear()
    recipe = Recipe(name="test", task="question-answering", precision="fp16", target="onnx")
    result = build(checkpoint, recipe, out_dir=tmp_path / "out", init_missing_head=0)
    assert result.report is not None and result.report.passed  # it validated against the reference
    assert hashed.count(checkpoint.resolve()) == 1


# ---- the fp16 pass: graph without weights, then one weight at a time ------------------------------------------------
@pytest.fixture(scope="module")
def fp32_onnx(example, tmp_path_factory):
    """The example's QA head as fp32 ONNX: one self-contained file, and the same model with external data."""
    import onnx

    from mbexport.export import export

    checkpoint, _ = example
    out = tmp_path_factory.mktemp("export")
    manifest = export(checkpoint, "question-answering", out, init_missing_head=0)
    inline = manifest.path_of(manifest.find("question-answering", "fp32", "onnx")[0])
    external = tmp_path_factory.mktemp("external") / "model.fp32.onnx"
    onnx.save_model(onnx.load(str(inline)), str(external), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    return inline, external


def test_fp16_from_external_data_equals_fp16_from_one_file_and_halves_the_weights_it_should(fp32_onnx, tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from mbexport.export import convert_fp16
    from mbexport.export.fp16 import FP16_MAX

    inline, external = fp32_onnx
    from_inline = convert_fp16(inline, tmp_path / "a" / "model.fp16.onnx")
    from_external = convert_fp16(external, tmp_path / "b" / "model.fp16.onnx")
    assert from_inline.read_bytes() == from_external.read_bytes()
    assert sorted(p.name for p in from_external.parent.iterdir()) == ["model.fp16.onnx"]  # < 2 GB: one file
    # Every weight is the fp32 one, as fp16 (saturated) where the graph computes in fp16, else unchanged.
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(inline)).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(from_inline)).graph.initializer}
    assert before.keys() == after.keys()
    halved = [name for name, array in after.items() if array.dtype == np.float16]
    assert len(halved) > 10 and any(before[name].dtype == np.float32 for name in after if name not in halved)
    for name, array in after.items():
        want = np.clip(before[name], -FP16_MAX, FP16_MAX).astype(np.float16) if name in halved else before[name]
        assert array.dtype == want.dtype and array.tobytes() == want.tobytes(), name


def test_fp16_over_2gb_keeps_page_aligned_external_data_that_onnx_runtime_runs(fp32_onnx, tmp_path, monkeypatch):
    import numpy as np
    import onnx

    import mbexport.export.onnxfile as onnxfile
    from mbexport.config import MegatronBertConfig
    from mbexport.export import convert_fp16
    from mbexport.inputs import sample_batch
    from mbexport.runtime import ort_session
    from mbexport.tasks import get_task

    inline, _ = fp32_onnx
    single = convert_fp16(inline, tmp_path / "single" / "model.fp16.onnx")
    monkeypatch.setattr(onnxfile, "EXTERNAL_THRESHOLD", 0)  # pretend the tiny model passes 2 GB
    monkeypatch.setattr(onnxfile, "ALIGN_ABOVE", 4096)
    split = convert_fp16(inline, tmp_path / "split" / "model.fp16.onnx")
    assert sorted(p.name for p in split.parent.iterdir()) == ["model.fp16.onnx", "model.fp16.onnx.data"]
    offsets = [(int(info["offset"]), int(info["length"])) for info in (
        {e.key: e.value for e in t.external_data} for t in onnx.load(str(split), load_external_data=False).graph.initializer)
        if info]
    assert len(offsets) > 10 and all(offset % onnxfile.ALIGNMENT == 0 for offset, length in offsets if length > 4096)
    task = get_task("question-answering")
    config = MegatronBertConfig.from_hf_dict(Manifest.load(inline.parent.parent).config)
    feed = sample_batch(task, config, 2, 16)
    for want, got in zip(ort_session(single).run(None, feed), ort_session(split).run(None, feed)):
        np.testing.assert_array_equal(want, got)


def matmul_chain(path: Path, layers: int = 40, width: int = 1024) -> Path:
    """An fp32 ONNX file of ``layers`` x (MatMul, Add, LayerNormalization), 4 MB per MatMul weight at 1024."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(layers):
        weights += [numpy_helper.from_array(rng.standard_normal((width, width), dtype=np.float32) * 0.03, f"w{i}"),
                    numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"),
                    numpy_helper.from_array(np.ones(width, np.float32), f"g{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("LayerNormalization", [f"a{i}", f"g{i}", f"b{i}"], [f"x{i}"], axis=-1)]
        x = f"x{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", width])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(onnx.shape_inference.infer_shapes(model), str(path))  # value types, as exports have
    return path


def peak_growth(code: str) -> int:
    """Bytes by which a fresh process's peak RSS rises over its RSS while it runs ``code`` (after its imports)."""
    import subprocess
    import sys

    probe = ("import gc, re\n"
             "def status(key): return int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024\n"
             f"{code.split('#run')[0]}\ngc.collect()\nopen('/proc/self/clear_refs', 'w').write('5')\n"
             f"before = status('VmRSS')\n{code.split('#run')[1]}\nprint(status('VmHWM') - before)\n")
    return int(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout)


def test_the_fp16_pass_holds_about_one_weight(tmp_path):
    """The old pass (onnx.load, convert in place, save) rose by twice the model; this one by a few tensors."""
    model = matmul_chain(tmp_path / "chain.onnx")
    growth = peak_growth(f"from mbexport.export import convert_fp16\n#run\n"
                         f"convert_fp16({str(model)!r}, {str(tmp_path / 'out' / 'chain.fp16.onnx')!r})")
    size = model.stat().st_size  # 168 MB: 40 weights of 4 MB
    assert growth < 0.15 * size, f"peak RSS rose by {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"


@pytest.mark.parametrize("mode, runtime", [("int8", "tensorrt"), ("int8", "onnxruntime")])
def test_quantization_holds_about_the_fp32_file_it_maps(mode, runtime, tmp_path):
    """Model Optimizer held about ten times the model, and ORT's int8 rewrite 3.6 times (at 345M); calibrating on
    the memory-mapped fp32 file a few rows at a time, then quantizing one weight at a time, holds about the
    file (its pages, as they are mapped) and one batch's activations."""
    import dataclasses

    import torch

    from mbexport.config import MegatronBertConfig
    from mbexport.export import export_onnx
    from mbexport.model.modeling import MegatronBert

    config = MegatronBertConfig(vocab_size=1024, hidden_size=768, num_hidden_layers=8, num_attention_heads=12,
                                intermediate_size=3072, max_position_embeddings=128)
    torch.manual_seed(0)
    fp32 = export_onnx(MegatronBert(config, "question-answering"), tmp_path / "model.fp32.onnx")
    growth = peak_growth(
        "import onnxruntime, warnings\n"
        "from mbexport.config import MegatronBertConfig\n"
        "from mbexport.precisions import get_precision\n"
        "from mbexport.quantize import calibration_batches\n"
        f"config = MegatronBertConfig(**{dataclasses.asdict(config)!r})\n"
        "warnings.simplefilter('ignore')\n"
        "batches = calibration_batches('question-answering', config, size=8, sequence=64)\n"
        f"#run\nget_precision({mode!r}, {runtime!r}).transform({str(fp32)!r}, {str(tmp_path / 'q.onnx')!r}, "
        f"mode={mode!r}, calibration=batches)")
    size = fp32.stat().st_size  # 230 MB
    assert growth < 1.4 * size, f"peak RSS rose by {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"


# ---- the checkpoint: tensor-parallel merges when a tensor is read ---------------------------------------------------
@pytest.mark.parametrize("layout", [dict(style="2020", version=0, tp=2), dict(style="2020", version=1.0, tp=4, pp=2),
                                    dict(style="2021", version=2.0, tp=8), dict(style="mcore-te", version=3.0, tp=4)])
def test_a_lazy_checkpoint_reads_the_same_tensors_without_making_them_up_front(megatron_bert, layout, tmp_path):
    import torch

    from mbexport.checkpoint import load_checkpoint
    from mbexport.checkpoint.lazy import LazyTensors
    from checkpoints import write_megatron

    write_megatron(tmp_path, megatron_bert.state_dict, megatron_bert.config, **layout)
    eager, lazy = load_checkpoint(tmp_path), load_checkpoint(tmp_path, lazy=True)
    assert isinstance(lazy.state_dict, LazyTensors) and isinstance(eager.state_dict, dict)
    assert (lazy.config, lazy.info, lazy.heads, lazy.num_parameters) == (eager.config, eager.info, eager.heads,
                                                                         eager.num_parameters)
    assert list(lazy.state_dict) == list(eager.state_dict) == list(megatron_bert.state_dict)
    for name, tensor in megatron_bert.state_dict.items():
        assert torch.equal(lazy.state_dict[name], tensor) and torch.equal(eager.state_dict[name], tensor), name
    assert {n: (t.shape, t.dtype) for n, t in lazy.state_dict.meta().items()} == {
        n: (t.shape, t.dtype) for n, t in eager.state_dict.items()}


# ---- export and the reference: the encoder blocks' weights stream from the checkpoint -------------------------------
@pytest.fixture(scope="module")
def sharded(megatron_bert, tmp_path_factory):
    """The conftest model as an fp16 TP=2 Megatron checkpoint (4 blocks), and its fp16 weights."""
    import torch

    from checkpoints import write_megatron

    half = {name: tensor.half() for name, tensor in megatron_bert.state_dict.items()}
    folder = tmp_path_factory.mktemp("tp2")
    write_megatron(folder, half, megatron_bert.config, style="2021", version=3.0, tp=2)
    return folder, {name: tensor.to(torch.float32) for name, tensor in half.items()}


def test_the_streamed_reference_holds_one_block_and_computes_what_the_whole_model_does(megatron_bert, sharded):
    import torch

    from mbexport.checkpoint import load_checkpoint
    from mbexport.model import build_reference
    from mbexport.tasks import TASKS

    folder, weights = sharded
    task = TASKS["pretraining"]
    whole, _ = build_reference(task, megatron_bert.config, weights)
    streamed, _ = build_reference(task, megatron_bert.config, load_checkpoint(folder, lazy=True).state_dict,
                                  streamed=True)
    blocks = list(streamed.bert.encoder.layer)
    holding = []

    def count(block, args, output):  # while a block runs: how many blocks hold real weights
        holding.append(sum(not b.ln.weight.is_meta for b in blocks))
    for block in blocks:
        block.register_forward_hook(count, prepend=True)
    ids = torch.randint(0, megatron_bert.config.vocab_size, (3, 20))
    with torch.no_grad():
        for want, got in zip(whole(ids), streamed(ids)):
            assert torch.equal(want, got)
    assert holding == [1, 2, 2, 2]  # block 0 stays (export traces it); one further block at a time
    assert all(b.ln.weight.is_meta for b in blocks[1:])


def test_export_streams_each_block_weight_once_and_writes_what_a_whole_model_exports(megatron_bert, sharded,
                                                                                      tmp_path, monkeypatch):
    import weakref

    import mbexport.export.fp32 as fp32
    from mbexport.export import export, export_onnx
    from mbexport.model import build_reference
    from mbexport.tasks import TASKS

    folder, weights = sharded
    read, alive, most = [], set(), [0]
    real = fp32.parameter

    def tracked(model, name):
        tensor = real(model, name)
        read.append(name)
        alive.add(name)
        weakref.finalize(tensor, alive.discard, name)
        most[0] = max(most[0], len(alive))
        return tensor

    monkeypatch.setattr(fp32, "parameter", tracked)
    manifest = export(folder, "masked-lm", tmp_path / "out")
    streamed = manifest.path_of(manifest.find("masked-lm", "fp32", "onnx")[0])
    block_weights = [n for n in weights if n.startswith("bert.encoder.layer.") and ".layer.0." not in n]
    assert set(read) == set(block_weights)
    # Each matrix is read once, when it is saved (vectors of up to 1024 values once more: onnx_ir's
    # deduplication compares them), and no more than two are ever held at once.
    assert all(read.count(n) == 1 for n in block_weights if weights[n].numel() > 1024)
    assert most[0] <= 2
    model, _ = build_reference(TASKS["masked-lm"], megatron_bert.config, weights)  # every weight in memory
    whole = export_onnx(model, tmp_path / "whole" / "model.fp32.onnx")
    assert streamed.read_bytes() == whole.read_bytes()


# ---- validate: the reference first, then ONNX Runtime on memory-mapped weights --------------------------------------
def test_a_lean_session_maps_the_weights_and_computes_what_a_plain_one_does(fp32_onnx, tmp_path, monkeypatch):
    import numpy as np
    import onnx

    import mbexport.export.onnxfile as onnxfile
    from mbexport.config import MegatronBertConfig
    from mbexport.export import convert_fp16
    from mbexport.export.onnxfile import INLINE_BELOW, read_weightless, weights_by_reference
    from mbexport.inputs import sample_batch
    from mbexport.runtime import ort_session
    from mbexport.tasks import get_task

    inline, _ = fp32_onnx
    config = MegatronBertConfig.from_hf_dict(Manifest.load(inline.parent.parent).config)
    feed = sample_batch(get_task("question-answering"), config, 3, 24)
    one_file = convert_fp16(inline, tmp_path / "one" / "model.fp16.onnx")
    monkeypatch.setattr(onnxfile, "EXTERNAL_THRESHOLD", 0)  # pretend the tiny model passes 2 GB
    external = convert_fp16(inline, tmp_path / "external" / "model.fp16.onnx")
    assert (external.parent / "model.fp16.onnx.data").is_file()
    for path in (inline, one_file, external):
        mapped = {t.name: t for t in onnx.ModelProto.FromString(weights_by_reference(path)).graph.initializer}
        large = [w.tensor.name for w in read_weightless(path)[1] if w.length >= INLINE_BELOW]
        assert large and all(mapped[name].data_location == 1 and not mapped[name].raw_data for name in large)
        for want, got in zip(ort_session(path).run(None, feed), ort_session(path, lean=True).run(None, feed)):
            np.testing.assert_array_equal(want, got)


def test_validate_passes_a_model_with_external_data_with_the_figures_of_the_one_file_model(example, tmp_path,
                                                                                          monkeypatch):
    import json

    import mbexport.export.onnxfile as onnxfile
    from mbexport.export import export
    from mbexport.validate import validate

    checkpoint, _ = example
    figures = {}
    for layout in ("one file", "external data"):
        if layout == "external data":
            monkeypatch.setattr(onnxfile, "EXTERNAL_THRESHOLD", 0)  # pretend the tiny model passes 2 GB
        out = tmp_path / layout.replace(" ", "-")
        manifest = export(checkpoint, "masked-lm", out, precisions=("fp32", "fp16"))
        assert all(("external_data" in a.details) == (layout == "external data") for a in manifest.find(kind="onnx"))
        assert validate(out).passed
        figures[layout] = [a["checks"] for a in json.loads((out / "validation.json").read_text())["artifacts"]]
    assert figures["one file"] == figures["external data"]


def test_an_int8_build_past_2gb_keeps_external_data_through_quantization_and_validation(example, tmp_path,
                                                                                        monkeypatch):
    import mbexport.export.onnxfile as onnxfile
    from mbexport.recipes import Calibration

    monkeypatch.setattr(onnxfile, "EXTERNAL_THRESHOLD", 0)  # pretend the tiny model passes 2 GB
    checkpoint, _ = example
    recipe = Recipe(name="test", task="question-answering", precision="int8", target="onnx",
                    calibration=Calibration(size=8, sequence=32))
    result = build(checkpoint, recipe, out_dir=tmp_path / "out", init_missing_head=0)
    assert result.report.passed
    manifest = Manifest.load(tmp_path / "out")
    for precision in ("fp32", "int8"):
        (artifact,) = manifest.find("question-answering", precision, "onnx")
        assert artifact.details["external_data"]["path"] == f"model.{precision}.onnx.data"
        assert manifest.verify(artifact) is None
