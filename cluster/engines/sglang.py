"""SGLang across hosts: one container per host, every one running the same launch command (`python3 -m
sglang.launch_server`) with `--tp-size` = all GPUs of all hosts, `--nnodes`, its own `--node-rank` and the
head's `--dist-init-addr` (`--nccl-init-addr` where a release has only that spelling). Rank 0 serves the
OpenAI API; readiness is checked there only (`/health` answers 503 while the model loads).

Facts: cluster/knowledge/sglang (flags per release from the wheels, image facts curated)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Iterator

from ..checks import ERROR, WARNING, Finding, Setup, _profiles_for, capability
from ..containers import ContainerSpec, container_step, secrets_digest, secrets_put, split_env, with_secrets
from ..errors import ConfigError
from ..knowledge import sglang as knowledge
from ..knowledge.curated import version_key
from ..memory import GIB, MIB, Memory, estimate
from ..steps import Http, Step
from . import EngineBase, LogSource, vllm

# torch.distributed's rendezvous on the head; SGLang opens its ZMQ ports just above it (port + 1 ...), so
# 29600-29610 must be reachable on the head. Pinned so firewalls can allow them.
DIST_PORT = 29600
NCCL_PORT = 29620      # --nccl-port, where the release has it (else SGLang picks port + 100..1000 at random)
IFNAMES = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME")
# Flags gpucluster sets itself (every spelling SGLang accepts), and where users set them instead.
MANAGED = {
    "model-path": "deploy.model", "model": "deploy.model", "tp-size": "deploy.tensor_parallel",
    "tp": "deploy.tensor_parallel", "tensor-parallel-size": "deploy.tensor_parallel",
    "served-model-name": "deploy.served_model_name", "host": "(gpucluster binds 0.0.0.0)", "port": "deploy.port",
    "api-key": "deploy.api_key", "nnodes": "(gpucluster: the number of hosts)",
    "node-rank": "(gpucluster: one per host)", "dist-init-addr": "(gpucluster: the head's address)",
    "nccl-init-addr": "(gpucluster: the head's address)", "nccl-port": "(gpucluster: pinned)",
    "pp-size": "(gpucluster runs SGLang with tensor parallelism only)",
    "pipeline-parallel-size": "(gpucluster runs SGLang with tensor parallelism only)",
}
# vLLM's names for what SGLang calls otherwise (a fix for an inventory written for vLLM)
SGLANG_NAMES = {"max-model-len": "context-length", "gpu-memory-utilization": "mem-fraction-static",
                "enforce-eager": "disable-cuda-graph", "max-num-seqs": "max-running-requests",
                "max-num-batched-tokens": "chunked-prefill-size", "tokenizer": "tokenizer-path"}
DEFAULT_FRACTION = 0.88    # SGLang's fallback when it cannot read the GPU's memory (and the tp-table's floor)
NOT_ENOUGH = "Not enough memory. Please try to increase --mem-fraction-static."


# ---------------------------------------------------------------- memory (SGLang's static pool)
def prefill_chunk(s: Setup, gpu_mib: int) -> int:
    """--chunked-prefill-size: as set, else the reserved-memory rule's default for this GPU (0: not known)."""
    if s.args.get("chunked-prefill-size"):
        return int(s.args["chunked-prefill-size"])
    if (knowledge.table(s.facts.version).get("mem_fraction") or {}).get("rule") != "reserved-mem":
        return 0
    return next(t for t in knowledge.reserved_mem()["tiers"] if gpu_mib < t[0])[1]


