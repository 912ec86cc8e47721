"""Ollama on one host, every GPU of it (OLLAMA_SCHED_SPREAD=1): one container running `ollama serve`, the model
pulled through Ollama's own API (/api/pull, its progress shown), readiness by /api/tags then one
/v1/chat/completions, and /api/ps read after the load: Ollama puts layers on the CPU without a word when the GPUs
are short, so a model not fully in GPU memory is reported.

Models: an Ollama library name (qwen3:32b) or a hub GGUF (modelscope.cn/ORG/REPO:QUANT, hf.co/ORG/REPO:QUANT);
facts in cluster/gguf.py. Image facts and server defaults: cluster/knowledge/ollama/curated.yaml."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterator

from .. import gguf
from ..checks import ERROR, WARNING, Finding, Setup, capability
from ..config import Secret
from ..containers import ContainerSpec, container_step, secrets_digest, secrets_put, split_env, with_secrets
from ..errors import ConfigError
from ..knowledge import ollama as knowledge
from ..knowledge.curated import version_key
from ..memory import GIB, MIB, Memory
from ..steps import Check, Cmd, Http, Step
from . import EngineBase, LogSource

MANAGED = {"OLLAMA_HOST": "deploy.port (gpucluster sets OLLAMA_HOST=0.0.0.0:<port>)",
           "OLLAMA_MODELS": "cluster.model_dir (gpucluster sets OLLAMA_MODELS=<model_dir>/ollama)"}
DURATION = re.compile(r"^-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")      # Go's time.ParseDuration, a unit required
KV_TYPES = ("f16", "q8_0", "q4_0")
GO_TRUE, GO_FALSE = ("1", "t", "T", "TRUE", "true", "True"), ("0", "f", "F", "FALSE", "false", "False")  # ParseBool
# A hub GGUF pulled through a mirror: Ollama names a registry by host[:port] only (types/model ParseName), so the
# mirror's endpoint must be a bare origin; http:// needs the pull's "insecure": true (server/images.go).
MIRROR = re.compile(r"^(https?)://([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::\d{1,5})?)/?$")
MIN_CONTEXT = 2048

# Read-only check of the pull: both names listed with the same ID (the served name is an alias made by `ollama cp`).
# Fixed text; the names arrive as "$0" and "$1".
HAVE_SCRIPT = (
    'ids=$(ollama list 2>/dev/null) || exit 0; '
    'a=$(printf "%s\\n" "$ids" | awk -v n="$0" \'NR > 1 && tolower($1) == tolower(n) {print $2}\'); '
    'b=$(printf "%s\\n" "$ids" | awk -v n="$1" \'NR > 1 && tolower($1) == tolower(n) {print $2}\'); '
    'if [ -n "$a" ] && [ "$a" = "$b" ]; then echo "skip present: $0 ($a)"; else echo "run not pulled yet"; fi')

# POST /api/pull over bash's /dev/tcp (the image has no curl), its NDJSON progress turned into the delivery agent's
# event lines, which `up` shows as progress (bytes, rate, ETA). $1: the model, $2: the port, $3: "true" for an
# http:// registry (Ollama's "insecure"), "false" or absent otherwise.
PULL_SCRIPT = r'''set -u
exec 3<>"/dev/tcp/127.0.0.1/$2" || { printf '{"ev":"error","msg":"cannot reach Ollama on port %s"}\n' "$2"; exit 1; }
body=$(printf '{"model":"%s","insecure":%s,"stream":true}' "$1" "${3:-false}")
printf 'POST /api/pull HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n%s' "${#body}" "$body" >&3
IFS= read -r first <&3 || first=
first=${first%$'\r'}
while IFS= read -r line <&3; do [ -z "${line%$'\r'}" ] && break; done
case $first in
  "HTTP/1."?" 200"*) ;;
  *) rest=$(head -c 300 <&3 | tr -d '"\\\r\n')
     printf '{"ev":"error","msg":"Ollama answered %s: %s"}\n' "$(printf %s "$first" | tr -d '"\\')" "$rest"; exit 1 ;;
esac
ok=0 digest= last=-1 big=0
while IFS= read -r line <&3 || [ -n "$line" ]; do
  if [[ $line =~ \"error\":[[:space:]]*\"([^\"]*)\" ]]; then
    printf '{"ev":"error","msg":"ollama pull %s: %s"}\n' "$1" "${BASH_REMATCH[1]}"; exit 1
  fi
  st=
  [[ $line =~ \"status\":[[:space:]]*\"([^\"]*)\" ]] && st=${BASH_REMATCH[1]}
  if [[ $line =~ \"total\":[[:space:]]*([0-9]+) ]]; then
    total=${BASH_REMATCH[1]} got=0 d=
    [ "$total" -ge 1048576 ] || continue
    [[ $line =~ \"completed\":[[:space:]]*([0-9]+) ]] && got=${BASH_REMATCH[1]}
    [[ $line =~ \"digest\":[[:space:]]*\"([^\"]*)\" ]] && d=${BASH_REMATCH[1]}
    if [ "$d" != "$digest" ]; then
      digest=$d last=-1 big=$total
      printf '{"ev":"plan","need":["%s"],"files":1,"bytes":%s}\n' "${d#sha256:}" "$total"
    fi
    pct=$(( got * 100 / total ))
    if [ "$pct" != "$last" ]; then last=$pct; printf '{"ev":"progress","done":%s}\n' "$got"; fi
  elif [ -n "$st" ]; then
    printf '{"ev":"note","msg":"%s"}\n' "$st"
    [ "$st" = success ] && ok=1
  fi
done
[ "$ok" = 1 ] || { printf '{"ev":"error","msg":"the pull of %s ended without success"}\n' "$1"; exit 1; }
printf '{"ev":"done","bytes":%s,"summary":"pulled %s"}\n' "$big" "$1"
'''

# GET /api/ps: is the model fully in GPU memory (size_vram == size)? A warning line otherwise; exit 0 either way.
# $1: the served name as listed, $2: the port.
PS_SCRIPT = r'''set -u
exec 3<>"/dev/tcp/127.0.0.1/$2" || { printf '{"ev":"error","msg":"cannot reach Ollama on port %s"}\n' "$2"; exit 1; }
printf 'GET /api/ps HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
body=$(cat <&3)
body=${body#*$'\r\n\r\n'}
shopt -s nocasematch
rest=$body found=
while [[ $rest =~ \{\"name\":[[:space:]]*\"([^\"]*)\"(.*) ]]; do
  name=${BASH_REMATCH[1]} rest=${BASH_REMATCH[2]}
  if [[ $name == "$1" ]]; then found=${rest%%\{\"name\":*}; break; fi
done
if [ -z "$found" ]; then
  printf '{"ev":"note","msg":"WARNING: %s is not loaded (not in /api/ps)"}\n' "$1"
  printf '{"ev":"done","summary":"WARNING: %s is not loaded"}\n' "$1"; exit 0
fi
size=0 vram=0 ctx=?
[[ $found =~ \"size\":[[:space:]]*([0-9]+) ]] && size=${BASH_REMATCH[1]}
[[ $found =~ \"size_vram\":[[:space:]]*([0-9]+) ]] && vram=${BASH_REMATCH[1]}
[[ $found =~ \"context_length\":[[:space:]]*([0-9]+) ]] && ctx=${BASH_REMATCH[1]}
if [ "$size" -gt 0 ] && [ "$vram" -ge "$size" ]; then
  printf '{"ev":"note","msg":"%s: 100%% in GPU memory (%s MiB, context %s)"}\n' "$1" "$(( size / 1048576 ))" "$ctx"
  printf '{"ev":"done","summary":"%s fully in GPU memory"}\n' "$1"
else
  cpu=$(( size > 0 ? (size - vram) * 100 / size : 100 ))
  printf '{"ev":"note","msg":"WARNING: %s runs %s%% on the CPU: %s of %s MiB in GPU memory (context %s); Ollama offloads layers silently: lower OLLAMA_CONTEXT_LENGTH, use a smaller quantization, or check the driver and the GPUs the container sees"}\n' "$1" "$cpu" "$(( vram / 1048576 ))" "$(( size / 1048576 ))" "$ctx"
  printf '{"ev":"done","summary":"WARNING: %s%% of %s on the CPU"}\n' "$cpu" "$1"
fi
'''


# ---------------------------------------------------------------- the environment and its rules
def _env(s: Setup) -> dict:
    """The engine's environment before gpucluster's own values: profile < inventory < the host's."""
    return {**s.env, **(s.hosts[0].env if s.hosts else {})}


