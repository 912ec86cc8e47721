"""vLLM across hosts with Ray: a Ray container per host (head first), the API server inside the head container.

The only module that knows Ray, VLLM_HOST_IP and where vLLM's API server runs."""

from __future__ import annotations

import json

from .. import knowledge
from ..checks import ERROR, Finding
from ..containers import ContainerSpec, container_step, digest, secrets_digest, secrets_put, with_secrets
from ..steps import Check, Cmd, Put, Step, Wait
from . import EngineBase, LogSource, vllm

RAY_PORT = 6379
LOG_DIR = "/var/log/gpucluster"
API_LOG = f"{LOG_DIR}/api.log"
API_STATE = "/run/gpucluster-api"     # "<pid> <spec hash>" of the API server gpucluster started

# The API server runs inside the head container. This fixed script records its pid and spec hash, then
# execs the server with its own argv ("$@"): no value from YAML is ever part of it.
API_LAUNCHER = f'mkdir -p {LOG_DIR} && echo "$$ $0" > {API_STATE} && exec "$@" >> {API_LOG} 2>&1'
_ALIVE = f'read -r pid spec < {API_STATE} 2>/dev/null && [ -d "/proc/$pid" ] && ! grep -q "^State:.*Z" "/proc/$pid/status"'
# Read-only: is the API server with this spec hash ("$0") running? (skip / replace / run)
API_CHECK = (f'if {_ALIVE}; then if [ "$spec" = "$0" ]; then echo "skip running pid $pid, spec $spec"; '
             'else echo "replace spec changed ($spec -> $0)"; fi; else echo "run not running"; fi')
# Stop the recorded API server: TERM, up to 30 s, then KILL.
API_STOP = (f'{_ALIVE} || exit 0; kill "$pid"; i=0; while [ $i -lt 30 ] && [ -d "/proc/$pid" ] && '
            '! grep -q "^State:.*Z" "/proc/$pid/status"; do sleep 1; i=$((i+1)); done; '
            '[ -d "/proc/$pid" ] && kill -9 "$pid"; true')
# Read-only: exits 0 when Ray lists the expected nodes ("name=ip" args) and at least argv[1] GPUs; with argv[2]
# "exact", no other node either (a host that left the deployment must be gone, or vLLM may place work on it).
RAY_JOINED = """import json, sys, ray
need, exact, want = float(sys.argv[1]), sys.argv[2] == "exact", dict(a.split("=", 1) for a in sys.argv[3:])
ray.init(address="auto", logging_level="ERROR")
alive = [n for n in ray.nodes() if n["Alive"]]
ips, gpus = {n["NodeManagerAddress"] for n in alive}, sum(n["Resources"].get("GPU", 0) for n in alive)
missing = [f"{name} ({ip})" for ip, name in sorted((ip, name) for name, ip in want.items()) if ip not in ips]
extra = sorted(ips - set(want.values())) if exact else []
print(json.dumps({"nodes": [{"ip": n["NodeManagerAddress"], "gpus": n["Resources"].get("GPU", 0)} for n in alive]}))
print((f"never joined: {', '.join(missing)}" if missing else f"all {len(want)} node(s) joined")
      + (f"; still listed, not in the deployment: {', '.join(extra)}" if extra else "")
      + f"; GPUs seen {gpus:g} of {need:g} needed")
sys.exit(0 if not missing and not extra and gpus >= need else 1)"""


def ray_on_gpus(s) -> list[Finding]:
    if s.cpu:
        return [Finding(code="ray-unsupported", severity=ERROR,
                        message="vLLM's CPU build refuses the Ray executor (\"current platform cpu does not support "
                                "ray\")", fix="use engine: vllm-mp (multi-node without Ray)")]
    return []


