"""PURE: container specs -> `docker run` argv, labels and a spec hash; the step that makes a host match a spec."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .steps import Check, Cmd, Step

LABEL = "gpucluster"


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def container_name(cluster: str, role: str) -> str:
    return f"{LABEL}-{cluster}-{role}"


@dataclass(frozen=True, kw_only=True)
class ContainerSpec:
    """One long-running container gpucluster owns on one host."""

    cluster: str
    role: str                                   # engine-defined: ray-head, ray-worker, ...
    node: str = "head"                          # head | worker | aux: the order `down` removes them in
    image: str
    entrypoint: str
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    env_file: str | None = None
    mounts: tuple[tuple[str, str, str], ...] = ()   # (host path, container path, ro|rw)
    network: str = "host"
    ipc: str | None = "host"
    shm_size: str | None = None
    gpus: str | None = "all"
    privileged: bool = False
    extra_hash: str = ""                        # digest of inputs not visible here (secret values)

    @property
    def name(self) -> str:
        return container_name(self.cluster, self.role)

    @property
    def spec_hash(self) -> str:
        return digest(asdict(self))

    def labels(self) -> dict[str, str]:
        return {f"{LABEL}.cluster": self.cluster, f"{LABEL}.role": self.role, f"{LABEL}.node": self.node,
                f"{LABEL}.spec": self.spec_hash}


def run_argv(spec: ContainerSpec) -> tuple[str, ...]:
    """`docker run -d ...` for a spec; every value is its own argv element."""
    argv = ["docker", "run", "-d", "--name", spec.name]
    for key, value in spec.labels().items():
        argv += ["--label", f"{key}={value}"]
    argv += [f"--network={spec.network}"]
    if spec.ipc:
        argv += [f"--ipc={spec.ipc}"]
    if spec.shm_size:
        argv += [f"--shm-size={spec.shm_size}"]
    if spec.gpus:
        argv += ["--gpus", spec.gpus]
    if spec.privileged:
        argv += ["--privileged"]
    for key, value in spec.env:
        argv += ["-e", f"{key}={value}"]
    if spec.env_file:
        argv += ["--env-file", spec.env_file]
    for src, dst, mode in spec.mounts:
        argv += ["-v", f"{src}:{dst}:{mode}"]
    return (*argv, "--entrypoint", spec.entrypoint, spec.image, *spec.command)


def check_argv(spec: ContainerSpec) -> tuple[str, ...]:
    """Read-only: prints skip / start / replace / fail for the container named by the spec (nothing: create).

    A Go template of `docker inspect`; the only values in it are the cluster name (a-z0-9-) and hex hashes."""
    lab = f'(index .Config.Labels "{LABEL}.'
    template = (f'{{{{if ne {lab}cluster") "{spec.cluster}"}}}}fail a container named {spec.name} exists and is '
                f'not gpucluster\'s (cluster {spec.cluster}); remove or rename it first'
                f'{{{{else if ne {lab}spec") "{spec.spec_hash}"}}}}replace spec changed '
                f'({{{{{lab}spec")}}}} -> {spec.spec_hash})'
                f'{{{{else if .State.Running}}}}skip running, spec {spec.spec_hash}'
                f'{{{{else}}}}start container is {{{{.State.Status}}}}{{{{end}}}}')
    return ("docker", "inspect", "--type", "container", "--format", template, spec.name)


def container_step(spec: ContainerSpec, *, host: str, phase: str, reason: str, after: tuple[str, ...] = ()) -> Step:
    """Make `host` run `spec`: create it, start it, replace it when its spec changed, or leave it."""
    run = Cmd(argv=run_argv(spec))
    variants = {"start": (Cmd(argv=("docker", "start", spec.name)),),
                "replace": (Cmd(argv=("docker", "rm", "-f", spec.name)), run)}
    if after:
        variants["restart"] = (Cmd(argv=("docker", "restart", spec.name)),)
    return Step(id=f"{host}/{spec.role}", host=host, phase=phase, reason=reason, ops=(run,),
                check=Check(argv=check_argv(spec)), variants=variants, after=after)


def removal_probe(cluster: str, node: str) -> tuple[str, ...]:
    """Read-only: names of this cluster's containers of one node kind (head | worker | aux)."""
    return ("docker", "ps", "-a", "--filter", f"label={LABEL}.cluster={cluster}", "--filter",
            f"label={LABEL}.node={node}", "--format", "{{.Names}}")
