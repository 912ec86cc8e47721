"""PURE: per-GPU memory the way vLLM's profiler budgets it, and the KV cache that is left."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .models import DTYPE_BYTES, ModelFacts

GIB = 1024 ** 3
MIB = 1024 ** 2
CUDA_CONTEXT = int(0.6 * GIB)      # CUDA context + allocator slack per process (V100, torch 2.x)
NCCL_BUFFERS = int(0.3 * GIB)      # per GPU when TP*PP > 1
CUDA_GRAPHS = int(1.0 * GIB)       # vLLM warns graphs "can take additional 1~3 GiB" unless --enforce-eager
PROFILE_SEQS = 256                 # default max_num_seqs: sequences in the profiling batch


@dataclass(frozen=True, kw_only=True)
class Memory:
    """Per-GPU figures in bytes (the worst GPU of the deployment)."""

    gpu_total: int
    utilization: float
    budget: int
    weights: int
    activations: int
    context: int
    cuda_graphs: int
    kv_cache: int
    block_bytes: int
    blocks: int
    block_size: int
    token_capacity: int
    max_model_len: int
    batched_tokens: int
    dtype: str

    def as_dict(self) -> dict:
        out = asdict(self)
        out["gib"] = {k: round(v / GIB, 2) for k, v in out.items()
                      if k in ("gpu_total", "budget", "weights", "activations", "context", "cuda_graphs", "kv_cache")}
        return out


def runtime_dtype(dtype_arg: str, model_dtype: str) -> str:
    """vLLM's --dtype: auto keeps bf16/fp16 checkpoints and runs fp32 ones in fp16."""
    if dtype_arg in ("auto", "", None):
        return "float16" if model_dtype in ("float32", "float") else model_dtype
    return {"half": "float16", "float": "float32"}.get(dtype_arg, dtype_arg)


def batched_tokens(rule: str, max_model_len: int, args: dict, gpu_mib: int = 0) -> int:
    if "max-num-batched-tokens" in args:
        return int(args["max-num-batched-tokens"])
    if rule == "max-model-len-or-2048":
        return 512 if args.get("enable-chunked-prefill") is True else max(max_model_len, 2048)
    if rule == "v1-server":   # vLLM V1 OpenAI server default: 8192 on GPUs with >= 70 GiB, else 2048
        return 8192 if gpu_mib * MIB >= 70 * GIB else 2048
    return int(rule)


def estimate(*, model: ModelFacts, tp: int, pp: int, gpu_mib: int, args: dict, batched_rule: str) -> Memory:
    """Estimate one GPU's memory: weights of its stage/shard, profile peak, context, graphs, KV."""
    dtype = runtime_dtype(str(args.get("dtype", "auto")), model.dtype)
    nbytes = DTYPE_BYTES.get(dtype, 2)
    max_len = int(args.get("max-model-len", model.max_positions))
    tokens = batched_tokens(batched_rule, max_len, args, gpu_mib)

    # Weights: the heaviest pipeline stage (the last one takes the remainder layers), split over TP.
    # bitsandbytes quantizes a 16-bit checkpoint in flight (~4.5 bits a weight); a pre-quantized
    # checkpoint (awq, gptq, ...) occupies what its files hold; embeddings stay 16-bit.
    quant = str(args.get("quantization") or "")
    per_param = {"bitsandbytes": 0.56, "fp8": 1.0}.get(quant, DTYPE_BYTES.get(model.dtype, 2) if quant else nbytes)
    layer_bytes = (model.params - model.embed_params) / model.layers * per_param
    embed_bytes = model.vocab * model.hidden * nbytes
    base = model.layers // pp
    last = base + model.layers % pp
    if pp == 1:
        stage = model.layers * layer_bytes + embed_bytes * (1 if model.tie_embeddings else 2)
    else:
        stage = max(base * layer_bytes, last * layer_bytes) + embed_bytes
    offload = float(args.get("cpu-offload-gb", 0)) * GIB
    weights = max(0, int(stage / tp - offload))

    # Profile peak: hidden states, QKV and MLP activations of the dummy batch, plus fp32 logits.
    per_token = (4 * model.hidden + (model.heads + 2 * model.kv_heads) * model.head_dim / tp
                 + 3 * model.intermediate / tp) * nbytes
    logits = min(PROFILE_SEQS, tokens) * model.vocab * 4 * 3
    activations = int(tokens * per_token + logits)
    context = CUDA_CONTEXT + (NCCL_BUFFERS if tp * pp > 1 else 0)
    graphs = 0 if args.get("enforce-eager") is True else CUDA_GRAPHS

    total = gpu_mib * MIB
    util = float(args.get("gpu-memory-utilization", 0.9))
    budget = int(total * util)
    block_size = int(args.get("block-size", 16))
    kv_dtype = str(args.get("kv-cache-dtype", "auto"))
    kv_bytes = 1 if kv_dtype.startswith("fp8") else nbytes
    stage_layers = last if pp > 1 else model.layers
    block_bytes = 2 * stage_layers * max(1, model.kv_heads // tp) * model.head_dim * kv_bytes * block_size
    kv_cache = budget - weights - activations - context - graphs
    blocks = max(0, kv_cache // block_bytes)
    return Memory(gpu_total=total, utilization=util, budget=budget, weights=weights, activations=activations,
                  context=context, cuda_graphs=graphs, kv_cache=max(0, kv_cache), block_bytes=block_bytes,
                  blocks=blocks, block_size=block_size, token_capacity=blocks * block_size,
                  max_model_len=max_len, batched_tokens=tokens, dtype=dtype)
