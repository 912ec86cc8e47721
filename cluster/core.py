"""Use cases: plan, probe, up, down, status, logs, doctor. The CLI is a thin layer over these."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

from . import config, facts, models
from . import docker as dk
from . import plan as planner
from .checks import ERROR, Finding
from .config import Host, Inventory, Profile
from .errors import ConfigError, GpuclusterError, LockHeld, RemoteError, StepFailed

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------- loading and planning
def load(inventory_path: str, *, profile: str | None = None, model: str | None = None,
         hosts: list[str] | None = None) -> tuple[Inventory, Profile]:
    """Read the inventory and its profile, with command-line overrides applied."""
    inv = config.load_inventory(inventory_path)
    if model:
        inv = dataclasses.replace(inv, deploy=dataclasses.replace(inv.deploy, model=model))
    if hosts:
        missing = sorted(set(hosts) - {h.name for h in inv.hosts})
        if missing:
            raise ConfigError(f"--hosts: no host named {', '.join(missing)}", file=inv.path,
                              fix="known hosts: " + ", ".join(h.name for h in inv.hosts))
        inv = dataclasses.replace(inv, hosts=[h for h in inv.hosts if h.name in hosts])
    return inv, config.load_profile(profile or inv.deploy.profile, inventory=inv)


def make_plan(inv: Inventory, prof: Profile, *, tp: int | None = None, pp: int | None = None,
              sets: dict[str, Any] | None = None, extra_findings: tuple = ()) -> planner.Plan:
    model = models.load(inv.deploy.model, file=inv.path, line=inv.lines.get("deploy.model"))
    return planner.build(inv, prof, model=model, tp=tp, pp=pp, sets=sets, extra_findings=extra_findings)


class PlanFailed(GpuclusterError):
    """The plan has error findings: nothing was (or will be) started."""

    def __init__(self, plan: planner.Plan, when: str):
        self.plan = plan
        codes = ", ".join(sorted({f.code for f in plan.findings if f.severity == ERROR}))
        super().__init__(f"plan {when} fails ({codes}); nothing was started. Run `gpucluster plan` for details")


# ---------------------------------------------------------------- probe
def _remote():
    from . import remote  # fabric/paramiko only where hosts are touched
    return remote


def probe_host(hosts, host: Host, model_dir: str) -> facts.HostFacts:
    """Gather one host's facts; each probe is a command plus a pure parser."""
    remote = _remote()
    try:
        t0 = time.time()
        clock = hosts.run(host, facts.CLOCK)
        t1 = time.time()
    except Exception as e:  # noqa: BLE001 - an unreachable host is a result, not a crash
        return facts.HostFacts(host=host.name, reachable=False, error=remote.describe(e))
    problems: list[str] = []

    def get(argv, parse, what):
        r = hosts.run(host, argv)
        if not r.ok:
            problems.append(f"{what}: {r.last_line()}")
            return None
        try:
            return parse(r.stdout)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            problems.append(f"{what}: cannot parse output ({e})")
            return None

    gpus = None
    r = hosts.run(host, facts.GPU_QUERY)
    if r.ok:
        gpus = facts.parse_gpus(r.stdout)
    elif "not a valid field" in (r.stdout + r.stderr):
        gpus = get(facts.GPU_QUERY_OLD, facts.parse_gpus, "nvidia-smi")
    else:
        problems.append(f"nvidia-smi: {r.last_line()}")
    info = hosts.run(host, facts.DOCKER_INFO)
    route = hosts.run(host, facts.ROUTE_TO_INTERNET)
    disk = facts.parse_df(hosts.run(host, facts.df_argv(model_dir)).stdout)  # df exits 1 for missing paths
    return facts.HostFacts(
        host=host.name,
        os=get(facts.OS_RELEASE, facts.parse_os_release, "os-release") or "",
        kernel=(get(facts.UNAME, str.strip, "uname") or ""),
        docker_version=get(facts.DOCKER_VERSION, facts.parse_docker_version, "docker"),
        gpu_runtime=facts.parse_gpu_runtime(info.stdout) if info.ok else False,
        gpus=tuple(gpus or ()),
        disk_free=disk[0] if disk else None, disk_path=disk[1] if disk else "",
        interface=get(facts.IP_ADDR, lambda t: facts.parse_interface(t, host.address), "ip addr"),
        route_src=facts.parse_route_src(route.stdout) if route.ok else None,
        clock_offset=round(float(clock.stdout.strip()) - (t0 + t1) / 2, 3) if clock.ok else None,
        mem_total=get(facts.MEMINFO, facts.parse_meminfo, "meminfo"),
        problems=tuple(problems),
    )


