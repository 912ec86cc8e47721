"""PURE: (inventory, profile, model facts, engine facts) -> Plan (findings, topology, memory, steps)."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from typing import Any

from . import checks, knowledge, models
from .checks import ERROR, Finding, Setup
from .config import Host, Inventory, Profile, flag_name
from .errors import ConfigError
from .docker import ApiSpec, ContainerSpec, container_name, run_argv
from .knowledge import Engine
from .memory import Memory
from .models import ModelFacts

RAY_PORT = 6379
MODELS_MOUNT = "/models"
SECRETS_DIR = "/etc/gpucluster"
DEFAULT_ENDPOINTS = {"hf-mirror": "https://hf-mirror.com", "huggingface": "https://huggingface.co",
                     "modelscope": "https://www.modelscope.cn"}


@dataclass(frozen=True, kw_only=True)
class Step:
    host: str                      # a host name, or "control" for this machine
    phase: str                     # image | model | ray-head | ray-workers | api | ready
    argv: tuple[str, ...]
    reason: str
    fallbacks: tuple[tuple[str, ...], ...] = ()   # tried in order when argv fails

    def as_dict(self) -> dict:
        out = {"host": self.host, "phase": self.phase, "argv": list(self.argv), "reason": self.reason}
        if self.fallbacks:
            out["fallbacks"] = [list(f) for f in self.fallbacks]
        return out

    def shell(self) -> str:
        return " || ".join(shlex.join(a) for a in (self.argv, *self.fallbacks))


@dataclass(frozen=True, kw_only=True)
class Topology:
    tp: int
    pp: int
    head: str
    nodes: tuple[str, ...]
    why: str

    def as_dict(self) -> dict:
        return {"tensor_parallel": self.tp, "pipeline_parallel": self.pp, "head": self.head,
                "nodes": list(self.nodes), "why": self.why}


@dataclass(frozen=True, kw_only=True)
class Plan:
    inventory: Inventory
    profile: Profile
    engine: Engine
    model: ModelFacts | None
    setup: Setup
    topology: Topology
    findings: tuple[Finding, ...]
    memory: Memory | None
    containers: dict[str, ContainerSpec]     # host name -> its Ray container
    api: ApiSpec
    served_name: str
    port: int
    steps: tuple[Step, ...]

    @property
    def verdict(self) -> str:
        if any(f.severity == ERROR for f in self.findings):
            return "fail"
        return "warn" if self.findings else "ok"

    @property
    def head(self) -> Host:
        return self.setup.hosts[0]

    @property
    def endpoint(self) -> str:
        return f"http://{self.head.address}:{self.port}/v1"

    def host(self, name: str) -> Host:
        return next(h for h in self.inventory.hosts if h.name == name)

    def as_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "cluster": self.inventory.cluster.name,
            "profile": self.profile.name,
            "image": self.profile.image,
            "model": self.inventory.deploy.model,
            "served_model_name": self.served_name,
            "endpoint": self.endpoint,
            "findings": [f.as_dict() for f in self.findings],
            "topology": self.topology.as_dict(),
            "memory": self.memory.as_dict() if self.memory else None,
            "steps": [s.as_dict() for s in self.steps],
        }


# ---------------------------------------------------------------- inputs
def effective_args(profile: Profile, inventory: Inventory, sets: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for source in (profile.engine_args, inventory.deploy.engine_args, sets):
        for key, value in source.items():
            out[flag_name(key)] = value
    return out


def _select_hosts(inventory: Inventory, names: list[str] | None) -> list[Host]:
    hosts = list(inventory.hosts)
    if names:
        known = {h.name for h in hosts}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"--hosts: no host named {', '.join(unknown)} in the inventory",
                              file=inventory.path, fix="known hosts: " + ", ".join(sorted(known)))
        hosts = [h for h in hosts if h.name in names]
    head = inventory.head if inventory.head in hosts else hosts[0]
    return [head] + [h for h in hosts if h is not head]


def _hosts_for(hosts: list[Host], gpus: int) -> tuple[Host, ...]:
    used, total = [], 0
    for h in hosts:
        if total >= gpus:
            break
        used.append(h)
        total += h.gpus.count
    return tuple(used)


# ---------------------------------------------------------------- topology
def _setup(base: Setup, hosts: list[Host], tp: int, pp: int) -> Setup:
    """TP x PP on the fewest hosts (head first); with PP > 1 each stage is one host."""
    if pp > 1 and pp <= len(hosts):
        used = tuple(hosts[:pp])
    elif tp * pp <= sum(h.gpus.count for h in hosts):
        used = _hosts_for(hosts, tp * pp)
    else:
        used = tuple(hosts)
    return dataclasses.replace(base, tp=tp, pp=pp, hosts=used)


def choose_topology(base: Setup, hosts: list[Host], tp: int | None, pp: int | None) -> tuple[Setup, str]:
    """Honour a given TP/PP; otherwise the fewest GPUs that pass every check, TP within a node first."""
    total = sum(h.gpus.count for h in hosts)
    if tp and pp:
        return _setup(base, hosts, tp, pp), "as given in the inventory / command line"
    if tp:
        return _setup(base, hosts, tp, 1), "tensor_parallel as given; pipeline_parallel 1"
    per_node = min(h.gpus.count for h in hosts)
    pps = [pp] if pp else (range(1, len(hosts) + 1) if base.engine.pipeline_parallel else [1])
    candidates = []
    for p in pps:
        for t in range(1, total // p + 1):
            if p > 1 and t != per_node:   # the usual layout: TP = GPUs per host, PP = hosts
                continue
            s = _setup(base, hosts, t, p)
            errors = [f.code for f in checks.run_all(s) if f.severity == ERROR]
            candidates.append(((t * p, t > per_node, p, t), s, errors))
    candidates.sort(key=lambda c: c[0])
    rejected = []
    for _, s, errors in candidates:
        if not errors:
            why = f"fewest GPUs that pass every check: TP {s.tp} x PP {s.pp} on {len(s.hosts)} host(s)"
            if rejected:
                why += "; smaller layouts fail: " + ", ".join(rejected[:4])
            return s, why
        rejected.append(f"TP {s.tp} x PP {s.pp} ({errors[0]})")
    if base.engine.pipeline_parallel and len(hosts) > 1 and not pp:
        s = _setup(base, hosts, per_node, len(hosts))
    else:
        s = _setup(base, hosts, total // (pp or 1), pp or 1)
    return s, "no layout passes every check; showing the largest (" + ", ".join(rejected[:4]) + ")"


# ---------------------------------------------------------------- containers and steps
def model_paths(inventory: Inventory, host: Host) -> tuple[str, str]:
    """(path on the host, path inside containers) of the deployment's model."""
    model = inventory.deploy.model
    if inventory.deploy.source.kind == "local" or models.is_local(model):
        path = model.rstrip("/")
        return path, f"{MODELS_MOUNT}/{path.rsplit('/', 1)[-1]}"
    name = models.host_dir_name(model)
    return f"{inventory.model_dir_for(host).rstrip('/')}/{name}", f"{MODELS_MOUNT}/{name}"


