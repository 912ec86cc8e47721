"""PURE: per-GPU memory the way vLLM's profiler budgets it, and the KV cache that is left.

Calibrated against real startup logs (tests/cases/memory/, one file per log with its source). What the
profiler subtracts from `total x gpu_memory_utilization` before the KV cache, per engine generation:

- weights of this GPU's shard and stage;
- the profile run's peak: the larger of the forward pass over `max_num_batched_tokens` tokens and the
  sampler over the logits of `max_num_seqs` sequences (they do not overlap: vLLM #10517 measured a peak
  that grows 110 KB a token with no fixed sampler share for Llama-3.1-8B);
- memory outside torch: the CUDA context, and NCCL buffers when the model is split;
- CUDA graphs only where the engine profiles them (V1 from 0.21: "CUDA graph memory profiling is enabled
  (default since v0.21.0)", vLLM #46462). Before that, V0 and V1 capture graphs after the KV cache is
  allocated, outside the budget: they do not shrink the cache but must fit beside it (`graphs_outside`).

V1 (the default from 0.8; V0 remains as the fallback below compute capability 8.0 until 0.10) always
chunks prefills, so its profile batch is the server's `max_num_batched_tokens` default (2048, 8192 on
GPUs of 70 GiB or more), not `max_model_len`; it has no CPU swap space; `max_num_seqs` defaults to 256
(1024 on GPUs of 70 GiB or more; vllm 0.8.5 engine/arg_utils.py `_set_default_args_v1`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .models import DTYPE_BYTES, ModelFacts

GIB = 1024 ** 3
MIB = 1024 ** 2
# CUDA context + cuBLAS workspace per process: "non_torch_memory=0.35GiB" for Llama-3.1-8B, TP 1, RTX 3090,
# vLLM 0.6.4 (vLLM #10517); counted in the budget by 0.3.x, 0.6.4 and V1 0.8.x (they subtract total - free).
CUDA_CONTEXT = int(0.35 * GIB)
# Per GPU when TP*PP > 1. Outside torch with TP 2: 0.44-0.46 GiB in all (context included) on V100s, vLLM
# 0.3.0, custom all-reduce off (seed 002's OOM lines: "this process has 15.49 GiB memory in use. Of the
# allocated memory 15.04 GiB is allocated by PyTorch"); "non_torch_memory takes 0.25GiB" beyond the context
# on 2 x RTX 4090, vLLM 0.7 (vLLM #13061).
NCCL_BUFFERS = int(0.2 * GIB)
# vLLM warns that graphs "can take additional 1~3 GiB"; logs show 0.43 GiB (Qwen3-0.6B) to 1.99 GiB
# (Qwen3-8B TP 2, field note 004).
CUDA_GRAPHS = int(1.0 * GIB)
PROFILE_SEQS = 256                 # default max_num_seqs: sequences in the profiling batch
LARGE_GPU = 70 * GIB               # V1 raises its batch defaults on GPUs with at least this much memory
V0_CHUNKED_TOKENS = 512            # V0 chunked prefill's max_num_batched_tokens (vllm 0.6.3 config.py)
# The sampler's peak in fp32 logit tensors [seqs, vocab]. Counted in vllm 0.6.3's sampler: the logits in
# bf16 (0.5) and fp32 (1), the top-k/top-p sort's values (1) and int64 indices (2), softmax (1), cumsum (1),
# masks (0.5) and the scatter back (1): about 8. The logs bracket it: in vLLM #13061 rank 0, the one that
# samples, profiled about 1.2 GiB more than rank 1 for 256 x 152064 fp32 logits of 0.145 GiB (8-10 copies);
# the 0.8.5 field-note run (V1 samples on every rank) leaves about 1 GiB beyond weights, forward and context.
SAMPLER_COPIES = 8
GRAPHS_PROFILED_FROM = (0, 21)     # V1 subtracts CUDA graph memory from the KV budget from 0.21.0
V0_SWAP_GIB = 4                    # --swap-space default (GiB of CPU memory per GPU); V1 has none


@dataclass(frozen=True, kw_only=True)
class Memory:
    """Per-GPU figures in bytes (the worst GPU of the deployment)."""

    gpu_total: int
    utilization: float
    budget: int
    weights: int
    activations: int               # profile peak: max(forward pass, sampler)
    context: int
    cuda_graphs: int               # CUDA graph memory taken out of the budget (0 where captured after the KV cache)
    kv_cache: int
    block_bytes: int
    blocks: int
    block_size: int
    token_capacity: int
    max_model_len: int
    batched_tokens: int
    dtype: str
    generation: str = "v0"
    max_num_seqs: int = PROFILE_SEQS
    graphs_outside: int = 0        # CUDA graph memory allocated after the KV cache, beyond the budget
    cpu_swap: int = 0              # CPU swap space per GPU (V0 only)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["gib"] = {k: round(v / GIB, 2) for k, v in out.items()
                      if k in ("gpu_total", "budget", "weights", "activations", "context", "cuda_graphs", "kv_cache",
                               "graphs_outside")}
        return out


def runtime_dtype(dtype_arg: str, model_dtype: str) -> str:
    """vLLM's --dtype: auto keeps bf16/fp16 checkpoints and runs fp32 ones in fp16."""
    if dtype_arg in ("auto", "", None):
        return "float16" if model_dtype in ("float32", "float") else model_dtype
    return {"half": "float16", "float": "float32"}.get(dtype_arg, dtype_arg)