def probe(inv: Inventory, *, accept_new_host_keys: bool = False, hosts=None) -> dict[str, facts.HostFacts]:
    own = hosts is None
    hosts = hosts or _remote().Hosts(inv, accept_new_host_keys=accept_new_host_keys)
    try:
        results = hosts.each(inv.hosts, lambda h: probe_host(hosts, h, inv.model_dir_for(h)))
    finally:
        if own:
            hosts.close()
    return {name: r if isinstance(r, facts.HostFacts) else facts.HostFacts(
        host=name, reachable=False, error=_remote().describe(r)) for name, r in results.items()}


def measured_findings(plan: planner.Plan, probed: dict[str, facts.HostFacts]) -> list[Finding]:
    """Findings only measured facts can give: the IP vLLM 0.3.0 would pick, disk space, GPU runtime."""
    out = []
    for h in plan.setup.hosts:
        f = probed.get(h.name)
        if not f or not f.reachable:
            continue
        if len(plan.setup.hosts) > 1 and not plan.engine.honours_host_ip and f.route_src != h.address:
            out.append(Finding(code="host-ip-ignored", severity=ERROR,
                               message=f"{h.name}: vLLM {plan.engine.version} ignores VLLM_HOST_IP and would use "
                                       f"{f.route_src or 'no address (no default route)'} instead of {h.address}",
                               fix=f"on {h.name}, route the default gateway through the NIC holding {h.address}"))
        need = plan.model.weight_bytes if plan.model else 0
        if f.disk_free is not None and need and f.disk_free < need * 1.05:
            out.append(Finding(code="disk-insufficient", severity=ERROR,
                               message=f"{h.name}: {f.disk_free / 1e9:.1f} GB free at {f.disk_path}, the model "
                                       f"needs {need / 1e9:.1f} GB",
                               fix="free space or point model_dir at a larger disk"))
    return out


# ---------------------------------------------------------------- up
@dataclass
class UpReport:
    plan: planner.Plan
    phases: dict[str, float] = field(default_factory=dict)     # phase -> seconds
    actions: dict[str, list[str]] = field(default_factory=dict)  # host -> what was done
    image_id: str = ""

    def act(self, host: str, what: str) -> None:
        self.actions.setdefault(host, []).append(what)

    def as_dict(self) -> dict:
        p = self.plan
        return {"endpoint": p.endpoint, "served_model_name": p.served_name, "image_id": self.image_id,
                "topology": p.topology.as_dict(), "phases": {k: round(v, 2) for k, v in self.phases.items()},
                "actions": self.actions, "changed": any(a for acts in self.actions.values() for a in acts
                                                        if not a.startswith("ok"))}


LOCK_DIR = "/tmp/gpucluster-{cluster}.lock"