class VllmRay(EngineBase):
    name = "vllm"
    knowledge = "vllm"
    components = ("api", "ray-head", "ray-worker")

    def facts(self, version: str):
        return knowledge.engine(self.knowledge, version)

    def validate(self, inventory, profile, sets=None) -> None:
        vllm.validate(inventory, profile, sets or {})

    def checks(self):
        return (*vllm.CHECKS, ray_on_gpus)

    def pipeline_parallel(self, facts) -> bool:
        return facts.pipeline_parallel

    # ------------------------------------------------------------------ specs
    def container(self, d, host) -> ContainerSpec:
        head = d.head
        host_path, container_path = d.model_path(host)
        if host is head:
            command = ("start", "--head", f"--node-ip-address={host.address}", f"--port={RAY_PORT}")
        else:
            command = ("start", f"--address={head.address}:{RAY_PORT}", f"--node-ip-address={host.address}")
        command += (f"--num-gpus={host.gpus.count if host.gpus else 0}", "--disable-usage-stats", "--block")
        env = self.node_env(d, host)
        o = d.profile.docker
        spec = ContainerSpec(cluster=d.cluster, role="ray-head" if host is head else "ray-worker",
                             node="head" if host is head else "worker", image=d.profile.image, entrypoint="ray",
                             command=command, env=tuple(sorted(env.items())),
                             mounts=((host_path, container_path, "ro"),), network=o.network, ipc=o.ipc,
                             shm_size=o.shm_size, gpus=o.gpus if d.profile.device == "gpu" else None,
                             privileged=o.privileged)
        secrets = self.secret_env(d, host)     # Ray's raylet and the workers it starts get them from its env
        return with_secrets(spec, file=d.secrets_file("env"), digest_=secrets_digest(secrets, d.cluster)) \
            if secrets else spec

    def containers(self, d) -> dict[str, list[ContainerSpec]]:
        return {h.name: [self.container(d, h)] for h in d.hosts}

    def node_env(self, d, host) -> dict[str, str]:
        """The environment of this engine's processes on one host (also what `check network` runs with)."""
        return vllm.node_env(d, host)

    def secret_env(self, d, host) -> dict:
        """The secret env values of this engine's processes on one host (a 0600 file, never `-e`)."""
        return vllm.secret_env(d, host)

    def secret_files(self, d, host) -> tuple[Put, ...]:
        """The 0600 file a node's container mounts (with_secrets), written before the container (re)starts."""
        secrets = self.secret_env(d, host)
        return (secrets_put(d.secrets_file("env"), secrets),) if secrets else ()

    def api_secrets(self, d) -> dict:
        """What the API server gets from its 0600 env file (`docker exec --env-file`, which `docker inspect` of the
        container does not show): the head's secret env (exec does not see what the container's process
        exported) and the API key."""
        return {**self.secret_env(d, d.head), **({"VLLM_API_KEY": d.api_key} if d.api_key is not None else {})}

    def api_argv(self, d) -> tuple[str, ...]:
        return vllm.api_argv(d.setup, model_path=d.model_path(d.head)[1], served_name=d.served_name, port=d.port)

    def api_hash(self, d) -> str:
        """The API server's spec: its argv, and the key it serves with (as a digest: rotating it restarts)."""
        key = d.api_key.digest(d.cluster) if d.api_key is not None else None
        env = secrets_digest(self.secret_env(d, d.head), d.cluster)
        return digest({"argv": self.api_argv(d), "key": key, **({"env": env} if env else {})})

    # ------------------------------------------------------------------ steps
    def steps(self, d, *, join_timeout: float = 180, ready_timeout: float = 1800) -> list[Step]:
        head = d.head
        specs = {h.name: self.container(d, h) for h in d.hosts}
        head_name = specs[head.name].name
        head_step = container_step(specs[head.name], host=head.name, phase="ray-head",
                                   reason=f"Ray head on {head.address}:{RAY_PORT}", files=self.secret_files(d, head))
        steps = [head_step, self._joined(d, head_name, [head], 0, join_timeout, "ray-head")]
        workers = [h for h in d.hosts if h is not head]
        for h in workers:
            steps.append(container_step(specs[h.name], host=h.name, phase="ray-workers", after=(head_step.id,),
                                        reason=f"Ray worker joining {head.address}:{RAY_PORT} (restarted when the "
                                               "head is new)", files=self.secret_files(d, h)))
        steps.append(self._joined(d, head_name, list(d.hosts), d.setup.tp * d.setup.pp, join_timeout,
                                  "ray-workers"))       # exactly these nodes (one that left must be gone)
        # a Ray node that (re)started has none of the engine's workers: the API server restarts with it
        nodes = (head_step.id, *(f"{h.name}/{specs[h.name].role}" for h in workers))
        steps += [self._api(d, head_name, after=nodes), *self._ready(d, head_name, ready_timeout)]
        return steps

    def _joined(self, d, head_name: str, hosts, gpus: int, timeout: float, phase: str) -> Step:
        probe = ("docker", "exec", head_name, "python3", "-c", RAY_JOINED, str(gpus),
                 "exact" if phase == "ray-workers" else "present", *(f"{h.name}={h.address}" for h in hosts))
        return Step(id=f"{d.head.name}/{phase}-joined", host=d.head.name, phase=phase, readonly=True,
                    reason=f"wait until Ray lists {', '.join(h.name for h in hosts)}"
                           + (f" and {gpus} GPUs" if gpus else ""),
                    ops=(Wait(argv=probe, timeout=timeout,
                              abort=("docker", "exec", head_name, "true")),))      # a dead head ends the wait

    def _api(self, d, head_name: str, after: tuple[str, ...] = ()) -> Step:
        spec = self.api_hash(d)
        exec_argv = ["docker", "exec", "-d"]
        puts: tuple = ()
        secrets = self.api_secrets(d)
        if secrets:
            env_file = d.secrets_file("api")
            exec_argv += ["--env-file", env_file]
            puts = (secrets_put(env_file, secrets),)
        start = (*puts, Cmd(argv=(*exec_argv, head_name, "sh", "-c", API_LAUNCHER, spec, *self.api_argv(d))))
        s = d.setup
        return Step(id=f"{d.head.name}/api", host=d.head.name, phase="api",
                    reason=f"vLLM {d.facts.version} API server in the head container, TP {s.tp} x PP {s.pp}, "
                           f"after all {s.tp * s.pp} GPUs have joined Ray",
                    check=Check(argv=("docker", "exec", head_name, "sh", "-c", API_CHECK, spec)),
                    variants={v: (Cmd(argv=("docker", "exec", head_name, "sh", "-c", API_STOP)), *start)
                              for v in ("replace", "restart")},
                    after=after, ops=start)

    def _ready(self, d, head_name: str, timeout: float) -> list[Step]:
        return vllm.ready_steps(d, timeout=timeout,
                                alive=(d.head.name, ("docker", "exec", head_name, "sh", "-c", _ALIVE)),
                                log=(d.head.name, ("docker", "exec", head_name, "tail", "-n", "20", API_LOG)))

    # ------------------------------------------------------------------ status and logs
    def measured(self, d, probed) -> list:
        return vllm.measured_host_ip(d, probed)

    def status(self, d, run) -> tuple[dict, list[str], list[str]]:
        head_name = self.container(d, d.head).name
        probe = ("docker", "exec", head_name, "python3", "-c", RAY_JOINED, str(d.setup.tp * d.setup.pp), "exact",
                 *(f"{h.name}={h.address}" for h in d.hosts))
        r = run(d.head.name, probe)
        lines = r.stdout.strip().splitlines()
        try:
            nodes = json.loads(lines[0])["nodes"] if lines else []
        except (ValueError, KeyError, TypeError):
            nodes = []
        problems = [] if r.ok else [f"ray: {lines[-1] if lines else r.last_line()}"]
        if not run(d.head.name, ("docker", "exec", head_name, "sh", "-c", _ALIVE)).ok:
            problems.append(f"{d.head.name}: the API server process is not running")
        gpus = sum(n.get("gpus", 0) for n in nodes)
        return {"ray": {"nodes": nodes, "gpus": gpus}}, [f"ray: {len(nodes)} nodes, {gpus:g} GPUs"], problems

    def logs(self, d, *, tail: int, follow: bool) -> list[LogSource]:
        out = []
        for h in d.hosts:
            spec = self.container(d, h)
            out.append(LogSource(host=h.name, component=spec.role, argv=(
                "docker", "logs", "--tail", str(tail), *(["-f"] if follow else []), spec.name)))
        head_name = self.container(d, d.head).name
        out.append(LogSource(host=d.head.name, component="api", argv=(
            "docker", "exec", head_name, "tail", "-n", str(tail), *(["-F"] if follow else []), API_LOG)))
        return out


ENGINE = VllmRay()
