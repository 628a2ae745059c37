"""The task registry: one declarative description per head, read by every stage.

A ``Task`` says everything about a head: its IO names, dims and dtypes (export, the engine's profiles,
Triton's ``config.pbtxt``), its task-level agreement checks (validate), the modules it adds to the encoder
(``HeadModule``: the model builds them under their Hugging Face names, the checkpoint reader checks their
weights' shapes and which heads a checkpoint holds, bench counts their FLOPs), how the model turns those
modules' results into its outputs, and its text-in, answer-out entry in ``deploy/serving.py``. Functions of
later stages are named (``mbexport.lazy.Ref``), not imported. Nothing else in mbexport spells out a head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from mbexport.config import MegatronBertConfig
from mbexport.errors import MbexportError
from mbexport.lazy import Ref

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
class HeadModule:
    """A module a head adds to the encoder, under its Hugging Face name.

    Heads that declare equal modules read the same weights with the same meaning (masked-LM, causal-LM and
    pretraining share ``cls.predictions``). One name declared differently is one tensor with different
    meanings: ``classifier`` scores rows for sequence classification, tokens for token classification, and
    (row, choice) pairs with one output for multiple choice; ``modules_in`` tells them apart.
    """

    group: str  # its weights' group in checkpoint.names.expected_shapes (and the test checkpoints' heads=)
    name: str  # Hugging Face module path: qa_outputs, cls.predictions
    kind: str  # linear: hidden -> width; lm: BERT's LM prediction head (dense, GELU, LayerNorm, tied decoder)
    reads: str  # tokens: every position's hidden state; rows: one vector per row (the pooled [CLS])
    width: str  # output features: a number, "labels", "hidden" or "vocab" (config sizes)

    def __post_init__(self):
        if self.kind not in ("linear", "lm") or self.reads not in ("tokens", "rows"):
            raise ValueError(f"head module {self.name}: kind {self.kind!r} / reads {self.reads!r}")

    def size(self, config: MegatronBertConfig) -> int:
        return _static_dim(self.width, config)

    def shapes(self, config: MegatronBertConfig, rows: int | None = None) -> dict[str, tuple[int, ...]]:
        """Every tensor of the module by Hugging Face name; ``rows`` overrides a linear module's output size."""
        h, n = config.hidden_size, self.name
        if self.kind == "lm":
            return {f"{n}.bias": (config.vocab_size,), f"{n}.transform.dense.weight": (h, h),
                    f"{n}.transform.dense.bias": (h,), f"{n}.transform.LayerNorm.weight": (h,),
                    f"{n}.transform.LayerNorm.bias": (h,)}
        out = self.size(config) if rows is None else rows
        return {f"{n}.weight": (out, h), f"{n}.bias": (out,)}

    def multiply_adds(self, config: MegatronBertConfig) -> int:
        """Matmul multiply-adds per vector it reads (the LM decoder runs over the padded vocab)."""
        h = config.hidden_size
        return h * h + h * config.vocab_size if self.kind == "lm" else h * self.size(config)


# The trunk's pooler (dense + tanh over the [CLS] row), kept by heads that read rows (Task.pooler).
POOLER = HeadModule("pooler", "bert.pooler.dense", "linear", "rows", "hidden")
LM_HEAD = HeadModule("lm", "cls.predictions", "lm", "tokens", "vocab")
NSP_HEAD = HeadModule("nsp", "cls.seq_relationship", "linear", "rows", "2")
SPAN_HEAD = HeadModule("qa", "qa_outputs", "linear", "tokens", "2")
ROW_CLASSIFIER = HeadModule("classifier", "classifier", "linear", "rows", "labels")
CHOICE_SCORER = HeadModule("classifier", "classifier", "linear", "rows", "1")
TOKEN_CLASSIFIER = HeadModule("classifier", "classifier", "linear", "tokens", "labels")