class Cluster:
    """One inventory's deployment on its hosts: the operations up/down/status/logs share."""

    def __init__(self, plan: planner.Plan, hosts, progress: Progress = _quiet):
        self.plan, self.hosts, self.progress = plan, hosts, progress
        self.inv = plan.inventory
        self.head = plan.head

    # -- containers
    def inspect(self, host: Host, name: str) -> dk.Observed | None:
        r = self.hosts.run(host, ["docker", "inspect", "--type", "container", name])
        return facts.parse_inspect(r.stdout)[0] if r.ok else None

    def labelled(self, host: Host) -> list[dk.Observed]:
        r = self.hosts.check(host, ["docker", "ps", "-aq", "--filter", f"label={dk.LABEL}.cluster={self.inv.cluster.name}"])
        ids = r.stdout.split()
        if not ids:
            return []
        return facts.parse_inspect(self.hosts.check(host, ["docker", "inspect", *ids]).stdout)

    def ensure(self, host: Host, spec: dk.ContainerSpec, report: UpReport) -> bool:
        """Make the container match its spec; True when it was (re)created or started."""
        seen = self.inspect(host, spec.name)
        why = dk.drift(spec, seen)
        if why is None:
            report.act(host.name, f"ok {spec.role}: running, spec {spec.spec_hash}")
            return False
        if seen is not None and seen.labels.get(f"{dk.LABEL}.cluster") != spec.cluster:
            raise StepFailed(f"{host.name}: a container named {spec.name} exists and is not gpucluster's "
                             f"(cluster {spec.cluster}); remove or rename it first")
        self.progress(f"{host.name}: {spec.role}: {why}")
        if why.startswith("start"):
            self.hosts.check(host, ["docker", "start", spec.name])
        else:
            if seen is not None:
                self.hosts.check(host, ["docker", "rm", "-f", spec.name])
            self.hosts.check(host, dk.run_argv(spec))
        report.act(host.name, f"{why.split(':')[0]} {spec.role}")
        return True

    # -- ray
    RAY_NODES = ("python3", "-c", "import json, ray; ray.init(address='auto', logging_level='ERROR'); "
                 "print(json.dumps([{'ip': n['NodeManagerAddress'], 'alive': n['Alive'], "
                 "'gpus': n['Resources'].get('GPU', 0)} for n in ray.nodes()]))")

    def ray_nodes(self) -> list[dict] | None:
        r = self.hosts.run(self.head, ["docker", "exec", self.plan.containers[self.head.name].name, *self.RAY_NODES],
                           timeout=60)
        if not r.ok:
            return None
        line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "[]"
        return [n for n in json.loads(line) if n["alive"]]

    def wait_ray(self, *, timeout: float, hosts: list[Host] | None = None, gpus: int | None = None) -> list[dict]:
        """Wait until Ray on the head lists every host (default: the plan's) and enough GPUs."""
        hosts = hosts or list(self.plan.setup.hosts)
        want = {h.address for h in hosts}
        need_gpus = self.plan.topology.tp * self.plan.topology.pp if gpus is None else gpus
        deadline, nodes = time.time() + timeout, None
        while time.time() < deadline:
            nodes = self.ray_nodes()
            if nodes is not None:
                ips = {n["ip"] for n in nodes}
                gpus = sum(n["gpus"] for n in nodes)
                if want <= ips and gpus >= need_gpus:
                    return nodes
                self.progress(f"ray: {len(ips & want)}/{len(want)} nodes, {gpus:g}/{need_gpus} GPUs")
            time.sleep(2)
        seen = {n["ip"] for n in nodes or []}
        missing = [f"{h.name} ({h.address})" for h in hosts if h.address not in seen]
        raise StepFailed(f"Ray did not assemble within {timeout:.0f}s: never joined: {', '.join(missing) or 'none'}; "
                         f"GPUs seen {sum(n['gpus'] for n in nodes or []):g} of {need_gpus} needed "
                         "(see `gpucluster logs --component ray-worker`)")

    # -- api server
    def api_state(self) -> tuple[int, str] | None:
        """(pid, spec hash) of the running API server that gpucluster started, or None."""
        name = self.plan.api.container
        r = self.hosts.run(self.head, ["docker", "exec", name, "cat", dk.API_STATE])
        if not r.ok or not re.fullmatch(r"\d+ [0-9a-f]+", r.stdout.strip()):
            return None
        pid, spec = r.stdout.split()
        return (int(pid), spec) if self._alive(pid) else None

    def _alive(self, pid: str) -> bool:
        """The process exists and is not a zombie (the container's PID 1 may not reap it)."""
        script = 'test -d "/proc/$0" && ! grep -q "^State:.*Z" "/proc/$0/status"'
        return self.hosts.run(self.head, ["docker", "exec", self.plan.api.container, "sh", "-c", script, pid]).ok

    def ensure_api(self, report: UpReport) -> bool:
        api, name = self.plan.api, self.plan.api.container
        state = self.api_state()
        if state and state[1] == api.spec_hash:
            report.act(self.head.name, f"ok api: running, spec {api.spec_hash}")
            return False
        if state:
            self.progress(f"{self.head.name}: api: spec changed ({state[1]} -> {api.spec_hash}); restarting")
            self.hosts.run(self.head, ["docker", "exec", name, "sh", "-c", 'kill "$0"', str(state[0])])
            for _ in range(30):
                if not self._alive(str(state[0])):
                    break
                time.sleep(1)
            else:
                self.hosts.run(self.head, ["docker", "exec", name, "sh", "-c", 'kill -9 "$0"', str(state[0])])
        self.hosts.check(self.head, api.exec_argv())
        report.act(self.head.name, "start api" if not state else "restart api")
        return True

    def api_log_tail(self, n: int = 20) -> str:
        r = self.hosts.run(self.head, ["docker", "exec", self.plan.api.container, "tail", "-n", str(n), dk.API_LOG])
        return r.stdout if r.ok else ""

    def http(self, path: str, body: dict | None = None, *, timeout: float = 10) -> tuple[int, Any]:
        url = f"http://{self.head.address}:{self.plan.port}{path}"
        headers = {"Content-Type": "application/json"}
        if self.inv.deploy.api_key is not None:
            headers["Authorization"] = f"Bearer {self.inv.deploy.api_key.reveal()}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http to the head
                raw = resp.read()
                return resp.status, json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError, ValueError) as e:
            return 0, str(e)

    def wait_ready(self, *, timeout: float) -> dict:
        """Wait (visibly, bounded) for /health, then /v1/models with the served name, then one completion."""
        start, last_note = time.time(), 0.0
        while True:
            code, _ = self.http("/health", timeout=5)
            if code == 200:
                break
            waited = time.time() - start
            if self.api_state() is None:
                raise StepFailed(f"the API server exited while loading; last log lines:\n{self.api_log_tail()}")
            if waited > timeout:
                raise StepFailed(f"the API server did not become healthy within {timeout:.0f}s "
                                 "(it is still loading: see `gpucluster logs --component api`)")
            if waited - last_note >= 10:
                tail = self.api_log_tail(1).strip()
                self.progress(f"api: loading, {waited:.0f}s" + (f": {tail[-160:]}" if tail else ""))
                last_note = waited
            time.sleep(2)
        code, listed = self.http("/v1/models")
        names = [m.get("id") for m in listed.get("data", [])] if code == 200 and isinstance(listed, dict) else []
        if self.plan.served_name not in names:
            raise StepFailed(f"/v1/models answered {code} without {self.plan.served_name!r} (listed: {names})")
        code, done = self.http("/v1/completions", {"model": self.plan.served_name, "prompt": "Hello",
                                                   "max_tokens": 8}, timeout=120)
        if code != 200 or not isinstance(done, dict) or not done.get("choices"):
            raise StepFailed(f"a test completion failed: HTTP {code}: {str(done)[:200]}")
        return {"models": names, "completion": done["choices"][0].get("text", "")}

    # -- lock
    def lock(self) -> None:
        path = LOCK_DIR.format(cluster=self.inv.cluster.name)
        r = self.hosts.run(self.head, ["mkdir", path])
        if not r.ok:
            who = self.hosts.run(self.head, ["cat", f"{path}/owner"]).stdout.strip() or "unknown"
            raise LockHeld(f"another gpucluster operation holds the lock on {self.head.name} ({who}); if none is "
                           f"running, remove {path} on {self.head.name}")
        owner = f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}"
        self.hosts.run(self.head, ["sh", "-c", 'echo "$1" > "$0/owner"', path, owner])

    def unlock(self) -> None:
        path = LOCK_DIR.format(cluster=self.inv.cluster.name)
        self.hosts.run(self.head, ["rm", "-rf", path])


