"""PURE: container specs -> docker argv, labels and a spec hash; drift between spec and reality."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

LABEL = "gpucluster"
LOG_DIR = "/var/log/gpucluster"
API_LOG = f"{LOG_DIR}/api.log"
API_STATE = "/run/gpucluster-api"     # "<pid> <spec hash>" of the API server started by gpucluster

# The API server runs inside the head container. This fixed script records its pid and spec
# hash, then execs the server with its own argv ("$@"): no value from YAML is ever part of it.
API_LAUNCHER = (f'mkdir -p {LOG_DIR} && echo "$$ $0" > {API_STATE} && '
                f'exec "$@" >> {API_LOG} 2>&1')


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def container_name(cluster: str, role: str) -> str:
    return f"{LABEL}-{cluster}-{role}"


@dataclass(frozen=True, kw_only=True)
class ContainerSpec:
    """One long-running container gpucluster owns on one host."""

    cluster: str
    role: str                                   # ray-head | ray-worker
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
    extra_hash: str = ""                        # digest of inputs that are not visible here (secrets)

    @property
    def name(self) -> str:
        return container_name(self.cluster, self.role)

    @property
    def spec_hash(self) -> str:
        return _digest(asdict(self))

    def labels(self) -> dict[str, str]:
        return {f"{LABEL}.cluster": self.cluster, f"{LABEL}.role": self.role, f"{LABEL}.spec": self.spec_hash}


def run_argv(spec: ContainerSpec) -> list[str]:
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
    argv += ["--entrypoint", spec.entrypoint, spec.image, *spec.command]
    return argv


@dataclass(frozen=True, kw_only=True)
class ApiSpec:
    """The API server process, started with `docker exec` inside the head container."""

    container: str
    argv: tuple[str, ...]
    env_file: str | None = None
    extra_hash: str = ""

    @property
    def spec_hash(self) -> str:
        return _digest(asdict(self))

    def exec_argv(self) -> list[str]:
        argv = ["docker", "exec", "-d"]
        if self.env_file:
            argv += ["--env-file", self.env_file]
        return argv + [self.container, "sh", "-c", API_LAUNCHER, self.spec_hash, *self.argv]


@dataclass(frozen=True)
class Observed:
    """What `docker inspect` says about a container (parsed by facts.parse_inspect)."""

    name: str
    id: str
    running: bool
    status: str
    labels: dict[str, str] = field(default_factory=dict)
    image_id: str = ""


def drift(spec: ContainerSpec, seen: Observed | None) -> str | None:
    """Why the container must be (re)created or started; None when it is already right."""
    if seen is None:
        return "create: no such container"
    if seen.labels.get(f"{LABEL}.cluster") != spec.cluster:
        return f"replace: {seen.name} exists but is not labelled for cluster {spec.cluster}"
    if seen.labels.get(f"{LABEL}.spec") != spec.spec_hash:
        return f"replace: spec changed ({seen.labels.get(f'{LABEL}.spec', '?')} -> {spec.spec_hash})"
    if not seen.running:
        return f"start: container is {seen.status}"
    return None