def _plain(env: dict, key: str) -> str | None:
    """The value as Ollama reads it: envconfig.Var() trims spaces, then quotes."""
    v = env.get(key)
    return v.strip().strip("\"'") if isinstance(v, str) and not isinstance(v, Secret) else None


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() and int(text) > 0 else None


def env_valid(s: Setup) -> Iterator[Finding]:
    env = _env(s)
    strict = knowledge.env()["bool_strict"]
    for key in strict:
        v = _plain(env, key)
        if v is not None and v not in GO_TRUE + GO_FALSE:
            yield Finding(code="env-invalid", severity=ERROR,
                          message=f"env {key}={v!r}: Ollama reads any value Go's strconv.ParseBool cannot parse as "
                                  "true ('off', 'no' and 'yes' all turn it on)",
                          fix=f"set {key} to \"1\" or \"0\" (or true / false)")
    v = _plain(env, "OLLAMA_KEEP_ALIVE")
    if v is not None and not DURATION.match(v):
        yield Finding(code="env-invalid", severity=ERROR,
                      message=f"env OLLAMA_KEEP_ALIVE={v!r}: give it a unit (Ollama reads a bare number as seconds)",
                      fix="e.g. \"24h\", \"30m\", or \"-1m\" to keep the model loaded (gpucluster's default)")
    for key in ("OLLAMA_CONTEXT_LENGTH", "OLLAMA_NUM_PARALLEL"):
        v = _plain(env, key)
        if v is not None and _int(v) is None and not (key == "OLLAMA_CONTEXT_LENGTH" and v == "0"):
            yield Finding(code="env-invalid", severity=ERROR,
                          message=f"env {key}={v!r} is not a positive integer (Ollama would ignore it)",
                          fix=f"set {key} to a number of tokens" if "CONTEXT" in key else f"set {key} to e.g. \"1\"")
    v = _plain(env, "OLLAMA_KV_CACHE_TYPE")
    if v is not None and v.lower() not in KV_TYPES:
        yield Finding(code="env-invalid", severity=ERROR, message=f"env OLLAMA_KV_CACHE_TYPE={v!r} is not one of "
                      f"{', '.join(KV_TYPES)}", fix="use f16 (the default), q8_0 or q4_0")