def _write_secrets(cluster: Cluster) -> None:
    """Secrets reach containers through 0600 env files on the hosts, never through command lines."""
    inv = cluster.inv
    if inv.deploy.api_key is not None:
        cluster.hosts.put_text(cluster.head, planner.secrets_file(inv, "api"),
                               f"VLLM_API_KEY={inv.deploy.api_key.reveal()}\n")


@contextlib.contextmanager
def _timed(report: UpReport, name: str, progress: Progress):
    """A phase: announced on stderr, its wall time recorded in the report."""
    progress(f"== {name}")
    start = time.time()
    try:
        yield
    finally:
        report.phases[name] = time.time() - start


def image_phase(cluster: Cluster, report: UpReport) -> str:
    """Pull through the mirrors where missing, retag to the canonical name; all hosts must agree."""
    plan, hosts = cluster.plan, cluster.hosts
    image = plan.profile.image
    refs = planner.mirror_refs(plan.inventory, plan.profile)

    def one(host: Host) -> str:
        r = hosts.run(host, ["docker", "image", "inspect", "--format", "{{.Id}}", image])
        if r.ok:
            report.act(host.name, f"ok image: {image} present")
            return r.stdout.strip()
        errors = []
        for ref in refs:
            cluster.progress(f"{host.name}: docker pull {ref}")
            pulled = hosts.run(host, ["docker", "pull", ref], timeout=3600)
            if pulled.ok:
                if ref != image:
                    hosts.check(host, ["docker", "tag", ref, image])
                report.act(host.name, f"pull image from {ref.split('/')[0] if ref != image else 'docker hub'}")
                return hosts.check(host, ["docker", "image", "inspect", "--format", "{{.Id}}", image]).stdout.strip()
            errors.append(f"{ref}: {pulled.last_line()}")
        raise RuntimeError("no mirror had it: " + "; ".join(errors))

    ids = hosts.phase("image", plan.setup.hosts, one)
    if len(set(ids.values())) > 1:
        seen = ", ".join(f"{h} {i[:19]}" for h, i in sorted(ids.items()))
        raise StepFailed(f"hosts ended with different {image} images ({seen}); remove the odd one "
                         "(docker rmi on that host) and re-run")
    return next(iter(ids.values()))


