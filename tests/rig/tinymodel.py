# Deterministic generator of the rig's tiny Qwen2 model repository (gpucluster/tiny-qwen2); stdlib only.
"""Writes a small but structurally real Qwen2 checkpoint: config, generation config, tokenizer files,
two hand-written safetensors shards with an index, and a README. Same seed -> same bytes.

    python3 tinymodel.py OUTDIR
"""
import json
import os
import random
import struct
import sys

from realmodel import file_list  # one listing for both rig models

MODEL_ID = "gpucluster/tiny-qwen2"
SEED = 20241121

CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 384,
    "initializer_range": 0.02,
    "intermediate_size": 768,
    "max_position_embeddings": 4096,
    "max_window_layers": 6,
    "model_type": "qwen2",
    "num_attention_heads": 12,
    "num_hidden_layers": 6,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.37.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 4224,
}

GENERATION_CONFIG = {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "do_sample": False,
    "max_new_tokens": 64,
    "transformers_version": "4.37.0",
}

SPECIAL = ["<unk>", "<|endoftext|>", "<|im_end|>", "<|im_start|>"]


def _tensors():
    c = CONFIG
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", [v, h])]
    for i in range(c["num_hidden_layers"]):
        p = "model.layers.%d." % i
        out += [
            (p + "input_layernorm.weight", [h]),
            (p + "mlp.down_proj.weight", [h, inter]),
            (p + "mlp.gate_proj.weight", [inter, h]),
            (p + "mlp.up_proj.weight", [inter, h]),
            (p + "post_attention_layernorm.weight", [h]),
            (p + "self_attn.k_proj.bias", [kv]),
            (p + "self_attn.k_proj.weight", [kv, h]),
            (p + "self_attn.o_proj.weight", [h, h]),
            (p + "self_attn.q_proj.bias", [h]),
            (p + "self_attn.q_proj.weight", [h, h]),
            (p + "self_attn.v_proj.bias", [kv]),
            (p + "self_attn.v_proj.weight", [kv, h]),
        ]
    out += [("model.norm.weight", [h]), ("lm_head.weight", [v, h])]
    return out


# fp16 high byte: keep sign and the 2 top mantissa bits, force exponent 0b01011 (|x| ~ 0.06..0.12)
_HIGH = bytes(((b & 0x83) | 0x2C) for b in range(256))


def _data(rng, name, shape):
    n = 1
    for d in shape:
        n *= d
    if name.endswith("norm.weight"):
        return struct.pack("<H", 0x3C00) * n  # 1.0
    raw = bytearray(rng.randbytes(2 * n))
    raw[1::2] = bytes(raw[1::2]).translate(_HIGH)
    return bytes(raw)


def _write_safetensors(path, items):
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, shape, data in items:
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)


def _tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    words = ("the a an of to and in is it that for on with as was be at by this from or hello world "
             "gpu cluster model token test ray node host vllm serve qwen tiny").split()
    for w in words:
        vocab.setdefault(w, len(vocab))
    for b in range(256):
        vocab.setdefault("<0x%02X>" % b, len(vocab))
    i = 0
    while len(vocab) < CONFIG["vocab_size"]:
        vocab.setdefault("tok%04d" % i, len(vocab))
        i += 1
    added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t in SPECIAL]
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in a if k not in ("id",)} for a in added},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }
    return tok, cfg


README = """---
license: apache-2.0
library_name: transformers
tags: [qwen2, test-fixture]
---
# gpucluster/tiny-qwen2

A tiny, randomly initialised Qwen2 checkpoint (6 layers, hidden 384, 12 heads, 2 KV heads,
vocab 4224, float16: divisible for TP 1/2/3/4/6 and PP 1/2/3) generated deterministically by gpucluster's test rig
(tests/rig/tinymodel.py, seed %d). It exists to test download and orchestration paths;
its outputs are meaningless.
""" % SEED


def generate(outdir):
    """Write the repository into outdir; returns [{path, size, sha256}] sorted by path."""
    os.makedirs(outdir, exist_ok=True)
    rng = random.Random(SEED)
    items = [(n, s, _data(rng, n, s)) for n, s in _tensors()]
    # shard 1: embeddings + layer 0; shard 2: the rest
    split = 1 + 12
    shards = [items[:split], items[split:]]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = "model-%05d-of-%05d.safetensors" % (i, len(shards))
        _write_safetensors(os.path.join(outdir, fname), shard)
        for n, _s, d in shard:
            weight_map[n] = fname
            total += len(d)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    tok, tok_cfg = _tokenizer()
    texts = {
        "config.json": json.dumps(CONFIG, indent=2) + "\n",
        "generation_config.json": json.dumps(GENERATION_CONFIG, indent=2) + "\n",
        "model.safetensors.index.json": json.dumps(index, indent=2) + "\n",
        "tokenizer.json": json.dumps(tok, ensure_ascii=False) + "\n",
        "tokenizer_config.json": json.dumps(tok_cfg, indent=2) + "\n",
        "README.md": README,
    }
    for name, text in texts.items():
        with open(os.path.join(outdir, name), "w", encoding="utf-8") as f:
            f.write(text)
    return file_list(outdir)


if __name__ == "__main__":
    print(json.dumps(generate(sys.argv[1]), indent=2))