def default_fraction(s: Setup, gpu_mib: int) -> tuple[float, str]:
    """--mem-fraction-static when not set, by the release's rule (releases.json mem_fraction), and where from."""
    rule = knowledge.table(s.facts.version).get("mem_fraction") or {}
    tp = s.tp * s.pp
    if rule.get("rule") == "tp-table":
        frac = next((f for n, f in rule["table"] if tp >= n), rule.get("otherwise") or DEFAULT_FRACTION)
        if rule.get("gpu_gated") and gpu_mib > 81920:
            frac = DEFAULT_FRACTION
            if gpu_mib > 96 * 1024:       # large GPUs keep ~15 GB + 3 GB for CUDA graphs out of the pool
                frac = min(frac + 48 * 1024 * (1 - frac) / gpu_mib, (gpu_mib - 18 * 1024) / gpu_mib)
        return round(frac, 3), f"SGLang {s.facts.version}'s default for TP {tp}"
    if rule.get("rule") == "reserved-mem":
        r = knowledge.reserved_mem()
        tier = next(t for t in r["tiers"] if gpu_mib < t[0])
        chunk = int(s.args.get("chunked-prefill-size") or tier[1])
        graph_bs = int(s.args.get("cuda-graph-max-bs") or (tier[2] if s.tp < 4 else tier[3]))
        reserved = (r["base_mib"] + max(chunk if chunk > 0 else 16384, 2048) * r["per_prefill_token_mib"]
                    + graph_bs * r["per_graph_bs_mib"] + tp * r["per_rank_mib"])
        if gpu_mib > 60 * 1024:
            reserved = max(reserved, r["floor_above_60g_mib"])
        return round((gpu_mib - reserved) / gpu_mib, 3), \
            f"SGLang {s.facts.version}'s default: {reserved:.0f} MiB reserved for activations and CUDA graphs"
    return DEFAULT_FRACTION, "SGLang's fallback (its rule for this release was not read)"