def batched_tokens(rule: str, max_model_len: int, args: dict, gpu_mib: int = 0,
                   chunked_prefill_over: int | None = None) -> int:
    """max_num_batched_tokens: the explicit arg, else the engine's default under `rule`."""
    if "max-num-batched-tokens" in args:
        return int(args["max-num-batched-tokens"])
    if rule == "max-model-len-or-2048":
        chunked = args.get("enable-chunked-prefill")
        auto = chunked is None and chunked_prefill_over is not None and max_model_len > chunked_prefill_over
        return V0_CHUNKED_TOKENS if chunked is True or auto else max(max_model_len, 2048)
    if rule == "v1-server":   # vLLM V1 OpenAI server default: 8192 on GPUs with >= 70 GiB, else 2048
        return 8192 if gpu_mib * MIB >= LARGE_GPU else 2048
    return int(rule)


def _graphs_profiled(generation: str, version: str) -> bool:
    m = re.match(r"^(\d+)\.(\d+)", version or "")
    return generation == "v1" and m is not None and (int(m[1]), int(m[2])) >= GRAPHS_PROFILED_FROM


def estimate(*, model: ModelFacts, tp: int, pp: int, gpu_mib: int, args: dict, batched_rule: str,
             generation: str = "v0", version: str = "", chunked_prefill_over: int | None = None) -> Memory:
    """Estimate one GPU's memory: weights of its stage/shard, profile peak, context, graphs, KV.

    generation: "v0" or "v1", the engine that will run (V1 releases before 0.11 run V0 below cc 8.0);
    version: the release (decides whether V1 profiles CUDA graphs); chunked_prefill_over: the
    max-model-len above which V0 turns chunked prefill on by itself (None: never).
    """
    v1 = generation == "v1"
    dtype = runtime_dtype(str(args.get("dtype", "auto")), model.dtype)
    nbytes = DTYPE_BYTES.get(dtype, 2)
    max_len = int(args.get("max-model-len", model.max_positions))
    rule = "v1-server" if v1 and batched_rule == "max-model-len-or-2048" else batched_rule
    tokens = batched_tokens(rule, max_len, args, gpu_mib, None if v1 else chunked_prefill_over)
    large = gpu_mib * MIB >= LARGE_GPU
    seqs = int(args.get("max-num-seqs") or (1024 if v1 and large else PROFILE_SEQS))

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

    # Profile peak. Forward: at the MLP, the gate/up output (2 x intermediate), the activated half
    # (1 x intermediate) and about three hidden-sized tensors (residual, normed input, output) per token;
    # 110 KB a token for Llama-3.1-8B in bf16, as vLLM #10517 measured (17.06 -> 17.98 GiB for 20k -> 29k).
    # Sampler: fp32 logits of one token per sequence, over the whole vocabulary, SAMPLER_COPIES times.
    per_token = (3 * model.intermediate / tp + 3 * model.hidden) * nbytes
    forward = int(tokens * per_token)
    sampler = SAMPLER_COPIES * min(seqs, tokens) * model.vocab * 4
    activations = max(forward, sampler)
    context = CUDA_CONTEXT + (NCCL_BUFFERS if tp * pp > 1 else 0)
    graph_mem = 0 if args.get("enforce-eager") is True else CUDA_GRAPHS
    counted = _graphs_profiled(generation, version)
    graphs = graph_mem if counted else 0

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
    swap = 0 if v1 else int(float(args.get("swap-space", V0_SWAP_GIB)) * GIB)
    return Memory(gpu_total=total, utilization=util, budget=budget, weights=weights, activations=activations,
                  context=context, cuda_graphs=graphs, kv_cache=max(0, kv_cache), block_bytes=block_bytes,
                  blocks=blocks, block_size=block_size, token_capacity=blocks * block_size,
                  max_model_len=max_len, batched_tokens=tokens, dtype=dtype, generation=generation,
                  max_num_seqs=seqs, graphs_outside=0 if counted else graph_mem, cpu_swap=swap)
