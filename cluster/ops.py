"""Use cases: probe, up, down, status, logs, doctor, model pull. Each builds steps and hands them to the executor."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from . import config, facts, models, record
from . import lease as leases
from .diagnose import LOG_TAIL, explain_failure, image_check_findings, scan_logs
from . import plan as planner
from .checks import ERROR, WARNING, Finding
from .config import Host, Inventory, Profile
from .containers import LABEL, removal_probe
from .deployment import SECRETS_DIR
from .delivery.model_steps import STATE_DIR, model_paths
from .errors import ConfigError, GpuclusterError, Interrupted, RemoteError
from .executor import Executor, PhaseFailed, Report, http
from .steps import Check, Cmd, Step

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _remote():
    from . import remote  # fabric/paramiko only where hosts are touched
    return remote


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
    ref = profile or inv.deploy.profile
    if ref in (None, "auto"):   # the first alternative that passes every check (cluster/alternatives.py)
        from . import alternatives
        model_facts = models.load(inv.deploy.model, source=inv.deploy.source, file=inv.path,
                                  line=inv.lines.get("deploy.model"))
        inv, prof, _ = alternatives.auto(inv, model_facts)
        return inv, prof
    return inv, config.load_profile(ref, inventory=inv)


def make_plan(inv: Inventory, prof: Profile, *, extra_findings: tuple = (), **kw: Any) -> planner.Plan:
    found = models.lookup(inv.deploy.model, source=inv.deploy.source, file=inv.path,
                          line=inv.lines.get("deploy.model"))
    if found.problem:   # the hub could not tell: the plan goes on without the model checks (model-unknown)
        extra_findings = (*extra_findings, Finding(
            code="model-hub-error", severity=WARNING, message=found.problem,
            fix="check deploy.source (endpoint, revision, token) and this machine's access to it (facts are "
                "cached under ~/.cache/gpucluster/hub once read), or plan with --offline"))
    return planner.build(inv, prof, model=found.facts, extra_findings=extra_findings, **kw)


class PlanFailed(GpuclusterError):
    """The plan has error findings: nothing was (or will be) started."""

    def __init__(self, plan: planner.Plan, when: str):
        self.plan = plan
        errors = [f for f in plan.findings if f.severity == ERROR]
        detail = "; ".join(f"{f.code}: {f.message} (fix: {f.fix})" for f in errors[:3])
        super().__init__(f"plan {when} fails, nothing was started: {detail}"
                         + (f"; and {len(errors) - 3} more (gpucluster plan / doctor)" if len(errors) > 3 else ""))


def lock_steps(lease: leases.Lease) -> tuple[list[Step], list[Step]]:
    """(take, release): the cluster lease on the inventory's head (cluster/lease.py), phases lock and unlock."""
    return lease.steps()


def up_steps(plan: planner.Plan, lease: leases.Lease | None = None) -> tuple[list[Step], list[Step], list[Step]]:
    """What `up` runs, in order: take the lease, the plan's steps, release the lease (the one place they are joined)."""
    take, release = lock_steps(lease or leases.for_operation(plan.inventory, "up"))
    return take, list(plan.steps), release


def _secrets_resolve(inv: Inventory) -> None:
    """A missing secret stops `up` before any host is touched, not after a long download. Env secrets must also
    fit on one KEY=value line of their 0600 file (a line break would start another variable)."""
    for field, secret in inv.secrets():
        line = inv.lines.get(field)
        try:
            value = secret.reveal()
        except ConfigError as e:
            raise ConfigError(str(e), file=inv.path, line=line, field=field) from None
        if ".env." in field and any(c in value for c in "\n\r\0"):
            raise ConfigError("the secret's value holds a line break or NUL: it cannot be one KEY=value line",
                              file=inv.path, line=line, field=field, fix="remove the line break from the value")


# ---------------------------------------------------------------- probe
PROBE_TIMEOUT = 30.0     # seconds one fact may take (a wedged nvidia-smi must not hang `probe` or `up`)


