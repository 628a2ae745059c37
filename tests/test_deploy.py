"""Text in, answers out: postprocessing against brute force, `mbexport run` against the PyTorch reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mbexport.config import MegatronBertConfig
from mbexport.deploy import serving
from mbexport.deploy.run import answer, text_pipeline
from mbexport.errors import MbexportError
from mbexport.export import export_onnx
from mbexport.manifest import Manifest
from mbexport.model import MegatronBert
from mbexport.tasks import get_task

WORDS = ("paris is the capital of france berlin germany what city river seine flows through rome italy "
         "a an and in on it which country where big small town lives people many old new").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz?.,",
         *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
CONFIG = MegatronBertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64, num_labels=3,
                            id2label={0: "O", 1: "PLACE", 2: "OTHER"})
QUESTION, CONTEXT = "what city does the seine flow through?", "the seine flows through paris, the capital of france."
TEXTS = {
    "question-answering": {"question": QUESTION, "context": CONTEXT},
    "sequence-classification": {"text": "paris is a big city", "text_pair": "berlin is in germany"},
    "masked-lm": {"text": "paris is the [MASK] of france"},
    "token-classification": {"text": "many people in rome and paris"},
}


def make_artifacts(root: Path, tasks=tuple(TEXTS), seed: int = 0) -> dict:
    """An output folder like `mbexport export` writes: manifest, vocab.txt, <task>/model.fp32.onnx per task.

    Returns the PyTorch reference model of each task (random weights, fixed seed)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    manifest = Manifest(root, source={"path": str(root), "format": "test"}, config=CONFIG.to_hf_dict())
    models = {}
    for i, name in enumerate(tasks):
        task = get_task(name)
        model = _random_model(task, seed + i)
        models[task.name] = model
        manifest.record(task, "fp32", "onnx", export_onnx(model, root / task.name / "model.fp32.onnx"))
    manifest.save()
    return models


def _random_model(task, seed):
    """A reference with every weight random (LayerNorms too), so answers are decisive and differ by head."""
    model = MegatronBert(CONFIG, task).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.1 * noise if "ln" in name.lower().split(".")[-2] else 0.2 * noise)
    return model


def reference_answer(model, name: str, root: Path) -> dict:
    """What the PyTorch reference says, through the same tokenization and postprocessing."""
    pipeline, _ = text_pipeline(Manifest.load(root), get_task(name), max_length=64)
    feed = pipeline.encode({k: [v] for k, v in TEXTS[name].items()}, pad_to_max=False)
    task = get_task(name)
    with torch.no_grad():
        outputs = model(*(torch.from_numpy(feed[n]) for n in task.input_names))
    return pipeline.answers(feed, {n: o.numpy() for n, o in zip(task.output_names, outputs)})[0]


def shared_artifacts(tmp_path_factory) -> tuple[Path, dict]:
    """One exported folder per test session, shared by the deploy, run and Triton tests (export is the slow part)."""
    root = tmp_path_factory.getbasetemp() / "deploy-artifacts"
    if root not in _BUILT:
        _BUILT[root] = make_artifacts(root)
    return root, _BUILT[root]


_BUILT: dict[Path, dict] = {}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


def test_best_span_matches_brute_force():
    rng = np.random.default_rng(0)
    start, end = rng.normal(size=(4, 12)), rng.normal(size=(4, 12))
    allowed = rng.random((4, 12)) > 0.4
    allowed[3] = False
    spans = serving.best_span(start, end, allowed, max_tokens=4)
    for row in range(3):
        pairs = [(start[row, i] + end[row, j], i, j) for i in range(12) for j in range(i, min(12, i + 4))
                 if allowed[row, i] and allowed[row, j]]
        _, i, j = max(pairs)
        p = (np.exp(start[row, i]) / np.exp(start[row, allowed[row]]).sum()
             * np.exp(end[row, j]) / np.exp(end[row, allowed[row]]).sum())
        assert spans[row][:2] == (i, j)
        assert spans[row][2] == pytest.approx(p, rel=1e-9)
    assert spans[3] == (-1, -1, 0.0)


