"""Bad checkpoints: one stderr line naming the file, exit code 2, no output folder, nothing executed."""

import argparse
import io
import json
import os
import pickle
import shutil
import warnings
import zipfile

import pytest
import torch

from checkpoints import megatron_shards, replace_bytes_item, save, torch_saved, write_megatron, write_torch_dist
from mbexport.checkpoint.example import make_example, write_ngc_zip


class Evil:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def refuse(cli, src, *fragments, tmp_path, options=()):
    out = tmp_path / "out"
    code, _, err = cli("convert", str(src), "--out", str(out), *options)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in " ".join(lines), err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    return lines[0]


@pytest.mark.parametrize("old", [True, False], ids=["old-serialization", "zip-serialization"])
@pytest.mark.parametrize("container", ["zip", "folder"])
def test_malicious_pickle_is_refused_without_running(old, container, tmp_path, cli):
    marker = tmp_path / "pwned"
    checkpoint = {"model": {"language_model": Evil(marker)}, "checkpoint_version": 3.0}
    if container == "zip":
        src = tmp_path / "evil.zip"
        with zipfile.ZipFile(src, "w") as archive:
            archive.writestr("latest_checkpointed_iteration.txt", "release")
            with archive.open("release/mp_rank_00/model_optim_rng.pt", "w") as member:
                torch.save(checkpoint, member, _use_new_zipfile_serialization=not old)
    else:
        src = tmp_path / "evil"
        (src / "release/mp_rank_00").mkdir(parents=True)
        (src / "latest_checkpointed_iteration.txt").write_text("release")
        torch.save(checkpoint, src / "release/mp_rank_00/model_optim_rng.pt", _use_new_zipfile_serialization=not old)
    line = refuse(cli, src, "model_optim_rng.pt", "system", tmp_path=tmp_path)
    assert "refused" in line
    assert not marker.exists()


def test_malicious_torch_dist_metadata_is_refused(tmp_path, cli, megatron_bert):
    src = write_torch_dist(tmp_path / "dist", megatron_bert.state_dict, megatron_bert.config)
    marker = tmp_path / "pwned"
    (src / "iter_0000100/.metadata").write_bytes(pickle.dumps(Evil(marker)))
    refuse(cli, src, ".metadata", "system", tmp_path=tmp_path)
    assert not marker.exists()


def test_not_a_zip(tmp_path, cli):
    src = tmp_path / "megatron_bert_345m_v0_1_uncased.zip"
    src.write_text("<html>404 Not Found</html>")
    refuse(cli, src, "megatron_bert_345m_v0_1_uncased.zip", "not a valid zip", tmp_path=tmp_path)


def test_truncated_zip(tmp_path, cli):
    archive, _ = make_example(tmp_path / "example")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    refuse(cli, archive, "example_bert_tiny_uncased.zip", tmp_path=tmp_path)


def test_truncated_member(tmp_path, cli, megatron_bert):
    src = write_megatron(tmp_path / "ckpt", megatron_bert.state_dict, megatron_bert.config, old_serialization=True)
    shard = src / "release/mp_rank_00/model_optim_rng.pt"
    shard.write_bytes(shard.read_bytes()[:5000])
    refuse(cli, src, "mp_rank_00/model_optim_rng.pt", tmp_path=tmp_path)


def test_missing_member(tmp_path, cli):
    src = tmp_path / "partial.zip"
    with zipfile.ZipFile(src, "w") as archive:
        archive.writestr("latest_checkpointed_iteration.txt", "release")
    refuse(cli, src, "partial.zip", "release, which has no mp_rank_*/model_optim_rng.pt", tmp_path=tmp_path)


def test_missing_tensor(tmp_path, cli, megatron_bert):
    state = {k: v for k, v in megatron_bert.state_dict.items() if k != "bert.encoder.layer.1.output.dense.bias"}
    src = write_ngc_zip(tmp_path / "ngc.zip", state, megatron_bert.config, args=True)
    refuse(cli, src, "ngc.zip", "missing tensor bert.encoder.layer.1.output.dense.bias", tmp_path=tmp_path)