def secrets_file(inventory: Inventory, what: str) -> str:
    return f"{SECRETS_DIR}/{inventory.cluster.name}/{what}.env"


def node_env(s: Setup, host: Host) -> tuple[tuple[str, str], ...]:
    env = dict(s.env)
    env["VLLM_HOST_IP"] = host.address
    if host.interface:
        env["NCCL_SOCKET_IFNAME"] = host.interface
        env["GLOO_SOCKET_IFNAME"] = host.interface
    return tuple(sorted(env.items()))


def ray_container(s: Setup, host: Host, *, head: Host) -> ContainerSpec:
    is_head = host is head
    host_path, container_path = model_paths(s.inventory, host)
    if is_head:
        command = ("start", "--head", f"--node-ip-address={host.address}", f"--port={RAY_PORT}")
    else:
        command = ("start", f"--address={head.address}:{RAY_PORT}", f"--node-ip-address={host.address}")
    command += (f"--num-gpus={host.gpus.count}", "--disable-usage-stats", "--block")
    d = s.profile.docker
    return ContainerSpec(
        cluster=s.inventory.cluster.name, role="ray-head" if is_head else "ray-worker",
        image=s.profile.image, entrypoint="ray", command=command, env=node_env(s, host),
        mounts=((host_path, container_path, "ro"),), network=d.network, ipc=d.ipc, shm_size=d.shm_size,
        gpus=d.gpus, privileged=d.privileged)


def api_argv(s: Setup, served_name: str, port: int) -> tuple[str, ...]:
    _, container_path = model_paths(s.inventory, s.hosts[0])
    e = s.engine
    argv = [*e.entrypoint, container_path] if e.entrypoint[-1] == "serve" else [*e.entrypoint, "--model",
                                                                                 container_path]
    argv += ["--served-model-name", served_name, "--host", "0.0.0.0", "--port", str(port),
             "--tensor-parallel-size", str(s.tp)]
    if s.pp > 1:
        argv += ["--pipeline-parallel-size", str(s.pp)]
    if s.tp * s.pp > 1 and not {"worker-use-ray", "distributed-executor-backend"} & set(s.args):
        argv += list(e.executor_args)
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


def mirror_refs(inventory: Inventory, profile: Profile) -> list[str]:
    mirrors = [*inventory.cluster.registry_mirrors, *profile.registry_mirrors]
    return [f"{m.rstrip('/')}/{profile.image}" for m in mirrors] + [profile.image]


