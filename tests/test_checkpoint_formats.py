"""What Megatron-LM writes in 2026 (issue 12): torch_dist without common.pt, torch_dcp, fsdp_dtensor, integrity.json,
tokenizer/vocab.txt, Megatron-Core's BERT name variants and Transformer Engine's FP8 extra state.

Every layout is written here with torch.distributed.checkpoint in this one process (tests/checkpoints.py), with
``args`` whose head count (8) and LayerNorm epsilon (1e-6) differ from what mbexport would guess without them
(hidden/64 = 1, Megatron's 1e-5), and read back exactly; its conversion matches transformers to 1e-6.
"""

import json
import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from checkpoints import (FP8_EXTRA_STATE, megatron_shards, pickled, replace_bytes_item, save, torch_saved,
                         write_torch_dcp, write_torch_dist)
from conftest import random_megatron_bert
from mbexport.checkpoint import load_checkpoint
from mbexport.checkpoint.example import example_vocab

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert():
    """A random transformers MegatronBertForPreTraining with 8 heads and epsilon 1e-6, in Checkpoint naming."""
    from mbexport.config import MegatronBertConfig

    return random_megatron_bert(MegatronBertConfig(vocab_size=384, hidden_size=64, num_hidden_layers=3,
                                                   num_attention_heads=8, intermediate_size=128,
                                                   max_position_embeddings=64, layer_norm_eps=1e-6), seed=1)


@pytest.fixture
def cli(cli):
    return lambda *args: cli(*map(str, args))


def logits(model, vocab_size):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, vocab_size, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    return out.prediction_logits, out.seq_relationship_logits


# (id, writer, mbexport format, Megatron's --ckpt-format, where args come from)
LAYOUTS = [
    ("torch-dist-common-state-tp2-pp2", lambda d, b: write_torch_dist(d, b.state_dict, b.config, common_pt=False,
                                                                     te=True, tp=2, pp=2),
     "megatron-core-dist", "torch_dist", "the DCP payload's common_state"),
    ("torch-dist-common-pt", lambda d, b: write_torch_dist(d, b.state_dict, b.config), "megatron-core-dist",
     "torch_dist", "common.pt"),
    ("torch-dcp", lambda d, b: write_torch_dcp(d, b.state_dict, b.config), "megatron-core-dcp", "torch_dcp",
     "the DCP payload's args item"),
    ("fsdp-dtensor-2-ranks", lambda d, b: write_torch_dcp(d, b.state_dict, b.config, ckpt_format="fsdp_dtensor",
                                                          te=True, ranks=2),
     "megatron-core-fsdp-dtensor", "fsdp_dtensor", "the DCP payload's args item"),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_dcp_layouts_read_exactly_with_their_args(layout, bert, tmp_path, cli):
    _, write, fmt, ckpt_format, args_source = layout
    src = write(tmp_path / "ckpt", bert)
    ckpt = load_checkpoint(src)
    assert (ckpt.format, ckpt.info["ckpt_format"], ckpt.info["args_source"]) == (fmt, ckpt_format, args_source)
    assert ckpt.config == bert.config  # 8 heads and epsilon 1e-6: from args, not guessed
    assert ckpt.info["num_attention_heads_source"] == "args" and ckpt.info["layer_norm_eps_source"] == "args"
    assert ckpt.info["iteration"] == 100 and ckpt.info["checkpoint_version"] == 3.0
    trained_with = (2, 2) if "tp2-pp2" in layout[0] else (1, 1)  # global tensors, whatever the parallelism
    assert (ckpt.info["tensor_parallel"], ckpt.info["pipeline_parallel"]) == trained_with
    assert list(ckpt.state_dict) == list(bert.state_dict)
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in bert.state_dict.items())
    code, _, err = cli("convert", src, "--out", tmp_path / "hf")
    assert code == 0 and err.startswith(f"{fmt} checkpoint -> ") and err.count("\n") == 1, err  # no warnings
    converted = transformers.MegatronBertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    for got, want in zip(logits(converted, 384), logits(bert.model, 384)):
        assert (got - want).abs().max().item() <= 1e-6