def test_extra_tensor(tmp_path, cli, megatron_bert):
    shards = megatron_shards(megatron_bert.state_dict, megatron_bert.config, args=False)
    shards["mp_rank_00/model_optim_rng.pt"]["model"]["language_model"]["transformer"]["layers.0.adapter.weight"] = \
        torch.zeros(2)
    path = tmp_path / "ckpt/release/mp_rank_00/model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    torch.save(shards["mp_rank_00/model_optim_rng.pt"], path)
    refuse(cli, path, "model_optim_rng.pt", "unexpected tensor language_model.transformer.layers.0.adapter.weight",
           tmp_path=tmp_path)


def test_shape_mismatch(tmp_path, cli, megatron_bert):
    state = dict(megatron_bert.state_dict)
    state["bert.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(96, 64)
    state["bert.encoder.layer.1.intermediate.dense.bias"] = torch.zeros(96)
    src = write_megatron(tmp_path / "ckpt", state, megatron_bert.config)
    refuse(cli, src, "ckpt", "bert.encoder.layer.1.intermediate.dense.weight has shape [96, 64], expected [128, 64]",
           tmp_path=tmp_path)


@pytest.mark.parametrize("how", ["replicated", "split-shape", "missing-rank"])
def test_disagreeing_tp_shards(how, tmp_path, cli, megatron_bert):
    tp = 4 if how == "missing-rank" else 2  # without args only a gap in the ranks shows that one is missing
    shards = megatron_shards(megatron_bert.state_dict, megatron_bert.config, tp=tp, args=False)
    rank1 = shards["mp_rank_01/model_optim_rng.pt"]["model"]
    if how == "replicated":
        rank1["language_model"]["transformer"]["layers.0.input_layernorm.weight"] += 1
    elif how == "split-shape":
        rank1["language_model"]["transformer"]["layers.0.mlp.dense_4h_to_h.weight"] = torch.zeros(32, 64)
    folder = tmp_path / "ckpt/release"
    for rel, checkpoint in shards.items():
        if how == "missing-rank" and rel.startswith("mp_rank_02"):
            continue
        (folder / rel).parent.mkdir(parents=True)
        torch.save(checkpoint, folder / rel)
    expected = {"replicated": "disagree on replicated tensor layers.0.input_layernorm.weight",
                "split-shape": "disagree on the shape of layers.0.mlp.dense_4h_to_h.weight",
                "missing-rank": "missing shard mp_rank_02"}[how]
    refuse(cli, folder, "release", expected, tmp_path=tmp_path, options=("--num-heads", "8"))


def test_args_that_contradict_the_shards(tmp_path, cli, megatron_bert):
    src = write_megatron(tmp_path / "ckpt", megatron_bert.state_dict, megatron_bert.config, tp=2)
    shutil.rmtree(src / "release/mp_rank_01")
    refuse(cli, src, "ckpt", "tensor_model_parallel_size=2", tmp_path=tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_megatron_core_output_layer_must_be_tied(tied, tmp_path, cli, megatron_bert):
    shards = megatron_shards(megatron_bert.state_dict, megatron_bert.config, style="mcore", args=False)
    model = shards["mp_rank_00/model_optim_rng.pt"]["model"]
    model["output_layer.weight"] = model["embedding.word_embeddings.weight"] + (0 if tied else 1)
    path = tmp_path / "mcore.pt"
    torch.save(shards["mp_rank_00/model_optim_rng.pt"], path)
    if tied:
        code, _, err = cli("convert", str(path), "--out", str(tmp_path / "out"), "--num-heads", "8")
        assert code == 0, err
    else:
        refuse(cli, path, "mcore.pt", "output_layer.weight is not tied", tmp_path=tmp_path,
               options=("--num-heads", "8"))


def test_missing_path_and_bad_vocab(tmp_path, cli):
    refuse(cli, tmp_path / "nope.zip", "nope.zip", "no such file", tmp_path=tmp_path)
    archive, _ = make_example(tmp_path / "example")
    bad_vocab = tmp_path / "vocab.txt"
    bad_vocab.write_text("hello\nworld\n")
    code, _, err = cli("convert", str(archive), "--out", str(tmp_path / "out"), "--vocab", str(bad_vocab))
    assert code == 2 and "vocab.txt" in err and "[UNK]" in err and not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path, cli):
    src = tmp_path / "x.zip"
    src.write_text("nope")
    with pytest.raises(Exception, match="not a valid zip"):
        cli("--debug", "convert", str(src), "--out", str(tmp_path / "out"))


# ---- issue 11, class 5: unexpected types and values in every file a checkpoint reader opens -----------------------
# Each case builds one hostile input and expects one stderr line naming the file and the problem, exit 2, no output.

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A Hugging Face MegatronBert folder (config.json + model.safetensors) the cases copy and damage."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MegatronBertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=32)
    folder = tmp_path_factory.mktemp("hf") / "hf"
    transformers.MegatronBertForPreTraining(config).save_pretrained(folder)
    return folder


def edited_config(change):
    def build(tmp_path, hf_folder, _):
        src = shutil.copytree(hf_folder, tmp_path / "hf")
        data = json.loads((src / "config.json").read_text())
        raw = change(data)
        (src / "config.json").write_bytes(raw if isinstance(raw, bytes) else json.dumps(data).encode())
        return src, src / "config.json"
    return build


def setting(key, value):
    return edited_config(lambda data: data.__setitem__(key, value))


CONFIG_CASES = {
    "top-level-list": (edited_config(lambda d: b"[]"), "expected a JSON object, got list"),
    "heads-a-string": (setting("num_attention_heads", "4"), "num_attention_heads must be a whole number from 1 to"),
    "heads-negative": (setting("num_attention_heads", -4), "num_attention_heads must be a whole number from 1 to"),
    "heads-zero": (setting("num_attention_heads", 0), "num_attention_heads must be a whole number"),
    "hidden-a-float": (setting("hidden_size", 32.0), "hidden_size must be a whole number"),
    "vocab-a-bool": (setting("vocab_size", True), "vocab_size must be a whole number"),
    "layers-a-billion": (setting("num_hidden_layers", 10**9), "num_hidden_layers must be a whole number from 1 to 1,0"),
    "positions-huge": (setting("max_position_embeddings", 10**12), "max_position_embeddings must be a whole number"),
    "ffn-a-list": (setting("intermediate_size", [64]), "intermediate_size must be a whole number"),
    "eps-a-string": (setting("layer_norm_eps", "1e-5"), "layer_norm_eps must be a number between 0 and 1"),
    "eps-nan": (edited_config(lambda d: json.dumps(d).replace('"layer_norm_eps": 1e-12', '"layer_norm_eps": NaN')
                              .encode()), "layer_norm_eps must be a number between 0 and 1, got nan"),
    "eps-negative": (setting("layer_norm_eps", -1e-5), "layer_norm_eps must be a number between 0 and 1"),
    "pad-beyond-vocab": (setting("pad_token_id", 500), "pad_token_id must be a token id from 0 to 127"),
    "id2label-keys": (setting("id2label", {"x": "a"}), "id2label must map label numbers to names"),
    "id2label-values": (setting("id2label", {"0": 5}), "id2label must map label numbers to names"),
    "architectures-a-string": (setting("architectures", "MegatronBertForMaskedLM"),
                               "architectures must be a list of class names"),
    "model-type-missing": (edited_config(lambda d: d.pop("model_type")), "model_type is 'None', expected"),
    "truncated-json": (edited_config(lambda d: b'{"model_type": "megatron-bert", '), "not valid JSON"),
    "binary": (edited_config(lambda d: b"\xff\xfe\x00\x01"), "not valid JSON"),
    "nested-100000-deep": (edited_config(lambda d: b"[" * 100000), "not valid JSON"),
    "40-MiB": (edited_config(lambda d: b" " * (40 << 20)), "is over 32 MiB"),
}


def index_with(weight_map=None, raw=None, link=None):
    """A sharded safetensors folder whose index is damaged: a weight_map, raw bytes, or a shard that is a link."""
    def build(tmp_path, hf_folder, _):
        src = shutil.copytree(hf_folder, tmp_path / "hf")
        (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
        index = src / "model.safetensors.index.json"
        if link:
            (tmp_path / "outside.safetensors").write_bytes((src / "model-00001-of-00001.safetensors").read_bytes())
            (src / "model-00001-of-00001.safetensors").unlink()
            (src / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "outside.safetensors")
        data = {"metadata": {}, "weight_map": weight_map if weight_map is not None else
                {"bert.embeddings.word_embeddings.weight": "model-00001-of-00001.safetensors"}}
        index.write_bytes(raw if raw is not None else json.dumps(data).encode())
        return src, index
    return build


INDEX_CASES = {
    "weight-map-a-list": (index_with(["model-00001-of-00001.safetensors"]), "'weight_map' must map tensor names"),
    "weight-map-values-ints": (index_with({"a": 1}), "'weight_map' must map tensor names"),
    "weight-map-empty": (index_with({}), "'weight_map' must map tensor names"),
    "top-level-list": (index_with(raw=b"[1, 2]"), "'weight_map' must map tensor names"),
    "not-json": (index_with(raw=b"\x00\x01"), "not valid JSON"),
    "parent-path": (index_with({"a": "../victim.safetensors"}), "'../victim.safetensors', which is outside the folder"),
    "absolute-path": (index_with({"a": "/etc/passwd"}), "'/etc/passwd', which is outside the folder"),
    "link-out-of-the-folder": (index_with(link=True), "which is outside the folder"),
}


def legacy_with(edit, name="model_optim_rng.pt"):
    """A Megatron-LM release folder whose one rank file is ``edit``ed (its dict, or replaced by raw bytes)."""
    def build(tmp_path, _, bert):
        checkpoint = megatron_shards(bert.state_dict, bert.config)["mp_rank_00/model_optim_rng.pt"]
        path = tmp_path / "ckpt/release/mp_rank_00" / name
        path.parent.mkdir(parents=True)
        (tmp_path / "ckpt/latest_checkpointed_iteration.txt").write_text("release")
        raw = edit(checkpoint)
        if isinstance(raw, bytes):
            path.write_bytes(raw)
        else:
            save(checkpoint, path)
        return tmp_path / "ckpt", path
    return build


def args_with(**values):
    return legacy_with(lambda c: c.__setitem__("args", argparse.Namespace(**{**vars(c["args"]), **values})))


def entry(key, value):
    return legacy_with(lambda c: c.__setitem__(key, value))


def nested(depth):
    def edit(checkpoint):
        for _ in range(depth):
            checkpoint["model"] = {"x": checkpoint["model"]}
    return legacy_with(edit)


def appended(junk: bytes):
    def edit(checkpoint):
        buffer = io.BytesIO()
        save(checkpoint, buffer)
        return buffer.getvalue() + junk
    return legacy_with(edit)


ARGS_CASES = {
    "heads-a-string": (args_with(num_attention_heads="8"), "args.num_attention_heads must be a whole number"),
    "heads-negative": (args_with(num_attention_heads=-8), "args.num_attention_heads must be a whole number"),
    "heads-zero": (args_with(num_attention_heads=0), "args.num_attention_heads must be a whole number"),
    "heads-a-float": (args_with(num_attention_heads=8.0), "args.num_attention_heads must be a whole number"),
    "hidden-negative": (args_with(hidden_size=-64), "args.hidden_size must be a whole number"),
    "layers-a-billion": (args_with(num_layers=10**9), "args.num_layers must be a whole number from 1 to 1,024"),
    "vocab-a-trillion": (args_with(padded_vocab_size=10**12), "args.padded_vocab_size must be a whole number"),
    "ffn-a-float": (args_with(ffn_hidden_size=1.5), "args.ffn_hidden_size must be a whole number"),
    "tp-a-string": (args_with(tensor_model_parallel_size="1"), "args.tensor_model_parallel_size must be a whole"),
    "eps-a-string": (args_with(layernorm_epsilon="x"), "args.layernorm_epsilon must be a number between 0 and 1"),
    "eps-inf": (args_with(layernorm_epsilon=float("inf")), "args.layernorm_epsilon must be a number between 0 and 1"),
    "eps-negative": (args_with(layernorm_epsilon=-1.0), "args.layernorm_epsilon must be a number between 0 and 1"),
    "args-a-string": (entry("args", "num_layers=2"), "args is a str, not Megatron's argparse.Namespace"),
    "args-a-dict-with-a-bad-value": (entry("args", {"num_attention_heads": "8"}), "args.num_attention_heads must be"),
}
VERSION_CASES = {
    f"version-{name}": (entry("checkpoint_version", value), "is not one Megatron-LM writes")
    for name, value in [("minus-1", -1), ("inf", float("inf")), ("nan", float("nan")), ("a-string", "3.0"),
                        ("true", True), ("2.5", 2.5), ("a-tensor", torch.tensor(3.0)), ("10e400", 10**400)]
}
PICKLE_CASES = {
    "a-text-file": (legacy_with(lambda c: b"hello, this is not a checkpoint\n"),
                    "not a PyTorch checkpoint (it starts with b'hell', neither PyTorch's zip nor its pickle format; "
                    "a text file?)"),
    "an-empty-file": (legacy_with(lambda c: b""), "not a PyTorch checkpoint"),
    "a-plain-pickle": (legacy_with(lambda c: pickle.dumps({"model": {}}, protocol=2)),
                       "not a PyTorch checkpoint (its pickle is damaged"),
    "a-protocol-4-pickle": (legacy_with(lambda c: pickle.dumps({"model": {}}, protocol=4)),
                            "not a PyTorch checkpoint"),
    "a-zip-of-something-else": (legacy_with(lambda c: _zip_bytes({"notes.txt": b"hi"})),
                                "a zip whose first record is not a stored data.pkl"),
    "junk-after-the-tensors": (appended(b"\0" * (3 << 20)), "but its tensors need only"),
    "top-level-a-list": (legacy_with(lambda c: c.__setitem__("model", [1, 2])), "'model' is not a dict of tensors"),
    "nested-20-deep": (nested(20), "is nested deeper than any Megatron model"),
    "a-string-for-a-tensor": (legacy_with(lambda c: c["model"]["language_model"]["transformer"].__setitem__(
        "final_layernorm.weight", "w")), "is not a tensor (str)"),
    "a-5000-digit-layer": (legacy_with(lambda c: c["model"]["language_model"]["transformer"].__setitem__(
        "layers." + "9" * 5000 + ".input_layernorm.weight", torch.zeros(64))), "unexpected tensor"),
}


def _zip_bytes(members: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tracker(content: bytes):
    def build(tmp_path, _, bert):
        src = write_megatron(tmp_path / "ckpt", bert.state_dict, bert.config)
        (src / "latest_checkpointed_iteration.txt").write_bytes(content)
        return src, src / "latest_checkpointed_iteration.txt"
    return build


TRACKER_CASES = {
    f"tracker-{name}": (tracker(content), fragment) for name, content, fragment in [
        ("arabic-digits", "١٢٣".encode(), "expected 'release' or an iteration number"),
        ("invalid-utf-8", b"\xff\xfe\xfa", "expected 'release' or an iteration number"),
        ("5000-digits", b"9" * 5000, "is 5,000 bytes; a tracker file is 'release' or an iteration number"),
        ("empty", b"", "expected 'release' or an iteration number"),
        ("iter-name", b"iter_0000005", "expected 'release' or an iteration number"),
        ("negative", b"-1", "expected 'release' or an iteration number"),
        ("exponent", b"1e3", "expected 'release' or an iteration number"),
    ]
}


def zipped(damage):
    """The example NGC zip, with its raw bytes damaged by ``damage(bytes, zipfile.ZipFile) -> bytes``."""
    def build(tmp_path, _, bert):
        archive, _ = make_example(tmp_path / "example")
        with zipfile.ZipFile(archive) as z:
            data = damage(archive.read_bytes(), z)
        archive.write_bytes(data)
        return archive, archive
    return build


def _flag_encrypted(data: bytes, archive: zipfile.ZipFile) -> bytes:
    data = bytearray(data)
    for info in archive.infolist():
        data[info.header_offset + 6] |= 1  # the local header's flag bits
    central = data.rfind(b"PK\x05\x06")
    start = int.from_bytes(data[central + 16:central + 20], "little")
    position = start
    while data[position:position + 4] == b"PK\x01\x02":
        data[position + 8] |= 1
        position += 46 + sum(int.from_bytes(data[position + i:position + i + 2], "little") for i in (28, 30, 32))
    return bytes(data)


def _method(method: int):
    def damage(data: bytes, archive: zipfile.ZipFile) -> bytes:
        data = bytearray(data)
        position = data.rfind(b"PK\x05\x06")
        position = int.from_bytes(data[position + 16:position + 20], "little")
        while data[position:position + 4] == b"PK\x01\x02":
            data[position + 10:position + 12] = method.to_bytes(2, "little")
            position += 46 + sum(int.from_bytes(data[position + i:position + i + 2], "little") for i in (28, 30, 32))
        return bytes(data)
    return damage


def _corrupt_member(data: bytes, archive: zipfile.ZipFile) -> bytes:
    info = archive.getinfo("release/mp_rank_00/model_optim_rng.pt")
    data = bytearray(data)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 40
    data[start:start + 64] = bytes(64)
    return bytes(data)


ZIP_CASES = {
    "encrypted-members": (zipped(_flag_encrypted), "is encrypted; mbexport reads only unencrypted archives"),
    "compression-method-99": (zipped(_method(99)), "uses compression method 99, which mbexport cannot read"),
    "damaged-deflate-data": (zipped(_corrupt_member), "model_optim_rng.pt: "),
}


def dist_with(damage):
    """A torch_dist checkpoint (common state in the DCP payload), damaged by ``damage(iteration folder)``."""
    def build(tmp_path, _, bert):
        src = write_torch_dist(tmp_path / "ckpt", bert.state_dict, bert.config, common_pt=False)
        return src, damage(src / "iter_0000100")
    return build


def _write(name, data: bytes):
    def damage(folder):
        (folder / name).write_bytes(data)
        return folder / name
    return damage


def _same_length_text(folder):
    path = folder / "__0_0.distcp"
    path.write_bytes(b"x" * path.stat().st_size)
    return folder


def _truncated(folder):
    path = folder / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[:1000])
    return folder / ".metadata"


def _metadata_edit(change):
    def damage(folder):
        from mbexport.checkpoint.safe_load import dist_metadata

        metadata = dist_metadata(folder / ".metadata")
        obj = change(metadata)
        with open(folder / ".metadata", "wb") as f:
            pickle.dump(obj if obj is not None else metadata, f)
        return folder / ".metadata"
    return damage


def _path(value):
    def change(metadata):
        for info in metadata.storage_data.values():
            info.relative_path = value
    return change


def _size(value):
    def change(metadata):
        metadata.state_dict_metadata["embedding.word_embeddings.weight"].size = value
    return change


def _common_state(obj):
    def damage(folder):
        replace_bytes_item(folder, "common_state/shard_0_1", torch_saved(obj))
        return folder / "common_state/shard_0_1"
    return damage


DIST_CASES = {
    "data-file-is-text": (dist_with(_same_length_text), "a data file (*.distcp) holds something that is not a saved"),
    "data-file-truncated": (dist_with(_truncated), "lies outside __0_0.distcp"),
    "data-file-missing": (dist_with(lambda f: (f / "__0_0.distcp").unlink() or f), "missing data file __0_0.distcp"),
    "metadata-json-a-list": (dist_with(_write("metadata.json", b"[]")), "sharded_backend 'None' is not read"),
    "metadata-json-zarr": (dist_with(_write("metadata.json", b'{"sharded_backend": "zarr"}')),
                           "sharded_backend 'zarr' is not read"),
    "metadata-json-binary": (dist_with(_write("metadata.json", b"\xff\x00")), "not valid JSON"),
    "metadata-truncated": (dist_with(lambda f: _write(".metadata", (f / ".metadata").read_bytes()[:50])(f)),
                           "corrupt torch.distributed.checkpoint metadata"),
    "metadata-not-metadata": (dist_with(_metadata_edit(lambda m: {"state_dict_metadata": {}})),
                              "not torch.distributed.checkpoint metadata (unexpected structure)"),
    "data-path-leaves-the-folder": (dist_with(_metadata_edit(_path("../../victim"))),
                                    "names the data file '../../victim', which is not a file in this folder"),
    "data-path-absolute": (dist_with(_metadata_edit(_path("/etc/passwd"))), "which is not a file in this folder"),
    "a-terabyte-tensor": (dist_with(_metadata_edit(_size(torch.Size([1 << 20, 1 << 18])))),
                          "declares 1,099,5"),
    "a-shape-of-strings": (dist_with(_metadata_edit(_size(("1024", "64")))), "malformed shape or dtype"),
    "common-state-a-dict": (dist_with(_common_state({"args": None})), "expected a one-item list"),
    "common-state-text": (dist_with(lambda f: _replace(f, b"plain text")), "not a PyTorch checkpoint"),
    "common-pt-text": (lambda t, h, b: _with_common_pt(t, b), "common.pt: not a PyTorch checkpoint"),
}


def _replace(folder, data):
    replace_bytes_item(folder, "common_state/shard_0_1", data)
    return folder / "common_state/shard_0_1"


def _with_common_pt(tmp_path, bert):
    src = write_torch_dist(tmp_path / "ckpt", bert.state_dict, bert.config)
    (src / "iter_0000100/common.pt").write_text("args: none\n")
    return src, src / "iter_0000100/common.pt"


HOSTILE = {"config": CONFIG_CASES, "index": INDEX_CASES, "args": ARGS_CASES, "version": VERSION_CASES,
           "pickle": PICKLE_CASES, "tracker": TRACKER_CASES, "zip": ZIP_CASES, "dist": DIST_CASES}


@pytest.mark.parametrize("case", [(kind, name) for kind, cases in HOSTILE.items() for name in cases],
                         ids=[f"{kind}-{name}" for kind, cases in HOSTILE.items() for name in cases])
def test_hostile_checkpoint_inputs_get_one_line(case, hf_folder, megatron_bert, tmp_path, cli):
    kind, name = case
    build, fragment = HOSTILE[kind][name]
    src, culprit = build(tmp_path, hf_folder, megatron_bert)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no library warning on the way
        line = refuse(cli, src, str(culprit), fragment, tmp_path=tmp_path)
    assert line.startswith("error: ")


@pytest.mark.parametrize("heads", ["-4", "0", "2000"])
def test_a_bad_head_count_option(heads, tmp_path, cli):
    archive, _ = make_example(tmp_path / "example")
    refuse(cli, archive, f"--num-heads must be a whole number from 1 to 1,024, got {heads}", tmp_path=tmp_path,
           options=("--num-heads", heads))


def test_an_unreadable_iteration_is_only_reported(tmp_path, megatron_bert, cli):
    """iteration is only shown: a value of another type is reported as unknown, not refused."""
    shards = megatron_shards(megatron_bert.state_dict, megatron_bert.config)
    checkpoint = shards["mp_rank_00/model_optim_rng.pt"]
    checkpoint["iteration"] = torch.tensor([1, 2])
    save(checkpoint, tmp_path / "ckpt.pt")
    code, out, err = cli("inspect", str(tmp_path / "ckpt.pt"), "--json")
    assert code == 0 and json.loads(out)["iteration"] is None, err


# ---- issue 11, class 4: small inputs that would take unbounded memory ------------------------------------------------
def deflated_zip(path, members: dict[str, tuple[bytes, int]]) -> None:
    """A zip whose members are ``prefix`` followed by ``zeros`` zero bytes, deflated: a 2 GiB member costs a few
    MB on disk and well under a second to write (one compressed 16 MiB block of zeros, repeated)."""
    import struct
    import zlib

    chunk = 16 << 20
    zero_block = zlib.compressobj(9, zlib.DEFLATED, -15)
    zero_block = zero_block.compress(bytes(chunk)) + zero_block.flush(zlib.Z_FULL_FLUSH)
    with open(path, "wb") as f:
        central = b""
        for name, (prefix, zeros) in members.items():
            assert zeros % chunk == 0
            head = zlib.compressobj(9, zlib.DEFLATED, -15)
            data = head.compress(prefix) + head.flush(zlib.Z_FULL_FLUSH)
            crc = zlib.crc32(prefix)
            for _ in range(zeros // chunk):
                crc = zlib.crc32(bytes(chunk), crc)
            data += zero_block * (zeros // chunk) + b"\x03\x00"  # an empty final block
            size, offset, encoded = len(prefix) + zeros, f.tell(), name.encode()
            fields = struct.pack("<HHHHHIIIHH", 20, 0, 8, 0, 0x21, crc, len(data), size, len(encoded), 0)
            f.write(b"PK\x03\x04" + fields + encoded + data)
            central += b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, offset)
            central += encoded
        start = f.tell()
        f.write(central + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(members), len(members), len(central),
                                                      start, 0))


def lying_storage(path) -> None:
    """PyTorch's pre-1.6 format, hand-written: a 600-byte file whose pickle declares a 16 GiB float storage."""
    import collections

    class Storage:
        pass

    storage = Storage()

    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (storage, 0, (1 << 32,), (1,), False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 1 << 32, None) if obj is storage else None

    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                      "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump({"model": {"language_model": {"embedding": {"word_embeddings": {
            "weight": Tensor()}}}}})
        pickle.dump(["0"], f, protocol=2)
        f.write((1 << 32).to_bytes(8, "little") + bytes(64))