def probe_host(hosts, host: Host, model_dir: str) -> facts.HostFacts:
    """Gather one host's facts; each probe is a command plus a pure parser, bounded in time."""
    remote = _remote()

    def run(argv):
        return hosts.run(host, argv, timeout=PROBE_TIMEOUT)
    try:
        t0 = time.time()
        clock = run(facts.CLOCK)
        t1 = time.time()
    except Exception as e:  # noqa: BLE001 - an unreachable host is a result, not a crash
        return facts.HostFacts(host=host.name, reachable=False, error=remote.describe(e))
    problems: list[str] = []

    def get(argv, parse, what):
        r = run(argv)
        if not r.ok:
            problems.append(f"{what}: {r.last_line()}")
            return None
        try:
            return parse(r.stdout)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            problems.append(f"{what}: cannot parse output ({e})")
            return None

    gpus = None
    r = run(facts.GPU_QUERY)
    if r.ok:
        gpus = facts.parse_gpus(r.stdout)
    elif "not a valid field" in (r.stdout + r.stderr):
        gpus = get(facts.GPU_QUERY_OLD, facts.parse_gpus, "nvidia-smi")
    else:
        problems.append(f"nvidia-smi: {r.last_line()}")
    held, ours = (), None
    if gpus:    # processes holding GPU memory; then who they are: this cluster's containers vs each PID's cgroup
        held = tuple(get(facts.COMPUTE_APPS, lambda t: facts.parse_compute_apps(t, gpus), "nvidia-smi apps") or ())
    if held:
        ps = run(facts.own_containers_argv(hosts.inventory.cluster.name))
        ours = facts.parse_container_ids(ps.stdout) if ps.ok else None
        if any(p.pid is not None for p in held):
            held = facts.with_cgroups(held, facts.parse_cgroups(run(facts.cgroups_argv(p.pid for p in held)).stdout))
    info = run(facts.DOCKER_INFO)
    route = run(facts.ROUTE_TO_INTERNET)
    disk = facts.parse_df(run(facts.df_argv(model_dir)).stdout)  # df exits 1 for missing paths
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
        gpu_processes=held, cluster_containers=ours,
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
    """Findings only measured facts can give: the engine's own (e.g. the IP it would pick), disk space, GPUs held by
    processes that are not this cluster's (gpu-busy)."""
    d = plan.deployment
    out = d.engine.measured(d, probed)
    try:
        util = plan.memory.utilization if plan.memory else float(d.setup.args.get("gpu-memory-utilization", 0.9))
    except (TypeError, ValueError):
        util = 0.9
    for h in d.hosts:
        f = probed.get(h.name)
        if not f or not f.reachable:
            continue
        if h.interface and f.interface and h.interface != f.interface:
            out.append(Finding(code="interface-mismatch", severity=ERROR,
                               message=f"{h.name}: interface {h.interface} (NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME) "
                                       f"does not hold {h.address}, {f.interface} does: the nodes would never connect",
                               fix=f"set hosts[{h.name}].interface to {f.interface}, or remove it"))
        need = plan.model.weight_bytes if plan.model else 0
        if f.disk_free is not None and need and f.disk_free < need * 1.05:
            out.append(Finding(code="disk-insufficient", severity=ERROR,
                               message=f"{h.name}: {f.disk_free / 1e9:.1f} GB free at {f.disk_path}, the model "
                                       f"needs {need / 1e9:.1f} GB",
                               fix="free space or point model_dir at a larger disk"))
        busy = facts.gpu_busy(h.name, f, utilization=util, gpus=d.profile.docker.gpus) \
            if d.profile.device == "gpu" else None
        out += [busy] if busy else []
    return out


def measured_plan(inv: Inventory, prof: Profile, hosts, offline: planner.Plan, **kw: Any) -> planner.Plan:
    """Re-plan with what the hosts say (GPUs, interfaces, routes, disk); unreachable deployment hosts stop here."""
    probed = probe(inv, hosts=hosts)
    down = {n: f.error or "unreachable" for n, f in probed.items()
            if not f.reachable and n in offline.topology.nodes}
    if down:
        raise RemoteError("probe", down)
    real = make_plan(facts.measured(inv, probed), prof, **{**kw, "tp": kw.get("tp") or offline.topology.tp,
                                                             "pp": kw.get("pp") or offline.topology.pp})
    return dataclasses.replace(real, findings=real.findings + tuple(measured_findings(real, probed)))


# ---------------------------------------------------------------- up
@dataclasses.dataclass
class UpResult:
    plan: planner.Plan
    report: Report
    dry_run: bool = False

    def as_dict(self) -> dict:
        p = self.plan
        inv = p.inventory
        return {"endpoint": p.endpoint, "served_model_name": p.served_name, "topology": p.topology.as_dict(),
                "dry_run": self.dry_run, "phases": {k: round(v, 2) for k, v in self.report.phases.items()},
                "probes": {h.name: [list(a) for a in facts.probe_argvs(inv.model_dir_for(h))] for h in inv.hosts},
                "steps": [o.as_dict() for o in self.report.outcomes],
                "plan": [s.as_dict() for s in self.steps()], "changed": self.report.changed}

    def steps(self) -> list[Step]:
        return [o.step for o in self.report.outcomes]


