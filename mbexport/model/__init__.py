"""The PyTorch reference model: build it for a task and fill it from a Hugging Face-named state dict."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from mbexport.checkpoint.lazy import described, read_into
from mbexport.config import MegatronBertConfig
from mbexport.errors import CheckpointError, MbexportError
from mbexport.model.modeling import MASK_VALUE, MegatronBert
from mbexport.tasks import Task, get_task

__all__ = ["MASK_VALUE", "MegatronBert", "build_reference", "parameter"]

BLOCK = "bert.encoder.layer.{}."


def build_reference(task: str | Task, config: MegatronBertConfig, state_dict: Mapping[str, torch.Tensor], *,
                    init_missing_head: int | None = None, source: str | Path | None = None, streamed: bool = False
                    ) -> tuple[MegatronBert, list[str]]:
    """An fp32 eval-mode reference for ``task`` and the names of head weights that had to be seeded.

    Weights for other heads are ignored. A missing head is an error unless ``init_missing_head`` gives a
    seed; then those weights are drawn as Hugging Face initialises them (normal(0, 0.02), zero bias).

    ``streamed``: every encoder block but the first holds no weights; it reads them from ``state_dict``
    (converted to fp32) just before it runs and drops them after, so the model holds the embeddings, the head
    and one block beside ``state_dict`` (memory-mapped checkpoint files, a ``LazyTensors``), which it keeps.
    ``parameter`` reads any weight of either kind of model.
    """
    task = get_task(task) if isinstance(task, str) else task
    with torch.device("meta"):  # no random init to overwrite: the checkpoint's tensors are assigned below
        model = MegatronBert(config, task).eval()
    wanted = model.state_dict()
    streaming = _Stream(state_dict) if streamed else None
    tensors = described(state_dict)
    missing = [name for name in wanted if name not in state_dict]
    broken = [name for name in missing if not name.startswith(task.head_prefixes)]  # a missing head is no damage
    if broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise CheckpointError(f"missing tensor {broken[0]}{more}", source)
    for name, target in wanted.items():
        if name in tensors and tuple(tensors[name].shape) != tuple(target.shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"expected {tuple(target.shape)}", source)
    if missing and init_missing_head is None:
        raise MbexportError(f"the checkpoint has no '{task.name}' head (no {missing[0]}); export or "
                            "build it with --init-missing-head SEED to start it from seeded random weights", source)
    # fp32 tensors are shared with the checkpoint, not copied: a 345M model is held once.
    weights = {name: state_dict[name].float() for name in wanted
               if name in state_dict and not (streaming and streaming.owns(name))}
    generator = torch.Generator().manual_seed(init_missing_head or 0)
    for name in sorted(missing):
        shape = wanted[name].shape
        weights[name] = torch.zeros(shape) if name.endswith("bias") else torch.empty(shape).normal_(
            0.0, 0.02, generator=generator)
    model.load_state_dict(weights, assign=True, strict=not streaming)
    if streaming:
        streaming.attach(model)
    return model, sorted(missing)


def parameter(model: MegatronBert, name: str) -> torch.Tensor:
    """The fp32 weight ``name`` of ``model``: its own, or a streamed block's, read from the checkpoint now."""
    streaming = getattr(model, "streaming", None)
    return streaming.weight(name) if streaming is not None and streaming.owns(name) else model.get_parameter(name)


class _Stream:
    """The weights of encoder blocks 1 and up, copied into a block by a hook before it runs and dropped after.

    Every streamed block runs on one set of fp32 buffers, refilled for each: the blocks' weights are never
    allocated and freed block after block, which the C allocator would leave as scattered free memory.
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        self.state_dict = state_dict
        self.buffers: dict[str, torch.Tensor] = {}

    @staticmethod
    def owns(name: str) -> bool:
        return name.startswith("bert.encoder.layer.") and not name.startswith(BLOCK.format(0))

    def weight(self, name: str) -> torch.Tensor:
        return self.state_dict[name].float()

    def attach(self, model: MegatronBert) -> None:
        model.streaming = self
        for index, block in enumerate(model.bert.encoder.layer):
            if index:
                block.register_forward_pre_hook(self._loader(BLOCK.format(index)))
                block.register_forward_hook(_drop)

    def _loader(self, prefix: str):
        def load(block: nn.Module, args) -> None:
            if not self.buffers:
                self.buffers = {name: torch.empty(meta.shape) for name, meta in block.state_dict().items()}
            for name, buffer in self.buffers.items():
                read_into(self.state_dict, prefix + name, buffer)  # converted to fp32 as it is written
            block.load_state_dict(self.buffers, assign=True)
        return load


def _drop(block: nn.Module, args, output) -> None:
    block.to("meta")  # the block's parameters let go of the buffers
