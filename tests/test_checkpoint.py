"""Every checkpoint layout reads back bit-exactly and converts to a folder transformers loads and matches."""

import json
import subprocess
import sys
import zipfile

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mbexport.checkpoint import load_checkpoint, save_hf_folder  # noqa: E402
from checkpoints import write_megatron, write_torch_dist  # noqa: E402
from mbexport.checkpoint.example import make_example, write_ngc_zip  # noqa: E402

# (id, writer(tmp, state_dict, config) -> path, pass --num-heads, expected format, TP, PP)
LAYOUTS = [
    ("ngc-old-no-args", lambda d, s, c: write_ngc_zip(d / "ngc.zip", s, c), True, "ngc-zip", 1, 1),
    ("ngc-old-stored", lambda d, s, c: write_ngc_zip(d / "ngc.zip", s, c, args=True, compression=zipfile.ZIP_STORED),
     False, "ngc-zip", 1, 1),
    ("ngc-new-stored-v3", lambda d, s, c: write_ngc_zip(d / "ngc.zip", s, c, args=True, version=3.0,
                                                        old_serialization=False, compression=zipfile.ZIP_STORED),
     False, "ngc-zip", 1, 1),
    ("ngc-new-args-v3", lambda d, s, c: write_ngc_zip(d / "ngc.zip", s, c, args=True, version=3.0,
                                                      old_serialization=False), False, "ngc-zip", 1, 1),
    ("v0-2020", lambda d, s, c: write_megatron(d, s, c, version=None), False, "megatron-lm", 1, 1),
    ("v0-old-serialization-no-args", lambda d, s, c: write_megatron(d, s, c, version=None, args=False,
                                                                    old_serialization=True), True, "megatron-lm", 1, 1),
    ("v1.0-tp2", lambda d, s, c: write_megatron(d, s, c, version=1.0, tp=2), False, "megatron-lm", 2, 1),
    ("v1-int-tp2-no-args", lambda d, s, c: write_megatron(d, s, c, version=1, tp=2, args=False), True,
     "megatron-lm", 2, 1),
    ("v2.0-2021-tp2-pp2", lambda d, s, c: write_megatron(d, s, c, version=2.0, style="2021", tp=2, pp=2,
                                                         iteration=1234), False, "megatron-lm", 2, 2),
    ("v3.0-2023-tp4", lambda d, s, c: write_megatron(d, s, c, style="2023", tp=4), False, "megatron-lm", 4, 1),
    ("v3.0-2021-tp8", lambda d, s, c: write_megatron(d, s, c, style="2021", tp=8), False, "megatron-lm", 8, 1),
    ("v3.0-pp2-virtual2", lambda d, s, c: write_megatron(d, s, c, pp=2, virtual=2), False, "megatron-lm", 1, 2),
    ("mcore-tp2", lambda d, s, c: write_megatron(d, s, c, style="mcore", tp=2), False, "megatron-core", 2, 1),
    ("mcore-te-pp2", lambda d, s, c: write_megatron(d, s, c, style="mcore-te", pp=2), False, "megatron-core", 1, 2),
    ("torch-dist", lambda d, s, c: write_torch_dist(d, s, c), False, "megatron-core-dist", 1, 1),
    ("torch-dist-te", lambda d, s, c: write_torch_dist(d, s, c, te=True), False, "megatron-core-dist", 1, 1),
    ("single-pt", lambda d, s, c: write_megatron(d, s, c) / "release/mp_rank_00/model_optim_rng.pt", False,
     "megatron-lm", 1, 1),
    ("zip-in-a-folder-no-tracker", lambda d, s, c: zip_without_tracker(write_megatron(d, s, c, tp=2, iteration=7)),
     False, "ngc-zip", 2, 1),
    ("mp-rank-folder-tp2", lambda d, s, c: write_megatron(d, s, c, tp=2) / "release/mp_rank_01", False,
     "megatron-lm", 2, 1),
]


def zip_without_tracker(folder):
    """A zip of a Megatron folder under a top-level directory, without latest_checkpointed_iteration.txt."""
    archive = folder.parent / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for file in folder.rglob("*.pt"):
            z.write(file, f"megatron_bert/{file.relative_to(folder)}")
    return archive


def outputs(model, config):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, config.vocab_size, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    mask[2, 5:] = 0
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    return out.prediction_logits, out.seq_relationship_logits


def assert_same_outputs(folder, source):
    model, info = transformers.MegatronBertForPreTraining.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set()), info
    for got, want in zip(outputs(model.eval(), model.config), outputs(source.model, source.model.config)):
        assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_layout_reads_exactly_and_converts(layout, tmp_path, megatron_bert, cli):
    _, write, needs_heads, fmt, tp, pp = layout
    src = write(tmp_path / "ckpt", megatron_bert.state_dict, megatron_bert.config)
    heads = megatron_bert.config.num_attention_heads
    ckpt = load_checkpoint(src, num_attention_heads=heads if needs_heads else None)
    assert ckpt.format == fmt
    assert (ckpt.info["tensor_parallel"], ckpt.info["pipeline_parallel"]) == (tp, pp)
    assert ckpt.config == megatron_bert.config
    assert ckpt.heads == ("model", "masked-lm", "causal-lm", "next-sentence", "pretraining")
    assert list(ckpt.state_dict) == list(megatron_bert.state_dict)
    for name, tensor in megatron_bert.state_dict.items():
        assert torch.equal(ckpt.state_dict[name], tensor), name

    out = tmp_path / "hf"
    code, _, err = cli("convert", str(src), "--out", str(out), *(["--num-heads", str(heads)] if needs_heads else []))
    assert code == 0, err
    assert_same_outputs(out, megatron_bert)


