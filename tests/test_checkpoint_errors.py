"""Bad checkpoints: one stderr line naming the file, exit code 2, no output folder, nothing executed."""

import os
import pickle
import shutil
import zipfile

import pytest
import torch

from checkpoints import megatron_shards, write_megatron, write_torch_dist
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
