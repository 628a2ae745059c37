"""The PyTorch reference model: build it for a task and fill it from a Hugging Face-named state dict."""

from __future__ import annotations

from pathlib import Path

import torch

from mbexport.config import MegatronBertConfig
from mbexport.errors import CheckpointError, MbexportError
from mbexport.model.modeling import MASK_VALUE, MegatronBert
from mbexport.tasks import Task, get_task

__all__ = ["MASK_VALUE", "MegatronBert", "build_reference"]


def build_reference(task: str | Task, config: MegatronBertConfig, state_dict: dict[str, torch.Tensor], *,
                    init_missing_head: int | None = None, source: str | Path | None = None
                    ) -> tuple[MegatronBert, list[str]]:
    """An fp32 eval-mode reference for ``task`` and the names of head weights that had to be seeded.

    Weights for other heads are ignored. A missing head is an error unless ``init_missing_head`` gives a
    seed; then those weights are drawn as Hugging Face initialises them (normal(0, 0.02), zero bias).
    """
    task = get_task(task) if isinstance(task, str) else task
    with torch.device("meta"):  # no random init to overwrite: the checkpoint's tensors are assigned below
        model = MegatronBert(config, task).eval()
    wanted = model.state_dict()
    missing = [name for name in wanted if name not in state_dict]
    broken = [name for name in missing if not name.startswith(task.head_prefixes)]  # a missing head is no damage
    if broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise CheckpointError(f"missing tensor {broken[0]}{more}", source)
    for name, target in wanted.items():
        if name in state_dict and tuple(state_dict[name].shape) != tuple(target.shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(state_dict[name].shape)}, "
                                  f"expected {tuple(target.shape)}", source)
    if missing and init_missing_head is None:
        raise MbexportError(f"the checkpoint has no '{task.name}' head (no {missing[0]}); export or "
                            "build it with --init-missing-head SEED to start it from seeded random weights", source)
    # fp32 tensors are shared with the checkpoint, not copied: a 345M model is held once.
    weights = {name: state_dict[name].float() for name in wanted if name in state_dict}
    generator = torch.Generator().manual_seed(init_missing_head or 0)
    for name in sorted(missing):
        shape = wanted[name].shape
        weights[name] = torch.zeros(shape) if name.endswith("bias") else torch.empty(shape).normal_(
            0.0, 0.02, generator=generator)
    model.load_state_dict(weights, assign=True)
    return model, sorted(missing)
