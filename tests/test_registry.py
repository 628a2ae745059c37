"""The task and precision registries: every entry is handled by every stage, an unknown name is refused in one
line by every command, a new head is one entry, and a checkpoint holds exactly the heads its weights mean."""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mbexport.bench import dense_peak, model_flops  # noqa: E402
from mbexport.checkpoint import load_checkpoint  # noqa: E402
from mbexport.config import MegatronBertConfig  # noqa: E402
from mbexport.deploy.serving import TEXT_HEADS  # noqa: E402
from mbexport.engine import Profile, check_gpu  # noqa: E402
from mbexport.errors import MbexportError  # noqa: E402
from mbexport.export import export  # noqa: E402
from mbexport.inputs import sample_batch  # noqa: E402
from mbexport.model import MegatronBert  # noqa: E402
from mbexport.precisions import EXPORTED, PRECISIONS, RUNTIMES  # noqa: E402
from mbexport.quantize import quantize_onnx  # noqa: E402
from mbexport.recipes import Recipe  # noqa: E402
from mbexport.tasks import TASKS, Agreement, HeadModule, Task, TensorSpec, heads_in  # noqa: E402
from mbexport.validate import tolerances_for  # noqa: E402

CONFIG = MegatronBertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=32, num_labels=3)
SHAPE = {"batch": 2, "sequence": 8, "num_choices": 3}
# What inspect lists for a folder transformers saved from each class: the heads its weights mean.
HEADS_OF = {
    "MegatronBertModel": ["model"],
    "MegatronBertForMaskedLM": ["model", "masked-lm", "causal-lm"],
    "MegatronBertForCausalLM": ["model", "masked-lm", "causal-lm"],
    "MegatronBertForNextSentencePrediction": ["model", "next-sentence"],
    "MegatronBertForPreTraining": ["model", "masked-lm", "causal-lm", "next-sentence", "pretraining"],
    "MegatronBertForSequenceClassification": ["model", "sequence-classification"],
    "MegatronBertForMultipleChoice": ["model", "multiple-choice"],
    "MegatronBertForTokenClassification": ["model", "token-classification"],
    "MegatronBertForQuestionAnswering": ["model", "question-answering"],
}


def run_task(model: MegatronBert) -> tuple[torch.Tensor, ...]:
    feed = sample_batch(model.task, model.config, SHAPE["batch"], SHAPE["sequence"], num_choices=SHAPE["num_choices"])
    with torch.no_grad():
        return model(*(torch.from_numpy(feed[name]) for name in model.task.input_names))


def head_shapes(model: MegatronBert) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name.startswith(model.task.head_prefixes)}


# ---- every head through every stage ----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS.values(), ids=list(TASKS))
def test_every_task_is_handled_by_every_stage(task):
    model = MegatronBert(CONFIG, task).eval()
    assert head_shapes(model) == task.weight_shapes(CONFIG)  # the registry's shapes are the model's
    outputs = run_task(model)
    assert [tuple(o.shape) for o in outputs] == [spec.shape(CONFIG, **SHAPE) for spec in task.outputs]
    assert {a.output for a in task.agreement} <= set(task.output_names)
    trunk_only = model_flops(CONFIG, TASKS["model"], 2, 8) - 2 * 2 * 32 * 32  # the bare encoder, without its pooler
    assert model_flops(CONFIG, task, 2, 8, num_choices=3) > (3 if task.has_choices else 1) * trunk_only
    assert list(Profile().shapes(task)) == task.input_names
    # A checkpoint with exactly these weights holds this head, named by its class or read from its tensors.
    weights = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for architectures in ([task.hf_class], None):
        assert task in heads_in(weights, CONFIG, architectures)
    assert task.serving is None or task.serving in TEXT_HEADS
    assert task.forward is None or callable(task.forward.load())


def test_every_text_head_is_some_tasks_serving_entry():
    assert set(TEXT_HEADS) == {t.serving for t in TASKS.values() if t.serving}