def test_classify_and_top_tokens():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    result = serving.classify(logits, ["a", "b", "c"])
    assert [r["label"] for r in result] == ["a", "b"]
    assert result[0]["probabilities"]["a"] == pytest.approx(np.exp(2) / (np.exp(2) + 1 + np.exp(-1)))
    # Ids past the real vocab (Megatron's padding rows) never win, however large their logit.
    row = np.array([[0.0, 1.0, 5.0, 9.0]])
    assert [t for t, _ in serving.top_tokens(row, np.array([0]), 2, vocab_size=3)[0]] == [2, 1]


def test_encoding_follows_bert_templates(artifacts):
    pipeline, _ = text_pipeline(Manifest.load(artifacts[0]), get_task("seq-cls"), max_length=12)
    feed = pipeline.encode({"text": ["paris is big", "rome"], "text_pair": ["", ""]})  # empty pair = single text
    ids = [VOCAB.index(t) for t in ("[CLS]", "paris", "is", "big", "[SEP]")]
    assert feed["input_ids"][0].tolist() == ids + [0] * 7 and feed["token_type_ids"].max() == 0
    assert feed["attention_mask"].sum(axis=1).tolist() == [5, 3]
    # In a batch, a row with an empty pair is still encoded alone: each row as it would be in a batch of one.
    rows = [("paris is big", ""), ("rome", "berlin is in germany"), ("rome is old", "")]
    mixed = pipeline.encode({"text": [t for t, _ in rows], "text_pair": [p for _, p in rows]})
    for i, (text, pair) in enumerate(rows):
        alone = pipeline.encode({"text": [text], "text_pair": [pair]})
        assert all((mixed[k][i] == alone[k][0]).all() for k in alone)
    assert mixed["token_type_ids"].max(axis=1).tolist() == [0, 1, 0]
    # With pad lengths, a batch is padded to the shortest that holds its longest row (Triton's tokenizer).
    bucketed = serving.TextPipeline("sequence-classification", pipeline.tokenizer, max_length=12, pad_lengths=[4, 8])
    assert [bucketed.encode({"text": [t]})["input_ids"].shape[1] for t in ("rome", "paris is big", "a " * 20)] == [
        4, 8, 12]
    qa, _ = text_pipeline(Manifest.load(artifacts[0]), get_task("qa"), max_length=10)
    feed = qa.encode({"question": ["what city"], "context": ["paris is the capital of france and big"]})
    # Only the context is truncated: [CLS] what city [SEP] paris is the capital of [SEP]
    assert feed["token_type_ids"][0].tolist() == [0] * 4 + [1] * 6 and feed["input_ids"][0, -1] == VOCAB.index("[SEP]")
    with pytest.raises(serving.RequestError, match="needs text for 'context'"):
        qa.encode({"question": ["what city"], "context": [""]})


@pytest.mark.parametrize("name", list(TEXTS))
def test_run_onnxruntime_answers_like_the_reference(artifacts, name):
    root, models = artifacts
    result = answer(root, name, TEXTS[name])
    assert result["backend"] == "onnxruntime" and result["artifact"] == f"{name}/model.fp32.onnx"
    expected = reference_answer(models[name], name, root)
    if name == "question-answering":
        assert (result["answer"], result["start_token"], result["end_token"]) == (
            expected["answer"], expected["start_token"], expected["end_token"])
        assert result["answer"] and result["answer"] in CONTEXT
        assert result["score"] == pytest.approx(expected["score"], rel=1e-3)
    elif name == "sequence-classification":
        assert result["label"] == expected["label"] and set(result["probabilities"]) == {"O", "PLACE", "OTHER"}
        np.testing.assert_allclose(list(result["probabilities"].values()),
                                   list(expected["probabilities"].values()), atol=1e-5)
    elif name == "masked-lm":
        assert [c["token"] for c in result["masks"][0]["candidates"]] == [
            c["token"] for c in expected["masks"][0]["candidates"]]
        assert result["text"] == expected["text"] and "[MASK]" not in result["text"]
        assert len(result["masks"]) == 1 and result["masks"][0]["position"] == 4
    else:
        assert [(t["token"], t["label"]) for t in result["tokens"]] == [
            (t["token"], t["label"]) for t in expected["tokens"]]
        assert [t["token"] for t in result["tokens"]] == TEXTS[name]["text"].split()


