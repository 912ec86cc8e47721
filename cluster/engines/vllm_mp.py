"""vLLM across hosts without Ray: one server container per host (`--nnodes/--node-rank/--master-addr`), the
head (rank 0) serves the API, the others run `--headless`. For releases that have these flags (and for CPU
builds, which refuse Ray)."""

from __future__ import annotations

from ..checks import ERROR, Finding
from ..memory import GIB
from ..containers import SECRETS_MOUNT as ENV_MOUNT
from ..containers import ContainerSpec, container_step, secrets_digest, secrets_put, split_env, with_secrets
from ..steps import Put, Step
from . import LogSource, vllm
from .vllm_ray import VllmRay

MASTER_PORT = 29501          # torch.distributed's store on the head; pinned so firewalls can allow it
SECRETS_MOUNT = "/run/gpucluster/api.env"    # the head's file when it holds the API key (else ENV_MOUNT)
MP_FLAGS = {"nnodes": "(gpucluster: the number of hosts)", "node-rank": "(gpucluster: one per host)",
            "master-addr": "(gpucluster: the head's address)", "master-port": "(gpucluster: pinned)",
            "headless": "(gpucluster: every host but the head)",
            "distributed-executor-backend": "(gpucluster: mp in this engine)"}


def mp_supported(s) -> list[Finding]:
    if len(s.hosts) > 1 and s.facts.flag("nnodes") is None:
        return [Finding(code="mp-unsupported", severity=ERROR,
                        message=f"vLLM {s.facts.version} has no multi-node mode without Ray (--nnodes)",
                        fix="use engine vllm (Ray) with this image, or an image whose vLLM has --nnodes")]
    return []


def cpu_memory(d, probed) -> list[Finding]:
    """A CPU node holds its weight shard plus VLLM_CPU_KVCACHE_SPACE GiB of KV cache in RAM, and ~1.5 GiB more."""
    weights = d.setup.model.weight_bytes / (d.setup.tp * d.setup.pp) if d.setup.model else 0
    kv = float(split_env(d.setup.env)[0].get("VLLM_CPU_KVCACHE_SPACE") or 4) * GIB     # a secret one: unknown
    need = weights + kv + 1.5 * GIB
    out = []
    for h in d.hosts:
        f = probed.get(h.name)
        if f and f.reachable and f.mem_total is not None and f.mem_total < need:
            out.append(Finding(code="host-memory-insufficient", severity=ERROR,
                               message=f"{h.name}: {f.mem_total / GIB:.1f} GiB of RAM; a CPU node needs "
                                       f"{need / GIB:.1f} GiB (weights {weights / GIB:.1f} + KV cache "
                                       f"{kv / GIB:.1f} + runtime 1.5)",
                               fix="lower env VLLM_CPU_KVCACHE_SPACE (GiB), use more nodes, or a smaller model"))
    return out


class VllmMp(VllmRay):
    name = "vllm-mp"
    components = ("head", "node")

    def validate(self, inventory, profile, sets=None) -> None:
        vllm.validate(inventory, profile, sets or {}, extra=MP_FLAGS)

    def checks(self):
        return (*(c for c in vllm.CHECKS if c is not vllm.host_ip_honoured), mp_supported)

    def measured(self, d, probed) -> list:
        return cpu_memory(d, probed) if d.profile.device == "cpu" else []

    def container(self, d, host) -> ContainerSpec:
        rank = d.hosts.index(host)
        argv = list(vllm.api_argv(d.setup, model_path=d.model_path(d.head)[1], served_name=d.served_name,
                                  port=d.port, executor=("--distributed-executor-backend", "mp")))
        if len(d.hosts) > 1:
            argv += ["--nnodes", str(len(d.hosts)), "--node-rank", str(rank), "--master-addr", d.head.address,
                     "--master-port", str(MASTER_PORT), *(["--headless"] if rank else [])]
        host_path, container_path = d.model_path(host)
        o = d.profile.docker
        spec = ContainerSpec(cluster=d.cluster, role="vllm-head" if rank == 0 else f"vllm-node-{rank}",
                             node="head" if rank == 0 else "worker", image=d.profile.image, entrypoint=argv[0],
                             command=tuple(argv[1:]), env=tuple(sorted(self.node_env(d, host).items())),
                             mounts=((host_path, container_path, "ro"),), network=o.network, ipc=o.ipc,
                             shm_size=o.shm_size, gpus=o.gpus if d.profile.device == "gpu" else None,
                             privileged=o.privileged, extra_hash=self.api_hash(d))
        if not self.node_secrets(d, host):
            return spec
        file, mount = self._secrets_paths(d, host)      # the key and the env secrets: one mounted 0600 file
        return with_secrets(spec, file=file, mount=mount,
                            digest_=secrets_digest(self.secret_env(d, host), d.cluster))   # the key: in api_hash

    def node_secrets(self, d, host) -> dict:
        """What this node's server exports from its file: its secret env, and on the head the API key."""
        key = {"VLLM_API_KEY": d.api_key} if host is d.head and d.api_key is not None else {}
        return {**self.secret_env(d, host), **key}

    def _secrets_paths(self, d, host) -> tuple[str, str]:
        if host is d.head and d.api_key is not None:
            return d.secrets_file("api"), SECRETS_MOUNT
        return d.secrets_file("env"), ENV_MOUNT

    def secret_files(self, d, host) -> tuple[Put, ...]:
        secrets = self.node_secrets(d, host)
        return (secrets_put(self._secrets_paths(d, host)[0], secrets),) if secrets else ()

    def steps(self, d, *, join_timeout: float = 180, ready_timeout: float = 1800) -> list[Step]:
        specs = [self.container(d, h) for h in d.hosts]
        ids = [f"{h.name}/{s.role}" for h, s in zip(d.hosts, specs)]
        steps = []
        for i, (h, spec) in enumerate(zip(d.hosts, specs)):
            # the nodes form one process group: when one of them is (re)started, the others must restart too
            others = tuple(x for x in ids if x != ids[i])
            what = "API server and rank 0" if i == 0 else f"rank {i} (--headless)"
            # the secrets file first (mounted read-only: the key and secret env are never in argv or config)
            steps.append(container_step(spec, host=h.name, phase="engine", after=others, files=self.secret_files(d, h),
                                        reason=f"vLLM {d.facts.version} {what} of {len(d.hosts)} node(s), "
                                               f"TP {d.setup.tp} x PP {d.setup.pp}, without Ray"))
        head = specs[0].name
        return steps + vllm.ready_steps(d, timeout=ready_timeout, alive=(d.head.name, ("docker", "exec", head, "true")),
                                        log=(d.head.name, ("docker", "logs", "--tail", "20", head)))

    def status(self, d, run) -> tuple[dict, list[str], list[str]]:
        return {}, [f"{len(d.hosts)} node(s) without Ray"], []

    def logs(self, d, *, tail: int, follow: bool) -> list[LogSource]:
        return [LogSource(host=h.name, component="head" if h is d.head else "node", argv=(
            "docker", "logs", "--tail", str(tail), *(["-f"] if follow else []), self.container(d, h).name))
            for h in d.hosts]


ENGINE = VllmMp()