def test_torch_dist_without_common_state_falls_back_and_says_so(bert, tmp_path, cli):
    src = write_torch_dist(tmp_path / "ckpt", bert.state_dict, bert.config, common_pt=False, args=False)
    code, out, _ = cli("inspect", src, "--json", "--num-heads", 8)
    report = json.loads(out)
    assert code == 0 and report["args_source"] is None and report["layer_norm_eps_source"] == "megatron-default"


def test_inspect_reports_format_args_source_integrity_and_vocab(bert, tmp_path, cli):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(example_vocab()) + "\n")
    src = write_torch_dist(tmp_path / "ckpt", bert.state_dict, bert.config, common_pt=False, integrity=True,
                           vocab=vocab)
    code, out, err = cli("inspect", src, "--json")
    assert code == 0 and err == "", err
    report = json.loads(out)
    assert report["format"] == "megatron-core-dist" and report["megatron_ckpt_format"] == "torch_dist"
    assert report["args_source"] == "the DCP payload's common_state"
    assert report["integrity"] == "integrity.json verified (3 files, sha256)"  # .metadata, __0_0.distcp, metadata.json
    assert report["vocab_file"] == str(src / "iter_0000100/tokenizer/vocab.txt")
    assert report["architecture"]["num_attention_heads"] == 8 and report["layer_norm_eps"] == 1e-6
    code, out, _ = cli("inspect", src)
    assert code == 0 and "integrity.json verified" in out and "common_state" in out


def test_the_checkpoints_tokenizer_vocab_is_used_and_named(bert, tmp_path, cli):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(example_vocab()) + "\n")
    src = write_torch_dist(tmp_path / "ckpt", bert.state_dict, bert.config, vocab=vocab)
    code, _, err = cli("convert", src, "--out", tmp_path / "hf")
    own = src / "iter_0000100/tokenizer/vocab.txt"
    assert code == 0 and err.splitlines()[0] == f"vocab: {own} (the checkpoint's own; --vocab overrides it)"
    assert (tmp_path / "hf/vocab.txt").read_text() == vocab.read_text()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.tokenize("The movie") == ["the", "movie"]
    other = tmp_path / "other.txt"
    other.write_text("\n".join(example_vocab()[:200]) + "\n")
    code, _, err = cli("convert", src, "--out", tmp_path / "hf2", "--vocab", other)
    assert code == 0 and err.splitlines()[0] == f"vocab: {other} (--vocab, instead of the checkpoint's own {own})"
    assert (tmp_path / "hf2/vocab.txt").read_text() == other.read_text()


def test_integrity_mismatch_is_refused_naming_the_file(bert, tmp_path, cli):
    src = write_torch_dist(tmp_path / "ckpt", bert.state_dict, bert.config, integrity=True)
    data = src / "iter_0000100/__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 1
    data.write_bytes(bytes(raw))
    code, _, err = cli("convert", src, "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert f"{data}: sha256 differs from integrity.json" in err


@pytest.mark.parametrize("change, fragment", [
    (lambda m: m["files"].update({"../victim.txt": "0" * 64}), "'../victim.txt', which is not a file in this folder"),
    (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "'/etc/passwd', which is not a file in this folder"),
    (lambda m: m.update(algorithm="md5"), "algorithm 'md5' is not sha256"),
    (lambda m: m.update(files=["common.pt"]), "'files' must map file names to sha256 hex digests"),
    (lambda m: m["files"].update({"common.pt": 5}), "'files' must map file names to sha256 hex digests"),
])
def test_a_hostile_integrity_manifest_is_refused(change, fragment, bert, tmp_path, cli):
    (tmp_path / "victim.txt").write_text("x")
    src = write_torch_dist(tmp_path / "ckpt", bert.state_dict, bert.config, integrity=True)
    manifest = src / "iter_0000100/integrity.json"
    data = json.loads(manifest.read_text())
    change(data)
    manifest.write_text(json.dumps(data))
    code, _, err = cli("inspect", src)
    assert code == 2 and err.count("\n") == 1 and f"{manifest}: " in err and fragment in err, err


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["common_state", "torch_dcp args"])
def test_pickles_inside_the_dcp_payload_never_run(where, bert, tmp_path, cli):
    """dcp's own load planner would unpickle these bytes with weights_only=False: mbexport never lets it."""
    marker = tmp_path / "pwned"
    if where == "common_state":
        common = {"args": Evil(marker), "checkpoint_version": 3.0}
        folder = tmp_path / "ckpt/iter_0000100"
        write_torch_dist(tmp_path / "ckpt", bert.state_dict, bert.config, common_pt=False)
        replace_bytes_item(folder, "common_state/shard_0_1", torch_saved([common]))
    else:
        folder = tmp_path / "ckpt/iter_0000100"
        write_torch_dcp(tmp_path / "ckpt", bert.state_dict, bert.config)
        replace_bytes_item(folder, "args", torch_saved(Evil(marker)))
    code, _, err = cli("inspect", tmp_path / "ckpt")
    assert code == 2 and err.count("\n") == 1 and "refused to load" in err and "posix.system" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("fp8", [True, False])
