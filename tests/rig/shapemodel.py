# A model repository with a real model's config.json but tiny weights (stdlib only): only for the rig's vLLM
# stand-in, which checks the architecture, shapes and flags a deployment gets but never loads weights.
"""Publishes Qwen/Qwen3-32B's config.json (as on huggingface.co/Qwen/Qwen3-32B) with one small shard, so that
`up --profile auto` with the field notes' model can run its whole plan (TP 2 x PP 3 over three V100 hosts) on the
rig. The planner takes the model's facts from its catalog (65.5 GB of weights), not from these files.

    python3 shapemodel.py OUTDIR
"""
import json
import os
import sys

from realmodel import file_list
from tinymodel import _write_safetensors

MODEL_ID = "Qwen/Qwen3-32B"

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 25600,
    "max_position_embeddings": 40960,
    "max_window_layers": 64,
    "model_type": "qwen3",
    "num_attention_heads": 64,
    "num_hidden_layers": 64,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

README = """---
license: apache-2.0
tags: [test-fixture]
---
# Qwen/Qwen3-32B (rig shape only)

Qwen3-32B's config.json with a single 64-byte tensor instead of its weights, published by gpucluster's test rig
(tests/rig/shapemodel.py) so that orchestration of the real model's deployment can be tested. Not a model.
"""


def generate(outdir):
    os.makedirs(outdir, exist_ok=True)
    shard = "model-00001-of-00001.safetensors"
    _write_safetensors(os.path.join(outdir, shard), [("model.norm.weight", [32], b"\x00\x3c" * 32)])
    index = {"metadata": {"total_size": 64}, "weight_map": {"model.norm.weight": shard}}
    texts = {"config.json": json.dumps(CONFIG, indent=2) + "\n",
             "model.safetensors.index.json": json.dumps(index, indent=2) + "\n",
             "README.md": README}
    for name, text in texts.items():
        with open(os.path.join(outdir, name), "w", encoding="utf-8") as f:
            f.write(text)
    return file_list(outdir)


if __name__ == "__main__":
    print(json.dumps(generate(sys.argv[1]), indent=2))