def memory(s: Setup) -> Memory | None:
    """One GPU the way SGLang budgets it: the static pool (`--mem-fraction-static` of the memory free after
    the CUDA context and NCCL) holds the weights and the KV cache; activations and CUDA graphs live outside it."""
    if s.model is None or s.cpu:
        return None
    gpu_mib = min(h.gpus.memory_mib for h in s.hosts)
    frac = float(s.args["mem-fraction-static"]) if "mem-fraction-static" in s.args else default_fraction(s, gpu_mib)[0]
    base = estimate(model=s.model, tp=s.tp, pp=s.pp, gpu_mib=gpu_mib, batched_rule="2048",
                    args={k: s.args[k] for k in ("dtype", "quantization", "cpu-offload-gb") if k in s.args})
    total = gpu_mib * MIB
    context = base.context
    budget = int((total - context) * frac)
    kv_bytes = 1 if str(s.args.get("kv-cache-dtype", "auto")).startswith("fp8") else 2
    cell = 2 * s.model.layers * max(1, s.model.kv_heads // s.tp) * s.model.head_dim * kv_bytes
    kv = budget - base.weights
    tokens = max(0, kv // cell)
    length = int(s.args.get("context-length") or s.model.max_positions)
    return Memory(gpu_total=total, utilization=frac, budget=budget, weights=base.weights, activations=0,
                  context=context, cuda_graphs=0, kv_cache=max(0, kv), block_bytes=cell, blocks=tokens, block_size=1,
                  token_capacity=tokens, max_model_len=length,
                  batched_tokens=prefill_chunk(s, gpu_mib), dtype=base.dtype, generation="sglang")


def memory_fits(s: Setup) -> Iterator[Finding]:
    m = s.memory()
    if m is None:
        return
    gib = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
    set_by = "set" if "mem-fraction-static" in s.args else default_fraction(s, m.gpu_total // MIB)[1]
    if m.weights + m.context > m.gpu_total:
        yield Finding(code="weights-exceed-memory", severity=ERROR,
                      message=f"weights need {gib(m.weights)} per GPU (TP {s.tp}) plus {gib(m.context)} CUDA "
                              f"context; a GPU has {gib(m.gpu_total)}: CUDA out of memory",
                      fix="use more GPUs (a higher tensor_parallel over more hosts), a quantized or a smaller model")
    elif m.token_capacity == 0:
        yield Finding(code="kv-cache-insufficient", severity=ERROR,
                      message=f"--mem-fraction-static {m.utilization} ({set_by}) keeps {gib(m.budget)} per GPU for "
                              f"weights and KV cache; the weights take {gib(m.weights)}: \"{NOT_ENOUGH}\"",
                      fix="raise mem-fraction-static (what is left holds activations and CUDA graphs), use more "
                          "GPUs, or a quantized model")
    elif m.token_capacity < m.max_model_len:
        yield Finding(code="kv-cache-short", severity=WARNING,
                      message=f"the KV cache holds {m.token_capacity} tokens ({gib(m.kv_cache)} per GPU at "
                              f"--mem-fraction-static {m.utilization}, {set_by}), fewer than the context length "
                              f"{m.max_model_len}: SGLang starts, and refuses longer requests",
                      fix=f"--set context-length={max(1024, m.token_capacity // 1024 * 1024)}, or use more GPUs")


# ---------------------------------------------------------------- SGLang's own rules
def _resolve(facts, name: str):
    """(flag, canonical name) as SGLang's parser takes `--name`; (None, unique prefix match or None)."""
    flag = facts.flag(name)
    if flag is not None:
        return flag, name
    dashed = "--" + name
    matches = sorted({facts.aliases.get(o, o) for o in (*facts.flags, *facts.aliases) if o.startswith(dashed)})
    return None, matches[0] if len(matches) == 1 else None


def flags_supported(s: Setup) -> Iterator[Finding]:
    v = s.facts.version
    for name, value in s.args.items():
        if value is False:
            continue
        flag, full = _resolve(s.facts, name)
        if flag is None:
            other = SGLANG_NAMES.get(name)
            yield Finding(code="unsupported-flag", severity=ERROR,
                          message=f"SGLang {v} has no --{name} (\"unrecognized arguments: --{name}\")",
                          fix=f"write it in full: {full}" if full else
                          f"SGLang calls it {other}: --set {other}=..." if other and s.facts.flag(other) else
                          f"remove {name} from engine_args, or use a profile whose SGLang has it")
        elif flag.choices and not isinstance(value, (bool, list)) and str(value) not in map(str, flag.choices):
            yield Finding(code="unsupported-flag", severity=ERROR,
                          message=f"SGLang {v}: --{name} {value} is not one of {', '.join(map(str, flag.choices))}",
                          fix=f"set {name} to one of: {', '.join(map(str, flag.choices))}")
        elif value is not True and not flag.value:
            yield Finding(code="unsupported-flag", severity=ERROR,
                          message=f"--{name} is a bare switch in SGLang {v}; got a value ({value!r})",
                          fix=f"set {name}: true (or false to leave it out)")
        elif value is True and flag.value and not flag.bare_ok:
            yield Finding(code="unsupported-flag", severity=ERROR,
                          message=f"--{name} takes a value in SGLang {v}, got a bare flag (true)",
                          fix=f"give {name} a value")


def tp_spans_hosts(s: Setup) -> Iterator[Finding]:
    """SGLang gives each node tp_size / nnodes GPUs (tp_size_per_node = tp_size // nnodes): TP must split evenly."""
    n = len(s.hosts)
    if s.pp > 1:
        yield Finding(code="pp-unsupported", severity=ERROR,
                      message=f"gpucluster runs SGLang with tensor parallelism only (pipeline_parallel {s.pp})",
                      fix="set pipeline_parallel: 1; tensor_parallel spans the hosts")
    elif s.tp % n:
        yield Finding(code="tp-not-per-node", severity=ERROR,
                      message=f"TP {s.tp} over {n} hosts: SGLang puts tp_size / nnodes GPUs on every node, and "
                              f"{s.tp} does not divide by {n}",
                      fix=f"use a tensor_parallel that is a multiple of {n} (or use fewer hosts with --hosts)")
    elif not s.cpu and s.tp // n > min(h.gpus.count for h in s.hosts):
        yield Finding(code="tp-not-per-node", severity=ERROR,
                      message=f"TP {s.tp} over {n} hosts needs {s.tp // n} GPUs on each; the smallest host has "
                              f"{min(h.gpus.count for h in s.hosts)}", fix="lower tensor_parallel or add hosts")


def served_name_supported(s: Setup) -> Iterator[Finding]:
    if s.facts.flag("served-model-name") is None:
        yield Finding(code="served-name-unsupported", severity=ERROR,
                      message=f"SGLang {s.facts.version} has no --served-model-name: its API would name the "
                              "model by its path, not deploy.served_model_name",
                      fix="use a profile with SGLang >= 0.2.9")


def host_network(s: Setup) -> Iterator[Finding]:
    o = s.profile.docker
    if len(s.hosts) > 1 and o.network != "host":
        yield Finding(code="network-not-host", severity=ERROR,
                      message=f"docker network {o.network!r}: SGLang's ranks reach each other at the hosts' "
                              f"addresses (rendezvous {DIST_PORT} and the ports above it, NCCL)",
                      fix="set docker.network: host in the profile")
    if o.ipc != "host" and not o.shm_size:
        yield Finding(code="shm-small", severity=WARNING,
                      message="private IPC without shm_size: the container gets Docker's 64 MB /dev/shm, too small "
                              "for NCCL and SGLang's processes", fix="set docker.ipc: host or docker.shm_size: 32g")


def arch_supported(s: Setup) -> Iterator[Finding]:
    if s.model and s.facts.architectures and s.model.architecture not in s.facts.architectures:
        low = min((capability(h.gpus.compute_capability) for h in s.hosts if h.gpus), default=(99, 0))
        yield Finding(code="arch-unsupported", severity=ERROR,
                      message=f"SGLang {s.facts.version} has no model class for {s.model.architecture} "
                              "(no EntryClass in sglang/srt/models)",
                      fix=_profiles_for(s.profile.engine, low, s.model.architecture))


def port_fits(s: Setup) -> Iterator[Finding]:
    """0.5.11 .. 0.5.15.post1 derive a gRPC port of --port + 10000 at every launch and refuse one above 65535."""
    top, port = knowledge.rules(s.facts.version).get("max_port"), s.inventory.deploy.port or s.profile.port
    if top and port > top:
        yield Finding(code="port-too-high", severity=ERROR,
                      message=f"port {port}: SGLang {s.facts.version} opens a gRPC port at --port + 10000 and "
                              f"stops with \"SGLANG_GRPC_PORT ({port + 10000}) must be between 1 and 65535\"",
                      fix=f"set deploy.port to {top} or lower (or use SGLang >= 0.5.16)")


CHECKS = (tp_spans_hosts, served_name_supported, host_network, port_fits, arch_supported, flags_supported,
          memory_fits)


# ---------------------------------------------------------------- the engine
class Sglang(EngineBase):
    name = "sglang"
    knowledge = "sglang"
    components = ("head", "node")

    def versions(self) -> list[str]:
        return knowledge.versions()

    def image(self, version: str) -> str:
        """The official image gpucluster proposes for a release (alternatives)."""
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
            near = ([v for v in known if version_key(v) < key][-2:] + [v for v in known if version_key(v) > key][:2])
        except ValueError:
            near = known[-4:]
        return ConfigError(f"no engine data for sglang {version} ({len(known)} releases known: {known[0]} .. "
                           f"{known[-1]})", fix="use one of the nearest: " + ", ".join(near or known[-4:]), **where)

    def validate(self, inventory, profile, sets=None) -> None:
        if profile.version not in knowledge.versions():
            key = "version" if "version:" in _text(profile.path) else "image"
            raise self._unknown(profile.version, file=profile.path or None, field=key,
                                line=_line(profile.path, key + ":"))
        vllm.validate(inventory, profile, sets or {}, extra=MANAGED)
        if inventory.deploy.api_key is not None:
            raise ConfigError("SGLang takes its API key only as --api-key on its command line (no release reads "
                              "it from the environment): `ps` on the host would show it", file=inventory.path,
                              line=inventory.lines.get("deploy.api_key"), field="deploy.api_key",
                              fix="remove deploy.api_key and put an authenticating proxy in front, or use engine vllm")

    def checks(self):
        return CHECKS

    def pipeline_parallel(self, facts) -> bool:
        return False

    def memory(self, s: Setup) -> Memory | None:
        return memory(s)

    def capability_quote(self, facts) -> str:
        t = knowledge.table(facts.version)
        return (t.get("min_cc") or {}).get("quote") or \
            f"SGLang only supports sm{facts.min_compute_capability.replace('.', '')} and above."

    # ------------------------------------------------------------------ specs
    def node_env(self, d, host) -> dict[str, str]:
        """Every rank's env: the profile's, the inventory's, the host's, and its NIC for NCCL, GLOO and TP
        (without GLOO_SOCKET_IFNAME gloo binds the hostname's address, often 127.0.0.1, and peers never connect).
        Secret values are not in it (secret_env)."""
        env, _ = split_env({**d.setup.env, **host.env})
        if host.interface:
            env.update({k: host.interface for k in IFNAMES})
        return env

    def secret_env(self, d, host) -> dict:
        """The rank's secret env values: exported from a mounted 0600 file at start, never `-e`."""
        return split_env({**d.setup.env, **host.env})[1]

    def secret_files(self, d, host) -> tuple:
        secrets = self.secret_env(d, host)
        return (secrets_put(d.secrets_file("env"), secrets),) if secrets else ()

    def served_name(self, d) -> str:
        return d.served_name if d.facts.flag("served-model-name") else d.model_path(d.head)[1]

    def launch_argv(self, d, host) -> tuple[str, ...]:
        """The same launch command on every host, but for --node-rank; values from YAML stay single elements."""
        f, s = d.facts, d.setup
        rank = d.hosts.index(host)
        argv = [*f.entrypoint, "--model-path", d.model_path(host)[1]]
        if f.flag("served-model-name"):
            argv += ["--served-model-name", d.served_name]
        argv += ["--host", "0.0.0.0", "--port", str(d.port), "--tp-size", str(s.tp)]
        if len(d.hosts) > 1:
            dist = knowledge.table(f.version)["dist_init_flag"] or "--dist-init-addr"
            head = d.head.address
            addr = f"[{head}]" if ipaddress.ip_address(head).version == 6 else head
            argv += ["--nnodes", str(len(d.hosts)), "--node-rank", str(rank), dist, f"{addr}:{DIST_PORT}"]
        if f.flag("nccl-port"):
            argv += ["--nccl-port", str(NCCL_PORT)]
        for name, value in s.args.items():
            if value is False or value is None:
                continue
            if value is True:
                argv.append(f"--{name}")
            elif isinstance(value, list):
                argv += [f"--{name}", *map(str, value)]
            else:
                argv += [f"--{name}", str(value)]
        return tuple(argv)

    def container(self, d, host) -> ContainerSpec:
        rank = d.hosts.index(host)
        argv = self.launch_argv(d, host)
        host_path, container_path = d.model_path(host)
        o = d.profile.docker
        spec = ContainerSpec(cluster=d.cluster, role="sglang-head" if rank == 0 else f"sglang-node-{rank}",
                             node="head" if rank == 0 else "worker", image=d.profile.image, entrypoint=argv[0],
                             command=argv[1:], env=tuple(sorted(self.node_env(d, host).items())),
                             mounts=((host_path, container_path, "ro"),), network=o.network, ipc=o.ipc,
                             shm_size=o.shm_size, gpus=o.gpus if d.profile.device == "gpu" else None,
                             privileged=o.privileged)
        secrets = self.secret_env(d, host)
        return with_secrets(spec, file=d.secrets_file("env"), digest_=secrets_digest(secrets, d.cluster)) \
            if secrets else spec

    def containers(self, d) -> dict[str, list[ContainerSpec]]:
        return {h.name: [self.container(d, h)] for h in d.hosts}

    # ------------------------------------------------------------------ steps
    def steps(self, d, *, join_timeout: float = 180, ready_timeout: float = 1800) -> list[Step]:
        specs = [self.container(d, h) for h in d.hosts]
        ids = [f"{h.name}/{spec.role}" for h, spec in zip(d.hosts, specs)]
        steps = []
        for i, (h, spec) in enumerate(zip(d.hosts, specs)):
            # the ranks form one process group: when one of them is (re)started, the others must restart too
            what = "rank 0 and the API server" if i == 0 else f"rank {i}"
            steps.append(container_step(spec, host=h.name, phase="engine", after=tuple(x for x in ids if x != ids[i]),
                                        files=self.secret_files(d, h), reason=f"SGLang {d.facts.version} {what} of {len(d.hosts)} node(s), "
                                               f"TP {d.setup.tp} over all their GPUs"))
        return steps + self.ready_steps(d, specs[0].name, ready_timeout)

    def ready_steps(self, d, head: str, timeout: float) -> list[Step]:
        """From this machine, rank 0 only: /health (503 while the model loads), /v1/models, one completion."""
        served = self.served_name(d)
        body = json.dumps({"model": served, "prompt": "Hello", "max_tokens": 8})
        return [
            Step(id="control/health", host="control", phase="ready", readonly=True,
                 reason="wait (minutes: the model loads; /health answers 503 until then) until rank 0 answers 200",
                 ops=(Http(url=f"{d.base_url}/health", until=timeout, abort=(d.head.name, ("docker", "exec", head,
                                                                                           "true")),
                           log=(d.head.name, ("docker", "logs", "--tail", "20", head))),)),
            Step(id="control/models", host="control", phase="ready", readonly=True,
                 reason=f"/v1/models lists {served!r}",
                 ops=(Http(url=f"{d.endpoint}/models", expect=json.dumps(served)),)),
            Step(id="control/completion", host="control", phase="ready", readonly=True,
                 reason="one completion answers",
                 ops=(Http(url=f"{d.endpoint}/completions", body=body, expect='"choices"', timeout=300),)),
        ]

    # ------------------------------------------------------------------ status and logs
    def measured(self, d, probed) -> list:
        return []

    def status(self, d, run) -> tuple[dict, list[str], list[str]]:
        nodes, problems = {}, []
        for h in d.hosts:
            name = self.container(d, h).name
            r = run(h.name, ("docker", "inspect", "--type", "container", "--format", "{{.State.Status}}", name))
            state = r.stdout.strip() if r.ok else "missing"
            nodes[h.name] = state
            if state != "running":
                problems.append(f"{h.name}: SGLang rank {d.hosts.index(h)} ({name}) is {state}")
        up = sum(1 for x in nodes.values() if x == "running")
        return {"nodes": nodes}, [f"sglang: {up} of {len(d.hosts)} rank(s) running"], problems

    def logs(self, d, *, tail: int, follow: bool) -> list[LogSource]:
        return [LogSource(host=h.name, component="head" if h is d.head else "node", argv=(
            "docker", "logs", "--tail", str(tail), *(["-f"] if follow else []), self.container(d, h).name))
            for h in d.hosts]


def _text(path: str) -> str:
    try:
        return Path(path).read_text() if path else ""
    except OSError:
        return ""


def _line(path: str, prefix: str) -> int | None:
    return next((i for i, line in enumerate(_text(path).splitlines(), 1) if line.startswith(prefix)), None)


ENGINE = Sglang()
