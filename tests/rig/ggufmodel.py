# Deterministic tiny GGUF (v3) for the rig's Ollama tests, and Ollama's registry view of a hub repository; stdlib only.
"""gpucluster/tiny-qwen2-GGUF: one file tiny-qwen2-Q4_K_M.gguf, a real GGUF v3 file (header, qwen2 metadata, a
tokenizer, 2 layers of small F32 tensors; about 2.2 MB so that progress shows) with random weights from a seed.
The name says Q4_K_M because that is the tag Ollama asks for by default; general.file_type says so too, while the
tensors are F32 (nothing here runs them).

    publish(d)          the repository on the rig's HF mirror and ModelScope server (righosts.prepare_model)
    registry(root, parts)   Ollama's registry protocol (/v2/ORG/REPO/manifests/TAG, /v2/ORG/REPO/blobs/sha256:X)
                        over a folder of hub repositories ROOT/ORG/REPO/*.gguf, as hf.co and modelscope.cn answer
                        `ollama pull hf.co/ORG/REPO:QUANT`: the quant's .gguf becomes the model layer.

    python3 ggufmodel.py OUTDIR        writes the repository's files into OUTDIR"""
import hashlib
import json
import os
import random
import re
import struct
import sys

MODEL_ID = "gpucluster/tiny-qwen2-GGUF"
FILE = "tiny-qwen2-Q4_K_M.gguf"
SEED = 20261122
ARCH = "qwen2"
LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, CONTEXT = 2, 128, 4, 2, 256, 4096, 4096
ALIGN = 32
T_UINT32, T_FLOAT32, T_STRING, T_ARRAY, T_UINT64 = 4, 6, 8, 9, 10
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "<|im_start|>assistant\n")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key, vtype, value):
    out = _str(key) + struct.pack("<I", vtype)
    if vtype == T_STRING:
        return out + _str(value)
    if vtype == T_ARRAY:
        atype, items = value
        out += struct.pack("<IQ", atype, len(items))
        return out + b"".join(_str(i) if atype == T_STRING else struct.pack({T_UINT32: "<I", T_FLOAT32: "<f"}[atype], i)
                              for i in items)
    return out + struct.pack({T_UINT32: "<I", T_FLOAT32: "<f", T_UINT64: "<Q"}[vtype], value)


def tokens():
    return SPECIAL + ["<0x%02X>" % i for i in range(256)] + ["t%d" % i for i in range(VOCAB - 256 - len(SPECIAL))]


def metadata():
    hd = HIDDEN // HEADS
    return [
        ("general.architecture", T_STRING, ARCH), ("general.name", T_STRING, "tiny-qwen2 (gpucluster rig)"),
        ("general.file_type", T_UINT32, 15),                      # LLAMA_FTYPE_MOSTLY_Q4_K_M
        ("general.quantization_version", T_UINT32, 2), ("general.alignment", T_UINT32, ALIGN),
        (ARCH + ".block_count", T_UINT32, LAYERS), (ARCH + ".context_length", T_UINT32, CONTEXT),
        (ARCH + ".embedding_length", T_UINT32, HIDDEN), (ARCH + ".feed_forward_length", T_UINT32, FFN),
        (ARCH + ".attention.head_count", T_UINT32, HEADS), (ARCH + ".attention.head_count_kv", T_UINT32, KV_HEADS),
        (ARCH + ".attention.key_length", T_UINT32, hd), (ARCH + ".attention.value_length", T_UINT32, hd),
        (ARCH + ".rope.freq_base", T_FLOAT32, 10000.0), (ARCH + ".attention.layer_norm_rms_epsilon", T_FLOAT32, 1e-6),
        ("tokenizer.ggml.model", T_STRING, "gpt2"), ("tokenizer.ggml.pre", T_STRING, "qwen2"),
        ("tokenizer.ggml.tokens", T_ARRAY, (T_STRING, tokens())),
        ("tokenizer.ggml.eos_token_id", T_UINT32, 2), ("tokenizer.ggml.bos_token_id", T_UINT32, 0),
        ("tokenizer.chat_template", T_STRING, CHAT_TEMPLATE),
    ]