def up(inv: Inventory, prof: Profile, *, tp=None, pp=None, sets=None, progress: Progress = _quiet,
       accept_new_host_keys: bool = False, ray_timeout: float = 180, ready_timeout: float = 1800) -> UpReport:
    """Bring the deployment to the planned state, phase by phase; re-running changes nothing right."""
    t_plan = time.time()
    first = make_plan(inv, prof, tp=tp, pp=pp, sets=sets)
    if first.verdict == "fail":
        raise PlanFailed(first, "offline")
    hosts = _remote().Hosts(inv, accept_new_host_keys=accept_new_host_keys)
    try:
        report = UpReport(plan=first)
        report.phases["plan"] = time.time() - t_plan
        with _timed(report, "probe", progress):
            probed = probe(inv, hosts=hosts)
            down = {n: f.error or "unreachable" for n, f in probed.items()
                    if not f.reachable and n in first.topology.nodes}
            if down:
                raise RemoteError("probe", down)
            for name, f in probed.items():
                for c in facts.contradictions(next(h for h in inv.hosts if h.name == name), f):
                    progress(f"{name}: {c} (planning with the measured value)")
            real_inv = facts.measured(inv, probed)
            plan = make_plan(real_inv, prof, tp=tp or first.topology.tp, pp=pp or first.topology.pp, sets=sets)
            plan = dataclasses.replace(plan, findings=plan.findings + tuple(measured_findings(plan, probed)))
            report.plan = plan
            if plan.verdict == "fail":
                raise PlanFailed(plan, "with the measured host facts")
        cluster = Cluster(plan, hosts, progress)
        cluster.lock()
        try:
            _bring_up(cluster, report, ray_timeout=ray_timeout, ready_timeout=ready_timeout)
        finally:
            cluster.unlock()
        return report
    finally:
        hosts.close()


def _bring_up(cluster: Cluster, report: UpReport, *, ray_timeout: float, ready_timeout: float) -> None:
    plan, progress = cluster.plan, cluster.progress
    with _timed(report, "image", progress):
        report.image_id = image_phase(cluster, report)
    with _timed(report, "model", progress):
        from . import delivery
        for host, what in delivery.deliver(cluster.hosts, plan, progress=progress).items():
            report.act(host, f"ok model: {what}" if what == "present" else f"model {what}")
    _write_secrets(cluster)
    with _timed(report, "ray-head", progress):
        head_changed = cluster.ensure(cluster.head, plan.containers[cluster.head.name], report)
        cluster.wait_ray(timeout=ray_timeout, hosts=[cluster.head], gpus=0)
    workers = [h for h in plan.setup.hosts if h is not cluster.head]
    with _timed(report, "ray-workers", progress):
        def worker(h: Host) -> bool:
            changed = cluster.ensure(h, plan.containers[h.name], report)
            if head_changed and not changed:   # a new head: workers must rejoin it
                cluster.hosts.check(h, ["docker", "restart", plan.containers[h.name].name])
                report.act(h.name, "restart ray-worker (new head)")
            return changed
        cluster.hosts.phase("ray-workers", workers, worker)
        cluster.wait_ray(timeout=ray_timeout)
    with _timed(report, "api", progress):
        cluster.ensure_api(report)
    with _timed(report, "ready", progress):
        cluster.wait_ready(timeout=ready_timeout)