@dataclass(frozen=True)
class Task:
    name: str
    aliases: tuple[str, ...]
    hf_class: str  # the transformers class with the same parameter names: our oracle and config.json's architecture
    modules: tuple[HeadModule, ...]  # what the head adds to the encoder
    pooler: bool  # whether the trunk keeps its pooler (as Hugging Face's add_pooling_layer)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    agreement: tuple[Agreement, ...]
    causal: bool = False
    # (module results, hidden states, pooled rows, rows' shape) -> outputs, in mbexport.model.modeling; None:
    # the outputs are the modules' results as they are
    forward: Ref | None = None
    serving: str | None = None  # its deploy/serving.py TEXT_HEADS entry (text in, answer out), if it has one

    @property
    def weight_modules(self) -> tuple[HeadModule, ...]:
        """Every module whose weights this head needs beyond the encoder: its own and, if used, the pooler."""
        return self.modules + ((POOLER,) if self.pooler else ())

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        """Every state-dict prefix this head needs beyond the encoder: its own weights and, if used, the pooler."""
        return tuple(f"{m.name}." for m in self.weight_modules)

    def weight_shapes(self, config: MegatronBertConfig) -> dict[str, tuple[int, ...]]:
        return {name: shape for m in self.weight_modules for name, shape in m.shapes(config).items()}

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
LM_LOGITS = TensorSpec("logits", ("batch", "sequence", "vocab"))
LM_AGREEMENT = (Agreement("logits", "argmax"), Agreement("logits", "topk", 5))
MODELING = "mbexport.model.modeling"

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("model", ("base", "feature-extraction"), "MegatronBertModel", (), True, TOKENS, (HIDDEN, POOLED),
             (Agreement("last_hidden_state", "cosine"), Agreement("pooler_output", "cosine")),
             forward=Ref(f"{MODELING}:encoder_outputs")),
        Task("masked-lm", ("mlm", "fill-mask"), "MegatronBertForMaskedLM", (LM_HEAD,), False, TOKENS, (LM_LOGITS,),
             LM_AGREEMENT, serving="masked-lm"),
        Task("causal-lm", ("clm", "text-generation"), "MegatronBertForCausalLM", (LM_HEAD,), False, TOKENS,
             (LM_LOGITS,), LM_AGREEMENT, causal=True),
        Task("next-sentence", ("nsp",), "MegatronBertForNextSentencePrediction", (NSP_HEAD,), True, TOKENS,
             (TensorSpec("logits", ("batch", "2")),), (Agreement("logits", "argmax"),), serving="next-sentence"),
        Task("pretraining", ("pretrain",), "MegatronBertForPreTraining", (LM_HEAD, NSP_HEAD), True, TOKENS,
             (TensorSpec("prediction_logits", ("batch", "sequence", "vocab")),
              TensorSpec("seq_relationship_logits", ("batch", "2"))),
             (Agreement("prediction_logits", "argmax"), Agreement("prediction_logits", "topk", 5),
              Agreement("seq_relationship_logits", "argmax"))),
        Task("sequence-classification", ("seq-cls", "text-classification", "classification"),
             "MegatronBertForSequenceClassification", (ROW_CLASSIFIER,), True, TOKENS,
             (TensorSpec("logits", ("batch", "labels")),), (Agreement("logits", "argmax"),),
             serving="sequence-classification"),
        Task("multiple-choice", ("mc",), "MegatronBertForMultipleChoice", (CHOICE_SCORER,), True, CHOICES,
             (TensorSpec("logits", ("batch", "num_choices")),), (Agreement("logits", "argmax"),),
             forward=Ref(f"{MODELING}:per_choice")),
        Task("token-classification", ("ner", "token-cls"), "MegatronBertForTokenClassification",
             (TOKEN_CLASSIFIER,), False, TOKENS,
             (TensorSpec("logits", ("batch", "sequence", "labels")),), (Agreement("logits", "argmax"),),
             serving="token-classification"),
        Task("question-answering", ("qa",), "MegatronBertForQuestionAnswering", (SPAN_HEAD,), False, TOKENS,
             (TensorSpec("start_logits", ("batch", "sequence")), TensorSpec("end_logits", ("batch", "sequence"))),
             (Agreement("start_logits", "argmax"), Agreement("end_logits", "argmax")),
             forward=Ref(f"{MODELING}:span_ends"), serving="question-answering"),
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


def module_groups() -> dict[str, tuple[HeadModule, ...]]:
    """Every head module by weight group, the pooler first, then in registry order; a group that heads declare
    differently (the classifier) lists each declaration."""
    groups: dict[str, list[HeadModule]] = {}
    for module in (POOLER, *(m for task in TASKS.values() for m in task.modules)):
        declared = groups.setdefault(module.group, [])
        if module not in declared:
            declared.append(module)
    return {group: tuple(modules) for group, modules in groups.items()}


def modules_in(weights: Mapping[str, tuple[int, ...]], config: MegatronBertConfig,
               architectures: Sequence[str] | None = None) -> set[HeadModule]:
    """The head modules (the pooler too) a checkpoint holds: weights (name -> shape) with their shapes and meaning.

    Meaning matters where heads declare one module name differently (``classifier``): a checkpoint that names
    its architecture (config.json's ``architectures``) holds that head's classifier; one that does not is read
    from its tensors: the classifier reads rows (the pooled [CLS]) when the pooler is there, tokens when it is
    not.
    """
    named = [t for t in TASKS.values() if t.hf_class in (architectures or ())]
    pooled = all(weights.get(name) == shape for name, shape in POOLER.shapes(config).items())

    def meant(module: HeadModule, declared: tuple[HeadModule, ...]) -> bool:
        if len(declared) == 1:
            return True
        if named:
            return any(module in task.modules for task in named)
        return (module.reads == "rows") == pooled

    return {module for declared in module_groups().values() for module in declared
            if all(weights.get(name) == shape for name, shape in module.shapes(config).items())
            and meant(module, declared)}


def heads_in(weights: Mapping[str, tuple[int, ...]], config: MegatronBertConfig,
             architectures: Sequence[str] | None = None) -> tuple[Task, ...]:
    """The heads a checkpoint holds (``modules_in`` every module they need); the bare encoder always (a missing
    pooler is seeded for it)."""
    held = modules_in(weights, config, architectures)
    return tuple(task for task in TASKS.values() if not task.modules or held.issuperset(task.weight_modules))


def richest(heads: Sequence[Task], config: MegatronBertConfig) -> Task:
    """The head that uses most of a checkpoint's weights: config.json's architecture when the checkpoint names
    none (pretraining over masked-LM over the bare encoder)."""
    return max(heads, key=lambda task: (bool(task.modules), len(task.weight_shapes(config))))
