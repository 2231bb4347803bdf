#!/usr/bin/env bash
# The main job on the built-in default model, no download: convert -> inspect -> merge -> eval (patch and merged,
# against the model reading prompt + query in one pass).
#   bash scripts/demo.sh [OUT_DIR]      (default: demo-out/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo-out}
mkdir -p "$out"
prompt=configs/examples/recall-prompt.txt
queries=configs/examples/recall-queries.jsonl
set -x
iclca convert "$prompt" --model demo-linear --out "$out/recall.safetensors" --force
iclca inspect "$out/recall.safetensors"
iclca merge --model demo-linear --patch "$out/recall.safetensors" --out "$out/recall-merged" --force
iclca eval --model demo-linear --patch "$out/recall.safetensors" --prompt "$prompt" --queries "$queries" --max-abs-logit-diff 1e-4 --one-pass
iclca eval --model demo-linear --merged "$out/recall-merged" --prompt "$prompt" --queries "$queries" --max-abs-logit-diff 1e-4 --one-pass
