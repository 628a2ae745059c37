"""The reference model against transformers' MegatronBert classes: same weights, same numbers."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mbexport.config import MegatronBertConfig  # noqa: E402
from mbexport.model import build_reference  # noqa: E402
from mbexport.tasks import TASKS  # noqa: E402

CONFIG = MegatronBertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64, type_vocab_size=2,
                            layer_norm_eps=1e-5, num_labels=3)


def hf_state(model):
    """The oracle's weights under our names (a base MegatronBertModel saves without the ``bert.`` prefix)."""
    prefix = "bert." if isinstance(model, transformers.MegatronBertModel) else ""
    return {prefix + k: v for k, v in model.state_dict().items()}


def hf_model(task):
    cfg = transformers.MegatronBertConfig(**{k: v for k, v in CONFIG.to_hf_dict().items()
                                              if k not in ("architectures", "id2label", "label2id")},
                                          num_labels=2 if task.name == "question-answering" else CONFIG.num_labels,
                                          is_decoder=task.causal)
    torch.manual_seed(0)
    model = getattr(transformers, task.hf_class)(cfg).eval()
    with torch.no_grad():  # exercise every parameter, LayerNorms and biases included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(task, b=3, s=11):
    g = torch.Generator().manual_seed(1)
    shape = (b, 2, s) if task.has_choices else (b, s)
    ids = torch.randint(5, CONFIG.vocab_size, shape, generator=g)
    mask = torch.ones(shape, dtype=torch.long)
    mask[1, ..., -4:] = 0  # a padded row
    mask[-1] = 0  # a row that is all padding: must stay finite (its values are arbitrary, as in transformers)
    types = torch.zeros(shape, dtype=torch.long)
    types[..., s // 2:] = 1
    return ids, mask, types


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("export_form", [False, True], ids=["torch-form", "export-form"])
def test_matches_transformers(name, export_form):
    task = TASKS[name]
    oracle = hf_model(task)
    ours, seeded = build_reference(task, CONFIG, hf_state(oracle))
    ours.export_form = export_form
    assert seeded == []
    ids, mask, types = batch(task)
    with torch.no_grad():
        expected = oracle(input_ids=ids, attention_mask=mask, token_type_ids=types)
        got = ours(ids, mask, types)
    for spec, tensor in zip(task.outputs, got):
        want = getattr(expected, spec.name)
        assert tensor.shape == want.shape
        assert torch.isfinite(tensor).all()
        diff = (tensor - want).abs()[:-1]  # the last batch row is all padding
        assert diff.max().item() <= 1e-5, f"{name}.{spec.name}: max abs diff {diff.max().item():.2e}"


def test_missing_head_is_refused_then_seeded_reproducibly():
    pretrain = hf_model(TASKS["pretraining"]).state_dict()
    with pytest.raises(Exception, match="no 'question-answering' head.*--init-missing-head"):
        build_reference("qa", CONFIG, pretrain)
    a, seeded = build_reference("qa", CONFIG, pretrain, init_missing_head=7)
    b, _ = build_reference("qa", CONFIG, pretrain, init_missing_head=7)
    assert seeded == ["qa_outputs.bias", "qa_outputs.weight"]
    assert torch.equal(a.qa_outputs.weight, b.qa_outputs.weight) and a.qa_outputs.weight.std() > 0.01


def test_broken_trunk_and_wrong_shape_are_refused():
    state = hf_model(TASKS["pretraining"]).state_dict()
    broken = {k: v for k, v in state.items() if k != "bert.encoder.layer.1.ln.weight"}
    with pytest.raises(Exception, match="missing tensor bert.encoder.layer.1.ln.weight"):
        build_reference("mlm", CONFIG, broken, init_missing_head=0)
    state["bert.encoder.ln.weight"] = torch.ones(65)
    with pytest.raises(Exception, match=r"bert.encoder.ln.weight has shape \(65,\)"):
        build_reference("mlm", CONFIG, state)