def one_host(s: Setup) -> Iterator[Finding]:
    if len(s.hosts) > 1:
        yield Finding(code="ollama-one-host", severity=ERROR,
                      message=f"Ollama serves from one host; this layout uses {len(s.hosts)}",
                      fix="pick one host with --hosts NAME, or use engine vllm / sglang to span hosts")
    elif s.tp != 1 or s.pp != 1:
        yield Finding(code="ollama-no-parallelism", severity=ERROR,
                      message=f"Ollama has no tensor or pipeline parallelism (TP {s.tp} x PP {s.pp} asked): it "
                              "spreads the layers over every GPU of the host (OLLAMA_SCHED_SPREAD=1)",
                      fix="leave out tensor_parallel / pipeline_parallel (--tp / --pp), or set them to 1")


# ---------------------------------------------------------------- memory
def num_parallel(s: Setup) -> int:
    return _int(_plain(_env(s), "OLLAMA_NUM_PARALLEL")) or 1


def flash_attention(s: Setup) -> bool:
    """Whether this release runs the model with flash attention (OLLAMA_FLASH_ATTENTION decides when set)."""
    v = _plain(_env(s), "OLLAMA_FLASH_ATTENTION")
    if v in GO_TRUE + GO_FALSE:
        return v in GO_TRUE
    rule = knowledge.rules(s.facts.version).get("flash_attention") or {}
    if rule.get("default") == "auto":
        ccs = [capability(h.gpus.compute_capability) for h in s.hosts if h.gpus]
        return bool(ccs) and all(cc >= capability(str(rule.get("min_cc", "7.0"))) and cc != (7, 2) for cc in ccs)
    return bool(s.model and s.model.model_type.lower() in rule.get("on_for", ()))


def kv_bytes(s: Setup) -> float:
    """Bytes per KV element: f16, or OLLAMA_KV_CACHE_TYPE's (taken only with flash attention)."""
    kind = (_plain(_env(s), "OLLAMA_KV_CACHE_TYPE") or "f16").lower()
    table = knowledge.memory()["kv_bytes"]
    return float(table.get(kind, 2)) if flash_attention(s) else 2.0