def test_fp8_scaling_factors_in_extra_state_are_reported_unused(fp8, bert, tmp_path, cli):
    src = write_torch_dist(tmp_path / "ckpt", bert.state_dict, bert.config, fp8=fp8, te=True)
    code, out, err = cli("inspect", src, "--json")
    assert code == 0 and json.loads(out)["fp8_scaling_ignored"] is fp8
    note = "Transformer Engine _extra_state holds FP8 scaling factors (trained with FP8); they are not used"
    assert (note in err) is fp8 and err.count("\n") == (1 if fp8 else 0), err


def test_fp8_extra_state_in_the_legacy_format(bert, tmp_path):
    shards = megatron_shards(bert.state_dict, bert.config, style="mcore-te")
    model = shards["mp_rank_00/model_optim_rng.pt"]["model"]
    for key in [k for k in model if k.endswith("_extra_state")]:
        model[key] = torch.frombuffer(bytearray(pickled(FP8_EXTRA_STATE)), dtype=torch.uint8)  # TE >= 1.x
    path = tmp_path / "mcore.pt"
    save(shards["mp_rank_00/model_optim_rng.pt"], path)
    with pytest.warns(UserWarning, match="FP8 scaling factors"):
        assert load_checkpoint(path).info["fp8_scaling_ignored"]


def mcore_file(tmp_path, bert, edit):
    shards = megatron_shards(bert.state_dict, bert.config, style="mcore")
    checkpoint = shards["mp_rank_00/model_optim_rng.pt"]
    edit(checkpoint["model"])
    path = tmp_path / "mcore.pt"
    save(checkpoint, path)
    return path


def rename(old, new):
    def edit(model):
        for key in [k for k in model if old in k]:
            model[key.replace(old, new)] = model.pop(key)
    return edit


def drop(*prefixes):
    def edit(model):
        for key in [k for k in model if k.startswith(prefixes)]:
            del model[key]
    return edit


ALL_HEADS = ("model", "masked-lm", "causal-lm", "next-sentence", "pretraining")


