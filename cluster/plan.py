"""PURE: (inventory, profile, model facts, engine facts) -> Plan: findings, topology, memory, and the steps.

The steps are everything `up` runs: the image and model phases (common), then the engine plugin's own."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from . import checks, engines, record
from . import ui as front
from .checks import ERROR, WARNING, Finding, Setup
from .config import Host, Inventory, Profile, Secret, flag_name
from .delivery.model_steps import ModelJob, fanout_steps, head_steps
from .deployment import Deployment, Topology
from .errors import ConfigError
from .memory import Memory
from .models import ModelFacts
from .containers import LABEL
from .steps import Check, Cmd, Step

IMAGE_CHECK_AGENT = (Path(__file__).parent / "image_check_agent.py").read_text()


@dataclass(frozen=True, kw_only=True)
class Plan:
    deployment: Deployment
    model: ModelFacts | None
    findings: tuple[Finding, ...]
    memory: Memory | None
    steps: tuple[Step, ...]

    @property
    def verdict(self) -> str:
        if any(f.severity == ERROR for f in self.findings):
            return "fail"
        return "warn" if self.findings else "ok"

    @property
    def inventory(self) -> Inventory:
        return self.deployment.inventory

    @property
    def profile(self) -> Profile:
        return self.deployment.profile

    @property
    def topology(self) -> Topology:
        return self.deployment.topology

    @property
    def endpoint(self) -> str:
        return self.deployment.endpoint

    @property
    def served_name(self) -> str:
        return self.deployment.served_name

    def host(self, name: str) -> Host:
        return next(h for h in self.inventory.hosts if h.name == name)

    def as_dict(self) -> dict:
        d = self.deployment
        return {
            "verdict": self.verdict,
            "cluster": d.cluster,
            "engine": d.engine.name,
            "profile": d.profile.name,
            "image": d.profile.image,
            "model": d.inventory.deploy.model,
            "served_model_name": d.served_name,
            "endpoint": d.endpoint,
            "findings": [f.as_dict() for f in self.findings],
            "topology": d.topology.as_dict(),
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


def _hosts_for(base: Setup, hosts: list[Host], ranks: int) -> tuple[Host, ...]:
    used, total = [], 0
    for h in hosts:
        if total >= ranks:
            break
        used.append(h)
        total += base.slots(h)
    return tuple(used)


# ---------------------------------------------------------------- topology
def _setup(base: Setup, hosts: list[Host], tp: int, pp: int) -> Setup:
    """TP x PP on the fewest hosts (head first); with PP > 1 each stage is one host."""
    if pp > 1 and pp <= len(hosts):
        used = tuple(hosts[:pp])
    elif tp * pp <= sum(base.slots(h) for h in hosts):
        used = _hosts_for(base, hosts, tp * pp)
    else:
        used = tuple(hosts)
    return dataclasses.replace(base, tp=tp, pp=pp, hosts=used)


def choose_topology(base: Setup, hosts: list[Host], tp: int | None, pp: int | None, *, base_pp: bool
                    ) -> tuple[Setup, str]:
    """Honour a given TP/PP; otherwise the fewest GPUs that pass every check, TP within a node first.
    `base_pp`: the engine can split layers over hosts (pipeline parallelism)."""
    total = sum(base.slots(h) for h in hosts)
    if tp and pp:
        return _setup(base, hosts, tp, pp), "as given in the inventory / command line"
    if tp:
        return _setup(base, hosts, tp, 1), "tensor_parallel as given; pipeline_parallel 1"
    per_node = min(base.slots(h) for h in hosts)
    pps = [pp] if pp else (range(1, len(hosts) + 1) if base_pp else [1])
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
    if base_pp and len(hosts) > 1 and not pp:
        s = _setup(base, hosts, per_node, len(hosts))
    else:
        s = _setup(base, hosts, total // (pp or 1), pp or 1)
    return s, "no layout passes every check; showing the largest (" + ", ".join(rejected[:4]) + ")"


# ---------------------------------------------------------------- steps
def image_refs(image: str, mirrors: list[str]) -> list[str]:
    """Where to pull `image` from, in order: each mirror as a prefix (`m.daocloud.io/ghcr.io/...`), then itself."""
    return [f"{m.rstrip('/')}/{image}" for m in mirrors] + [image]


def mirror_refs(inventory: Inventory, profile: Profile) -> list[str]:
    return image_refs(profile.image, [*inventory.cluster.registry_mirrors, *profile.registry_mirrors])


def pull_step(host: str, image: str, refs: list[str], *, id: str, phase: str) -> Step:
    """Pull through the registry mirrors in order (retagging a mirror's copy to the canonical name); skip if present."""
    tries = [(Cmd(argv=("docker", "pull", r), timeout=3600),) + ((Cmd(argv=("docker", "tag", r, image)),)
                                                                  if r != image else ()) for r in refs]
    return Step(id=id, host=host, phase=phase, ops=tries[0], otherwise=tuple(tries[1:]),
                check=Check(argv=("docker", "image", "inspect", "--format", "skip present {{.Id}}", image)),
                reason=f"pull {image} through the mirrors in order: {', '.join(refs)}")


def image_steps(d: Deployment, *, token: Secret | None = None) -> list[Step]:
    """The engine's image on every host: through the mirrors once and over the LAN (cluster.image_fanout: lan), or
    every host through the mirrors (mirror, or a single host)."""
    from . import image_fanout
    refs = mirror_refs(d.inventory, d.profile)
    if image_fanout.use_lan(d):
        return image_fanout.lan_steps(d, refs, token or Secret(literal=secrets.token_hex(24)))
    return [image_fanout.pull_step(h.name, d.profile.image, refs, id=f"{h.name}/image", phase="image")
            for h in d.hosts]


def image_check_steps(d: Deployment) -> list[Step]:
    """Right after the pull: the image's own torch on every host must have a kernel image for each GPU it sees."""
    if d.profile.device != "gpu":
        return []
    image = d.profile.image
    return [Step(id=f"{h.name}/image-check", host=h.name, phase="image-check", readonly=True,
                 reason=f"the torch in {image} runs on this host's GPUs (torch.cuda.get_arch_list() vs each GPU)",
                 ops=(Cmd(argv=("docker", "run", "--rm", "--pull", "never", "--gpus", "all", "--network", "none",
                                "--entrypoint", "python3", image, "-c", IMAGE_CHECK_AGENT, image),
                          timeout=300, stream=True),))
            for h in d.hosts]


def _devices_declared(inventory: Inventory, profile: Profile) -> None:
    """A GPU profile needs every host's GPUs declared (a CPU profile needs none)."""
    for i, h in enumerate(inventory.hosts):
        if profile.device == "gpu" and h.gpus is None:
            raise ConfigError(f"{h.name} declares no GPUs, and profile {profile.name} runs on GPUs",
                              file=inventory.path, field=f"hosts[{i}].gpus",
                              fix="add gpus: {count, memory_mib, compute_capability}, or use a CPU profile (device: cpu)")


def stray_steps(d: Deployment) -> list[Step]:
    """Containers of this cluster the plan does not run (a host left the deployment, the engine changed) go first."""
    planned, ui = d.engine.containers(d), front.containers(d)
    return [Step(id=f"{h.name}/strays", host=h.name, phase="strays", use_output=True,
                 keep=tuple(sorted(c.name for c in [*planned.get(h.name, []), *ui.get(h.name, [])])),
                 check=Check(argv=("docker", "ps", "-a", "--filter", f"label={LABEL}.cluster={d.cluster}",
                                   "--format", "{{.Names}}")),
                 reason="remove this cluster's containers that the plan does not run",
                 ops=(Cmd(argv=("docker", "rm", "-f")),))
            for h in d.inventory.hosts]


def _secret_findings(inventory: Inventory) -> list[Finding]:
    named = dict(inventory.secrets())
    return [Finding(code="secret-unset", severity=WARNING, message=f"{field} is read from ${s.env}, which is not set "
                    "here; `up` will refuse to start", fix=f"export {s.env}=... before `gpucluster up`")
            for field, s in named.items() if s is not None and s.env and s.digest("") == "unset"]


def build(inventory: Inventory, profile: Profile, *, model: ModelFacts | None, tp: int | None = None,
          pp: int | None = None, hosts: list[str] | None = None, sets: dict[str, Any] | None = None,
          extra_findings: tuple[Finding, ...] = (), verify: bool = False, join_timeout: float = 180,
          ready_timeout: float = 1800, transfer_token: Secret | None = None) -> Plan:
    """The whole plan, from data only: no I/O."""
    engine = engines.get(profile.engine)
    engine.validate(inventory, profile, sets or {})
    _devices_declared(inventory, profile)
    facts = engine.facts(profile.version)
    selected = _select_hosts(inventory, hosts)
    env = {**profile.env, **inventory.deploy.env}
    base = Setup(inventory=inventory, profile=profile, facts=facts, model=model, hosts=tuple(selected),
                 tp=1, pp=1, args=effective_args(profile, inventory, sets or {}), env=env,
                 engine_checks=tuple(engine.checks()))
    setup, why = choose_topology(base, selected, tp or inventory.deploy.tensor_parallel,
                                 pp or inventory.deploy.pipeline_parallel, base_pp=engine.pipeline_parallel(facts))
    findings = list(extra_findings)
    if model is None:
        findings.append(Finding(code="model-unknown", severity="warning",
                                message=f"{inventory.deploy.model} is not in the built-in catalog: heads, vocabulary "
                                        "and memory were not checked",
                                fix="point deploy.model at a local directory holding config.json"))
    findings += checks.run_all(setup) + _secret_findings(inventory)
    head = setup.hosts[0]
    d = Deployment(inventory=inventory, profile=profile, engine=engine, facts=facts, setup=setup,
                   topology=Topology(tp=setup.tp, pp=setup.pp, head=head.name,
                                     nodes=tuple(h.name for h in setup.hosts), why=why),
                   served_name=inventory.deploy.served_model_name or inventory.deploy.model,
                   port=inventory.deploy.port or profile.port)
    front.validate(d)
    findings += front.findings(d)
    job = ModelJob(inventory=inventory, hosts=setup.hosts, image=profile.image, verify=verify,
                   transfer_token=transfer_token or Secret(literal=secrets.token_hex(24)))
    # an engine may fetch its model itself (Ollama pulls through its API) and have no torch to check in its image
    own_model, own_check = engine.model_steps(d), engine.image_check_steps(d)
    steps = [*stray_steps(d), *image_steps(d), *(image_check_steps(d) if own_check is None else own_check),
             *([*head_steps(job), *fanout_steps(job)] if own_model is None else own_model),
             *engine.steps(d, join_timeout=join_timeout, ready_timeout=ready_timeout), *front.steps(d),
             *record.steps(d, sets or {})]
    return Plan(deployment=d, model=model, findings=tuple(findings), memory=setup.memory(), steps=tuple(steps))


def model_steps(plan: Plan) -> list[Step]:
    """The image and model phases alone (`gpucluster model pull`)."""
    return [s for s in plan.steps if s.phase in ("image", "image-fanout") or s.phase.startswith("model")]
