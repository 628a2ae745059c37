#!/usr/bin/env bash
# The main job on the built-in example: a tiny random Megatron-BERT in NGC layout goes through every stage.
# Usage: scripts/demo.sh [VENV]   (make demo sets up the venv first)
set -euo pipefail
venv=${1:-.venv}
mb() { "$venv/bin/mbexport" "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
demo=artifacts/demo
rm -rf "$demo"

step "1. the built-in example checkpoint (NGC zip layout, random weights) and its vocab"
mb example "$demo/checkpoint"
ckpt=$demo/checkpoint/example_bert_tiny_uncased.zip
vocab=$demo/checkpoint/vocab.txt

step "2. inspect it"
mb inspect "$ckpt"

step "3. convert it to a Hugging Face MegatronBert folder"
mb convert "$ckpt" --out "$demo/hf" --vocab "$vocab"

step "4. build: QA fp16/int8/fp8, masked-LM fp16, classification int8 (ONNX target without TensorRT), QA int8 for ONNX Runtime"
# The NGC checkpoint holds only the pretraining heads: the QA and classifier heads are seeded (and saved).
for recipe in qa-fp16 qa-int8 qa-fp8 mlm-fp16 seq-cls-int8 qa-int8-ort; do
  mb build "$ckpt" --recipe "$recipe" --out "$demo/artifacts" --vocab "$vocab" --init-missing-head 0
done

step "5. a re-run with nothing changed does no work"
mb build "$ckpt" --recipe qa-int8 --out "$demo/artifacts" --vocab "$vocab" --init-missing-head 0

step "6. validate every artifact against the PyTorch reference"
mb validate "$demo/artifacts"

step "7. a Triton model repository (text-in ensembles)"
mb triton "$demo/artifacts" --repo "$demo/triton"

step "8. answers from text, locally (the Triton ensemble's twin)"
mb run "$demo/artifacts" --task qa --question "what does the model read?" \
  --context "the model reads text and answers a question about it"
mb run "$demo/artifacts" --task mlm --text "the [MASK] of the world"

step "9. benchmark on this machine's CPU"
mb bench "$demo/artifacts" --task qa

trained=../shared/fixtures/tiny-trained
if [ -d "$trained" ]; then
  step "10. a trained classifier (shared fixture): int8 with real calibration text, then classify"
  mb build "$trained/seqcls-hf" --task seq-cls --precision int8 --out "$demo/trained" \
    --vocab "$trained/vocab.txt" --calib-text "$trained/calib.txt"
  mb run "$demo/trained" --task seq-cls --text "$(head -n 1 "$trained/dev.txt")"
fi

step "done: everything is under $demo (validation.md, manifest.json, triton/, bench.json)"