@pytest.mark.parametrize("edit, heads, note", [
    (rename("lm_head.layer_norm.", "lm_head.layernorm."), ALL_HEADS, None),  # Megatron-Core before 2024
    (drop("lm_head."), ("model", "next-sentence"), "apply_lm_head=False"),  # output_layer straight on the encoder
    (drop("binary_head.", "pooler."), ("model", "masked-lm", "causal-lm"), None),  # add_binary_head=False
    (drop("lm_head.", "binary_head.", "pooler."), ("model",), "apply_lm_head=False"),
    (drop("output_layer.bias"), ALL_HEADS, "output_layer_bias=False"),
], ids=["lm_head.layernorm", "no-lm-head", "no-binary-head", "encoder-only", "no-output-bias"])
def test_megatron_core_bert_name_variants(edit, heads, note, bert, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = load_checkpoint(mcore_file(tmp_path, bert, edit))
    notes = [str(w.message) for w in caught]
    assert len(notes) == (1 if note else 0) and all(note in n for n in notes), notes
    assert ckpt.heads == heads
    if note == "output_layer_bias=False":
        assert torch.equal(ckpt.state_dict.pop("cls.predictions.bias"), torch.zeros(bert.config.vocab_size))
    assert all(torch.equal(t, bert.state_dict[k]) for k, t in ckpt.state_dict.items())
    assert ckpt.config == bert.config


def test_an_untied_output_layer_without_lm_head_is_left_out(bert, tmp_path):
    def edit(model):
        drop("lm_head.")(model)
        model["output_layer.weight"] = model["embedding.word_embeddings.weight"] + 1  # untied, never used
    with pytest.warns(UserWarning, match="apply_lm_head=False"):
        ckpt = load_checkpoint(mcore_file(tmp_path, bert, edit))
    assert "cls.predictions.bias" not in ckpt.state_dict and ckpt.heads == ("model", "next-sentence")


# ---- issue 11, class 7: a checkpoint's own vocab is used unless --vocab overrides it ---------------------------------
@pytest.fixture(scope="module")
def hf_with_vocab(tmp_path_factory):
    """The example converted to a Hugging Face folder, which ships vocab.txt and tokenizer files."""
    from mbexport.checkpoint import save_hf_folder
    from mbexport.checkpoint.example import make_example

    folder = tmp_path_factory.mktemp("hf")
    archive, vocab = make_example(folder / "example")
    save_hf_folder(load_checkpoint(archive), folder / "hf", vocab=vocab)
    return folder / "hf"


def test_build_calibrates_with_the_folders_own_vocab(hf_with_vocab, tmp_path, cli):
    calib = tmp_path / "calib.txt"
    calib.write_text("the movie was good\nthe book was bad\nwhat a happy day\n")
    code, _, err = cli("build", hf_with_vocab, "--task", "mlm", "--precision", "int8", "--calib-text", calib,
                       "--calib-size", 3, "--target", "onnx", "--out", tmp_path / "out")
    assert code == 0, err
    assert err.splitlines()[0] == f"vocab: {hf_with_vocab / 'vocab.txt'} (the checkpoint's own; --vocab overrides it)"
    assert (tmp_path / "out/vocab.txt").read_bytes() == (hf_with_vocab / "vocab.txt").read_bytes()
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    int8 = next(a for a in manifest["artifacts"] if a["precision"] == "int8" and a["kind"] == "onnx")
    assert int8["details"]["calibration"]["text"] == str(calib)


def test_a_tokenizer_json_alone_is_the_vocab(hf_with_vocab, tmp_path, cli):
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((hf_with_vocab / name).read_bytes())
    tokenizer = transformers.BertTokenizerFast(str(hf_with_vocab / "vocab.txt"))
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    temporaries = set(Path(tempfile.gettempdir()).glob("mbexport-vocab-*"))
    code, _, err = cli("export", folder, "--task", "mlm", "--out", tmp_path / "out")
    assert code == 0 and err.splitlines()[0] == f"vocab: {folder / 'tokenizer.json'} (the checkpoint's own; --vocab " \
                                                "overrides it)", err
    assert (tmp_path / "out/vocab.txt").read_text() == "\n".join(example_vocab()) + "\n"
    assert set(Path(tempfile.gettempdir()).glob("mbexport-vocab-*")) == temporaries  # the temporary vocab is gone


def test_a_tokenizer_json_that_is_not_wordpiece_is_refused(hf_with_vocab, tmp_path, cli):
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((hf_with_vocab / name).read_bytes())
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}))
    code, _, err = cli("convert", folder, "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert err.splitlines()[0] == f"error: {folder / 'tokenizer.json'}: not a WordPiece tokenizer (model type " \
                                  "'BPE'), which BERT needs; give --vocab"