def up(inv: Inventory, prof: Profile, *, dry_run: bool = False, progress: Progress = _quiet,
       accept_new_host_keys: bool = False, break_lock: bool = False, notice: Progress = _quiet, **kw: Any) -> UpResult:
    """Bring the deployment to the planned state; with dry_run, say per step what would run or be skipped."""
    t0 = time.time()
    first = make_plan(inv, prof, **kw)
    if first.verdict == "fail":
        raise PlanFailed(first, "offline")
    if not dry_run:
        _secrets_resolve(inv)
    with _remote().Hosts(inv, accept_new_host_keys=accept_new_host_keys) as hosts:
        progress("== probe")
        try:
            plan = measured_plan(inv, prof, hosts, first, **kw)
        except KeyboardInterrupt:
            raise Interrupted("interrupted (Ctrl-C) while probing the hosts: nothing was changed") from None
        if plan.verdict == "fail":
            raise PlanFailed(plan, "with the measured host facts")
        plan_s = time.time() - t0
        lease = leases.for_operation(plan.inventory, "up", break_lock=break_lock)
        take, body, release = up_steps(plan, lease)
        if dry_run:     # the lease's check only: a dry run never takes it
            report = Executor(hosts, progress).evaluate([*take, *body, *release])
            return UpResult(plan, report, dry_run=True)
        try:
            with leases.Held(lease, hosts, progress=progress, notice=notice) as held:
                done = held.executor.execute(body)
        except PhaseFailed as e:    # an engine phase: add the causes its logs show (never instead of the failure)
            explained = explain_failure(e, plan, hosts, progress)
            if explained is e:
                raise
            raise explained from None
        report = _merge(_merge(held.taken, done), held.released)
        report.phases = {"plan+probe": plan_s, **report.phases}
        return UpResult(plan, report)


def _merge(a: Report, b: Report) -> Report:
    return Report(outcomes=a.outcomes + b.outcomes, phases={**a.phases, **b.phases})


# ---------------------------------------------------------------- down
def down_steps(inv: Inventory, *, purge_model: bool = False) -> list[Step]:
    """Every labelled container of this cluster, workers first, then heads, then helpers; then our files."""
    cluster = inv.cluster.name
    steps = [Step(id=f"{h.name}/remove-{node}", host=h.name, phase=f"remove-{node}", use_output=True,
                  check=Check(argv=removal_probe(cluster, node)), ops=(Cmd(argv=("docker", "rm", "-f")),),
                  reason=f"remove cluster {cluster}'s {node} containers ({LABEL}.node={node})")
             for node in ("worker", "head", "aux") for h in inv.hosts]
    for h in inv.hosts:
        paths = [f"{SECRETS_DIR}/{cluster}", f"{STATE_DIR}/{cluster}/{h.name}", record.PATH.format(cluster=cluster)]
        local = inv.deploy.source.kind == "local" or models.is_local(inv.deploy.model)
        if purge_model and not local:
            paths.append(model_paths(inv, h)[0])
        steps.append(Step(id=f"{h.name}/cleanup", host=h.name, phase="cleanup", reason="remove "
                          + ", ".join(paths) + (" (a local model is never deleted)" if purge_model and local else ""),
                          check=Check(argv=("sh", "-c", 'for p; do [ -e "$p" ] && echo "run $p exists" && exit 0; done; '
                                                        'echo "skip nothing to remove"', "-", *paths)),
                          ops=(Cmd(argv=("rm", "-rf", "--one-file-system", *paths)),)))
    return steps


def down(inv: Inventory, *, purge_model: bool = False, dry_run: bool = False, progress: Progress = _quiet,
         accept_new_host_keys: bool = False, break_lock: bool = False, notice: Progress = _quiet) -> Report:
    """Remove exactly this cluster's labelled containers on every host; needs only the inventory."""
    steps = down_steps(inv, purge_model=purge_model)
    lease = leases.for_operation(inv, "down", break_lock=break_lock)
    take, release = lock_steps(lease)
    with _remote().Hosts(inv, accept_new_host_keys=accept_new_host_keys) as hosts:
        if dry_run:
            return Executor(hosts, progress).evaluate([*take, *steps, *release])
        with leases.Held(lease, hosts, progress=progress, notice=notice) as held:
            try:
                done = held.executor.execute(steps, keep_going=True)
            except PhaseFailed as e:   # the reachable hosts were still cleaned
                raise RemoteError("down", {o.step.host: o.why for o in e.failed}) from None
        return _merge(_merge(held.taken, done), held.released)