MEMORY_SCRIPT = r"""
import contextlib, io, json, re, resource, sys
from mbexport.cli import main

def run(src):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(["inspect", src, "--json"])
            code = 0
        except SystemExit as exit:
            code = exit.code
        except MemoryError:
            code = "MemoryError"
    return code, err.getvalue()

control, cases = sys.argv[1], sys.argv[2:]
run(control)  # everything imported and warm before the limit
size = int(re.search(r"VmSize:\s+(\d+) kB", open("/proc/self/status").read())[1]) << 10
limit = size + (1 << 30)  # 1 GiB more than now: a 2 GiB member read whole cannot fit
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
print(json.dumps({"control": run(control), **{src: run(src) for src in cases}}))
"""


def test_small_inputs_that_would_take_gigabytes_are_refused_within_a_memory_limit(tmp_path, hf_folder,
                                                                                  megatron_bert):
    """Each case is refused in one line in a process whose address space is capped 1 GiB above what it uses
    before: a 2 GiB zip member or tracker is never inflated, a declared 16 GiB storage or 1 TiB DCP tensor
    never allocated, a config or args saying 10^9 layers never looped over. The example still loads."""
    import subprocess
    import sys

    example, _ = make_example(tmp_path / "example")
    checkpoint = io.BytesIO()
    save(megatron_shards(megatron_bert.state_dict, megatron_bert.config, version=None)
         ["mp_rank_00/model_optim_rng.pt"], checkpoint, old_serialization=True)
    rank = "release/mp_rank_00/model_optim_rng.pt"
    deflated_zip(tmp_path / "tracker.zip", {"latest_checkpointed_iteration.txt": (b"release", 2 << 30),
                                            rank: (checkpoint.getvalue(), 0)})
    deflated_zip(tmp_path / "member.zip", {"latest_checkpointed_iteration.txt": (b"release", 0),
                                           rank: (checkpoint.getvalue(), 2 << 30)})
    lying_storage(tmp_path / "lying.pt")
    layers = edited_config(lambda d: d.__setitem__("num_hidden_layers", 10**9))(tmp_path / "c", hf_folder, None)[0]
    args = args_with(num_layers=10**9)(tmp_path / "a", None, megatron_bert)[0]
    dist = dist_with(_metadata_edit(_size(torch.Size([1 << 20, 1 << 18]))))(tmp_path / "d", None, megatron_bert)[0]
    expected = {
        tmp_path / "tracker.zip": "would inflate 1,",  # 1,5xx,xxx x: the ratio depends on zlib's block encoding
        tmp_path / "member.zip": "would inflate",
        tmp_path / "lying.pt": "its pickle declares 17,179,869,192 bytes of tensors, but it holds only",
        layers: "num_hidden_layers must be a whole number from 1 to 1,024, got 1000000000",
        args: "args.num_layers must be a whole number from 1 to 1,024, got 1000000000",
        dist: "declares 1,099,5",
    }
    assert (tmp_path / "member.zip").stat().st_size < 10 << 20
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(example), *map(str, expected)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout)
    assert outcomes.pop("control")[0] == 0
    for src, fragment in expected.items():
        code, err = outcomes[str(src)]
        assert code == 2 and err.count("\n") == 1 and fragment in err, (src, err)