def _steps(s: Setup, containers: dict[str, ContainerSpec], api: ApiSpec, served: str, port: int) -> list[Step]:
    inv, prof = s.inventory, s.profile
    refs = mirror_refs(inv, prof)
    steps: list[Step] = []
    for h in s.hosts:
        steps.append(Step(host=h.name, phase="image", argv=("docker", "pull", refs[0]),
                          fallbacks=tuple(("docker", "pull", r) for r in refs[1:]),
                          reason=f"pull {prof.image} through the registry mirrors in order (skipped when present)"))
        if len(refs) > 1:
            steps.append(Step(host=h.name, phase="image", argv=("docker", "tag", refs[0], prof.image),
                              reason="retag the copy from whichever mirror answered to the canonical name every host runs"))
    src = inv.deploy.source
    head = s.hosts[0]
    head_path, _ = model_paths(inv, head)
    if src.kind == "local" or models.is_local(inv.deploy.model):
        steps.append(Step(host=head.name, phase="model", argv=("test", "-f", f"{head_path}/config.json"),
                          reason="local model: the head's copy is the reference; others get missing files from it"))
    else:
        endpoint = src.endpoint or DEFAULT_ENDPOINTS[src.kind]
        env = ["-e", f"HF_ENDPOINT={endpoint}"] if src.kind != "modelscope" else []
        argv = ["docker", "run", "--rm", "--network", "host", *env, "-v", f"{head_path}:/target", "--entrypoint",
                "huggingface-cli", prof.image, "download", inv.deploy.model, "--local-dir", "/target"]
        if src.revision:
            argv += ["--revision", src.revision]
        where = "this machine" if src.download_on == "control" else "the head"
        steps.append(Step(host="control" if src.download_on == "control" else head.name, phase="model",
                          argv=tuple(argv),
                          reason=f"download {inv.deploy.model} once on {where} from {endpoint} (gpucluster "
                                 "uses its own resumable, sha256-checking fetcher; skipped when complete)"))
    if not inv.cluster.shared_model_dir:
        for h in s.hosts[1:]:
            path, _ = model_paths(inv, h)
            steps.append(Step(host=h.name, phase="model",
                              argv=("rsync", "-a", "--partial", f"{head.address}:{head_path}/", f"{path}/"),
                              reason=f"copy from {head.name} over the LAN, then verify sizes and sha256 "
                                     "(gpucluster streams host to host itself; skipped when complete)"))
    steps.append(Step(host=head.name, phase="ray-head", argv=tuple(run_argv(containers[head.name])),
                      reason=f"Ray head on {head.address}:{RAY_PORT} with {head.gpus.count} GPUs"))
    for h in s.hosts[1:]:
        steps.append(Step(host=h.name, phase="ray-workers", argv=tuple(run_argv(containers[h.name])),
                          reason=f"Ray worker joining {head.address}:{RAY_PORT}, after the head is healthy"))
    steps.append(Step(host=head.name, phase="api", argv=tuple(api.exec_argv()),
                      reason=f"vLLM {s.engine.version} API server, TP {s.tp} x PP {s.pp}, after all "
                             f"{s.tp * s.pp} GPUs have joined Ray"))
    base = f"http://{head.address}:{port}"
    steps.append(Step(host="control", phase="ready", argv=("curl", "-fsS", f"{base}/health"),
                      reason="wait (minutes: the model loads) for /health, then /v1/models and one completion"))
    return steps


def build(inventory: Inventory, profile: Profile, *, model: ModelFacts | None, tp: int | None = None,
          pp: int | None = None, hosts: list[str] | None = None, sets: dict[str, Any] | None = None,
          extra_findings: tuple[Finding, ...] = ()) -> Plan:
    """The whole plan, from data only: no I/O."""
    engine = knowledge.engine(profile.version)
    selected = _select_hosts(inventory, hosts)
    env = {**profile.env, **inventory.deploy.env}
    base = Setup(inventory=inventory, profile=profile, engine=engine, model=model, hosts=tuple(selected),
                 tp=1, pp=1, args=effective_args(profile, inventory, sets or {}), env=env)
    setup, why = choose_topology(base, selected, tp or inventory.deploy.tensor_parallel,
                                 pp or inventory.deploy.pipeline_parallel)
    findings = list(extra_findings)
    if model is None:
        findings.append(Finding(code="model-unknown", severity="warning",
                                message=f"{inventory.deploy.model} is not in the built-in catalog: heads, vocabulary "
                                        "and memory were not checked",
                                fix="point deploy.model at a local directory holding config.json"))
    findings += checks.run_all(setup)
    head = setup.hosts[0]
    containers = {h.name: ray_container(setup, h, head=head) for h in setup.hosts}
    served = inventory.deploy.served_model_name or inventory.deploy.model
    port = inventory.deploy.port or profile.port
    api = ApiSpec(container=container_name(inventory.cluster.name, "ray-head"),
                  argv=api_argv(setup, served, port),
                  env_file=secrets_file(inventory, "api") if inventory.deploy.api_key else None)
    topo = Topology(tp=setup.tp, pp=setup.pp, head=head.name, nodes=tuple(h.name for h in setup.hosts), why=why)
    return Plan(inventory=inventory, profile=profile, engine=engine, model=model, setup=setup, topology=topo,
                findings=tuple(findings), memory=setup.memory(), containers=containers, api=api,
                served_name=served, port=port, steps=tuple(_steps(setup, containers, api, served, port)))
