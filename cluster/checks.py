"""PURE: compatibility rules. Each check takes a Setup and yields Findings with a fix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .config import Host, Inventory, Profile
from .knowledge import Engine
from .memory import GIB, Memory, estimate
from .models import ModelFacts

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True, kw_only=True)
class Finding:
    code: str
    severity: str
    message: str
    fix: str

    def as_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "message": self.message, "fix": self.fix}


@dataclass(frozen=True, kw_only=True)
class Setup:
    """Everything a check may look at: one candidate deployment."""

    inventory: Inventory
    profile: Profile
    engine: Engine
    model: ModelFacts | None
    hosts: tuple[Host, ...]          # the hosts this deployment uses, head first
    tp: int
    pp: int
    args: dict[str, Any]             # effective engine args (profile < inventory < --set), dashed names
    env: dict[str, str]              # effective container env (profile < inventory)

    @property
    def gpus(self) -> int:
        return sum(h.gpus.count for h in self.hosts)

    def memory(self) -> Memory | None:
        if self.model is None:
            return None
        return estimate(model=self.model, tp=self.tp, pp=self.pp, gpu_mib=min(h.gpus.memory_mib for h in self.hosts),
                        args=self.args, batched_rule=self.engine.batched_tokens_default)


def _cc(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def _ver(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


# ---------------------------------------------------------------- parallelism
def heads_divisible(s: Setup) -> Iterator[Finding]:
    if s.model and s.model.heads % s.tp:
        ok = [t for t in range(1, s.gpus + 1) if s.model.heads % t == 0]
        yield Finding(code="heads-not-divisible", severity=ERROR,
                      message=f"Total number of attention heads ({s.model.heads}) must be divisible by "
                              f"tensor parallel size ({s.tp}).",
                      fix=f"use a tensor parallel size that divides {s.model.heads}: {', '.join(map(str, ok))}")


def kv_heads_divisible(s: Setup) -> Iterator[Finding]:
    if not s.model:
        return
    kv = s.model.kv_heads
    if (kv >= s.tp and kv % s.tp) or (kv < s.tp and s.tp % kv):
        yield Finding(code="kv-heads-not-divisible", severity=ERROR,
                      message=f"{kv} KV heads cannot be split over tensor parallel size {s.tp} "
                              f"(needs {kv} % TP == 0, or TP % {kv} == 0 when TP is larger)",
                      fix=f"use a tensor parallel size that divides {kv} or is a multiple of it")


def vocab_divisible(s: Setup) -> Iterator[Finding]:
    if not s.model:
        return
    padded = math.ceil(s.model.vocab / 64) * 64
    if padded % s.tp:
        yield Finding(code="vocab-not-divisible", severity=ERROR,
                      message=f"vocabulary {s.model.vocab} (padded to {padded}) is not divisible by tensor "
                              f"parallel size {s.tp}: AssertionError: {padded} is not divisible by {s.tp}",
                      fix="use a power-of-two tensor parallel size (1, 2, 4, 8)")


def layers_divisible(s: Setup) -> Iterator[Finding]:
    if not s.model or s.pp == 1 or s.model.layers % s.pp == 0:
        return
    base = s.model.layers // s.pp
    stages = [base] * (s.pp - 1) + [base + s.model.layers % s.pp]
    if s.engine.even_layers_required:
        yield Finding(code="layers-not-divisible", severity=ERROR,
                      message=f"{s.model.layers} layers do not divide into {s.pp} pipeline stages "
                              f"(vLLM {s.engine.version} requires an even split)",
                      fix="use a pipeline parallel size that divides the layer count")
    else:
        yield Finding(code="layers-not-divisible", severity=WARNING,
                      message=f"{s.model.layers} layers over {s.pp} stages split unevenly: "
                              f"{'/'.join(map(str, stages))} layers (the last stage is the bottleneck)",
                      fix="set env VLLM_PP_LAYER_PARTITION to balance stages, or use a pp that divides "
                          f"{s.model.layers}")


def pp_supported(s: Setup) -> Iterator[Finding]:
    if s.pp > 1 and not s.engine.pipeline_parallel:
        yield Finding(code="pp-unsupported", severity=ERROR,
                      message=f"vLLM {s.engine.version} does not implement pipeline parallelism "
                              f"(pipeline_parallel {s.pp} raises NotImplementedError)",
                      fix="set pipeline_parallel: 1 and tensor_parallel to the GPU count, "
                          "or use a profile with vLLM >= 0.6.3")


def enough_gpus(s: Setup) -> Iterator[Finding]:
    need = s.tp * s.pp
    if need > s.gpus:
        yield Finding(code="insufficient-gpus", severity=ERROR,
                      message=f"TP {s.tp} x PP {s.pp} needs {need} GPUs; the hosts used have {s.gpus}",
                      fix="lower tensor_parallel/pipeline_parallel or add hosts")
        return
    if s.pp > 1 and s.tp > min(h.gpus.count for h in s.hosts):
        yield Finding(code="insufficient-gpus", severity=ERROR,
                      message=f"each pipeline stage needs {s.tp} GPUs on one host; the smallest host has "
                              f"{min(h.gpus.count for h in s.hosts)}",
                      fix="use tensor_parallel <= GPUs per host when pipeline_parallel > 1")


def even_gpus(s: Setup) -> Iterator[Finding]:
    counts = {h.gpus.count for h in s.hosts}
    kinds = {(h.gpus.name, h.gpus.memory_mib) for h in s.hosts}
    if len(counts) > 1 or len(kinds) > 1:
        detail = ", ".join(f"{h.name}: {h.gpus.count} x {h.gpus.name or '?'} ({h.gpus.memory_mib} MiB)"
                           for h in s.hosts)
        yield Finding(code="uneven-gpus", severity=WARNING,
                      message=f"hosts differ in GPUs ({detail}); every shard is sized for the smallest GPU",
                      fix="use hosts with the same GPU model and count, or restrict with --hosts")


# ---------------------------------------------------------------- hardware vs image
def compute_capability(s: Setup) -> Iterator[Finding]:
    floor = max(_cc(s.engine.min_compute_capability), _cc(s.profile.min_compute_capability or "0.0"))
    low = [h for h in s.hosts if _cc(h.gpus.compute_capability) < floor]
    if low:
        names = ", ".join(f"{h.name} ({h.gpus.name or 'GPU'} cc {h.gpus.compute_capability})" for h in low)
        yield Finding(code="compute-capability", severity=ERROR,
                      message=f"{s.profile.image} (torch {s.engine.torch}, CUDA {s.engine.cuda}) needs compute "
                              f"capability >= {floor[0]}.{floor[1]}; {names} is below: \"The minimum cuda "
                              f"capability supported by this library is {floor[0]}.{floor[1]}\"",
                      fix="use a profile whose image supports these GPUs (vllm-v0.3.0 or vllm-v0.6.3 for sm_70)")


def bf16_supported(s: Setup) -> Iterator[Finding]:
    if not s.model:
        return
    from .memory import runtime_dtype
    dtype = runtime_dtype(str(s.args.get("dtype", "auto")), s.model.dtype)
    low = [h for h in s.hosts if _cc(h.gpus.compute_capability) < (8, 0)]
    if dtype == "bfloat16" and low:
        yield Finding(code="bf16-unsupported", severity=ERROR,
                      message=f"the model runs in bfloat16 but {low[0].name} has compute capability "
                              f"{low[0].gpus.compute_capability}: \"Bfloat16 is only supported on GPUs with "
                              "compute capability of at least 8.0\"",
                      fix="--set dtype=half (engine_args: {dtype: half})")


def driver_recent(s: Setup) -> Iterator[Finding]:
    if not s.profile.min_driver:
        return
    old = [h for h in s.hosts if h.gpus.driver and _ver(h.gpus.driver) < _ver(s.profile.min_driver)]
    if old:
        names = ", ".join(f"{h.name} ({h.gpus.driver})" for h in old)
        yield Finding(code="driver-too-old", severity=ERROR,
                      message=f"{s.profile.image} (CUDA {s.profile.cuda or s.engine.cuda}) needs NVIDIA driver >= "
                              f"{s.profile.min_driver}; {names} is older",
                      fix="upgrade the driver, or use a profile with an older CUDA")


# ---------------------------------------------------------------- memory
def memory_fits(s: Setup) -> Iterator[Finding]:
    m = s.memory()
    if m is None:
        return
    if m.weights + m.context > m.gpu_total:
        yield Finding(code="weights-exceed-memory", severity=ERROR,
                      message=f"weights need {_gib(m.weights)} per GPU (TP {s.tp} x PP {s.pp}) plus "
                              f"{_gib(m.context)} CUDA context; a GPU has {_gib(m.gpu_total)}: CUDA out of memory",
                      fix="use more GPUs (higher tensor_parallel / pipeline_parallel), a quantized model, "
                          "or a smaller model")
        return
    need = f"{m.max_model_len} tokens"
    if m.blocks == 0:
        yield Finding(code="kv-cache-insufficient", severity=ERROR,
                      message=f"no memory left for the KV cache: budget {_gib(m.budget)} "
                              f"({m.utilization:.0%} of {_gib(m.gpu_total)}) - weights {_gib(m.weights)} - "
                              f"profile peak {_gib(m.activations)} ({m.batched_tokens} tokens) - context "
                              f"{_gib(m.context)} - CUDA graphs {_gib(m.cuda_graphs)} <= 0: \"No available "
                              "memory for the cache blocks\" (# GPU blocks: 0)",
                      fix="use more GPUs, lower max-model-len / max-num-batched-tokens, set enforce-eager, "
                          "or raise gpu-memory-utilization")
    elif m.token_capacity < m.max_model_len:
        yield Finding(code="kv-cache-insufficient", severity=ERROR,
                      message=f"The model's max seq len ({m.max_model_len}) is larger than the maximum number "
                              f"of tokens that can be stored in KV cache ({m.token_capacity}: {m.blocks} blocks "
                              f"of {m.block_size})",
                      fix=f"--set max-model-len={max(m.block_size, m.token_capacity // 256 * 256)} or use more "
                          f"GPUs / raise gpu-memory-utilization; {need} do not fit")


# ---------------------------------------------------------------- engine version
def flags_supported(s: Setup) -> Iterator[Finding]:
    for name, value in s.args.items():
        if value is False:
            continue
        flag = s.engine.flag(name)
        if flag is None:
            yield Finding(code="unsupported-flag", severity=ERROR,
                          message=f"vLLM {s.engine.version} has no --{name} (\"unrecognized arguments: --{name}\")",
                          fix=f"remove {name} from engine_args, or use a profile whose vLLM has it")
        elif flag.choices and not isinstance(value, (bool, list)) and str(value) not in map(str, flag.choices):
            yield Finding(code="unsupported-flag", severity=ERROR,
                          message=f"vLLM {s.engine.version}: --{name} {value} is not one of "
                                  f"{', '.join(map(str, flag.choices))}",
                          fix=f"set {name} to one of: {', '.join(map(str, flag.choices))}")
        elif value is not True and not flag.value:
            yield Finding(code="unsupported-flag", severity=ERROR,
                          message=f"--{name} is a bare switch in vLLM {s.engine.version}; got a value ({value!r})",
                          fix=f"set {name}: true (or false to leave it out)")
        elif value is True and flag.value and not flag.bare_ok:
            yield Finding(code="unsupported-flag", severity=ERROR,
                          message=f"--{name} takes a value in vLLM {s.engine.version}, got a bare flag (true)",
                          fix=f"give {name} a value")


def batched_tokens_cover_len(s: Setup) -> Iterator[Finding]:
    m = s.memory()
    over = s.engine.chunked_prefill_over
    chunked = s.args.get("enable-chunked-prefill") is True or (over is not None and m and m.max_model_len > over)
    if m and not chunked and m.batched_tokens < m.max_model_len:
        yield Finding(code="batched-tokens-too-small", severity=ERROR,
                      message=f"max_num_batched_tokens ({m.batched_tokens}) is smaller than max_model_len "
                              f"({m.max_model_len}): vLLM {s.engine.version} refuses to start",
                      fix=f"--set max-num-batched-tokens={m.max_model_len} or lower max-model-len")


def arch_supported(s: Setup) -> Iterator[Finding]:
    if s.model and s.engine.architectures and s.model.architecture not in s.engine.architectures:
        tf = s.engine.requires.get("transformers", "?")
        yield Finding(code="arch-unsupported", severity=ERROR,
                      message=f"vLLM {s.engine.version} (transformers {tf}) does not support {s.model.architecture} "
                              f"(model type `{s.model.model_type}` is not recognized)",
                      fix="use a profile with a newer vLLM that lists this architecture, or another model")


def host_ip_honoured(s: Setup) -> Iterator[Finding]:
    if len(s.hosts) > 1 and not s.engine.honours_host_ip:
        yield Finding(code="host-ip-ignored", severity=WARNING,
                      message=f"vLLM {s.engine.version} ignores VLLM_HOST_IP and takes each node's IP from the "
                              "route to 8.8.8.8: every host needs a default route through the NIC of its "
                              "inventory address",
                      fix="check `ip route get 8.8.8.8` on each host shows its inventory address (probe does), "
                          "or use vLLM >= 0.6.3")


def port_env_valid(s: Setup) -> Iterator[Finding]:
    for key in ("VLLM_PORT", "VLLM_RPC_PORT"):
        value = s.env.get(key)
        if value is not None and not str(value).isdigit():
            yield Finding(code="port-env-invalid", severity=ERROR,
                          message=f"env {key}={value!r} is not an integer (a Kubernetes-style "
                                  f"service variable?): vLLM fails with \"invalid literal for int()\"",
                          fix=f"remove {key} from env or set it to a port number")


ALL: tuple[Callable[[Setup], Iterator[Finding]], ...] = (
    enough_gpus, pp_supported, heads_divisible, kv_heads_divisible, vocab_divisible, layers_divisible,
    even_gpus, compute_capability, driver_recent, bf16_supported, arch_supported, flags_supported,
    port_env_valid, host_ip_honoured, memory_fits, batched_tokens_cover_len,
)


def run_all(s: Setup) -> list[Finding]:
    return [f for check in ALL for f in check(s)]
