"""A real Triton Inference Server serving what ``mbexport triton`` writes.

Every model loads; the text ensembles answer as ``mbexport run`` does, over HTTP and gRPC, one row or a batch
per request; the raw ONNX models compute what ONNX Runtime computes in-process; bad requests are refused
without harm; concurrent load is answered in full, and the dynamic batcher forms batches.

The server (tritonserver 2.51.0 from the nvidia-pytriton wheel with ../shared/triton's ONNX Runtime backend,
assembled by tests/tritonserver.py) serves repositories written with the defaults from real ``build`` outputs:
the built-in example (QA built for fp16, int8 and fp8; masked-LM, classification, NSP and NER for fp32) and the
trained fixture's classifier (int8, calibrated on its text). Instance kinds are the default KIND_AUTO, which a
CPU-only server resolves to the CPU.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import tritonserver
from mbexport.checkpoint.example import make_example
from mbexport.config import MegatronBertConfig
from mbexport.deploy.run import SOURCE, answer, sequence_length, text_pipeline
from mbexport.deploy.triton import write_repository
from mbexport.manifest import Manifest
from mbexport.build import build
from mbexport.recipes import Calibration, Recipe
from mbexport.runtime import ort_session
from mbexport.tasks import get_task

pytestmark = pytest.mark.skipif(tritonserver.missing() is not None, reason=f"no Triton server here: "
                                                                           f"{tritonserver.missing()}")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

TRAINED = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tiny-trained"
QA = "question-answering"
EXAMPLE_BUILDS = [(QA, "fp16"), (QA, "int8"), (QA, "fp8"), ("masked-lm", "fp32"), ("sequence-classification", "fp32"),
                  ("next-sentence", "fp32"), ("token-classification", "fp32")]
TRAINED_BUILD = ("sequence-classification", "int8")
CONTEXT = "the city is a place where many people work and the house is a home for a family."
EXAMPLE_TEXTS = {
    QA: [{"question": "where do people work?", "context": CONTEXT},
         {"question": "what is a home?", "context": CONTEXT},
         {"question": "who lives in the house?", "context": "a family lives in the old house near the water."}],
    "masked-lm": [{"text": "the [MASK] of the world"}, {"text": "people [MASK] in the city"},
                  {"text": "a [MASK] is a [MASK] for a family"}],
    "sequence-classification": [{"text": "a good movie", "text_pair": ""},
                                {"text": "the book is bad", "text_pair": "i read it"},
                                {"text": "happy people", "text_pair": ""}],
    "next-sentence": [{"text": "the city is old.", "text_pair": "many people work there."},
                      {"text": "the house is small.", "text_pair": "water is a good thing."},
                      {"text": "i read a book.", "text_pair": "it was a good book."}],
    "token-classification": [{"text": "many people work in the city"}, {"text": "the president of the united state"},
                             {"text": "a house"}],
}
LOAD_CLIENTS, LOAD_REQUESTS = 16, 25  # 400 requests


def _builds() -> list[tuple[str, str, str]]:
    """(output, task, precision) of every build served; the trained one where the fixture is here."""
    return [("example", *b) for b in EXAMPLE_BUILDS] + ([("trained", *TRAINED_BUILD)] if TRAINED.is_dir() else [])


def texts_for(output: str, task: str) -> list[dict]:
    if output == "example":
        return EXAMPLE_TEXTS[task]
    lines = (TRAINED / "dev.txt").read_text(encoding="utf-8").splitlines()
    return [{"text": line, "text_pair": ""} for line in lines[:3]]  # long paragraphs: truncated alike on both sides


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """{output name: output folder} of real builds, and {output name: (repository, its model names)}."""
    base = tmp_path_factory.mktemp("served")
    checkpoint, vocab = make_example(base / "checkpoint")
    outputs = {"example": base / "example"}
    for task, precision in EXAMPLE_BUILDS:
        build(checkpoint, Recipe(name="test", task=task, precision=precision, target="onnx",
                                 calibration=Calibration(size=8, sequence=32)),
              out_dir=outputs["example"], vocab=vocab, init_missing_head=0)
    if TRAINED.is_dir():
        outputs["trained"] = base / "trained"
        task, precision = TRAINED_BUILD
        build(TRAINED / "seqcls-hf", Recipe(name="test", task=task, precision=precision, target="onnx",
                                            calibration=Calibration(text=TRAINED / "calib.txt", size=16, sequence=64)),
              out_dir=outputs["trained"], vocab=TRAINED / "vocab.txt")
    # The trained model's warm-up at the default max batch (32 x 384 tokens) alone would take ~10 s to load here.
    max_batch = {"example": None, "trained": 8}
    repos = {name: (base / f"{name}-repo", write_repository(out, base / f"{name}-repo", max_batch=max_batch[name]))
             for name, out in outputs.items()}
    return outputs, repos


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    with tritonserver.TritonServer(tmp_path_factory.mktemp("tritonserver"),
                                   [repo for repo, _ in served[1].values()]) as server:
        yield server


@pytest.fixture(scope="module")
def clients(server):
    """An HTTP and a gRPC client (closed before the server stops: an open connection delays its exit)."""
    made = {"http": httpclient.InferenceServerClient(server.http_url),
            "grpc": grpcclient.InferenceServerClient(server.grpc_url)}
    yield made
    for client in made.values():
        client.close()


def text_request(protocol: str, ensemble: str, rows: list[dict]) -> tuple[list, list]:
    """Inputs (one BYTES tensor per text field, one row per example) and the requested output."""
    module = httpclient if protocol == "http" else grpcclient
    inputs = []
    for field in rows[0]:
        tensor = module.InferInput(field, [len(rows), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[row[field].encode("utf-8")] for row in rows], dtype=np.object_))
        inputs.append(tensor)
    return inputs, [module.InferRequestedOutput("answer")]


def ask(client, protocol: str, ensemble: str, rows: list[dict]) -> list[dict]:
    inputs, outputs = text_request(protocol, ensemble, rows)
    result = client.infer(ensemble, inputs, outputs=outputs)
    answers = result.as_numpy("answer")
    assert answers.shape == (len(rows), 1)
    return [json.loads(row) for row in answers[:, 0]]


def local_answer(root: Path, task: str, precision: str, row: dict) -> dict:
    """`mbexport run`'s answer for the same artifact, less the fields saying where it came from."""
    result = answer(root, task, row, precision=precision)
    assert result["backend"] == "onnxruntime" and result["precision"] == precision
    return {k: v for k, v in result.items() if k not in SOURCE}


