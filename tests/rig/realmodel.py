# Deterministic generator of the rig's real-engine model repository (gpucluster/tiny-qwen2-real).
"""Writes a small Qwen2 checkpoint that a real vLLM loads and serves: config, generation config, a byte-level
BPE tokenizer trained with `tokenizers` on a built-in corpus, tokenizer_config.json with a ChatML chat template,
random weights (fixed seed) in one safetensors file, and a README. Same seed and same library versions -> same
bytes. Needs torch, safetensors and tokenizers: `rig setup --real-engine` runs it inside the real-engine image
(no hub downloads), so the versions are the image's.

    python3 realmodel.py OUTDIR
"""
import hashlib
import json
import os
import sys

MODEL_ID = "gpucluster/tiny-qwen2-real"
SEED = 20250211
GENERATOR_REV = "1"  # bump when the output changes on purpose

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024  # config vocab (embedding rows); the trained tokenizer is at most this big

# 8 heads / 2 KV heads of size 32 (a CPU attention head size): TP 1/2 and PP 1/2/4 divide it.
CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 256,
    "initializer_range": 0.02,
    "intermediate_size": 768,
    "max_position_embeddings": 2048,
    "max_window_layers": 4,
    "model_type": "qwen2",
    "num_attention_heads": 8,
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": VOCAB_SIZE,
}

GENERATION_CONFIG = {
    "bos_token_id": 0,
    "eos_token_id": [2, 0],
    "pad_token_id": 0,
    "do_sample": False,
    "max_new_tokens": 32,
    "transformers_version": "4.43.1",
}

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS_PARAGRAPHS = [
    "The cluster has three hosts. Each host has two GPUs and a fast network card. The head node runs the API "
    "server and the other nodes join it.",
    "A model is a set of weights, a configuration and a tokenizer. The tokenizer turns text into tokens and "
    "tokens back into text.",
    "Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is the capital "
    "of France.",
    "To serve a model, pull the image, download the weights once, copy them to every host, start the engine and "
    "wait until the health check answers.",
    "Tensor parallelism splits every layer across devices; pipeline parallelism splits the layers into stages. "
    "Both need a working network between the hosts.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i, add(i, i))\n",
    "{\"model\": \"tiny\", \"prompt\": \"Hello\", \"max_tokens\": 8, \"temperature\": 0}",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024 2048 4096 8192.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "User: write a short poem about a small computer.\nAssistant: A small machine hums in the night, its "
    "little lights blink green and bright.",
]


def corpus():
    """A few hundred lines of text, the same every time."""
    out = []
    for r in range(8):
        for i, p in enumerate(_CORPUS_PARAGRAPHS):
            out.append(p if r % 2 == 0 else p.lower())
            out.append(" ".join(reversed(p.split())) if (r + i) % 3 == 0 else p.upper() if (r + i) % 5 == 0 else p)
    return out


def train_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def tokenizer_config(tok):
    added = {}
    for t in SPECIAL:
        added[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 2048,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def tensor_shapes():
    c = CONFIG
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    out = [("model.embed_tokens.weight", [v, h])]
    for i in range(c["num_hidden_layers"]):
        p = "model.layers.%d." % i
        out += [
            (p + "input_layernorm.weight", [h]),
            (p + "self_attn.q_proj.weight", [h, h]), (p + "self_attn.q_proj.bias", [h]),
            (p + "self_attn.k_proj.weight", [kv, h]), (p + "self_attn.k_proj.bias", [kv]),
            (p + "self_attn.v_proj.weight", [kv, h]), (p + "self_attn.v_proj.bias", [kv]),
            (p + "self_attn.o_proj.weight", [h, h]),
            (p + "post_attention_layernorm.weight", [h]),
            (p + "mlp.gate_proj.weight", [inter, h]),
            (p + "mlp.up_proj.weight", [inter, h]),
            (p + "mlp.down_proj.weight", [h, inter]),
        ]
    out += [("model.norm.weight", [h]), ("lm_head.weight", [v, h])]
    return out


def weights():
    import torch
    g = torch.Generator().manual_seed(SEED)
    std = CONFIG["initializer_range"]
    out = {}
    for name, shape in tensor_shapes():
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.empty(shape).normal_(0.0, std, generator=g)
        out[name] = t.to(torch.bfloat16).contiguous()
    return out


README = """---
license: apache-2.0
library_name: transformers
tags: [qwen2, test-fixture]
---
# %s

A tiny, randomly initialised Qwen2 checkpoint (4 layers, hidden 256, 8 heads of 32, 2 KV heads, vocab %d,
bfloat16, %s parameters) with a real byte-level BPE tokenizer trained on a small built-in corpus and a ChatML
chat template. Generated deterministically (seed %d) by gpucluster's test rig (tests/rig/realmodel.py) so that
a real vLLM has something to load; its outputs are meaningless.
"""


def generate(outdir):
    """Write the repository into outdir; returns [{path, size, sha256}] sorted by path."""
    import torch
    from safetensors.torch import save_file
    os.makedirs(outdir, exist_ok=True)
    torch.manual_seed(SEED)
    tok = train_tokenizer()
    if tok.get_vocab_size() > VOCAB_SIZE:
        raise SystemExit("tokenizer has %d tokens, more than vocab_size %d" % (tok.get_vocab_size(), VOCAB_SIZE))
    tok.save(os.path.join(outdir, "tokenizer.json"))
    w = weights()
    nparams = sum(t.numel() for t in w.values())
    save_file(w, os.path.join(outdir, "model.safetensors"), metadata={"format": "pt"})
    texts = {
        "config.json": json.dumps(CONFIG, indent=2) + "\n",
        "generation_config.json": json.dumps(GENERATION_CONFIG, indent=2) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config(tok), indent=2) + "\n",
        "special_tokens_map.json": json.dumps({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                                               "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                                              indent=2) + "\n",
        "README.md": README % (MODEL_ID, VOCAB_SIZE, "{:,}".format(nparams), SEED),
    }
    for name, text in texts.items():
        with open(os.path.join(outdir, name), "w", encoding="utf-8") as f:
            f.write(text)
    return file_list(outdir)


def file_list(outdir):
    files = []
    for name in sorted(os.listdir(outdir)):
        p = os.path.join(outdir, name)
        if not os.path.isfile(p) or name.startswith("."):
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        files.append({"path": name, "size": os.path.getsize(p), "sha256": h.hexdigest()})
    return files


if __name__ == "__main__":
    print(json.dumps(generate(sys.argv[1]), indent=2))