# ---------------------------------------------------------------- status / logs / doctor / pull
def recorded(inv: Inventory, hosts) -> dict | None:
    """The deployment `up` recorded on the inventory's hosts (the version most of them hold), or None."""
    path = record.PATH.format(cluster=inv.cluster.name)
    found = {name: r.stdout for name, r in hosts.each(inv.hosts, lambda h: hosts.check(h, ["cat", path], timeout=30)
                                                         ).items() if not isinstance(r, BaseException) and r.ok}
    return record.choose(found)


def running_plan(inv: Inventory, rec: dict) -> planner.Plan:
    """The plan of the recorded deployment, with today's inventory for addresses, SSH and secrets."""
    gone = [n for n in rec["nodes"] if n not in {h.name for h in inv.hosts}]
    if gone:
        raise ConfigError(f"the running deployment (as `up` recorded it) includes {', '.join(gone)}, which the "
                          "inventory no longer lists", file=inv.path, field="hosts",
                          fix="add the host back to check it, or `gpucluster down` with the old inventory")
    inv = dataclasses.replace(inv, deploy=dataclasses.replace(inv.deploy, model=rec["model"]))
    return make_plan(inv, record.profile(rec, inv), tp=rec["tensor_parallel"], pp=rec["pipeline_parallel"],
                     hosts=rec["nodes"], sets=rec["sets"])


def status(inv: Inventory, load_planned: Callable[[], tuple[Inventory, Profile]], *,
           accept_new_host_keys: bool = False) -> tuple[bool, dict]:
    """Judge the deployment `up` recorded on the hosts (today's inventory only when none is recorded): containers
    per host, the engine's own view, API health; healthy only when all of it is there."""
    with _remote().Hosts(inv, accept_new_host_keys=accept_new_host_keys) as hosts:
        rec = recorded(inv, hosts)
        notes: list[str] = []
        if rec is None:
            plan = make_plan(*load_planned())
            notes.append("no deployment is recorded on the hosts: judging what the inventory plans")
        else:
            plan = running_plan(inv, rec)
            try:
                planned = make_plan(*load_planned()).deployment
                notes += [f"the inventory differs: {x} (`gpucluster up` would change it)"
                          for x in record.differences(rec, record.content(planned, {}))]
            except GpuclusterError as e:
                notes.append(f"the inventory's own plan cannot be built ({e}); judging what runs")
        d = plan.deployment
        out: dict[str, Any] = {"cluster": inv.cluster.name, "endpoint": plan.endpoint, "recorded": rec is not None,
                               "topology": plan.topology.as_dict(), "image": d.profile.image, "notes": notes,
                               "hosts": {}, "problems": []}

        def labelled(h: Host) -> list:
            r = hosts.check(h, ["docker", "ps", "-aq", "--filter", f"label={LABEL}.cluster={inv.cluster.name}"])
            ids = r.stdout.split()
            return facts.parse_inspect(hosts.check(h, ["docker", "inspect", *ids]).stdout) if ids else []
        for name, r in hosts.each(inv.hosts, labelled).items():
            if isinstance(r, BaseException):
                out["hosts"][name] = {"reachable": False, "error": _remote().describe(r)}
                if name in plan.topology.nodes:
                    out["problems"].append(f"{name}: unreachable")
                continue
            out["hosts"][name] = {"reachable": True, "containers": [
                {"name": c.name, "role": c.labels.get(f"{LABEL}.role"), "state": c.status,
                 "spec": c.labels.get(f"{LABEL}.spec"), "id": c.id[:12]} for c in r]}
            if name in plan.topology.nodes:
                node = "head" if name == d.head.name else "worker"
                if not any(c.running and c.labels.get(f"{LABEL}.node") == node for c in r):
                    out["problems"].append(f"{name}: the {node} container is not running")
        if not out["problems"]:
            ex = Executor(hosts)
            state, summary, problems = d.engine.status(d, lambda host, argv: ex.run(host, argv, timeout=60))
            out["engine"], out["engine_summary"] = state, summary
            out["problems"] += problems
        else:
            out["engine"], out["engine_summary"] = {}, []
        if d.inventory.ui is not None:    # OpenWebUI in front (cluster/ui.py): /health from here, its model list
            from . import ui
            ex = Executor(hosts)
            out["ui"], found = ui.status(d, lambda host, argv: ex.run(host, argv, timeout=60), http)
            out["problems"] += found
    auth = d.api_key.reveal() if d.api_key is not None else None
    path = d.engine.health_path
    health, _ = http(f"{d.base_url}{path}")
    code, text = http(f"{d.endpoint}/models", auth=auth)
    served = _model_ids(text) if code == 200 else []
    out["api"] = {"health": health == 200, "models": served}
    served_id = d.engine.served_id(d)
    if health != 200:
        out["problems"].append(f"api: {path} does not answer 200")
    elif served_id not in served:
        out["problems"].append(f"api: {served_id!r} is not served")
    out["healthy"] = not out["problems"]
    return out["healthy"], out