def same(a, b):
    """Equal documents: every label, token, span and text exactly, scores to float32 noise (Triton pads every
    request to one length for its batcher, `mbexport run` does not)."""
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


def test_every_model_is_ready(served, clients):
    outputs, repos = served
    http = clients["http"]
    assert http.get_server_metadata()["version"] == tritonserver.VERSION
    index = {m["name"]: m["state"] for m in http.get_model_repository_index()}
    expected = {name for _, names in repos.values() for name in names}
    assert index == {name: "READY" for name in expected}
    # What the builds were for: QA's precisions and the fp32 heads, not QA's fp32 export.
    inference = {name for name in repos["example"][1] if role(name) == ""}
    assert inference == {f"{task}-{precision}" for task, precision in EXAMPLE_BUILDS}
    for name in expected:
        assert http.is_model_ready(name)
        config = http.get_model_config(name)
        if config.get("platform") == "onnxruntime_onnx":  # KIND_AUTO came back as the CPU on this server
            assert [g["kind"] for g in config["instance_group"]] == ["KIND_CPU"]


def role(name: str) -> str:
    """'' for an inference model, else its role: tokenizer, postprocess or text (the ensemble)."""
    last = name.rsplit("-", 1)[-1]
    return last if last in ("tokenizer", "postprocess", "text") else ""


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("output, task, precision", _builds(), ids=lambda v: v if isinstance(v, str) else None)
def test_ensemble_answers_like_mbexport_run(served, clients, protocol, output, task, precision):
    outputs, _ = served
    rows = texts_for(output, task)
    expected = [local_answer(outputs[output], task, precision, row) for row in rows]
    client, ensemble = clients[protocol], f"{task}-{precision}-text"
    same(ask(client, protocol, ensemble, rows[:1]), expected[:1])
    same(ask(client, protocol, ensemble, rows), expected)  # one request, a batch of rows


