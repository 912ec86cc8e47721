"""PURE: compatibility rules. Each check takes a Setup and yields Findings with a fix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .config import Host, Inventory, Profile
from .knowledge import EngineFacts
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
    facts: EngineFacts
    model: ModelFacts | None
    hosts: tuple[Host, ...]          # the hosts this deployment uses, head first
    tp: int
    pp: int
    args: dict[str, Any]             # effective engine args (profile < inventory < --set), dashed names
    env: dict[str, str]              # effective container env (profile < inventory)
    engine_checks: tuple = ()        # the engine plugin's own rules

    @property
    def cpu(self) -> bool:
        return self.profile.device == "cpu"

    def slots(self, host: Host) -> int:
        """Ranks a host can run: its GPUs, or one on a CPU host."""
        return 1 if self.cpu else host.gpus.count

    @property
    def gpus(self) -> int:
        return sum(self.slots(h) for h in self.hosts)

    def memory(self) -> Memory | None:
        if self.model is None or self.cpu:      # the GPU memory model; a CPU host's RAM is checked once probed
            return None
        own = _engine_attr(self.profile.engine, "memory")
        if own is not None:                     # an engine that budgets memory its own way (SGLang's static pool)
            return own(self)
        # V1 runs where it is the default, except that releases still carrying V0 (batched rule of V0) fall
        # back to it below compute capability 8.0.
        v0_fallback = self.facts.batched_tokens_default != "v1-server" and \
            min(capability(h.gpus.compute_capability) for h in self.hosts) < (8, 0)
        return estimate(model=self.model, tp=self.tp, pp=self.pp, gpu_mib=min(h.gpus.memory_mib for h in self.hosts),
                        args=self.args, batched_rule=self.facts.batched_tokens_default,
                        generation="v1" if self.facts.v1 and not v0_fallback else "v0",
                        version=self.facts.version, chunked_prefill_over=self.facts.chunked_prefill_over)


def _engine_attr(engine: str, attr: str):
    """An optional member of an engine plugin (`memory`, `capability_quote`); None where it has none."""
    from . import engines
    from .errors import GpuclusterError
    try:
        return getattr(engines.get(engine), attr, None)
    except GpuclusterError:
        return None


def capability(text: str) -> tuple[int, int]:
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






def enough_gpus(s: Setup) -> Iterator[Finding]:
    need = s.tp * s.pp
    if need > s.gpus:
        yield Finding(code="insufficient-gpus", severity=ERROR,
                      message=f"TP {s.tp} x PP {s.pp} needs {need} GPUs; the hosts used have {s.gpus}",
                      fix="lower tensor_parallel/pipeline_parallel or add hosts")
        return
    if s.pp > 1 and s.tp > min(s.slots(h) for h in s.hosts) and not s.cpu:
        yield Finding(code="insufficient-gpus", severity=ERROR,
                      message=f"each pipeline stage needs {s.tp} GPUs on one host; the smallest host has "
                              f"{min(s.slots(h) for h in s.hosts)}",
                      fix="use tensor_parallel <= GPUs per host when pipeline_parallel > 1")


def even_gpus(s: Setup) -> Iterator[Finding]:
    if s.cpu:
        return
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
    if s.cpu:
        return
    floor = capability(s.facts.min_compute_capability)
    low = [h for h in s.hosts if capability(h.gpus.compute_capability) < floor]
    if low:
        names = ", ".join(f"{h.name} ({h.gpus.name or 'GPU'} cc {h.gpus.compute_capability})" for h in low)
        quote = _engine_attr(s.profile.engine, "capability_quote")
        said = quote(s.facts) if quote else \
            f"The minimum cuda capability supported by this library is {floor[0]}.{floor[1]}"
        yield Finding(code="compute-capability", severity=ERROR,
                      message=f"{s.profile.image} (torch {s.facts.torch}, CUDA {s.facts.cuda}) needs compute "
                              f"capability >= {floor[0]}.{floor[1]}; {names} is below: \"{said}\"",
                      fix=_profiles_for(s.profile.engine, min(capability(h.gpus.compute_capability) for h in low)))


def _profiles_for(engine: str, cc: tuple[int, int], arch: str | None = None) -> str:
    """The fix for a capability/architecture finding: shipped profiles whose image runs on `cc` (and knows
    `arch`), else the newest official images that do; never a release that cannot run on these GPUs."""
    from . import config, engines, knowledge
    from .knowledge import curated
    key = engines.get(engine).knowledge

    def fits(version: str, of: str = engine) -> bool:
        facts = engines.get(of).facts(version)
        return facts.runs_on(cc) and (arch is None or not facts.architectures or arch in facts.architectures)
    ok, other = [], []     # this engine's profiles that run here; other engines' (when none of this one's can)
    for name in config.available_profiles():
        try:
            p = config.load_profile(name)
            if fits(p.version, p.engine):
                (ok if p.engine == engine else other).append(name)
        except Exception:  # noqa: BLE001 - a broken profile is simply not suggested
            continue
    where = f"compute capability {cc[0]}.{cc[1]}" + (f" and knows {arch}" if arch else "")
    if ok:
        return f"use a profile whose image runs on {where}: {', '.join(ok)}"
    images = []
    for v in reversed(knowledge.known_versions(key)):
        if curated.runs_on(list(curated.image(v).get("torch_arch", [])), cc) and fits(v):
            images.append(f"vllm/vllm-openai:v{v}")
            if len(images) == 3:
                break
    if images:
        return f"no shipped profile runs on {where}; use a profile with `image: {images[0]}` (newest that does; " \
               f"also {', '.join(images[1:]) or 'none older checked'})"
    if other:              # e.g. no SGLang release runs below cc 7.5
        return f"no {engine} release runs on {where}; use a profile of another engine that does: {', '.join(other)}"
    return f"no known release runs on {where}"


def driver_recent(s: Setup) -> Iterator[Finding]:
    if s.cpu:
        return
    old = [h for h in s.hosts if h.gpus.driver and _ver(h.gpus.driver) < _ver(s.facts.min_driver)]
    if old:
        names = ", ".join(f"{h.name} ({h.gpus.driver})" for h in old)
        yield Finding(code="driver-too-old", severity=ERROR,
                      message=f"{s.profile.image} (CUDA {s.facts.cuda}) needs NVIDIA driver >= "
                              f"{s.facts.min_driver}; {names} is older",
                      fix="upgrade the driver, or use a profile with an older CUDA")


# ---------------------------------------------------------------- memory
def memory_fits(s: Setup) -> Iterator[Finding]:
    if _engine_attr(s.profile.engine, "memory") is not None:     # that engine checks its own memory model
        return
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


# ---------------------------------------------------------------- model code
def remote_code(s: Setup) -> Iterator[Finding]:
    """A repository with its own modelling code (config.json `auto_map`) loads only with --trust-remote-code
    when the engine does not know the architecture (it may need it anyway when transformers lacks the type)."""
    m = s.model
    if m is None or not m.remote_code or s.args.get("trust-remote-code") is True:
        return
    known = not s.facts.architectures or m.architecture in s.facts.architectures
    yield Finding(code="trust-remote-code", severity=WARNING if known else ERROR,
                  message=f"{m.id} ships its own modelling code (config.json auto_map): " + (
                      f"vLLM {s.facts.version} has {m.architecture} built in, but reading its config may still "
                      "need the repository's code" if known else
                      f"vLLM {s.facts.version} does not know {m.architecture}; it loads only with the "
                      "repository's code (\"requires you to execute the configuration file\")"),
                  fix="--set trust-remote-code=true (engine_args: {trust-remote-code: true}) runs the repository's "
                      "Python code on every host: review it first")


COMMON: tuple[Callable[[Setup], Iterator[Finding]], ...] = (
    enough_gpus, heads_divisible, kv_heads_divisible, vocab_divisible, even_gpus, compute_capability,
    driver_recent, memory_fits, remote_code,
)


def run_all(s: Setup) -> list[Finding]:
    """The common rules, then the engine's own."""
    return [f for check in (*COMMON, *s.engine_checks) for f in check(s)]
