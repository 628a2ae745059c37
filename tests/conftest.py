"""Shared fixtures, and the one rule (and wording) for skipping tests that need TensorRT, a CUDA GPU or Model
Optimizer."""

from types import SimpleNamespace

import pytest
import torch

NEEDS = ("tensorrt", "gpu", "modelopt")  # the markers (pyproject.toml); a marked test runs only where missing() is None


def missing(need: str) -> str | None:
    """Why a test marked ``tensorrt``, ``gpu`` or ``quant`` cannot run on this machine (its skip reason), or None."""
    if need == "modelopt":
        import importlib.util

        return None if importlib.util.find_spec("modelopt") else ("needs NVIDIA Model Optimizer, not installed here "
                                                                  "(the oracle for Q/DQ placement: pip install 'mbexport[test]')")
    if need == "tensorrt":
        from mbexport.engine import tensorrt_available

        return None if tensorrt_available() else ("needs TensorRT, not installed here (pip install tensorrt-cu12 "
                                                  "from NVIDIA's index, on a GPU machine)")
    import onnxruntime

    if not torch.cuda.is_available():
        return "needs a CUDA GPU, none visible to PyTorch here"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "needs a CUDA GPU, none visible to ONNX Runtime here (pip install onnxruntime-gpu)"
    return None


def pytest_runtest_setup(item):
    for need in NEEDS:
        if item.get_closest_marker(need) is not None and (reason := missing(need)):
            pytest.skip(reason)


def random_megatron_bert(config, seed: int = 0):
    """A random transformers MegatronBertForPreTraining of ``config`` (every weight random, LayerNorms too) with
    its state dict in Checkpoint naming and the config itself: the oracle for checkpoint tests."""
    transformers = pytest.importorskip("transformers")

    hf_config = transformers.MegatronBertConfig(**{k: v for k, v in config.to_hf_dict().items()
                                                   if k not in ("architectures", "id2label", "label2id")})
    torch.manual_seed(seed)
    model = transformers.MegatronBertForPreTraining(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state_dict = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("cls.predictions.decoder")}
    return SimpleNamespace(model=model, config=config, state_dict=state_dict)


@pytest.fixture(scope="session")
def megatron_bert():
    """``random_megatron_bert`` with eps 1e-5 and shapes that allow TP 8, PP 2 x virtual 2."""
    from mbexport.config import MegatronBertConfig

    return random_megatron_bert(MegatronBertConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=4,
                                                   num_attention_heads=8, intermediate_size=128,
                                                   max_position_embeddings=64))


@pytest.fixture
def cli(capsys):
    """Run ``mbexport ARGS...`` in-process: returns (exit code, stdout, stderr)."""
    from mbexport.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exit:
            code = exit.code or 0
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