@pytest.mark.parametrize("output, task, precision", _builds(), ids=lambda v: v if isinstance(v, str) else None)
def test_raw_model_computes_what_onnxruntime_computes(served, clients, output, task, precision):
    """The inference model alone, on pre-tokenized input: fp32 bit for bit; the others as close as
    ONNX Runtime's own session options make them (Triton's backend fuses Q/DQ, the exact emulation does not)."""
    outputs, repos = served
    manifest = Manifest.load(outputs[output])
    spec = get_task(task)
    config = MegatronBertConfig.from_hf_dict(manifest.config)
    pipeline, _ = text_pipeline(manifest, spec, max_length=sequence_length(config, None))
    feed = pipeline.encode({k: [row[k] for row in texts_for(output, task)] for k in texts_for(output, task)[0]})
    name = f"{task}-{precision}"
    inputs = []
    for key in spec.input_names:
        tensor = httpclient.InferInput(key, list(feed[key].shape), "INT64")
        tensor.set_data_from_numpy(feed[key])
        inputs.append(tensor)
    result = clients["http"].infer(name, inputs)
    session = ort_session(repos[output][0] / name / "1" / "model.onnx")
    for key, value in zip(spec.output_names, session.run(spec.output_names, feed)):
        served_value = result.as_numpy(key)
        assert served_value.dtype == value.dtype and served_value.shape == value.shape
        if precision == "fp32":
            np.testing.assert_array_equal(served_value, value)
        else:
            np.testing.assert_allclose(served_value, value, rtol=0.05, atol=0.05 * np.abs(value).max())


def raw_inputs(feed: dict[str, np.ndarray], datatype: str = "INT64") -> list:
    inputs = []
    for key, value in feed.items():
        tensor = httpclient.InferInput(key, list(value.shape), datatype)
        tensor.set_data_from_numpy(value.astype(np.int64 if datatype == "INT64" else np.int32))
        inputs.append(tensor)
    return inputs


def test_bad_requests_are_refused_and_the_server_keeps_answering(served, server, clients):
    outputs, _ = served
    http = clients["http"]
    qa, raw = f"{QA}-int8-text", f"{QA}-int8"
    good = EXAMPLE_TEXTS[QA][0]
    question = {"question": good["question"]}

    def refused(model, inputs, *expected):
        with pytest.raises(InferenceServerException) as error:
            http.infer(model, inputs)
        assert all(text in str(error.value) for text in expected), str(error.value)

    refused(qa, text_request("http", qa, [{**question, "context": ""}])[0], "needs text for 'context'")
    refused("masked-lm-fp32-text", text_request("http", "", [{"text": "no mask here"}])[0], "[MASK]")
    refused(qa, text_request("http", qa, [{**question, "passage": good["context"]}])[0], "passage")  # wrong name
    refused(qa, text_request("http", qa, [question])[0], "context")  # a missing input
    wrong_dtype = httpclient.InferInput("context", [1, 1], "INT32")
    wrong_dtype.set_data_from_numpy(np.zeros((1, 1), dtype=np.int32))
    refused(qa, [text_request("http", qa, [question])[0][0], wrong_dtype], "INT32")
    wrong_shape = text_request("http", qa, [good])[0]
    wrong_shape[1] = httpclient.InferInput("context", [1, 2], "BYTES")
    wrong_shape[1].set_data_from_numpy(np.array([[b"a", b"b"]], dtype=np.object_))
    refused(qa, wrong_shape, "shape", "context")
    not_utf8 = text_request("http", qa, [good])[0]
    not_utf8[1].set_data_from_numpy(np.array([[b"\xff\xfe city"]], dtype=np.object_))
    refused(qa, not_utf8, "utf-8")
    refused("no-such-model", text_request("http", qa, [good])[0], "no-such-model")
    ids = np.full((1, 8), 10**6, dtype=np.int64)  # token ids past the vocab
    refused(raw, raw_inputs({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}))
    longest = sequence_length(MegatronBertConfig.from_hf_dict(Manifest.load(outputs["example"]).config), None)
    ids = np.full((1, 4 * longest), 5, dtype=np.int64)  # past the model's positions
    refused(raw, raw_inputs({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}))

    long_context = " ".join([good["context"]] * 40)  # ~20x the model's positions: truncated, still answered
    [answer_row] = ask(http, "http", qa, [{**question, "context": long_context}])
    assert answer_row["answer"] and answer_row["answer"] in long_context and answer_row["end_token"] < longest
    assert http.is_server_live() and http.is_server_ready() and server.process.poll() is None
    same(ask(http, "http", qa, [good]), [local_answer(outputs["example"], QA, "int8", good)])