def test_a_new_head_is_one_entry():
    """A head the registry has never seen (one regression score per token): the model builds and runs it, the
    checkpoint's shapes and bench's FLOPs follow from the entry alone."""
    scorer = HeadModule("scorer", "token_scorer", "linear", "tokens", "1")
    task = Task("token-regression", (), "-", (scorer,), False, TASKS["masked-lm"].inputs,
                (TensorSpec("scores", ("batch", "sequence", "1")),), (Agreement("scores", "cosine"),))
    model = MegatronBert(CONFIG, task).eval()
    assert head_shapes(model) == {"token_scorer.weight": (1, 32), "token_scorer.bias": (1,)}
    (scores,) = run_task(model)
    assert scores.shape == (2, 8, 1)
    bare = model_flops(CONFIG, TASKS["model"], 2, 8) - 2 * 2 * 32 * 32
    assert model_flops(CONFIG, task, 2, 8) == bare + 2 * 2 * 8 * 32
    with pytest.raises(ValueError, match="kind 'conv'"):
        HeadModule("x", "x", "conv", "tokens", "1")


# ---- every precision through every stage -----------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS.values(), ids=list(PRECISIONS))
def test_every_precision_is_handled_by_every_stage(precision, tmp_path):
    name = precision.name
    for kind in ("onnx", "engine"):
        assert set(tolerances_for(name, kind)) == {"atol", "rtol", "cosine", "agreement"}
    assert precision.file_name("onnx") == f"model.{name}.onnx" and precision.file_name("engine") == f"model.{name}.plan"
    assert (precision.transform is None) == (name == EXPORTED)
    assert precision.transform is None or callable(precision.transform.load())
    Recipe(name="r", task="qa", precision=name.upper()).override(precision=name).check()
    assert all(sorted(runtime.preference) == sorted(PRECISIONS) for runtime in RUNTIMES.values())
    assert (dense_peak("NVIDIA H100 80GB HBM3", name) is None) == (precision.math is None)
    assert precision.torch_dtype is None or isinstance(getattr(torch, precision.torch_dtype), torch.dtype)
    check_gpu(name, {"gpu": "NVIDIA H100", "compute_capability": "9.0"})
    if precision.min_capability and precision.min_capability > (8, 0):
        with pytest.raises(MbexportError, match="A100 is 8.0"):
            check_gpu(name, {"gpu": "NVIDIA A100", "compute_capability": "8.0"})
    # export writes the export stage's precisions, quantize_onnx the quantize stage's; each refuses the others.
    missing = tmp_path / "no-such-checkpoint.zip"
    with pytest.raises(MbexportError, match="no such file" if precision.stage == "export" else "export writes"):
        export(missing, "qa", tmp_path / "out", precisions=[name])
    with pytest.raises(MbexportError, match="ONNX file not found" if precision.stage == "quantize" else "cannot"):
        quantize_onnx(tmp_path / "model.fp32.onnx", tmp_path / precision.file_name("onnx"), mode=name,
                      calibration=[{}])


# ---- unknown names: one line, exit 2, from every command -------------------------------------------------------------
def empty_output_folder(path: Path) -> Path:
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"schema": 1, "source": {}, "config": {}, "artifacts": []}))
    return path


@pytest.mark.parametrize("args, message", [
    (("export", "{ckpt}", "--task", "squad", "--out", "{tmp}/out"), "unknown task 'squad'"),
    (("export", "{ckpt}", "--task", "qa", "--precision", "bf16", "--out", "{tmp}/out"), "unknown precision 'bf16'"),
    (("build", "{ckpt}", "--task", "squad", "--out", "{tmp}/out"), "unknown task 'squad'"),
    (("build", "{ckpt}", "--task", "qa", "--precision", "bf16", "--out", "{tmp}/out"), "unknown precision 'bf16'"),
    (("validate", "{dir}", "--task", "squad"), "unknown task 'squad'"),
    (("validate", "{dir}", "--precision", "bf16"), "unknown precision 'bf16'"),
    (("triton", "{dir}", "--repo", "{tmp}/repo", "--task", "squad"), "unknown task 'squad'"),
    (("triton", "{dir}", "--repo", "{tmp}/repo", "--precision", "bf16"), "unknown precision 'bf16'"),
    (("run", "{dir}", "--task", "squad", "--text", "x"), "unknown task 'squad'"),
    (("run", "{dir}", "--task", "qa", "--precision", "bf16", "--question", "q", "--context", "c"),
     "unknown precision 'bf16'"),
    (("bench", "{dir}", "--task", "squad"), "unknown task 'squad'"),
], ids=["export-task", "export-precision", "build-task", "build-precision", "validate-task", "validate-precision",
        "triton-task", "triton-precision", "run-task", "run-precision", "bench-task"])