@pytest.mark.parametrize("shape", [
    dict(vocab_size=30592, hidden_size=2560, num_hidden_layers=48, num_attention_heads=40, intermediate_size=10240,
         max_position_embeddings=512),  # Megatron-BERT 3.9B
    dict(vocab_size=51200, hidden_size=12288, num_hidden_layers=96, num_attention_heads=96, intermediate_size=49152,
         max_position_embeddings=2048),  # GPT-3 175B's shape
    dict(vocab_size=128256, hidden_size=16384, num_hidden_layers=126, num_attention_heads=128,
         intermediate_size=53248, max_position_embeddings=131072),  # a 405B model's shape
], ids=["bert-3.9b", "gpt3-175b", "405b"])
def test_the_limits_leave_room_for_real_large_models(shape):
    """The architecture limits refuse only what no released model has: these configs and args are accepted."""
    from mbexport.checkpoint import _args
    from mbexport.config import MegatronBertConfig

    config = MegatronBertConfig(**shape)
    args = argparse.Namespace(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                              num_attention_heads=config.num_attention_heads,
                              ffn_hidden_size=config.intermediate_size,
                              max_position_embeddings=config.max_position_embeddings,
                              padded_vocab_size=config.vocab_size, layernorm_epsilon=1e-5,
                              tensor_model_parallel_size=8, pipeline_model_parallel_size=16)
    assert _args(args, None)["num_layers"] == config.num_hidden_layers
    assert MegatronBertConfig.from_hf_dict(config.to_hf_dict()).replace(id2label={}) == config