# ---------------------------------------------------------------- down / status / logs
def _connect(inv: Inventory, accept_new_host_keys: bool = False):
    return _remote().Hosts(inv, accept_new_host_keys=accept_new_host_keys)


def down(inv: Inventory, prof: Profile, *, purge_model: bool = False, progress: Progress = _quiet,
         accept_new_host_keys: bool = False) -> dict[str, list[str] | str]:
    """Remove exactly this cluster's labelled containers on every host: API first, workers, then the head."""
    plan = make_plan(inv, prof)
    with _connect(inv, accept_new_host_keys) as hosts:
        cluster = Cluster(plan, hosts, progress)
        listed = hosts.each(inv.hosts, cluster.labelled)
        report: dict[str, list[str] | str] = {}
        reachable = {n: r for n, r in listed.items() if not isinstance(r, BaseException)}
        for n, r in listed.items():
            if isinstance(r, BaseException):
                report[n] = f"unreachable: {_remote().describe(r)}"

        def remove(role: str):
            def one(h: Host) -> list[str]:
                gone = []
                for c in reachable.get(h.name, []):
                    if c.labels.get(f"{dk.LABEL}.role") == role:
                        if role == "ray-head" and c.running:
                            hosts.run(h, ["docker", "exec", c.name, "sh", "-c",
                                          f'kill "$(cut -d" " -f1 {dk.API_STATE})" 2>/dev/null; true'])
                        hosts.check(h, ["docker", "rm", "-f", c.name])
                        progress(f"{h.name}: removed {c.name}")
                        gone.append(f"removed {c.name}")
                return gone
            return hosts.each([h for h in inv.hosts if h.name in reachable], one)

        for role in ("ray-worker", "ray-head"):
            for n, r in remove(role).items():
                if isinstance(r, BaseException):
                    report[n] = f"failed: {_remote().describe(r)}"
                elif not isinstance(report.get(n), str):
                    report.setdefault(n, []).extend(r)  # type: ignore[union-attr]

        def cleanup(h: Host) -> None:
            hosts.run(h, ["rm", "-rf", f"{planner.SECRETS_DIR}/{inv.cluster.name}"])
            if purge_model:
                path, _ = planner.model_paths(inv, h)
                if inv.deploy.source.kind == "local" or models.is_local(inv.deploy.model):
                    report.setdefault(h.name, []).append(f"kept local model {path}")  # type: ignore[union-attr]
                    return
                hosts.check(h, ["rm", "-rf", "--one-file-system", path])
                report.setdefault(h.name, []).append(f"purged {path}")  # type: ignore[union-attr]
        for n, r in hosts.each([h for h in inv.hosts if h.name in reachable], cleanup).items():
            if isinstance(r, BaseException):
                report[n] = f"failed: {_remote().describe(r)}"
    failed = {n: r for n, r in report.items() if isinstance(r, str)}
    if failed:
        raise RemoteError("down", failed)  # the reachable hosts were still cleaned
    return report