def _model_ids(text: str) -> list[str]:
    import json
    try:
        doc = json.loads(text)
    except ValueError:
        return []
    return [str(m.get("id")) for m in doc.get("data", []) if isinstance(m, dict)] if isinstance(doc, dict) else []


def logs(inv: Inventory, load_planned: Callable[[], tuple[Inventory, Profile]], *, host: str | None = None,
         component: str | None = None, tail: int = 100, follow: bool = False, sink: Callable[[str], None]) -> int:
    """The logs of the deployment `up` recorded (today's inventory's plan when none is recorded)."""
    with _remote().Hosts(inv) as hosts:
        rec = recorded(inv, hosts)
    plan = make_plan(*load_planned()) if rec is None else running_plan(inv, rec)
    d = plan.deployment
    if host and host not in plan.topology.nodes:
        raise ConfigError(f"--host {host}: not a host of this deployment",
                          fix="use one of: " + ", ".join(plan.topology.nodes))
    if component and component not in d.engine.components:
        raise ConfigError(f"--component {component!r}: {d.engine.name} has " + ", ".join(d.engine.components))
    sources = [s for s in d.engine.logs(d, tail=tail, follow=follow)
               if (not host or s.host == host) and (not component or s.component == component)]
    remote = _remote()
    with remote.Hosts(inv) as hosts:
        def one(src):
            return remote.stream(hosts, hosts.host(src.host), list(src.argv),
                                 lambda line: sink(f"[{src.host} {src.component}] {line}"))
        results = hosts.each(sources, one, key=lambda s: f"{s.host} {s.component}")
    failed = {k: remote.describe(r) for k, r in results.items() if isinstance(r, BaseException)}
    if failed:
        raise RemoteError("logs", failed)
    return max(results.values(), default=0)


def doctor(inv: Inventory, prof: Profile, *, accept_new_host_keys: bool = False, logs: bool = False,
           tail: int = LOG_TAIL) -> tuple[planner.Plan, dict]:
    """Probe every host, compare with the inventory, and re-plan with what was measured; with `logs`, also explain
    the deployment's container logs on every host (running or exited) by known failure signatures. Changes nothing."""
    probed = probe(inv, accept_new_host_keys=accept_new_host_keys)
    contradictions = {h.name: facts.contradictions(h, probed[h.name]) for h in inv.hosts}
    plan = make_plan(facts.measured(inv, probed), prof)
    found = measured_findings(plan, probed) + image_check_findings(plan, probed, accept_new_host_keys)
    plan = dataclasses.replace(plan, findings=plan.findings + tuple(found))
    out = {"hosts": {n: f.as_dict() for n, f in probed.items()}, "contradictions": contradictions}
    if logs:
        out["logs"] = scan_logs(plan, accept_new_host_keys=accept_new_host_keys, tail=tail)
    return plan, out


def model_pull(inv: Inventory, prof: Profile, *, progress: Progress = _quiet, accept_new_host_keys: bool = False,
               verify: bool = False, dry_run: bool = False, break_lock: bool = False,
               notice: Progress = _quiet) -> tuple[dict[str, str], Report]:
    """The image and model phases of `up`, alone: host -> present | what was done."""
    plan = make_plan(inv, prof, verify=verify)
    steps = planner.model_steps(plan)
    lease = leases.for_operation(plan.inventory, "model pull", break_lock=break_lock)
    take, release = lock_steps(lease)
    with _remote().Hosts(inv, accept_new_host_keys=accept_new_host_keys) as hosts:
        if dry_run:
            report = Executor(hosts, progress).evaluate([*take, *steps, *release])
        else:
            with leases.Held(lease, hosts, progress=progress, notice=notice) as held:
                done = held.executor.execute(steps)
            report = _merge(_merge(held.taken, done), held.released)
    by_id = {o.step.id: o for o in report.outcomes}
    out = {}
    for h in plan.deployment.hosts:
        o = by_id.get(f"{h.name}/model")
        out[h.name] = "present" if o is None or o.status == "skipped" else (o.detail or o.status)
    return out, report
