"""Megatron-BERT in one file: the PyTorch reference every artifact is compared against.

Megatron's BERT differs from the original BERT in three places: LayerNorm comes *before* attention and the
MLP in every block (pre-LN), a final LayerNorm follows the last block, and the embeddings have no LayerNorm.
Module and parameter names are Hugging Face's (``bert.encoder.layer.0.attention.self.query.weight``), so a
``transformers`` MegatronBert folder loads with no renaming and ``transformers`` can serve as the oracle.

Two forms compute the same thing. The PyTorch form uses ``scaled_dot_product_attention`` and ``F.gelu`` (fast
in PyTorch). The export form, switched on with ``model.export_form = True``, spells out what the ONNX graph
should hold: attention as MatMul -> add mask -> Softmax -> MatMul with the 1/sqrt(d) scale on Q (the pattern
TensorRT fuses), and GELU in the operand order ONNX Runtime fuses (see ``gelu``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mbexport.config import MegatronBertConfig
from mbexport.tasks import HeadModule, Task, get_task

# Additive mask for padded keys. Finite on purpose: float32's minimum turns into -inf in fp16, and a row
# that is all padding then becomes NaN. exp(-10000) is exactly 0 in fp32, so nothing is lost.
MASK_VALUE = -10000.0


class Namespace(nn.Module):
    """A bare container, so parameter paths can follow Hugging Face's nesting without a class per level."""

    def __init__(self, /, **children: nn.Module):  # positional-only, so a child may be called "self"
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class Embeddings(nn.Module):
    def __init__(self, c: MegatronBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return (self.word_embeddings(input_ids) + self.position_embeddings(positions)
                + self.token_type_embeddings(token_type_ids))


class Layer(nn.Module):
    """One pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, c: MegatronBertConfig):
        super().__init__()
        h, eps = c.hidden_size, c.layer_norm_eps
        self.num_heads = c.num_attention_heads
        self.attention = Namespace(
            ln=nn.LayerNorm(h, eps=eps),
            self=Namespace(query=nn.Linear(h, h), key=nn.Linear(h, h), value=nn.Linear(h, h)),
            output=Namespace(dense=nn.Linear(h, h)),
        )
        self.ln = nn.LayerNorm(h, eps=eps)
        self.intermediate = Namespace(dense=nn.Linear(h, c.intermediate_size))
        self.output = Namespace(dense=nn.Linear(c.intermediate_size, h))

    def forward(self, x, mask, export_form: bool):
        qkv = self.attention.self
        y = self.attention.ln(x)
        q, k, v = (self._split_heads(proj(y)) for proj in (qkv.query, qkv.key, qkv.value))
        if export_form:
            scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2) + mask
            context = scores.softmax(dim=-1) @ v
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        context = context.transpose(1, 2).flatten(2)  # [b, heads, s, d] -> [b, s, h]
        x = x + self.attention.output.dense(context)
        return x + self.output.dense(gelu(self.intermediate.dense(self.ln(x)), export_form))

    def _split_heads(self, t):
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # [b, s, h] -> [b, heads, s, d]


class Trunk(nn.Module):
    """Embeddings, the blocks, the final LayerNorm and (for some heads) the pooler: Hugging Face's ``bert``."""

    def __init__(self, c: MegatronBertConfig, pooler: bool):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = Namespace(layer=nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers)),
                                 ln=nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps))
        self.pooler = Namespace(dense=nn.Linear(c.hidden_size, c.hidden_size)) if pooler else None

    def forward(self, input_ids, attention_mask, token_type_ids, causal: bool, export_form: bool):
        mask = additive_mask(attention_mask, causal).to(self.encoder.ln.weight.dtype)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask, export_form)
        x = self.encoder.ln(x)
        pooled = torch.tanh(self.pooler.dense(x[:, 0])) if self.pooler is not None else None
        return x, pooled


