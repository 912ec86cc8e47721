"""PURE: container specs -> `docker run` argv, labels and a spec hash; the step that makes a host match a spec."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Mapping

from .config import Secret
from .steps import Check, Cmd, Put, Step

LABEL = "gpucluster"
SECRETS_MOUNT = "/run/gpucluster/env"   # where a container finds its node's secret env (a read-only bind mount)
# Exports the KEY=value lines of a mounted 0600 file (literally: nothing in a value is expanded), then execs
# the process: a secret is in no argv and in no container config (`docker inspect` shows the path only).
WITH_SECRETS = 'while IFS= read -r kv; do export "$kv"; done < "$0"; exec "$@"'


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


def split_env(env: Mapping[str, str | Secret]) -> tuple[dict[str, str], dict[str, Secret]]:
    """(plain values, for `-e`; secret values, for the node's 0600 file): a secret never goes to `-e`."""
    plain = {k: v for k, v in env.items() if not isinstance(v, Secret)}
    return plain, {k: v for k, v in env.items() if isinstance(v, Secret)}


def secrets_digest(secrets: Mapping[str, Secret], salt: str) -> str:
    """A digest of secret values, never the values ("" when none): rotating one changes a spec's hash."""
    return digest({k: v.digest(salt) for k, v in sorted(secrets.items())}) if secrets else ""


def secrets_put(path: str, secrets: Mapping[str, Secret]) -> Put:
    """The node's secret env as a 0600 file of KEY=value lines, written over SFTP (revealed only then)."""
    return Put(path=path, mode=0o600, secrets=tuple(sorted(secrets.items())))


def with_secrets(spec: ContainerSpec, *, file: str, mount: str = SECRETS_MOUNT, digest_: str = "") -> ContainerSpec:
    """The spec's process started by WITH_SECRETS, which exports `file` (on the host; read-only at `mount`)."""
    return dataclasses.replace(spec, entrypoint="sh", command=("-c", WITH_SECRETS, mount, spec.entrypoint,
                                                               *spec.command),
                               mounts=(*spec.mounts, (file, mount, "ro")), extra_hash=spec.extra_hash + digest_)


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


def container_step(spec: ContainerSpec, *, host: str, phase: str, reason: str, after: tuple[str, ...] = (),
                   files: tuple[Put, ...] = ()) -> Step:
    """Make `host` run `spec`: create it, start it, replace it when its spec changed, or leave it.
    `files` (the secrets file it mounts) are written first whenever the container is (re)started."""
    run = Cmd(argv=run_argv(spec))
    variants = {"start": (*files, Cmd(argv=("docker", "start", spec.name))),
                "replace": (*files, Cmd(argv=("docker", "rm", "-f", spec.name)), run)}
    if after:
        variants["restart"] = (*files, Cmd(argv=("docker", "restart", spec.name)))
    return Step(id=f"{host}/{spec.role}", host=host, phase=phase, reason=reason, ops=(*files, run),
                check=Check(argv=check_argv(spec)), variants=variants, after=after)


def removal_probe(cluster: str, node: str) -> tuple[str, ...]:
    """Read-only: names of this cluster's containers of one node kind (head | worker | aux)."""
    return ("docker", "ps", "-a", "--filter", f"label={LABEL}.cluster={cluster}", "--filter",
            f"label={LABEL}.node={node}", "--format", "{{.Names}}")
