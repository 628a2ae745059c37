"""Tensors computed when asked for: a merged checkpoint that never holds more than the tensor being read.

Merging tensor-parallel ranks (``torch.cat``) or de-interleaving a fused QKV makes a copy of each tensor;
made all at once, those copies are a second copy of the model beside the (memory-mapped) checkpoint. A
``LazyTensors`` keeps, per name, the function and the inputs that make it, and runs them on each access, so
a consumer that takes one tensor at a time (conversion, export, the streamed reference) holds one.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Iterator, Mapping

import torch


class LazyTensors(Mapping[str, torch.Tensor]):
    """name -> ``function(*inputs)``, computed on every access and never kept.

    Each function also takes ``out=``: a tensor of the result's shape to write it into (in ``out``'s dtype),
    so a reader that refills one buffer (the streamed reference) allocates nothing.
    """

    def __init__(self) -> None:
        self._recipes: dict[str, tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]] = {}

    def add(self, name: str, function: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
        self._recipes[name] = (function, inputs)

    def __getitem__(self, name: str) -> torch.Tensor:
        function, inputs = self._recipes[name]
        return function(*inputs)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        function, inputs = self._recipes[name]
        return function(*inputs, out=out)

    def __contains__(self, name) -> bool:  # Mapping's own would make the tensor to find out
        return name in self._recipes

    def __iter__(self) -> Iterator[str]:
        return iter(self._recipes)

    def __len__(self) -> int:
        return len(self._recipes)

    def pop(self, name: str, default=None):
        """The tensor ``name`` (computed), no longer listed; ``default`` when it is not there."""
        if name not in self._recipes:
            return default
        value = self[name]
        del self._recipes[name]
        return value

    def renamed(self, rename: Callable[[str], str]) -> "LazyTensors":
        out = LazyTensors()
        out._recipes = {rename(name): recipe for name, recipe in self._recipes.items()}
        return out

    def selected(self, names) -> "LazyTensors":
        """Only ``names``, in that order."""
        out = LazyTensors()
        out._recipes = {name: self._recipes[name] for name in names}
        return out

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor on the meta device (shape and dtype, no data), from its function run on meta inputs."""
        return {name: function(*(t.to("meta") for t in inputs)) for name, (function, inputs) in self._recipes.items()}

    def materialized(self) -> dict[str, torch.Tensor]:
        """All tensors computed, in a plain dict; each recipe (and its hold on its inputs) is dropped once used."""
        out = {}
        while self._recipes:
            name = next(iter(self._recipes))
            out[name] = self.pop(name)
        return out


def read_into(tensors: Mapping[str, torch.Tensor], name: str, out: torch.Tensor) -> torch.Tensor:
    """Tensor ``name`` written into ``out`` (converted to its dtype): for a ``LazyTensors`` (also inside a
    ``ChainMap``) made there directly, with no copy of its own."""
    if isinstance(tensors, ChainMap):
        return read_into(next(layer for layer in tensors.maps if name in layer), name, out)
    return tensors.read_into(name, out) if isinstance(tensors, LazyTensors) else out.copy_(tensors[name])


def described(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Tensors to read shapes and dtypes from without computing any: meta tensors for ``LazyTensors`` (also
    inside a ``ChainMap``), the tensors themselves otherwise."""
    if isinstance(tensors, ChainMap):
        return ChainMap(*(described(layer) for layer in tensors.maps))
    return tensors.meta() if isinstance(tensors, LazyTensors) else tensors