def test_run_cli_json_and_errors(artifacts, cli, tmp_path):
    root, models = artifacts
    code, out, err = cli("run", str(root), "--task", "qa", "--question", QUESTION, "--context", CONTEXT, "--json")
    assert code == 0, err
    assert json.loads(out)["answer"] == reference_answer(models["question-answering"], "question-answering",
                                                         root)["answer"]
    code, out, err = cli("run", str(root), "--task", "mlm", "--text", TEXTS["masked-lm"]["text"])
    assert code == 0 and "[MASK]" not in out
    code, out, err = cli("run", str(root), "--task", "qa", "--question", QUESTION)
    assert code == 2 and "context" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("run", str(tmp_path), "--task", "qa", "--question", "q", "--context", "c")
    assert code == 2 and "manifest.json" in err
    code, out, err = cli("run", str(root), "--task", "qa", "--backend", "tensorrt", "--question", "q",
                         "--context", "c")
    assert code == 2 and "TensorRT" in err
    code, out, err = cli("run", str(root), "--task", "qa", "--question", "q", "--context", "c", "--device", "tpu")
    assert code == 2 and "unknown device 'tpu'" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("run", str(root), "--task", "model", "--text", "paris")
    assert code == 2 and "no text-in, answer-out pipeline for 'model'" in err


def test_run_never_substitutes_what_was_asked_for(artifacts, cli):
    """Asked for and not built is an error naming what was built; what auto chose is said before the answer."""
    root, _ = artifacts
    qa = ("--task", "qa", "--question", "q", "--context", "c")
    built = "question-answering fp32 (onnx)"
    for args, problem in ((("--task", "nsp", "--text", "paris", "--text-pair", "rome"),
                           f"next-sentence was not built here (built: masked-lm fp32 (onnx); {built};"),
                          ((*qa, "--precision", "FP16"), f"no fp16 artifact for question-answering (built: {built})"),
                          ((*qa, "--backend", "pytorch", "--precision", "int8"),
                           "the PyTorch reference runs fp32 only"),
                          (("--task", "mlm", "--text", "no mask here"), "put at least one [MASK] in 'text'")):
        code, out, err = cli("run", str(root), *args)
        assert code == 2 and problem in err and len(err.strip().splitlines()) == 1 and not out, (args, err)
    code, out, err = cli("run", str(root), "--task", "qa", "--question", QUESTION, "--context", CONTEXT)
    assert code == 0 and err.strip() == ("question-answering: onnxruntime on cpu, fp32, "
                                         "question-answering/model.fp32.onnx")
    assert out.strip().startswith("'")  # the answer, after the line saying where it came from


def test_run_needs_a_vocab(artifacts, tmp_path):
    root = tmp_path / "out"
    shutil.copytree(artifacts[0], root)
    (root / "vocab.txt").unlink()
    with pytest.raises(MbexportError, match="vocab"):
        answer(root, "seq-cls", {"text": "paris"})


@pytest.mark.tensorrt
def test_tensorrt_engine_answers_like_onnxruntime(artifacts, tmp_path):
    from mbexport.engine import Profile, build_engine

    root = tmp_path / "out"
    shutil.copytree(artifacts[0], root)
    manifest = Manifest.load(root)
    task = get_task("qa")
    plan = root / task.name / "model.fp32.plan"
    profiles = (Profile(batch=(1, 1, 4), sequence=(8, 32, 64)),)
    details = build_engine(root / task.name / "model.fp32.onnx", plan, task, profiles, precision="fp32", root=root)
    manifest.record(task, "fp32", "engine", plan, **details)
    manifest.save()
    trt = answer(root, "qa", TEXTS["question-answering"], backend="tensorrt")
    ort = answer(root, "qa", TEXTS["question-answering"], backend="onnxruntime")
    assert trt["backend"] == "tensorrt" and (trt["answer"], trt["start_token"]) == (ort["answer"], ort["start_token"])