def test_concurrent_load_every_answer_correct_none_lost_and_batched(served, server, clients):
    """16 clients (half HTTP, half gRPC) send 400 one-row requests to the QA ensemble at once."""
    outputs, _ = served
    rows = EXAMPLE_TEXTS[QA]
    expected = [local_answer(outputs["example"], QA, "int8", row) for row in rows]
    model = f"{QA}-int8"
    before = clients["grpc"].get_inference_statistics(model, as_json=True)["model_stats"][0]
    answers, failures, start = [], [], threading.Barrier(LOAD_CLIENTS)

    def client_loop(n: int) -> None:
        protocol = "http" if n % 2 else "grpc"
        client = (httpclient if protocol == "http" else grpcclient).InferenceServerClient(
            server.http_url if protocol == "http" else server.grpc_url)
        try:
            start.wait()
            for i in range(LOAD_REQUESTS):
                k = (n + i) % len(rows)
                answers.append((k, ask(client, protocol, f"{model}-text", [rows[k]])[0]))
        except Exception as error:  # reported below: a lost answer fails the test
            failures.append(repr(error))
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(LOAD_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures and len(answers) == LOAD_CLIENTS * LOAD_REQUESTS
    for k, row in answers:
        same(row, expected[k])
    after = clients["grpc"].get_inference_statistics(model, as_json=True)["model_stats"][0]
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    batches = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in after["batch_stats"]}
    assert inferences == LOAD_CLIENTS * LOAD_REQUESTS and executions < inferences
    assert max(batches) > 1, batches  # the dynamic batcher stacked requests
    print(f"\n{model}: {inferences} inferences in {executions} executions; batch size: count "
          f"{dict(sorted(batches.items()))}")


def group_members(pgid: int) -> list[int]:
    """Live processes in a process group (the server and its Python-backend stubs)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_the_harness_leaves_no_process_when_a_test_is_interrupted(served, tmp_path):
    """A server with Python models, interrupted mid-test: stopped by its pid, its stubs gone with it."""
    repo = tmp_path / "repo"
    write_repository(served[0]["example"], repo, tasks=["mlm"])
    with pytest.raises(KeyboardInterrupt):
        with tritonserver.TritonServer(tmp_path, [repo]) as server:
            pid = server.process.pid
            assert len(group_members(pid)) == 3  # the server and the tokenizer's and postprocess's stubs
            raise KeyboardInterrupt
    assert group_members(pid) == [] and not Path(f"/proc/{pid}").exists()


def test_a_server_that_cannot_start_is_reported_and_gone(served, tmp_path):
    repo = tmp_path / "repo"
    write_repository(served[0]["example"], repo, tasks=["mlm"])
    (repo / "masked-lm-fp32" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(RuntimeError, match="tritonserver exited") as error:
        with tritonserver.TritonServer(tmp_path, [repo]):
            pass
    assert "masked-lm-fp32" in str(error.value)
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(tmp_path) in _cmdline(p)]


def _cmdline(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