def tensors():
    """(name, dims (GGML order: fastest first)) of a qwen2 model, all F32."""
    kv = KV_HEADS * (HIDDEN // HEADS)
    out = [("token_embd.weight", (HIDDEN, VOCAB)), ("output_norm.weight", (HIDDEN,))]
    for i in range(LAYERS):
        b = "blk.%d." % i
        out += [(b + "attn_norm.weight", (HIDDEN,)), (b + "attn_q.weight", (HIDDEN, HIDDEN)),
                (b + "attn_k.weight", (HIDDEN, kv)), (b + "attn_v.weight", (HIDDEN, kv)),
                (b + "attn_output.weight", (HIDDEN, HIDDEN)), (b + "ffn_norm.weight", (HIDDEN,)),
                (b + "ffn_gate.weight", (HIDDEN, FFN)), (b + "ffn_up.weight", (HIDDEN, FFN)),
                (b + "ffn_down.weight", (FFN, HIDDEN))]
    return out


def gguf_bytes():
    """The whole file; the same bytes for the same SEED."""
    rng = random.Random(SEED)
    meta, ts = metadata(), tensors()
    head = b"GGUF" + struct.pack("<IQQ", 3, len(ts), len(meta)) + b"".join(_kv(*m) for m in meta)
    infos, offset, datas = b"", 0, []
    for name, dims in ts:
        n = 1
        for x in dims:
            n *= x
        data = struct.pack("<%df" % n, *(1.0 if name.endswith("norm.weight") else rng.uniform(-0.05, 0.05)
                                         for _ in range(n)))
        infos += _str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", x) for x in dims) + \
            struct.pack("<IQ", 0, offset)                    # type 0 = GGML_TYPE_F32
        datas.append(data)
        offset += len(data) + (-len(data)) % ALIGN
    out = head + infos
    out += b"\0" * ((-len(out)) % ALIGN)
    for data in datas:
        out += data + b"\0" * ((-len(data)) % ALIGN)
    return out


def generate(dst):
    """Writes the repository into dst; returns [{path, size, sha256}]."""
    os.makedirs(dst, exist_ok=True)
    data = gguf_bytes()
    with open(os.path.join(dst, FILE), "wb") as f:
        f.write(data)
    with open(os.path.join(dst, "README.md"), "w") as f:
        f.write("# %s\n\nA tiny GGUF v3 (qwen2, %d layers, random F32 weights) generated by tests/rig/ggufmodel.py "
                "for gpucluster's rig. Not a usable model.\n" % (MODEL_ID, LAYERS))
    files = []
    for name in sorted(os.listdir(dst)):
        p = os.path.join(dst, name)
        if os.path.isfile(p) and not name.startswith("."):
            files.append({"path": name, "size": os.path.getsize(p), "sha256": _sha256_file(p)})
    return files


def publish(d):
    """Publish the repository through the rig's HF mirror and ModelScope server (call from righosts.up, in the
    "model repository" stage, next to prepare_model(d)); returns its rig.json record."""
    import righosts
    return righosts.prepare_model(d, MODEL_ID, fill=generate, origin="tests/rig/ggufmodel.py")


# ---------------------------------------------------------------- Ollama's registry protocol over hub repositories
_SHA = {}


def _sha256_file(path):
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA[key] = h.hexdigest()
    return _SHA[key]


def _pick(repo_dir, tag):
    """The .gguf of a quant: a name ending in -QUANT.gguf / _QUANT.gguf / .QUANT.gguf (case-insensitive)."""
    want = (tag or "latest").lower()
    want = "q4_k_m" if want == "latest" else want
    for name in sorted(os.listdir(repo_dir)):
        low = name.lower()
        if low.endswith(".gguf") and re.search(r"(^|[-_.])%s\.gguf$" % re.escape(want), low):
            return os.path.join(repo_dir, name)
    return None


def _quant(path):
    return os.path.basename(path)[:-len(".gguf")].rsplit("-", 1)[-1].upper()


def _blob(obj):
    data = json.dumps(obj, separators=(",", ":")).encode()
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def manifest(repo_dir, tag):
    """(manifest bytes, {digest: bytes or path}) for a hub repository's quant, or None."""
    path = _pick(repo_dir, tag)
    if path is None:
        return None
    digest = "sha256:" + _sha256_file(path)
    template, tdig = CHAT_TEMPLATE.encode(), "sha256:" + hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()
    params, pdig = _blob({"stop": ["<|im_end|>"]})
    config, cdig = _blob({"model_format": "gguf", "model_family": ARCH, "model_families": [ARCH],
                          "model_type": "", "file_type": _quant(path), "architecture": "amd64",
                          "os": "linux", "rootfs": {"type": "layers", "diff_ids": [digest, tdig, pdig]}})
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": os.path.getsize(path)},
              {"mediaType": "application/vnd.ollama.image.template", "digest": tdig, "size": len(template)},
              {"mediaType": "application/vnd.ollama.image.params", "digest": pdig, "size": len(params)}]
    mf = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
          "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": cdig,
                     "size": len(config)}, "layers": layers}
    return json.dumps(mf).encode(), {digest: path, tdig: template, pdig: params, cdig: config}


def registry(root, parts):
    """Answer GET /v2/<ORG>/<REPO>/(manifests/<TAG>|blobs/<DIGEST>) over ROOT/<ORG>/<REPO>/: (status, content
    type, bytes or a file path). parts: the URL path split on "/", starting with "v2"."""
    if parts == ["v2"]:
        return 200, "application/json", b"{}"
    if len(parts) != 5 or parts[0] != "v2" or parts[3] not in ("manifests", "blobs"):
        return 404, "application/json", json.dumps({"errors": [{"code": "NAME_UNKNOWN"}]}).encode()
    org, repo, what, ref = parts[1:]
    base = os.path.realpath(root)
    repo_dir = os.path.realpath(os.path.join(base, org, repo))
    if not repo_dir.startswith(base + os.sep) or not os.path.isdir(repo_dir):
        return 404, "application/json", json.dumps({"errors": [{"code": "NAME_UNKNOWN"}]}).encode()
    if what == "manifests":
        found = manifest(repo_dir, ref)
        if found is None:
            return 404, "application/json", json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message":
                                                                    "no GGUF for tag %s" % ref}]}).encode()
        return 200, "application/vnd.docker.distribution.manifest.v2+json", found[0]
    for name in sorted(os.listdir(repo_dir)):
        if name.lower().endswith(".gguf"):
            found = manifest(repo_dir, _quant(name))
            if found and ref in found[1]:
                return 200, "application/octet-stream", found[1][ref]
    return 404, "application/json", json.dumps({"errors": [{"code": "BLOB_UNKNOWN"}]}).encode()


if __name__ == "__main__":
    print(json.dumps(generate(sys.argv[1]), indent=1))
