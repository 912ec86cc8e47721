"""PURE (reads shipped profiles and knowledge only): deployments that pass every check for these hosts and model.

Candidates are the shipped profiles plus the newest release of every vLLM minor series (as a bare image
profile); for each, the fewest GPUs that pass, with the engine args that make it pass (dtype half below
cc 8.0, enforce-eager and a max-model-len that fits the KV cache, ...). Ranked newest engine first, then
fewest GPUs. `auto` turns the first into the (inventory, profile) that `plan` and `up` use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from . import checks, config, engines
from .checks import ERROR, Setup
from .config import Inventory, Profile
from .errors import GpuclusterError
from .knowledge.curated import version_key
from .models import ModelFacts

MIN_MODEL_LEN = 1024          # below this an alternative is not worth proposing
MAX_FIX_ROUNDS = 6
IMAGE_REPO = {"vllm": "vllm/vllm-openai", "sglang": "lmsysorg/sglang", "ollama": "ollama/ollama"}   # also the
# engines searched, in order (Ollama last: a GGUF in place of the model asked for)
LABEL = {"vllm": "vLLM", "vllm-mp": "vLLM", "sglang": "SGLang", "ollama": "Ollama"}


@dataclass(frozen=True, kw_only=True)
class Alternative:
    profile: Profile
    shipped: bool                 # profile is a file under profiles/ (else: a bare image)
    tp: int
    pp: int
    engine_args: dict[str, Any]   # what deploy.engine_args must hold (the inventory's, plus the fixes)
    verdict: str
    why: str
    model: str | None = None      # the model it deploys in place of deploy.model (Ollama: a GGUF of it)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def as_dict(self) -> dict:
        out = {"profile": self.profile.name if self.shipped else None, "image": self.profile.image,
               "engine": self.profile.engine, "version": self.profile.version, "tensor_parallel": self.tp,
               "pipeline_parallel": self.pp, "engine_args": dict(self.engine_args), "verdict": self.verdict,
               "why": self.why}
        return {**out, "model": self.model} if self.model else out


class NoAlternative(GpuclusterError):
    """No known engine release passes every check for these hosts and this model."""


# ---------------------------------------------------------------- candidates
def _shipped(engine: str) -> list[Profile]:
    out = []
    for name in config.available_profiles():
        try:
            p = config.load_profile(name)
        except GpuclusterError:
            continue   # a broken profile is simply not proposed
        if p.engine == engine:
            out.append(p)
    return out


def image_profile(engine: str, version: str, template: Profile | None) -> Profile:
    """A profile that is just the official image of `version` (mirrors, docker and env from `template`)."""
    base = {"registry_mirrors": list(template.registry_mirrors), "docker": template.docker,
            "env": dict(template.env)} if template else {}
    image = engines.get(engine).image(version) or f"{IMAGE_REPO.get(engine, engine)}:v{version}"
    return Profile(name=f"{engine}-v{version}", engine=engine, version=version, image=image, **base)


def candidates(engine: str = "vllm") -> list[tuple[Profile, bool]]:
    """(profile, shipped) newest first: shipped profiles and the newest release of each minor series."""
    shipped = {p.version: p for p in sorted(_shipped(engine), key=lambda p: p.name)}
    newest: dict[tuple[str, ...], str] = {}
    for v in engines.get(engine).versions():
        newest[tuple(v.split(".")[:2])] = v
    out = []
    for v in sorted(set(newest.values()) | set(shipped), key=version_key, reverse=True):
        if v in shipped:
            out.append((shipped[v], True))
            continue
        near = min(shipped.values(), key=lambda p: abs(_num(p.version) - _num(v)), default=None)
        out.append((image_profile(engine, v, near), False))
    return out


def _num(version: str) -> float:
    k = version_key(version)
    return k[0] * 1e6 + k[1] * 1e3 + k[2]


# ---------------------------------------------------------------- evaluation
def _layouts(hosts, facts, tp: int | None, pp: int | None) -> list[tuple[int, int]]:
    """TP x PP candidates, fewest GPUs first (the planner's usual layout: TP = GPUs per host when PP > 1)."""
    total = sum(h.gpus.count for h in hosts)
    per_node = min(h.gpus.count for h in hosts)
    pps = [pp] if pp else (range(1, len(hosts) + 1) if facts.pipeline_parallel else [1])
    out = []
    for p in pps:
        for t in ([tp] if tp else range(1, total // p + 1)):
            if p > 1 and not tp and t != per_node:
                continue
            out.append((t * p, t > per_node, p, t))
    return [(t, p) for _, _, p, t in sorted(out)]


def _fixes(s: Setup, errors: list[checks.Finding]) -> dict[str, Any] | None:
    """Engine args that may clear these errors, or None when only another layout or release can."""
    codes = {f.code for f in errors}
    fix: dict[str, Any] = {}
    if "bf16-unsupported" in codes:
        fix["dtype"] = "half"
    if "batched-tokens-too-small" in codes and s.memory():
        fix["max-num-batched-tokens"] = s.memory().max_model_len
    if "kv-cache-insufficient" in codes:
        m = s.memory()
        if s.args.get("enforce-eager") is not True and s.facts.flag("enforce-eager"):
            fix["enforce-eager"] = True
        elif m.token_capacity >= MIN_MODEL_LEN:
            fix["max-model-len"] = m.token_capacity // 256 * 256
        elif m.max_model_len > MIN_MODEL_LEN:
            fix["max-model-len"] = max(MIN_MODEL_LEN, m.max_model_len // 2 // 256 * 256)
        else:
            return None
    if codes - {"bf16-unsupported", "batched-tokens-too-small", "kv-cache-insufficient"} or not fix:
        return None
    return fix


def evaluate(inv: Inventory, prof: Profile, model: ModelFacts | None, *, sets: dict[str, Any] | None = None,
             tp: int | None = None, pp: int | None = None) -> tuple[Setup, list[checks.Finding], dict] | None:
    """The fewest-GPU layout of `prof` that passes every check (with the args added to pass), or None."""
    from .plan import _setup, effective_args
    engine = engines.get(prof.engine)
    facts = engine.facts(prof.version)
    hosts = [inv.head] + [h for h in inv.hosts if h is not inv.head]
    low = min((checks.capability(h.gpus.compute_capability) for h in hosts))
    if not facts.runs_on(low) or (model and facts.architectures and model.architecture not in facts.architectures):
        return None
    env = {**prof.env, **inv.deploy.env}
    for t, p in _layouts(hosts, facts, tp, pp):
        added: dict[str, Any] = {}
        for _ in range(MAX_FIX_ROUNDS):
            args = effective_args(prof, inv, {**(sets or {}), **added})
            base = Setup(inventory=inv, profile=prof, facts=facts, model=model, hosts=tuple(hosts), tp=1, pp=1,
                         args=args, env=env, engine_checks=tuple(engine.checks()))
            s = _setup(base, hosts, t, p)
            findings = checks.run_all(s)
            errors = [f for f in findings if f.severity == ERROR]
            if not errors:
                return s, findings, added
            fix = _fixes(s, errors)
            if fix is None or all(added.get(k) == v for k, v in fix.items()):
                break
            added.update(fix)
    return None


def _why(prof: Profile, s: Setup, findings, added: dict, cc: str) -> str:
    f = s.facts
    arch = "CUDA runners' arch list" if prof.engine == "ollama" else "torch arch list"
    seen = "confirmed" if f.image_confirmed else f"inferred from the image's {arch}, not yet run here"
    name = LABEL.get(prof.engine, prof.engine)
    parts = [f"{name} {f.version} ({f.released}, torch {f.torch}, CUDA {f.cuda}) runs on cc {cc} ({seen}) and "
             f"knows {s.model.architecture}" if s.model else f"{name} {f.version} runs on cc {cc} ({seen})",
             f"TP {s.tp} x PP {s.pp} on {len(s.hosts)} host(s)"]
    reasons = {"dtype": "bf16 needs cc >= 8.0", "enforce-eager": "no CUDA graph memory",
               "max-model-len": "fits the KV cache", "max-num-batched-tokens": "covers max-model-len"}
    parts += [f"{k} {v} ({reasons.get(k, 'needed')})" for k, v in added.items()]
    parts += [f"warning {x.code}" for x in findings]
    return "; ".join(parts)


def _adapted(inv: Inventory, prof: Profile, model: ModelFacts | None):
    """(inventory, model facts, the model deployed instead or None) as this engine would serve the request, or
    None where it cannot: an engine may serve another form of the model (Ollama: a GGUF); an Ollama name or GGUF
    is served by Ollama only."""
    return engines.get(prof.engine).adapt(inv, model)


def search(inv: Inventory, model: ModelFacts | None, *, sets: dict[str, Any] | None = None, engine: str = "vllm",
           tp: int | None = None, pp: int | None = None, limit: int = 8) -> list[Alternative]:
    """Up to `limit` alternatives that pass every check: `engine`'s, then the other engines' (SGLang only where
    every GPU has compute capability >= 7.5); newest release first, then fewest GPUs."""
    if any(h.gpus is None for h in inv.hosts):    # CPU hosts: the alternatives are GPU images
        return []
    cc = min((h.gpus.compute_capability for h in inv.hosts), key=checks.capability)
    # "SGLang only supports sm75 and above." (every release's floor, cluster/knowledge/sglang)
    order = [e for e in dict.fromkeys([engine, *IMAGE_REPO]) if e != "sglang" or checks.capability(cc) >= (7, 5)]
    found = []
    for prof, shipped in (c for e in order for c in candidates(e)):
        adapted = _adapted(inv, prof, model)
        if adapted is None:
            continue
        inv2, model2, instead = adapted
        got = evaluate(inv2, prof, model2, sets=sets if inv2 is inv else None, tp=tp, pp=pp)
        if got is None:
            continue
        s, findings, added = got
        args = {**{config.flag_name(k): v for k, v in inv2.deploy.engine_args.items()}, **added}
        why = _why(prof, s, findings, added, cc)
        if instead:
            why = f"serves {instead} ({model2.dtype} GGUF, {model2.weight_bytes / 1e9:.1f} GB) in place of " \
                  f"{inv.deploy.model}: --model {instead}; {why}"
        found.append(Alternative(profile=prof, shipped=shipped, tp=s.tp, pp=s.pp, engine_args=args,
                                 verdict="warn" if findings else "ok", why=why, model=instead))
        if len(found) >= limit:
            break
    return sorted(found, key=lambda a: (order.index(a.profile.engine),
                                        tuple(-x for x in version_key(a.profile.version)), a.gpus))


def auto(inv: Inventory, model: ModelFacts | None) -> tuple[Inventory, Profile, Alternative]:
    """`--profile auto` / no deploy.profile: the first alternative, as the inventory and profile to plan with."""
    found = search(inv, model, limit=1)
    if not found:
        raise NoAlternative(f"no known engine release passes every check for {inv.deploy.model} on these hosts "
                            "(compute capability, architecture, memory); run `gpucluster plan` with a profile "
                            "for the findings")
    a = found[0]
    deploy = dataclasses.replace(inv.deploy, profile=a.profile.name, tensor_parallel=a.tp, pipeline_parallel=a.pp,
                                 engine_args=dict(a.engine_args), model=a.model or inv.deploy.model)
    return dataclasses.replace(inv, deploy=deploy), a.profile, a
