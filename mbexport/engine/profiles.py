"""TensorRT optimization profiles, derived from the task registry.

A recipe only says which range each dynamic dim (``batch``, ``sequence``, ``num_choices``) covers; which
inputs carry those dims, and in which order, comes from ``mbexport.tasks``. Every profile of one engine
shares the same max batch: Triton sizes its batcher from a single ``max_batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mbexport.errors import MbexportError
from mbexport.tasks import DYNAMIC_DIMS, Task

Range = tuple[int, int, int]  # min, opt, max


@dataclass(frozen=True)
class Profile:
    """(min, opt, max) for each dynamic dim; ``num_choices`` only matters for multiple-choice."""

    batch: Range = (1, 8, 32)
    sequence: Range = (16, 128, 384)
    num_choices: Range = (2, 4, 4)

    def shapes(self, task: Task) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Input name -> (min shape, opt shape, max shape), in registry order."""
        return {spec.name: tuple(tuple(getattr(self, dim)[i] for dim in spec.dims) for i in range(3))
                for spec in task.inputs}

    def as_dict(self, task: Task) -> dict[str, list[int]]:
        """The dims this task uses, for recipes and the manifest."""
        used = {dim for spec in task.inputs for dim in spec.dims}
        return {dim: list(getattr(self, dim)) for dim in DYNAMIC_DIMS if dim in used}


def make_profile(values: dict, *, source=None) -> Profile:
    """A Profile from a mapping such as a recipe's ``[[profiles]]`` table; checks every range."""
    unknown = sorted(set(values) - set(DYNAMIC_DIMS))
    if unknown:
        raise MbexportError(f"unknown profile dim '{unknown[0]}' (known: {', '.join(DYNAMIC_DIMS)})", source)
    ranges = {}
    for dim, value in values.items():
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise MbexportError(f"profile {dim} must be [min, opt, max] integers, got {value!r}", source)
        if not 1 <= value[0] <= value[1] <= value[2]:
            raise MbexportError(f"profile {dim} needs 1 <= min <= opt <= max, got {list(value)}", source)
        ranges[dim] = tuple(value)
    return Profile(**ranges)


def check_profiles(profiles: list[Profile] | tuple[Profile, ...], task: Task, *, max_positions: int | None = None,
                   source=None) -> None:
    """Reject profile sets TensorRT or Triton cannot use, before anything expensive runs."""
    if not profiles:
        raise MbexportError("at least one optimization profile is needed", source)
    batches = sorted({p.batch[2] for p in profiles})
    if len(batches) > 1:
        raise MbexportError(f"all profiles must share one max batch (Triton serves one max_batch_size), "
                            f"got {', '.join(map(str, batches))}", source)
    if max_positions is not None:
        longest = max(p.sequence[2] for p in profiles)
        if longest > max_positions:
            raise MbexportError(f"profile max sequence {longest} exceeds the model's {max_positions} positions",
                                source)


def default_profiles(max_positions: int) -> tuple[Profile, ...]:
    """One profile up to batch 32 and the model's position limit (at most 384, SQuAD's usual length)."""
    top = min(384, max_positions)
    return (Profile(sequence=(min(16, top), min(128, top), top)),)
