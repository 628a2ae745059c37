"""Text in, answers out: the one file that both ``mbexport run`` and Triton's Python models execute.

``mbexport triton`` copies this file as ``1/model.py`` of each head's tokenizer and postprocess models, beside
``vocab.txt`` and ``serving.json``, so it imports only numpy (1.x or 2.x) and ``tokenizers``: no torch, no
mbexport. ``mbexport run`` imports it as ``mbexport.deploy.serving``, so a local answer is the server's answer.

``TEXT_HEADS`` is the one table of what each head reads as text and how its outputs become an answer, keyed
by canonical task name; the task registry names each head's entry (``Task.serving``), this file imports none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

VOCAB = "vocab.txt"
SETTINGS = "serving.json"
# BERT's WordPiece special tokens: the one definition (mbexport.text and mbexport.inputs read them from here).
CLS, SEP, PAD, UNK, MASK = "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"
SPECIAL_TOKENS = (CLS, SEP, PAD)  # never part of an answer


class RequestError(ValueError):
    """A request this head cannot answer (a missing text, no [MASK] to fill); Triton returns it as an error."""


# ---- tokenization ------------------------------------------------------------------------------------------------
def wordpiece(vocab: str | Path, lowercase: bool = True):
    """A fast ``tokenizers`` WordPiece tokenizer with BERT's [CLS] a [SEP] b [SEP] template."""
    from tokenizers import BertWordPieceTokenizer

    return BertWordPieceTokenizer(str(vocab), lowercase=lowercase)