def default_context(s: Setup) -> int:
    """Ollama's num_ctx when OLLAMA_CONTEXT_LENGTH is unset (by release; from 0.15.5 by the host's total VRAM)."""
    rule = knowledge.rules(s.facts.version)["context_default"]
    if rule != "vram-tiers":
        return int(rule)
    m, host = knowledge.memory(), s.hosts[0]
    total = host.gpus.count * host.gpus.memory_mib / 1024 if host.gpus else 0
    return next((c for bound, c in zip(m["vram_tiers_gib"], m["vram_tier_context"]) if total < bound),
                m["vram_tier_context"][-1])


def _budget(s: Setup, ctx: int) -> dict:
    """Per-GPU bytes with the layers spread over every GPU of the host, for `ctx` tokens per sequence."""
    m, model, host = knowledge.memory(), s.model, s.hosts[0]
    n, gpu = host.gpus.count, host.gpus.memory_mib * MIB
    tokens = ctx * num_parallel(s)
    per_token = 2 * model.layers * model.kv_heads * model.head_dim * kv_bytes(s)
    batch = int(m["batch"])
    graph = 4 * batch * (model.hidden + model.vocab)
    if not flash_attention(s):
        graph += 8 * batch * tokens * model.heads
    fixed = int(m["cuda_minimum_mib"]) * MIB
    layer = model.weight_bytes / model.layers
    weights = model.weight_bytes / n
    free = gpu - weights - graph - fixed - layer
    capacity = int(max(0, free) * n // per_token)
    return {"n": n, "gpu": gpu, "weights": weights, "graph": graph, "fixed": fixed, "layer": layer, "free": free,
            "per_token": per_token, "capacity": capacity, "tokens": tokens, "batch": batch}


def context_length(s: Setup) -> tuple[int, str]:
    """(OLLAMA_CONTEXT_LENGTH gpucluster sets, why): the user's; else the release's default, capped at the
    model's trained context, lowered to what fits in GPU memory (multiples of 1024, at least 2048)."""
    user = _int(_plain(_env(s), "OLLAMA_CONTEXT_LENGTH"))
    if user is not None:
        return user, "set"
    default = default_context(s)
    if s.model is None or s.cpu:
        return default, "default"
    want = min(default, s.model.max_positions)
    if _fits(s, want):
        return want, "default"
    lo, hi = MIN_CONTEXT // 1024, want // 1024       # the largest multiple of 1024 that fits
    if not _fits(s, lo * 1024):
        return MIN_CONTEXT, "lowered"
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _fits(s, mid * 1024) else (lo, mid - 1)
    return lo * 1024, "lowered"


def _fits(s: Setup, ctx: int) -> bool:
    b = _budget(s, ctx)
    return b["capacity"] >= b["tokens"]


def memory(s: Setup) -> Memory | None:
    if s.model is None or s.cpu or not s.hosts:
        return None
    ctx, _ = context_length(s)
    b = _budget(s, min(ctx, s.model.max_positions))
    return Memory(gpu_total=b["gpu"], utilization=1.0, budget=b["gpu"], weights=int(b["weights"]),
                  activations=int(b["graph"] + b["layer"]), context=b["fixed"], cuda_graphs=0,
                  kv_cache=int(max(0, b["free"])), block_bytes=int(b["per_token"] / b["n"]), blocks=b["capacity"],
                  block_size=1, token_capacity=b["capacity"], max_model_len=b["tokens"], batched_tokens=b["batch"],
                  dtype=s.model.dtype, generation="ollama", max_num_seqs=num_parallel(s))


def memory_fits(s: Setup) -> Iterator[Finding]:
    if s.model is None or s.cpu or not s.hosts or len(s.hosts) > 1:
        return
    gib = lambda x: f"{x / GIB:.2f} GiB"  # noqa: E731
    host = s.hosts[0]
    ctx, why = context_length(s)
    b = _budget(s, min(ctx, s.model.max_positions))
    where = f"{b['n']} x {host.gpus.name or 'GPU'} ({gib(b['gpu'])} each) of {host.name}"
    overhead = b["graph"] + b["fixed"] + b["layer"]
    if b["free"] <= 0 or (why != "set" and b["capacity"] < MIN_CONTEXT * num_parallel(s)):
        yield Finding(code="weights-exceed-memory", severity=ERROR,
                      message=f"{s.model.id}: the GGUF ({gib(s.model.weight_bytes)}) spread over {where} needs "
                              f"{gib(b['weights'])} per GPU plus {gib(overhead)} Ollama reserves (CUDA minimum, "
                              f"compute graph, one layer), and room for at least {MIN_CONTEXT} tokens: it does not "
                              "fit, and Ollama would run the layers that do not on the CPU, silently and slowly",
                      fix="use a smaller quantization (e.g. a :Q4_K_M or :Q3_K_M GGUF) or model, or a host with "
                          "more GPU memory")
    elif b["capacity"] < b["tokens"]:
        fit = max(MIN_CONTEXT, b["capacity"] // num_parallel(s) // 1024 * 1024)
        yield Finding(code="ollama-cpu-offload", severity=ERROR,
                      message=f"OLLAMA_CONTEXT_LENGTH {ctx} x OLLAMA_NUM_PARALLEL {num_parallel(s)}: the KV cache "
                              f"needs {gib(b['tokens'] * b['per_token'])}, {where} hold {b['capacity']} tokens "
                              "beside the weights: Ollama would put layers on the CPU, silently",
                      fix=f"set deploy.env OLLAMA_CONTEXT_LENGTH: \"{fit}\" (or less), or lower OLLAMA_NUM_PARALLEL")
    elif why == "lowered":
        yield Finding(code="ollama-context-lowered", severity=WARNING,
                      message=f"Ollama {s.facts.version}'s default context here would be "
                              f"{min(default_context(s), s.model.max_positions)} tokens, which does not fit fully in "
                              f"GPU memory; gpucluster sets OLLAMA_CONTEXT_LENGTH={ctx}",
                      fix="set deploy.env OLLAMA_CONTEXT_LENGTH yourself to choose (more spills onto the CPU)")


CHECKS = (one_host, env_valid, memory_fits)


# ---------------------------------------------------------------- the engine
class Ollama(EngineBase):
    name = "ollama"
    knowledge = "ollama"
    components = ("server",)

    def versions(self) -> list[str]:
        return knowledge.versions()

    def image(self, version: str) -> str:
        return knowledge.image_ref(version)

    def facts(self, version: str):
        try:
            return knowledge.facts(version)
        except KeyError:
            raise self._unknown(version) from None

    def _unknown(self, version: str, **where) -> ConfigError:
        known = knowledge.versions()
        try:
            key = version_key(version)
            near = [v for v in known if version_key(v) < key][-2:] + [v for v in known if version_key(v) > key][:2]
        except ValueError:
            near = known[-4:]
        return ConfigError(f"no engine data for ollama {version} ({len(known)} releases known: {known[0]} .. "
                           f"{known[-1]})", fix="use one of the nearest: " + ", ".join(near or known[-4:]), **where)

    # ------------------------------------------------------------------ inputs
    def validate(self, inventory, profile, sets=None) -> None:
        if profile.version not in knowledge.versions():
            key = "version" if "version:" in _text(profile.path) else "image"
            raise self._unknown(profile.version, file=profile.path or None, field=key,
                                line=_line(profile.path, key + ":"))
        at = {"file": inventory.path or None}
        if len(inventory.hosts) > 1:
            raise ConfigError(f"Ollama serves from one host; the inventory lists {len(inventory.hosts)} ("
                              f"{', '.join(h.name for h in inventory.hosts)})", field="hosts",
                              fix=f"pick one with --hosts {inventory.head.name} (Ollama uses all its GPUs), or use "
                                  "engine vllm / sglang to span hosts", **at)
        d = inventory.deploy
        self._model(d.model, inventory)
        if d.api_key is not None:
            raise ConfigError("Ollama serves its API without authentication: it has no API key to set",
                              field="deploy.api_key", line=inventory.lines.get("deploy.api_key"),
                              fix="remove deploy.api_key and put an authenticating proxy in front", **at)
        for field, value in (("deploy.tensor_parallel", d.tensor_parallel),
                             ("deploy.pipeline_parallel", d.pipeline_parallel)):
            if value is not None and value > 1:
                raise ConfigError(f"Ollama has no tensor or pipeline parallelism ({value} asked): it spreads the "
                                  "layers over every GPU of the host", field=field, line=inventory.lines.get(field),
                                  fix=f"remove {field}", **at)
        for args, file, lines, prefix in ((profile.engine_args, profile.path, profile.lines, "engine_args"),
                                          (d.engine_args, inventory.path, inventory.lines, "deploy.engine_args"),
                                          (sets or {}, "--set", {}, "")):
            for key in args:
                field = f"{prefix}.{key}" if prefix else key
                hint = "deploy.env OLLAMA_CONTEXT_LENGTH" if key.lstrip("-").replace("_", "-") in (
                    "max-model-len", "context-length") else "deploy.env (OLLAMA_* variables)"
                raise ConfigError("Ollama takes no engine arguments: it is configured by its environment",
                                  file=file or None, line=lines.get(field), field=field, fix=f"use {hint}")
        for where, env, line in (("profile env", profile.env, None), ("deploy.env", d.env, inventory.lines.get(
                "deploy.env")), *((f"hosts[{i}].env", h.env, None) for i, h in enumerate(inventory.hosts))):
            for key in env:
                if key in MANAGED:
                    raise ConfigError(f"gpucluster sets {key} itself", field=f"{where}.{key}", line=line,
                                      fix=f"use {MANAGED[key]}", file=(profile.path if where == "profile env"
                                                                      else inventory.path) or None)
        if d.served_model_name is not None:
            try:
                ref = gguf.parse(d.served_model_name)
            except ValueError:
                ref = None
            if ref is None or ref.host is not None:
                raise ConfigError(f"{d.served_model_name!r} cannot name an Ollama model (it becomes an alias made "
                                  "with `ollama cp`)", field="deploy.served_model_name",
                                  line=inventory.lines.get("deploy.served_model_name"),
                                  fix="use letters, digits, . _ - and an optional :tag, e.g. qwen3-32b", **at)

    def _model(self, model: str, inventory) -> None:
        at = {"file": inventory.path or None, "field": "deploy.model", "line": inventory.lines.get("deploy.model")}
        from .. import knowledge as catalog
        if model in catalog.catalog() or model.startswith(("/", "./", "../", "~")):
            same = gguf.for_hub_id(model)
            raise ConfigError(f"{model} is not a model Ollama can pull: Ollama serves GGUF models by its own names",
                              fix=(f"use deploy.model: {same['name']} ({same['quant']} GGUF)" if same else
                                   "use an Ollama name (qwen3:32b) or a hub GGUF (modelscope.cn/ORG/REPO:Q4_K_M, "
                                   "hf.co/ORG/REPO:Q4_K_M)"), **at)
        try:
            gguf.parse(model)
        except ValueError as e:
            raise ConfigError(str(e), fix="e.g. qwen3:32b, modelscope.cn/Qwen/Qwen3-32B-GGUF:Q4_K_M", **at) from None
        try:
            _mirror(model, inventory.deploy.source)
        except ValueError:
            raise ConfigError(f"deploy.source.endpoint {inventory.deploy.source.endpoint!r}: Ollama pulls {model} "
                              "from a mirror named by its origin only (scheme, host, port; no path)",
                              file=inventory.path or None, field="deploy.source.endpoint",
                              line=inventory.lines.get("deploy.source.endpoint"),
                              fix="use e.g. http://mirror.lan:8080 for a mirror that speaks Ollama's registry "
                                  "protocol (/v2/ORG/REPO/manifests/QUANT), or remove deploy.source") from None

    def checks(self):
        return CHECKS

    def pipeline_parallel(self, facts) -> bool:
        return False

    def memory(self, s: Setup) -> Memory | None:
        return memory(s)

    def capability_quote(self, facts) -> str:
        return (f"Ollama supports Nvidia GPUs with compute capability {facts.min_compute_capability}+ and driver "
                f"version {facts.min_driver.split('.')[0]} and newer")

    def adapt(self, inv, model):
        """For alternatives: (inventory, model facts, the model it deploys instead or None) as Ollama would serve
        this request; None where it cannot (several hosts, or no GGUF known for a hub model)."""
        if len(inv.hosts) != 1 or inv.deploy.api_key is not None:     # Ollama has no API key to honour
            return None
        bare = dataclasses.replace(inv.deploy, engine_args={}, tensor_parallel=None, pipeline_parallel=None)
        if gguf.is_ref(inv.deploy.model):
            return dataclasses.replace(inv, deploy=bare), model, None
        entry = gguf.for_hub_id(inv.deploy.model)
        if entry is None:
            return None
        facts = gguf.facts(entry["name"])
        return dataclasses.replace(inv, deploy=dataclasses.replace(bare, model=entry["name"])), facts, entry["name"]

    # ------------------------------------------------------------------ specs
    def store(self, d, host) -> str:
        """OLLAMA_MODELS: the blobs and manifests of every model pulled, under the host's model_dir."""
        return f"{d.inventory.model_dir_for(host).rstrip('/')}/ollama"

    def node_env(self, d, host) -> dict[str, str]:
        """The server's plain env (`-e`): the profile's, the inventory's and the host's, gpucluster's defaults
        (OLLAMA_SCHED_SPREAD=1, OLLAMA_KEEP_ALIVE=-1m), OLLAMA_HOST, OLLAMA_MODELS and OLLAMA_CONTEXT_LENGTH.
        Secret values are not in it (secret_env)."""
        env, secrets = split_env({**d.setup.env, **host.env})
        for key, value in knowledge.env()["defaults"].items():
            if key not in secrets:
                env.setdefault(key, value)
        env["OLLAMA_HOST"] = f"0.0.0.0:{d.port}"
        env["OLLAMA_MODELS"] = self.store(d, host)
        if "OLLAMA_CONTEXT_LENGTH" not in secrets:
            env["OLLAMA_CONTEXT_LENGTH"] = str(context_length(d.setup)[0])
        return env

    def secret_env(self, d, host) -> dict:
        """The server's secret env values: exported from a mounted 0600 file at start, never `-e`."""
        return split_env({**d.setup.env, **host.env})[1]

    def secret_files(self, d, host) -> tuple:
        secrets = self.secret_env(d, host)
        return (secrets_put(d.secrets_file("env"), secrets),) if secrets else ()

    def container(self, d, host) -> ContainerSpec:
        o = d.profile.docker
        store = self.store(d, host)
        spec = ContainerSpec(cluster=d.cluster, role="ollama", node="head", image=d.profile.image,
                             entrypoint="/bin/ollama", command=("serve",),
                             env=tuple(sorted(self.node_env(d, host).items())), mounts=((store, store, "rw"),),
                             network=o.network, ipc=o.ipc, shm_size=o.shm_size,
                             gpus=o.gpus if d.profile.device == "gpu" else None, privileged=o.privileged)
        secrets = self.secret_env(d, host)
        return with_secrets(spec, file=d.secrets_file("env"), digest_=secrets_digest(secrets, d.cluster)) \
            if secrets else spec

    def containers(self, d) -> dict[str, list[ContainerSpec]]:
        return {d.head.name: [self.container(d, d.head)]}

    # ------------------------------------------------------------------ steps
    def model_steps(self, d) -> list[Step]:
        """No download phase of gpucluster's own: Ollama pulls the model through its API (in steps())."""
        return []

    def image_check_steps(self, d) -> list[Step]:
        """No torch in the image to ask: whether the GPUs serve the model is read from /api/ps after the load."""
        return []

    def steps(self, d, *, join_timeout: float = 180, ready_timeout: float = 1800) -> list[Step]:
        spec = self.container(d, d.head)
        head, name = d.head.name, spec.name
        model, served = d.inventory.deploy.model, d.served_name
        pulled, insecure = pull_name(d)
        listed_model = gguf.parse(model).listed if pulled == model else _listed_pull(pulled)
        listed_served = _listed(served)
        alive = (head, ("docker", "exec", name, "true"))
        log = (head, ("docker", "logs", "--tail", "20", name))
        n = d.head.gpus.count if d.head.gpus else 0
        env = dict(spec.env)
        pull = [Cmd(argv=("docker", "exec", name, "bash", "-c", PULL_SCRIPT, "pull", pulled, str(d.port),
                          *(("true",) if insecure else ())), timeout=None, stream=True)]
        alias = "" if pulled == model else f" from the mirror {pulled.rsplit('/', 2)[0]}"
        if listed_served.lower() != listed_model.lower():
            pull.append(Cmd(argv=("docker", "exec", name, "ollama", "cp", model if pulled == model else listed_model,
                                  served)))
            alias += f", served as {served} (`ollama cp`)"
        body = json.dumps({"model": served, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
        return [
            container_step(spec, host=head, phase="engine", files=self.secret_files(d, d.head),
                           reason=f"Ollama {d.facts.version} on {head}, every GPU ({n}) with OLLAMA_SCHED_SPREAD="
                                  f"{env.get('OLLAMA_SCHED_SPREAD')}, context {env.get('OLLAMA_CONTEXT_LENGTH')}, "
                                  f"models in {self.store(d, d.head)}"),
            Step(id="control/ollama-api", host="control", phase="engine-api", readonly=True,
                 reason="wait until Ollama answers /api/tags",
                 ops=(Http(url=f"{d.base_url}/api/tags", until=join_timeout, abort=alive, log=log),)),
            Step(id=f"{head}/ollama-pull", host=head, phase="pull",
                 check=Check(argv=("docker", "exec", name, "sh", "-c", HAVE_SCRIPT, listed_model, listed_served)),
                 reason=f"pull {pulled if pulled == model else model} through Ollama's API (/api/pull, progress shown) into "
                        f"{self.store(d, d.head)}{alias}",
                 ops=tuple(pull)),
            Step(id="control/tags", host="control", phase="ready", readonly=True,
                 reason=f"/api/tags lists {listed_served}",
                 ops=(Http(url=f"{d.base_url}/api/tags", expect=json.dumps(listed_served)),)),
            Step(id="control/chat", host="control", phase="ready", readonly=True,
                 reason="one chat completion answers (it loads the model into the GPUs: minutes)",
                 ops=(Http(url=f"{d.endpoint}/chat/completions", body=body, expect='"choices"',
                           timeout=ready_timeout),)),
            Step(id=f"{head}/ollama-vram", host=head, phase="ready", readonly=True,
                 reason="/api/ps: the model is fully in GPU memory (a warning otherwise: Ollama falls back to the "
                        "CPU silently)",
                 ops=(Cmd(argv=("docker", "exec", name, "bash", "-c", PS_SCRIPT, "ps", listed_served, str(d.port)),
                          timeout=60, stream=True),)),
        ]

    # ------------------------------------------------------------------ status and logs
    health_path = "/api/version"      # Ollama has no /health

    def served_id(self, d) -> str:
        return _listed(d.served_name)

    def measured(self, d, probed) -> list:
        return []

    def status(self, d, run) -> tuple[dict, list[str], list[str]]:
        name = self.container(d, d.head).name
        r = run(d.head.name, ("docker", "inspect", "--type", "container", "--format", "{{.State.Status}}", name))
        state = r.stdout.strip() if r.ok else "missing"
        if state != "running":
            return {"server": state}, [f"ollama: {name} is {state}"], [f"{d.head.name}: Ollama ({name}) is {state}"]
        r = run(d.head.name, ("docker", "exec", name, "bash", "-c", PS_SCRIPT, "ps", _listed(d.served_name),
                              str(d.port)))
        notes = []
        for line in (r.stdout if r.ok else "").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("ev") == "note":
                notes.append(" ".join(str(ev.get("msg", "")).split())[:300])
        return {"server": state}, [f"ollama: {n}" for n in notes] or ["ollama: running"], []

    def logs(self, d, *, tail: int, follow: bool) -> list[LogSource]:
        return [LogSource(host=d.head.name, component="server", argv=(
            "docker", "logs", "--tail", str(tail), *(["-f"] if follow else []), self.container(d, d.head).name))]


def pull_name(d) -> tuple[str, bool]:
    """(the name Ollama pulls, insecure): a hub GGUF whose hub the inventory's deploy.source points at a mirror
    (source.kind the same hub, source.endpoint set) is pulled from that mirror as ENDPOINT/ORG/REPO[:QUANT], which
    must speak Ollama's registry protocol as hf.co and modelscope.cn do; otherwise deploy.model itself."""
    model = d.inventory.deploy.model
    m = _mirror(model, d.inventory.deploy.source)
    if m is None:
        return model, False
    ref = gguf.parse(model)
    return f"{m.group(1)}://{m.group(2)}/{ref.repo}" + (f":{ref.tag}" if ref.tag else ""), m.group(1) == "http"


def _mirror(model: str, source):
    """The MIRROR match of source.endpoint when it serves this hub GGUF, else None (ValueError: not a bare origin)."""
    try:
        ref = gguf.parse(model)
    except ValueError:
        return None
    if not ref.hub or source is None or source.kind != ref.kind or not source.endpoint:
        return None
    m = MIRROR.match(source.endpoint)
    if m is None:
        raise ValueError(source.endpoint)
    return m


def _listed_pull(name: str) -> str:
    """How `ollama list` shows a pulled name: no scheme, ":latest" when no tag."""
    bare = name.split("://", 1)[-1]
    return bare if bare.rfind(":") > bare.rfind("/") else f"{bare}:latest"


def _listed(name: str) -> str:
    try:
        return gguf.parse(name).listed
    except ValueError:
        return name


def _text(path: str) -> str:
    try:
        return Path(path).read_text() if path else ""
    except OSError:
        return ""


def _line(path: str, prefix: str) -> int | None:
    return next((i for i, line in enumerate(_text(path).splitlines(), 1) if line.startswith(prefix)), None)


ENGINE = Ollama()
