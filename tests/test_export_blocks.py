"""Tracing one encoder block and repeating it gives the graph, and the numbers, of tracing them all."""

import numpy as np
import onnx
import pytest
import torch

from mbexport.config import MegatronBertConfig
from mbexport.export import export_onnx
from mbexport.export.fp32 import NATIVE_OPSET, _quiet, trace_inputs
from mbexport.inputs import sample_batch
from mbexport.model import MegatronBert
from mbexport.runtime import ort_session

CONFIG = MegatronBertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=32, num_labels=3)


def random_model(task: str) -> MegatronBert:
    """Every weight random, except the first block's LayerNorms and the final one: those are equal (ones, as
    freshly initialised), the case where an optimizer merges initializers across blocks."""
    torch.manual_seed(0)
    model = MegatronBert(CONFIG, task).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln." in name and name.startswith(("bert.encoder.layer.0.", "bert.encoder.ln.")):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.2)
    return model


def full_trace(model: MegatronBert, path) -> None:
    """What export did before it repeated blocks: torch.onnx.export over all of them, its optimizer on."""
    args, dynamic_shapes = trace_inputs(model)
    model.export_form = True
    with _quiet():
        torch.onnx.export(model, args, str(path), dynamo=True, dynamic_shapes=dynamic_shapes,
                          input_names=model.task.input_names, output_names=model.task.output_names,
                          opset_version=NATIVE_OPSET)
    model.export_form = False


def run(path, task, feed):
    return ort_session(path).run(None, {name: feed[name] for name in task.input_names})


@pytest.mark.parametrize("task", ["question-answering", "multiple-choice", "masked-lm"])
def test_repeated_blocks_match_a_full_trace(task, tmp_path):
    model = random_model(task)
    ours, full = export_onnx(model, tmp_path / "ours.onnx"), tmp_path / "full.onnx"
    full_trace(model, full)
    graphs = [onnx.load(str(path)).graph for path in (ours, full)]
    assert [n.op_type for n in graphs[0].node] == [n.op_type for n in graphs[1].node]
    assert (sorted(tuple(t.dims) for t in graphs[0].initializer)
            == sorted(tuple(t.dims) for t in graphs[1].initializer))
    names = {t.name for t in graphs[0].initializer}
    for block in range(CONFIG.num_hidden_layers):  # every block reads its own weights, by their names
        assert f"bert.encoder.layer.{block}.attention.self.query.bias" in names

    feed = sample_batch(model.task, CONFIG, 3, 11, num_choices=2)
    with torch.no_grad():
        reference = [t.numpy() for t in model(*(torch.from_numpy(feed[n]) for n in model.task.input_names))]
    for mine, theirs, expected in zip(run(ours, model.task, feed), run(full, model.task, feed), reference):
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-5)
        np.testing.assert_allclose(mine, expected, rtol=0, atol=1e-5)



def test_a_graph_without_module_scopes_is_refused_in_one_line(tmp_path, monkeypatch):
    """An exporter that records no module scopes (another torch) gives a clear error and no file."""
    import mbexport.export.blocks as blocks
    from mbexport.errors import MbexportError

    monkeypatch.setattr(blocks, "SCOPES", "no.such.metadata")
    with pytest.raises(MbexportError, match="cannot find encoder block 0") as error:
        export_onnx(random_model("question-answering"), tmp_path / "model.onnx")
    assert "\n" not in str(error.value) and list(tmp_path.iterdir()) == []
