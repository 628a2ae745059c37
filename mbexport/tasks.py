"""The task registry: one declarative description per head, read by every stage.

Export takes input/output names and dynamic axes from here, validation takes its task-level agreement
checks, the engine stage its optimization-profile inputs, and the Triton stage its ``config.pbtxt`` dims
and dtypes. Nothing else in mbexport spells out a head's IO.
"""

from __future__ import annotations

from dataclasses import dataclass

from mbexport.config import MegatronBertConfig
from mbexport.errors import MbexportError

DYNAMIC_DIMS = ("batch", "num_choices", "sequence")


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor. ``dims`` are symbolic: dynamic ones (DYNAMIC_DIMS) or sizes taken from the config."""

    name: str
    dims: tuple[str, ...]
    dtype: str = "float32"  # numpy / ONNX names: int64, float32

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if d in DYNAMIC_DIMS}

    def shape(self, config: MegatronBertConfig, **sizes: int) -> tuple[int, ...]:
        """Concrete shape; dynamic dims come from ``sizes`` (missing ones become -1)."""
        return tuple(sizes.get(d, -1) if d in DYNAMIC_DIMS else _static_dim(d, config) for d in self.dims)


def _static_dim(dim: str, config: MegatronBertConfig) -> int:
    if dim.isdigit():
        return int(dim)
    return {"hidden": config.hidden_size, "vocab": config.vocab_size, "labels": config.num_labels}[dim]


@dataclass(frozen=True)
class Agreement:
    """A task-level check: do two runners pick the same answer?

    ``argmax``: same index on the last axis (classes, tokens, span start/end), ``topk``: the reference's
    top-1 is among the candidate's top ``k``; ``cosine``: cosine similarity of whole rows, for
    hidden states that have no answer to agree on. Per-token outputs are judged at non-padding positions.
    """

    output: str
    kind: str  # argmax | topk | cosine
    k: int = 1


@dataclass(frozen=True)
class Task:
    name: str
    aliases: tuple[str, ...]
    hf_class: str  # the transformers class with the same parameter names: our oracle and config.json's architecture
    head_weights: tuple[str, ...]  # state-dict prefixes the head needs beyond the encoder
    pooler: bool  # whether the trunk keeps its pooler (as Hugging Face's add_pooling_layer)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    agreement: tuple[Agreement, ...]
    causal: bool = False

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        """Every state-dict prefix this head needs beyond the encoder: its own weights and, if used, the pooler."""
        return self.head_weights + (("bert.pooler.",) if self.pooler else ())

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s dynamic_axes for every input and output."""
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs)}

    @property
    def has_choices(self) -> bool:
        return "num_choices" in self.inputs[0].dims


def _ids(*dims: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(n, dims, "int64") for n in ("input_ids", "attention_mask", "token_type_ids"))


TOKENS = _ids("batch", "sequence")
CHOICES = _ids("batch", "num_choices", "sequence")
HIDDEN = TensorSpec("last_hidden_state", ("batch", "sequence", "hidden"))
POOLED = TensorSpec("pooler_output", ("batch", "hidden"))
LM = ("cls.predictions.",)
LM_LOGITS = TensorSpec("logits", ("batch", "sequence", "vocab"))

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("model", ("base", "feature-extraction"), "MegatronBertModel", (), True, TOKENS,
             (HIDDEN, POOLED), (Agreement("last_hidden_state", "cosine"), Agreement("pooler_output", "cosine"))),
        Task("masked-lm", ("mlm", "fill-mask"), "MegatronBertForMaskedLM", LM, False, TOKENS,
             (LM_LOGITS,), (Agreement("logits", "argmax"), Agreement("logits", "topk", 5))),
        Task("causal-lm", ("clm", "text-generation"), "MegatronBertForCausalLM", LM, False, TOKENS,
             (LM_LOGITS,), (Agreement("logits", "argmax"), Agreement("logits", "topk", 5)), causal=True),
        Task("next-sentence", ("nsp",), "MegatronBertForNextSentencePrediction", ("cls.seq_relationship.",),
             True, TOKENS, (TensorSpec("logits", ("batch", "2")),), (Agreement("logits", "argmax"),)),
        Task("pretraining", ("pretrain",), "MegatronBertForPreTraining", (*LM, "cls.seq_relationship."), True,
             TOKENS,
             (TensorSpec("prediction_logits", ("batch", "sequence", "vocab")),
              TensorSpec("seq_relationship_logits", ("batch", "2"))),
             (Agreement("prediction_logits", "argmax"), Agreement("prediction_logits", "topk", 5),
              Agreement("seq_relationship_logits", "argmax"))),
        Task("sequence-classification", ("seq-cls", "text-classification", "classification"),
             "MegatronBertForSequenceClassification", ("classifier.",), True, TOKENS,
             (TensorSpec("logits", ("batch", "labels")),), (Agreement("logits", "argmax"),)),
        Task("multiple-choice", ("mc",), "MegatronBertForMultipleChoice", ("classifier.",), True, CHOICES,
             (TensorSpec("logits", ("batch", "num_choices")),), (Agreement("logits", "argmax"),)),
        Task("token-classification", ("ner", "token-cls"), "MegatronBertForTokenClassification",
             ("classifier.",), False, TOKENS,
             (TensorSpec("logits", ("batch", "sequence", "labels")),), (Agreement("logits", "argmax"),)),
        Task("question-answering", ("qa",), "MegatronBertForQuestionAnswering", ("qa_outputs.",), False, TOKENS,
             (TensorSpec("start_logits", ("batch", "sequence")), TensorSpec("end_logits", ("batch", "sequence"))),
             (Agreement("start_logits", "argmax"), Agreement("end_logits", "argmax"))),
    )
}

_BY_ALIAS = {alias: task for task in TASKS.values() for alias in (task.name, *task.aliases)}


def get_task(name: str) -> Task:
    """Resolve a canonical task name or alias (``qa``, ``mlm``, ...)."""
    try:
        return _BY_ALIAS[name.strip().lower().replace("_", "-")]
    except KeyError:
        known = ", ".join(f"{t.name} ({'/'.join(t.aliases)})" for t in TASKS.values())
        raise MbexportError(f"unknown task '{name}'; choose one of: {known}") from None