def test_an_unknown_head_or_precision_is_refused_in_one_line_everywhere(args, message, tmp_path, cli):
    folder = empty_output_folder(tmp_path / "built")
    fill = {"ckpt": str(tmp_path / "ckpt.zip"), "dir": str(folder), "tmp": str(tmp_path)}
    code, _, err = cli(*(arg.format(**fill) for arg in args))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "repo").exists()


def test_a_manifest_naming_an_unknown_precision_is_refused(tmp_path, cli):
    folder = empty_output_folder(tmp_path / "built")
    data = json.loads((folder / "manifest.json").read_text())
    data["artifacts"] = [{"task": "question-answering", "precision": "bf16", "kind": "onnx",
                          "path": "question-answering/model.bf16.onnx", "sha256": "0" * 64, "io": {}, "details": {}}]
    (folder / "manifest.json").write_text(json.dumps(data))
    code, _, err = cli("validate", str(folder))
    assert code == 2 and "precision 'bf16' is not one of fp32, fp16, int8, fp8" in err, err


# ---- which heads a checkpoint holds (issue 15) -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_config():
    return transformers.MegatronBertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=32)


def save(hf_class: str, hf_config, folder: Path, *, named: bool = True) -> Path:
    torch.manual_seed(0)
    getattr(transformers, hf_class)(hf_config).save_pretrained(folder)
    if not named:  # a folder whose config.json does not say what it is: the tensors decide
        config = json.loads((folder / "config.json").read_text())
        del config["architectures"]
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("named", [True, False], ids=["architectures", "tensors-only"])
@pytest.mark.parametrize("hf_class", HEADS_OF)
def test_inspect_lists_the_heads_the_weights_mean(hf_class, named, hf_config, tmp_path, cli):
    folder = save(hf_class, hf_config, tmp_path / "in", named=named)
    code, out, err = cli("inspect", str(folder), "--json")
    assert code == 0, err
    assert json.loads(out)["heads"] == HEADS_OF[hf_class]


def test_a_sentence_classifier_is_not_exported_as_another_head(hf_config, tmp_path, cli):
    """A sequence-classification fine-tune holds a classifier of the right shape for token classification, but
    not of its meaning: export refuses it as missing, and seeds a new one when asked to."""
    folder = save("MegatronBertForSequenceClassification", hf_config, tmp_path / "seq-cls")
    for task in ("ner", "mc"):
        code, _, err = cli("export", str(folder), "--task", task, "--out", str(tmp_path / task))
        assert code == 2 and "it holds: model, sequence-classification" in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / task).exists()
    code, _, err = cli("export", str(folder), "--task", "ner", "--out", str(tmp_path / "ner"), "--init-missing-head",
                       "3")
    assert code == 0, err
    manifest = json.loads((tmp_path / "ner" / "manifest.json").read_text())
    seeded = next(a for a in manifest["artifacts"] if a["kind"] == "weights")
    assert seeded["details"]["tensors"] == ["classifier.bias", "classifier.weight"]
    from safetensors.torch import load_file

    fresh = load_file(tmp_path / "ner" / seeded["path"])["classifier.weight"]
    assert not torch.equal(fresh, load_checkpoint(folder).state_dict["classifier.weight"])
