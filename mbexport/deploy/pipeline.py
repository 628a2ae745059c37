"""Text in, answers out for one head: the tokenization and answer extraction that ``mbexport run`` and the
Triton ensemble's Python models share, so the answer a server returns is the one tested here.

Triton's Python backend imports this module, so mbexport must be installed in the serving container (the
registry's import of ``mbexport.model`` brings PyTorch along; nothing here runs it).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

import mbexport.model  # noqa: F401  # before mbexport.tasks: importing tasks first trips the tasks <-> model cycle
from mbexport.config import MegatronBertConfig
from mbexport.deploy import postprocess
from mbexport.errors import MbexportError
from mbexport.manifest import Manifest
from mbexport.tasks import Task, get_task
from mbexport.text import encode, load_tokenizer

SETTINGS = "pipeline.json"
VOCAB = "vocab.txt"


@dataclass(frozen=True)
class TextTask:
    """What a head reads as text and which encoder inputs its postprocessing needs besides the logits."""

    fields: tuple[str, ...]  # raw text inputs in encoding order; a second one is the pair
    needs: tuple[str, ...] = ()
    pair_optional: bool = False  # an empty or absent pair encodes the first text alone


TEXT_TASKS = {
    "question-answering": TextTask(("question", "context"), ("input_ids", "token_type_ids", "attention_mask")),
    "sequence-classification": TextTask(("text", "text_pair"), pair_optional=True),
    "next-sentence": TextTask(("text", "text_pair")),
    "masked-lm": TextTask(("text",), ("input_ids",)),
    "token-classification": TextTask(("text",), ("input_ids", "attention_mask")),
}


def text_task(task: Task) -> TextTask:
    try:
        return TEXT_TASKS[task.name]
    except KeyError:
        raise MbexportError(f"no text-in, answer-out pipeline for '{task.name}' (supported: "
                            f"{', '.join(TEXT_TASKS)})") from None


class TextPipeline:
    """Encode texts for ``task`` and turn its outputs into one JSON-ready answer per row."""

    def __init__(self, task: str | Task, vocab: str | Path, *, labels: Sequence[str] = (), max_length: int = 128,
                 top_k: int = 5):
        self.task = get_task(task) if isinstance(task, str) else task
        self.spec = text_task(self.task)
        self.vocab = Path(vocab)
        self.tokenizer = load_tokenizer(self.vocab)
        self.labels = list(labels)
        self.max_length, self.top_k = int(max_length), int(top_k)
        self.special_ids = {self.tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}

    @classmethod
    def for_artifacts(cls, manifest: Manifest, task: str | Task, *, vocab: str | Path | None = None,
                      max_length: int = 128, top_k: int = 5) -> "TextPipeline":
        """The pipeline for an output folder: its vocab (unless ``vocab`` is given) and its label names."""
        if vocab is None:
            recorded = manifest.find(kind="vocab")
            vocab = manifest.path_of(recorded[0]) if recorded else manifest.root / VOCAB
            if not Path(vocab).is_file():
                raise MbexportError("no vocab.txt in this output folder; pass --vocab FILE (the checkpoint's "
                                    "WordPiece vocab)", manifest.root)
        config = MegatronBertConfig.from_hf_dict(manifest.config)
        labels = [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
        return cls(task, vocab, labels=labels, max_length=max_length, top_k=top_k)

    def save(self, folder: str | Path) -> None:
        """Write the vocab and settings a Triton Python model reloads with :meth:`load`."""
        folder = Path(folder)
        shutil.copyfile(self.vocab, folder / VOCAB)
        (folder / SETTINGS).write_text(json.dumps({"task": self.task.name, "labels": self.labels,
                                                   "max_length": self.max_length, "top_k": self.top_k}, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "TextPipeline":
        folder = Path(folder)
        settings = json.loads((folder / SETTINGS).read_text())
        return cls(settings["task"], folder / VOCAB, labels=settings["labels"], max_length=settings["max_length"],
                   top_k=settings["top_k"])

    def encode(self, texts: Mapping[str, Sequence[str]], *, pad_to_max: bool = True) -> dict[str, np.ndarray]:
        """Encoder inputs for a batch; ``texts`` maps each field to one string per row (an empty pair = none)."""
        required = self.spec.fields[:1] if self.spec.pair_optional else self.spec.fields
        missing = [f for f in required if not texts.get(f) or not all(texts[f])]
        if missing:
            raise MbexportError(f"{self.task.name} needs text for '{missing[0]}' (give: {', '.join(required)})")
        first = list(texts[self.spec.fields[0]])
        pairs = list(texts.get(self.spec.fields[1], ())) if len(self.spec.fields) > 1 else []
        return encode(self.tokenizer, first, pairs if any(pairs) else None, max_length=self.max_length,
                      pad_to_max=pad_to_max)

    def answers(self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> list[dict]:
        """One answer per row, from the encoder inputs and the model's outputs (registry names)."""
        name = self.task.name
        if name == "question-answering":
            allowed = (feed["token_type_ids"] == 1) & (feed["attention_mask"] == 1) & ~self._special(feed["input_ids"])
            spans = postprocess.best_span(outputs["start_logits"], outputs["end_logits"], allowed)
            return [{"answer": self._text(ids[i:j + 1]) if i >= 0 else "", "score": score,
                     "start_token": i, "end_token": j} for ids, (i, j, score) in zip(feed["input_ids"], spans)]
        if name in ("sequence-classification", "next-sentence"):
            return postprocess.classify(outputs["logits"], self._labels(outputs["logits"].shape[-1]))
        if name == "masked-lm":
            return [self._fill(ids, logits) for ids, logits in zip(feed["input_ids"], outputs["logits"])]
        keep = (feed["attention_mask"] == 1) & ~self._special(feed["input_ids"])  # token-classification
        tags = postprocess.tag(outputs["logits"], keep, self._labels(outputs["logits"].shape[-1]))
        return [{"tokens": [{"token": self.tokenizer.id_to_token(int(ids[i])), "label": label, "score": score}
                            for i, label, score in row]}
                for ids, row in zip(feed["input_ids"], tags)]

    def _fill(self, ids: np.ndarray, logits: np.ndarray) -> dict:
        positions = np.flatnonzero(ids == self.tokenizer.token_to_id("[MASK]"))
        candidates = postprocess.top_tokens(logits, positions, self.top_k, self.tokenizer.get_vocab_size())
        filled = ids.copy()
        filled[positions] = [best[0][0] for best in candidates]
        return {"text": self._text(filled),
                "masks": [{"position": int(p), "candidates": [{"token": self.tokenizer.id_to_token(t), "score": s}
                                                               for t, s in best]}
                          for p, best in zip(positions, candidates)]}

    def _labels(self, count: int) -> list[str]:
        """Class names: the checkpoint's id2label, else NSP's fixed meaning, else LABEL_i."""
        if self.task.name == "next-sentence":
            return ["is_next", "not_next"]  # index 0 = B continues A, as in BERT's pretraining
        return self.labels if len(self.labels) == count else [f"LABEL_{i}" for i in range(count)]

    def _special(self, ids: np.ndarray) -> np.ndarray:
        return np.isin(ids, list(self.special_ids))

    def _text(self, ids: np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def summary(answer: dict) -> str:
    """One human line for an answer (``mbexport run`` without ``--json``)."""
    if "answer" in answer:
        return f"{answer['answer']!r} (score {answer['score']:.3f})"
    if "label" in answer:
        return f"{answer['label']} (score {answer['score']:.3f})"
    if "masks" in answer:
        tops = ", ".join("/".join(c["token"] for c in m["candidates"][:3]) for m in answer["masks"])
        return f"{answer['text']!r} [{tops}]"
    return " ".join(f"{t['token']}/{t['label']}" for t in answer["tokens"])