def status(inv: Inventory, prof: Profile, *, accept_new_host_keys: bool = False) -> tuple[bool, dict]:
    """Containers per host, Ray as the head sees it, API health; healthy only when all the plan needs is."""
    plan = make_plan(inv, prof)
    out: dict[str, Any] = {"cluster": inv.cluster.name, "endpoint": plan.endpoint, "hosts": {}, "problems": []}
    with _connect(inv, accept_new_host_keys) as hosts:
        cluster = Cluster(plan, hosts)
        listed = hosts.each(inv.hosts, cluster.labelled)
        for name, r in listed.items():
            if isinstance(r, BaseException):
                out["hosts"][name] = {"reachable": False, "error": _remote().describe(r)}
                if name in plan.topology.nodes:
                    out["problems"].append(f"{name}: unreachable")
                continue
            out["hosts"][name] = {"reachable": True, "containers": [
                {"name": c.name, "role": c.labels.get(f"{dk.LABEL}.role"), "state": c.status,
                 "spec": c.labels.get(f"{dk.LABEL}.spec"), "id": c.id[:12]} for c in r]}
            if name in plan.topology.nodes:
                role = plan.containers[name].role
                if not any(c.running and c.labels.get(f"{dk.LABEL}.role") == role for c in r):
                    out["problems"].append(f"{name}: {role} container is not running")
        nodes = cluster.ray_nodes() if not out["problems"] else None
        out["ray"] = {"nodes": nodes or [], "gpus": sum(n["gpus"] for n in nodes or [])}
        need = plan.topology.tp * plan.topology.pp
        if nodes is not None and out["ray"]["gpus"] < need:
            out["problems"].append(f"ray: {out['ray']['gpus']:g} GPUs, the deployment needs {need}")
        code, listed_models = cluster.http("/v1/models")
        health, _ = cluster.http("/health")
        served = [m.get("id") for m in listed_models.get("data", [])] if isinstance(listed_models, dict) else []
        out["api"] = {"health": health == 200, "models": served}
        if health != 200:
            out["problems"].append("api: /health does not answer 200")
        elif plan.served_name not in served:
            out["problems"].append(f"api: {plan.served_name!r} is not served")
    out["healthy"] = not out["problems"]
    return out["healthy"], out


def log_commands(inv: Inventory, prof: Profile, *, host: str | None, component: str | None, tail: int,
                 follow: bool) -> list[tuple[Host, str, list[str]]]:
    """(host, component, argv) for each log source asked for."""
    plan = make_plan(inv, prof)
    out = []
    for h in plan.setup.hosts:
        if host and h.name != host:
            continue
        spec = plan.containers[h.name]
        if component in (None, spec.role):
            out.append((h, spec.role, ["docker", "logs", "--tail", str(tail), *(["-f"] if follow else []), spec.name]))
        if h is plan.head and component in (None, "api"):
            out.append((h, "api", ["docker", "exec", spec.name, "tail", "-n", str(tail),
                                   *(["-F"] if follow else []), dk.API_LOG]))
    if host and not any(h.name == host for h in plan.setup.hosts):
        raise ConfigError(f"--host {host}: not a host of this deployment",
                          fix="use one of: " + ", ".join(plan.topology.nodes))
    return out


def logs(inv: Inventory, prof: Profile, *, host: str | None = None, component: str | None = None,
         tail: int = 100, follow: bool = False, sink: Callable[[str], None]) -> int:
    remote = _remote()
    sources = log_commands(inv, prof, host=host, component=component, tail=tail, follow=follow)
    with _connect(inv) as hosts:
        def one(src):
            h, comp, argv = src
            return remote.stream(hosts, h, argv, lambda line: sink(f"[{h.name} {comp}] {line}"))
        results = hosts.each(sources, one, key=lambda src: f"{src[0].name} {src[1]}")
    failed = {k: remote.describe(r) for k, r in results.items() if isinstance(r, BaseException)}
    if failed:
        raise RemoteError("logs", failed)
    return max(results.values(), default=0)


def doctor(inv: Inventory, prof: Profile, *, accept_new_host_keys: bool = False) -> tuple[planner.Plan, dict]:
    """Probe every host, compare with the inventory, and re-plan with what was measured. Changes nothing."""
    probed = probe(inv, accept_new_host_keys=accept_new_host_keys)
    contradictions = {h.name: facts.contradictions(h, probed[h.name]) for h in inv.hosts}
    plan = make_plan(facts.measured(inv, probed), prof)
    plan = dataclasses.replace(plan, findings=plan.findings + tuple(measured_findings(plan, probed)))
    return plan, {"hosts": {n: f.as_dict() for n, f in probed.items()}, "contradictions": contradictions}


def model_pull(inv: Inventory, prof: Profile, *, progress: Progress = _quiet,
               accept_new_host_keys: bool = False, verify: bool = False) -> dict[str, str]:
    """The model phase of `up`, alone."""
    from . import delivery
    plan = make_plan(inv, prof)
    with _connect(inv, accept_new_host_keys) as hosts:
        return delivery.deliver(hosts, plan, progress=progress, verify=verify)