def encode(tokenizer, texts: list[str], pairs: list[str] | None = None, *, max_length: int = 128,
           pad_to_max: bool = True, lengths: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Encode a batch: truncate to ``max_length`` (a pair's second text first), pad with [PAD] to ``max_length``
    (or, given ``lengths``, the shortest of them that holds the longest row), else to the longest row.
    A row whose pair is empty is encoded alone, exactly as it would be in a batch of one."""
    pairs = list(pairs) if pairs else [""] * len(texts)
    tokenizer.no_padding()
    rows: list = [None] * len(texts)
    for paired in (False, True):
        chosen = [i for i, pair in enumerate(pairs) if bool(pair) == paired]
        if chosen:
            tokenizer.enable_truncation(max_length, strategy="only_second" if paired else "longest_first")
            batch = tokenizer.encode_batch([(texts[i], pairs[i]) if paired else texts[i] for i in chosen])
            for i, encoding in zip(chosen, batch):
                rows[i] = encoding
    longest = max(len(e.ids) for e in rows)
    length = min((n for n in (*lengths, max_length) if n >= longest), default=longest) if pad_to_max else longest
    pad = tokenizer.token_to_id(PAD)

    def padded(values: list[list[int]], fill: int) -> np.ndarray:
        return np.array([v + [fill] * (length - len(v)) for v in values], dtype=np.int64)

    return {"input_ids": padded([e.ids for e in rows], pad),
            "attention_mask": padded([e.attention_mask for e in rows], 0),
            "token_type_ids": padded([e.type_ids for e in rows], 0)}


# ---- from logits to answers: one plain dict per row --------------------------------------------------------------
def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, allowed: np.ndarray, max_tokens: int = 30
              ) -> list[tuple[int, int, float]]:
    """Per row, the (start, end, probability) maximizing start + end logits with start <= end < start + max_tokens.

    ``allowed`` marks the positions an answer may cover (the context's word pieces). The probability is
    P(start) * P(end), each a softmax over the allowed positions. A row with no allowed position gives
    (-1, -1, 0.0).
    """
    spans = []
    for start, end, ok in zip(start_logits.astype(np.float64), end_logits.astype(np.float64), allowed.astype(bool)):
        if not ok.any():
            spans.append((-1, -1, 0.0))
            continue
        start, end = np.where(ok, start, -np.inf), np.where(ok, end, -np.inf)
        n = len(start)
        offset = np.arange(n)[None, :] - np.arange(n)[:, None]  # j - i
        pair = np.where((offset >= 0) & (offset < max_tokens), start[:, None] + end[None, :], -np.inf)
        i, j = np.unravel_index(int(np.argmax(pair)), pair.shape)
        p_start, p_end = (np.exp(x[k] - _logsumexp(x[ok])) for x, k in ((start, i), (end, j)))
        spans.append((int(i), int(j), float(p_start * p_end)))
    return spans


def _logsumexp(x: np.ndarray) -> float:
    top = x.max()
    return float(top + np.log(np.exp(x - top).sum()))


def classify(logits: np.ndarray, labels: Sequence[str]) -> list[dict]:
    """Label, its probability, and every label's probability, per row of [batch, classes] logits."""
    probs = softmax(logits.astype(np.float64))
    return [{"label": labels[int(row.argmax())], "score": float(row.max()),
             "probabilities": {label: float(p) for label, p in zip(labels, row)}} for row in probs]


def top_tokens(logits: np.ndarray, positions: np.ndarray, k: int, vocab_size: int) -> list[list[tuple[int, float]]]:
    """(token id, probability) of the ``k`` likeliest tokens at each position of one row's [sequence, vocab] logits.

    Only the first ``vocab_size`` ids count: Megatron pads the embedding past the real vocab.
    """
    probs = softmax(logits[positions, :vocab_size].astype(np.float64))
    best = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(int(t), float(p[t])) for t in row] for p, row in zip(probs, best)]


def tag(logits: np.ndarray, keep: np.ndarray, labels: Sequence[str]) -> list[list[tuple[int, str, float]]]:
    """(position, label, probability) for each kept position, per row of [batch, sequence, labels] logits."""
    probs = softmax(logits.astype(np.float64))
    return [[(int(i), labels[int(row[i].argmax())], float(row[i].max())) for i in np.flatnonzero(ok)]
            for row, ok in zip(probs, keep.astype(bool))]


# ---- the heads that take text ------------------------------------------------------------------------------------
def _span_answers(pipeline: "TextPipeline", feed, outputs) -> list[dict]:
    allowed = (feed["token_type_ids"] == 1) & (feed["attention_mask"] == 1) & ~pipeline.special(feed["input_ids"])
    spans = best_span(outputs["start_logits"], outputs["end_logits"], allowed)
    return [{"answer": pipeline.text(ids[i:j + 1]) if i >= 0 else "", "score": score, "start_token": i, "end_token": j}
            for ids, (i, j, score) in zip(feed["input_ids"], spans)]


def _class_answers(pipeline: "TextPipeline", feed, outputs) -> list[dict]:
    return classify(outputs["logits"], pipeline.labels_for(outputs["logits"].shape[-1]))


def _mask_answers(pipeline: "TextPipeline", feed, outputs) -> list[dict]:
    tokenizer, answers = pipeline.tokenizer, []
    for ids, logits in zip(feed["input_ids"], outputs["logits"]):
        positions = np.flatnonzero(ids == tokenizer.token_to_id(MASK))
        candidates = top_tokens(logits, positions, pipeline.top_k, tokenizer.get_vocab_size())
        filled = ids.copy()
        filled[positions] = [best[0][0] for best in candidates]
        answers.append({"text": pipeline.text(filled),
                        "masks": [{"position": int(p),
                                   "candidates": [{"token": tokenizer.id_to_token(t), "score": s} for t, s in best]}
                                  for p, best in zip(positions, candidates)]})
    return answers


def _token_answers(pipeline: "TextPipeline", feed, outputs) -> list[dict]:
    keep = (feed["attention_mask"] == 1) & ~pipeline.special(feed["input_ids"])
    tags = tag(outputs["logits"], keep, pipeline.labels_for(outputs["logits"].shape[-1]))
    return [{"tokens": [{"token": pipeline.tokenizer.id_to_token(int(ids[i])), "label": label, "score": score}
                        for i, label, score in row]}
            for ids, row in zip(feed["input_ids"], tags)]


@dataclass(frozen=True)
class TextHead:
    """What a head reads as text, which encoder inputs its answer needs besides the logits, and the answer."""

    fields: tuple[str, ...]  # raw text inputs in encoding order; a second one is the pair
    answer: Callable[["TextPipeline", Mapping[str, np.ndarray], Mapping[str, np.ndarray]], list[dict]]
    needs: tuple[str, ...] = ()
    pair_optional: bool = False  # an empty pair encodes the first text alone
    labels: tuple[str, ...] = ()  # fixed class names (else the checkpoint's id2label)
    marker: str | None = None  # a token every text must contain


TEXT_HEADS = {
    "question-answering": TextHead(("question", "context"), _span_answers,
                                   needs=("input_ids", "token_type_ids", "attention_mask")),
    "sequence-classification": TextHead(("text", "text_pair"), _class_answers, pair_optional=True),
    # index 0 = B continues A, as in BERT's pretraining
    "next-sentence": TextHead(("text", "text_pair"), _class_answers, labels=("is_next", "not_next")),
    "masked-lm": TextHead(("text",), _mask_answers, needs=("input_ids",), marker=MASK),
    "token-classification": TextHead(("text",), _token_answers, needs=("input_ids", "attention_mask")),
}


class TextPipeline:
    """Encode texts for one head and turn its outputs into one JSON-ready answer per row."""

    def __init__(self, task: str, tokenizer, *, labels: Sequence[str] = (), max_length: int = 128,
                 pad_lengths: Sequence[int] = (), top_k: int = 5):
        self.task, self.head, self.tokenizer = task, TEXT_HEADS[task], tokenizer
        self.labels = list(labels)
        self.max_length, self.top_k = int(max_length), int(top_k)
        self.pad_lengths = sorted(int(n) for n in pad_lengths)  # a padded batch's possible lengths (else max_length)
        self.special_ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]

    @property
    def settings(self) -> dict:
        """What :meth:`load` reads back from ``serving.json``."""
        return {"task": self.task, "labels": self.labels, "max_length": self.max_length,
                "pad_lengths": self.pad_lengths, "top_k": self.top_k}

    @classmethod
    def load(cls, folder: str | Path) -> "TextPipeline":
        """The pipeline a folder holds: ``vocab.txt`` and ``serving.json`` (a Triton model's version folder)."""
        folder = Path(folder)
        settings = json.loads((folder / SETTINGS).read_text(encoding="utf-8"))
        return cls(settings["task"], wordpiece(folder / VOCAB), labels=settings["labels"],
                   max_length=settings["max_length"], pad_lengths=settings["pad_lengths"], top_k=settings["top_k"])

    def encode(self, texts: Mapping[str, Sequence[str]], *, pad_to_max: bool = True) -> dict[str, np.ndarray]:
        """Encoder inputs for a batch; ``texts`` maps each field to one string per row (an empty pair = none).
        ``pad_to_max`` pads to the shortest of ``pad_lengths`` that holds every row (Triton's batcher stacks
        requests of one length; a few lengths keep short texts from paying for the longest)."""
        fields = self.head.fields
        required = fields[:1] if self.head.pair_optional else fields
        missing = [f for f in required if not texts.get(f) or not all(texts[f])]
        if missing:
            raise RequestError(f"{self.task} needs text for '{missing[0]}' (give: {', '.join(required)})")
        first = list(texts[fields[0]])
        pairs = list(texts.get(fields[1], ())) if len(fields) > 1 else None
        try:
            feed = encode(self.tokenizer, first, pairs, max_length=self.max_length, pad_to_max=pad_to_max,
                          lengths=self.pad_lengths)
        except Exception as error:  # tokenizers raises plain Exceptions, e.g. a question longer than max_length
            raise RequestError(f"{self.task}: cannot encode the text in {self.max_length} tokens ({error})") from None
        marker = self.head.marker
        if marker and not (feed["input_ids"] == self.tokenizer.token_to_id(marker)).any(axis=1).all():
            raise RequestError(f"{self.task} fills {marker} tokens: put at least one {marker} in '{fields[0]}'")
        return feed

    def answers(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> list[dict]:
        """One answer per row, from the encoder inputs and the model's outputs (registry names)."""
        return self.head.answer(self, feed, outputs)

    def labels_for(self, count: int) -> list[str]:
        """Class names: the head's fixed ones, else the checkpoint's id2label, else LABEL_i."""
        for labels in (self.head.labels, self.labels):
            if len(labels) == count:
                return list(labels)
        return [f"LABEL_{i}" for i in range(count)]

    def special(self, ids: np.ndarray) -> np.ndarray:
        return np.isin(ids, self.special_ids)

    def text(self, ids: np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


# ---- Triton's Python backend -------------------------------------------------------------------------------------
class TritonPythonModel:
    """A tokenizer or postprocess model, as the config's ``role`` parameter says; bad requests get an error."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend

        self.pb_utils = pb_utils
        config = json.loads(args["model_config"])
        self.role = config["parameters"]["role"]["string_value"]
        self.pipeline = TextPipeline.load(Path(args["model_repository"]) / args["model_version"])
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = {tensor["name"]: pb_utils.triton_string_to_numpy(tensor["data_type"])
                        for tensor in config["output"]}

    def execute(self, requests):
        pb_utils, responses = self.pb_utils, []
        for request in requests:
            arrays = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            try:
                results = self._tokenize(arrays) if self.role == "tokenizer" else self._postprocess(arrays)
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(results[name], dtype=dtype))
                           for name, dtype in self.outputs.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as error:  # a bad request must not take the model down: answer it with the error
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error))))
        return responses

    def _tokenize(self, arrays):
        return self.pipeline.encode({name: [_text(v) for v in array.reshape(-1)] for name, array in arrays.items()})

    def _postprocess(self, arrays):
        [name] = self.outputs
        answers = self.pipeline.answers(arrays, arrays)
        return {name: np.array([[json.dumps(answer).encode("utf-8")] for answer in answers], dtype=np.object_)}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