def test_args_less_checkpoint_guesses_heads_from_hidden(tmp_path, megatron_bert):
    ckpt = load_checkpoint(write_ngc_zip(tmp_path / "ngc.zip", megatron_bert.state_dict, megatron_bert.config))
    assert ckpt.config.num_attention_heads == 1  # hidden 64 / 64, overridable with --num-heads
    assert ckpt.info["layer_norm_eps_source"] == "megatron-default" and ckpt.config.layer_norm_eps == 1e-5
    assert ckpt.info["checkpoint_version"] == 0 and not ckpt.info["has_args"]


@pytest.mark.parametrize("base", [False, True], ids=["pretraining", "base-model-without-prefix"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_huggingface_folder(base, safe, tmp_path, megatron_bert, cli):
    source = megatron_bert.model.bert if base else megatron_bert.model
    source.save_pretrained(tmp_path / "in", safe_serialization=safe)
    ckpt = load_checkpoint(tmp_path / "in")
    assert ckpt.format == "huggingface" and ckpt.info["layer_norm_eps_source"] == "config"
    expected = {k: v for k, v in megatron_bert.state_dict.items() if k.startswith("bert.") or not base}
    assert set(ckpt.state_dict) == set(expected)
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in expected.items())
    assert ckpt.heads == (("model",) if base else ("model", "masked-lm", "causal-lm", "next-sentence", "pretraining"))
    if not base:
        code, _, err = cli("convert", str(tmp_path / "in"), "--out", str(tmp_path / "hf"))
        assert code == 0, err
        assert_same_outputs(tmp_path / "hf", megatron_bert)


def test_fine_tuned_heads_are_listed(tmp_path, megatron_bert):
    hf_config = megatron_bert.model.config
    transformers.MegatronBertForQuestionAnswering(hf_config).save_pretrained(tmp_path / "qa")
    ckpt = load_checkpoint(tmp_path / "qa")
    assert ckpt.heads == ("model", "question-answering")
    save_hf_folder(ckpt, tmp_path / "out")
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["architectures"] == ["MegatronBertForQuestionAnswering"]
    loaded, info = transformers.MegatronBertForQuestionAnswering.from_pretrained(tmp_path / "out",
                                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_example_converts_with_tokenizer_and_inspects(tmp_path, cli):
    archive, vocab = make_example(tmp_path / "example", seed=0)
    assert archive.name == "example_bert_tiny_uncased.zip"
    code, _, err = cli("convert", str(archive), "--out", str(tmp_path / "hf"), "--vocab", str(vocab))
    assert code == 0, err
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.do_lower_case and tokenizer.tokenize("The MOVIE") == ["the", "movie"]
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert (config["model_type"], config["layer_norm_eps"], config["vocab_size"]) == ("megatron-bert", 1e-5, 384)
    assert config["num_attention_heads"] == 4
    code, _, err = cli("convert", str(archive), "--out", str(tmp_path / "cased"), "--vocab", str(vocab),
                       "--no-lowercase")
    assert code == 0, err
    assert json.loads((tmp_path / "cased/tokenizer_config.json").read_text())["do_lower_case"] is False
    code, out, _ = cli("inspect", str(archive), "--json")
    report = json.loads(out)
    assert code == 0 and report["format"] == "ngc-zip" and report["vocab"]["padded"] == 384
    assert report["heads"] == ["model", "masked-lm", "causal-lm", "next-sentence", "pretraining"]
    assert report["architecture"]["num_hidden_layers"] == 2 and report["parameters"] > 0
    code, out, _ = cli("inspect", str(archive))
    assert code == 0 and "ngc-zip" in out


def test_example_is_seeded(tmp_path):
    a = load_checkpoint(make_example(tmp_path / "a", seed=1)[0]).state_dict
    b = load_checkpoint(make_example(tmp_path / "b", seed=1)[0]).state_dict
    c = load_checkpoint(make_example(tmp_path / "c", seed=2)[0]).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["cls.predictions.bias"],
                                                                         c["cls.predictions.bias"])


def test_example_is_reproducible_to_the_byte(tmp_path, cli):
    """Two `mbexport example` runs with one seed write identical files (zip times, serialization, vocab); one
    runs in its own process, where PyTorch's old serialization would have keyed storages by other addresses."""
    for name, seed in (("a", "7"), ("c", "8")):
        code, _, err = cli("example", str(tmp_path / name), "--seed", seed)
        assert code == 0, err
    subprocess.run([sys.executable, "-m", "mbexport", "example", str(tmp_path / "b"), "--seed", "7"], check=True,
                   capture_output=True)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["example_bert_tiny_uncased.zip", "vocab.txt"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a/example_bert_tiny_uncased.zip").read_bytes() != \
        (tmp_path / "c/example_bert_tiny_uncased.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "a/example_bert_tiny_uncased.zip") as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