def additive_mask(attention_mask, causal: bool):
    """[b, s] of 1 (attend) / 0 (padding) -> [b, 1, 1 or s, s] of 0 / MASK_VALUE, over key positions."""
    keep = attention_mask[:, None, None, :].bool()
    if causal:
        s = attention_mask.shape[-1]
        keep = keep & torch.ones(s, s, dtype=torch.bool, device=keep.device).tril()
    return torch.where(keep, 0.0, MASK_VALUE)


def gelu(x, spelled_out: bool):
    """Exact (erf) GELU; spelled out, in the operand order ONNX Runtime fuses into one kernel, for export.

    torch's exporter writes ``x * (0.5 * (1 + erf(x / sqrt 2)))``, which ORT leaves as five kernels; written
    as ``(x * (1 + erf(x / sqrt 2))) * 0.5`` it becomes ORT's BiasGelu. Both are the same standard ops for
    TensorRT.
    """
    return x * (1.0 + torch.erf(x / math.sqrt(2.0))) * 0.5 if spelled_out else F.gelu(x)


class LMHead(nn.Module):
    """``cls.predictions``: dense -> GELU -> LayerNorm -> logits over the (padded) vocab, decoder tied."""

    def __init__(self, c: MegatronBertConfig):
        super().__init__()
        self.transform = Namespace(dense=nn.Linear(c.hidden_size, c.hidden_size),
                                   LayerNorm=nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps))
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, x, word_embeddings, export_form: bool):
        x = self.transform.LayerNorm(gelu(self.transform.dense(x), export_form))
        return F.linear(x, word_embeddings, self.bias)


class MegatronBert(nn.Module):
    """The trunk plus one task's head: the modules the registry declares for it, under their Hugging Face names.

    ``forward`` runs each module on what it reads (every token's hidden state, or the pooled row) and returns
    the task's outputs in registry order: the modules' results, or what the task's ``forward`` makes of them.
    """

    def __init__(self, config: MegatronBertConfig, task: str | Task):
        super().__init__()
        self.config, self.task = config, get_task(task) if isinstance(task, str) else task
        self.export_form = False
        self.bert = Trunk(config, pooler=self.task.pooler)
        for module in self.task.modules:
            layer = LMHead(config) if module.kind == "lm" else nn.Linear(config.hidden_size, module.size(config))
            _attach(self, module.name, layer)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> tuple[torch.Tensor, ...]:
        rows_shape = input_ids.shape[:-1]  # [batch], or [batch, choices]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if self.task.has_choices:  # [b, choices, s] -> [b * choices, s]
            input_ids, attention_mask, token_type_ids = (
                t.flatten(0, 1) for t in (input_ids, attention_mask, token_type_ids))
        x, pooled = self.bert(input_ids, attention_mask, token_type_ids, self.task.causal, self.export_form)
        results = tuple(self._run(module, x, pooled) for module in self.task.modules)
        return self.task.forward(results, x, pooled, rows_shape) if self.task.forward else results

    def _run(self, module: HeadModule, x, pooled):
        layer = self.get_submodule(module.name)
        source = x if module.reads == "tokens" else pooled
        if module.kind == "lm":
            return layer(source, self.bert.embeddings.word_embeddings.weight, self.export_form)
        return layer(source)


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at a dotted path (``cls.predictions``), making the levels above it as needed."""
    *parents, name = path.split(".")
    for part in parents:
        if getattr(root, part, None) is None:
            root.add_module(part, Namespace())
        root = getattr(root, part)
    root.add_module(name, module)


# Task.forward entries of the registry: a head's outputs where they are not its modules' results as they are.
def encoder_outputs(results, hidden, pooled, rows_shape):
    """The bare encoder: every token's hidden state and the pooled [CLS] row."""
    return hidden, pooled


def per_choice(results, hidden, pooled, rows_shape):
    """Multiple choice: one score per (row, choice), [batch * choices, 1] -> [batch, choices]."""
    return (results[0].view(rows_shape),)


def span_ends(results, hidden, pooled, rows_shape):
    """Question answering: the span head's two columns are the start and the end logits."""
    start, end = results[0].unbind(dim=-1)
    return start, end
