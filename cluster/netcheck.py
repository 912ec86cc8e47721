"""`gpucluster check network`: vLLM's troubleshooting sanity test, run on every host at once in the deployment's
image with the engine's per-node env; what each host's ranks reported, and one verdict.

Steps and result parsing are pure; `check_network` hands the steps to the executor (the only I/O). The script
shipped to the hosts is netcheck_agent.py (stdlib + torch)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import Host, Inventory, Profile
from .containers import LABEL, split_env
from .delivery.model_steps import STATE_DIR
from .steps import Check, Cmd, Put, Step

AGENT = Path(__file__).resolve().with_name("netcheck_agent.py")
PHASE = "netcheck"
DEFAULT_PORT = 29555           # the rendezvous on the head (not vLLM's 29500/29501, not Ray's 6379)
DEFAULT_TIMEOUT = 120.0
START_GRACE = 120.0            # container start and the agent's own kill grace, on top of the timeout
STATUSES = ("ok", "fail", "stopped", "timeout", "-")
# Read-only: a check container left by an interrupted run is replaced; otherwise the check just runs. Fixed text,
# the container's name arrives as "$0".
LEFTOVER = ('docker inspect --type container --format "replace a check container is left over ({{.State.Status}})" '
            '"$0" 2>/dev/null || echo "run start the check"')


# ---------------------------------------------------------------- the job (pure)
@dataclass(frozen=True, kw_only=True)
class NetHost:
    host: Host
    first_rank: int
    local: int                              # ranks on this host: its GPUs, or 1 on a CPU host
    env: tuple[tuple[str, str], ...]        # the engine's env for this node (d.engine.node_env)


@dataclass(frozen=True, kw_only=True)
class NetJob:
    cluster: str
    image: str
    device: str                             # cuda | cpu
    hosts: tuple[NetHost, ...]              # head first: rank 0 and the rendezvous are on the head
    timeout: float
    port: int
    gpus: str | None                        # docker --gpus value (None on CPU)
    ipc: str | None
    shm_size: str | None

    @property
    def world(self) -> int:
        return sum(h.local for h in self.hosts)

    @property
    def head(self) -> Host:
        return self.hosts[0].host

    @property
    def container(self) -> str:
        return f"{LABEL}-{self.cluster}-netcheck"

    def jobdir(self, host: Host) -> str:
        return f"{STATE_DIR}/{self.cluster}/{host.name}/netcheck"

    def doc(self, nh: NetHost) -> dict:
        """The job file one host's agent reads."""
        return {"host": nh.host.name, "master_addr": self.head.address, "master_port": self.port,
                "world": self.world, "first_rank": nh.first_rank, "local": nh.local, "device": self.device,
                "timeout": self.timeout,
                "hosts": [{"name": h.host.name, "first_rank": h.first_rank, "local": h.local} for h in self.hosts]}


def device_of(profile: Profile, hosts: Iterable[Host]) -> str:
    """cpu for a CPU profile or hosts without GPUs (one rank per host, GLOO only); else cuda (a rank per GPU)."""
    if getattr(profile, "device", "gpu") == "cpu" or any(h.gpus is None for h in hosts):
        return "cpu"
    return "cuda"


def make_job(d, hosts: Iterable[Host], *, timeout: float = DEFAULT_TIMEOUT, port: int = DEFAULT_PORT) -> NetJob:
    """The check for `hosts` (the deployment's head first) with the deployment's image, docker options and env."""
    ordered = sorted(hosts, key=lambda h: h.name != d.head.name)
    device = device_of(d.profile, ordered)
    out, first = [], 0
    for h in ordered:
        local = h.gpus.count if device == "cuda" else 1
        env, _ = split_env(d.engine.node_env(d, h))     # the agent needs no secret (they would go to `-e`)
        out.append(NetHost(host=h, first_rank=first, local=local, env=tuple(sorted(env.items()))))
        first += local
    o = d.profile.docker
    return NetJob(cluster=d.cluster, image=d.profile.image, device=device, hosts=tuple(out), timeout=timeout,
                  port=port, gpus=o.gpus if device == "cuda" else None, ipc=o.ipc, shm_size=o.shm_size)


def run_argv(job: NetJob, nh: NetHost) -> tuple[str, ...]:
    """`docker run --rm` of the agent in the image: host network, the node's env, the job folder read-only."""
    argv = ["docker", "run", "--rm", "--name", job.container, "--label", f"{LABEL}.cluster={job.cluster}",
            "--label", f"{LABEL}.node=aux", "--label", f"{LABEL}.role=netcheck", "--network", "host"]
    if job.ipc:
        argv.append(f"--ipc={job.ipc}")
    if job.shm_size:
        argv.append(f"--shm-size={job.shm_size}")
    if job.gpus:
        argv += ["--gpus", job.gpus]
    for key, value in nh.env:
        argv += ["-e", f"{key}={value}"]
    argv += ["-v", f"{job.jobdir(nh.host)}:/job:ro", "--entrypoint", "python3", job.image,
             "-u", "/job/netcheck_agent.py", "/job/netcheck.json"]
    return tuple(argv)


def steps(job: NetJob) -> list[Step]:
    """One step per host, all in one phase: the executor starts them at once; each ends by itself."""
    out = []
    what = "NCCL and GLOO" if job.device == "cuda" else "GLOO"
    for nh in job.hosts:
        d = job.jobdir(nh.host)
        run = (Put(path=f"{d}/netcheck_agent.py", text=AGENT.read_text()),
               Put(path=f"{d}/netcheck.json", text=json.dumps(job.doc(nh), sort_keys=True)),
               Cmd(argv=run_argv(job, nh), timeout=job.timeout + START_GRACE, stream=True))
        ranks = f"rank {nh.first_rank}" if nh.local == 1 else f"ranks {nh.first_rank}-{nh.first_rank + nh.local - 1}"
        out.append(Step(
            id=f"{nh.host.name}/{PHASE}", host=nh.host.name, phase=PHASE, readonly=True,
            reason=(f"{ranks} of {job.world}: torch.distributed rendezvous on {job.head.address}:{job.port}, "
                    f"{what} all-reduce checked, in {job.image} with the engine's env "
                    f"({', '.join(k for k, _ in nh.env) or 'none'}); ends within {job.timeout:.0f}s"),
            check=Check(argv=("sh", "-c", LEFTOVER, job.container)),
            variants={"replace": (Cmd(argv=("docker", "rm", "-f", job.container)), *run)},
            ops=run))
    return out


# ---------------------------------------------------------------- results (pure; the text is untrusted)
@dataclass(frozen=True, kw_only=True)
class HostResult:
    host: str
    status: str                     # ok | fail | stopped | timeout | error (it could not run) | not run
    step: str = ""                  # the first check that did not pass
    message: str = ""
    checks: tuple[tuple[str, str, float, str], ...] = ()   # (check, status, seconds, message)
    ranks: tuple[int, int] | None = None
    world: int | None = None
    device: str | None = None
    torch: str | None = None
    nccl: str | None = None
    gpu: str | None = None
    notes: tuple[str, ...] = ()
    seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "", ())}
        out["ok"] = self.ok
        out["checks"] = [{"check": c, "status": s, "seconds": t, "message": m} for c, s, t, m in self.checks]
        if self.ranks is not None:
            out["ranks"] = list(self.ranks)
        out["line"] = line(self)
        return out


def _clean(value: Any, limit: int = 400) -> str:
    """One printable line of at most `limit` characters."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _opt(value: Any, limit: int = 80) -> str | None:
    return _clean(value, limit) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None


def parse_result(host: str, text: str) -> HostResult:
    """A host's outcome text -> HostResult: the agent's JSON result, or (anything else) why it could not run."""
    text = text or ""
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("netcheck") != 1:
        return HostResult(host=host, status="error", message=_clean(text) or "no result from the agent")
    checks = []
    for item in doc.get("checks") if isinstance(doc.get("checks"), list) else []:
        if (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str) and item[1] in STATUSES
                and isinstance(item[2], (int, float)) and not isinstance(item[2], bool)):
            checks.append((_clean(item[0], 20), item[1], float(item[2]), _clean(item[3])))
    if not checks:
        return HostResult(host=host, status="error", message="the agent's result lists no checks")
    if _clean(doc.get("host", ""), 200) != host:
        return HostResult(host=host, status="error", message=f"the result names another host: "
                                                              f"{_clean(doc.get('host'), 60)!r}")
    bad = next((c for c in checks if c[1] != "ok"), None)
    ranks = doc.get("ranks")
    return HostResult(
        host=host, status="ok" if bad is None else ("fail" if bad[1] == "-" else bad[1]),
        step=bad[0] if bad else "", message=(bad[3] or "not reached") if bad else "",
        checks=tuple(checks),
        ranks=(ranks[0], ranks[1]) if isinstance(ranks, list) and len(ranks) == 2 and all(
            isinstance(r, int) and not isinstance(r, bool) for r in ranks) else None,
        world=doc["world"] if isinstance(doc.get("world"), int) and not isinstance(doc.get("world"), bool) else None,
        device=_opt(doc.get("device"), 8), torch=_opt(doc.get("torch")), nccl=_opt(doc.get("nccl")),
        gpu=_opt(doc.get("gpu")),
        notes=tuple(_clean(n, 200) for n in (doc.get("notes") if isinstance(doc.get("notes"), list) else [])[:4]),
        seconds=float(doc["s"]) if isinstance(doc.get("s"), (int, float)) and not isinstance(doc.get("s"), bool)
        else None)


def final_event(lines: Iterable[str]) -> str:
    """The text of the agent's last done/error event in its raw output, as the executor hands it on."""
    from .delivery.control import _text
    text = ""
    for ln in lines:
        try:
            ev = json.loads(ln)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("ev") == "done":
            text = _text(ev.get("summary"))
        elif isinstance(ev, dict) and ev.get("ev") == "error":
            text = _text(ev.get("msg"))
    return text


def result_from_output(host: str, lines: Iterable[str]) -> HostResult:
    """What `check network` makes of one agent's raw stdout (the same parser, for captured runs)."""
    return parse_result(host, final_event(lines))


def collect(job: NetJob, report) -> dict[str, HostResult]:
    """Host -> result, from the executor's report (a host whose earlier step failed says which and why)."""
    by_id = {o.step.id: o for o in report.outcomes}
    failed = [o for o in report.outcomes if o.status == "failed" and o.step.phase != PHASE]
    out = {}
    for nh in job.hosts:
        name = nh.host.name
        o = by_id.get(f"{name}/{PHASE}")
        if o is not None and o.status in ("ran", "failed"):
            out[name] = parse_result(name, o.detail if o.status == "ran" else o.why)
            continue
        mine = next((f for f in failed if f.step.host == name), None)
        if mine is not None:
            out[name] = HostResult(host=name, status="error", step=mine.step.phase, message=_clean(mine.why))
        else:
            why = "; ".join(f"{f.step.host} {f.step.phase}" for f in failed) or "the run stopped"
            out[name] = HostResult(host=name, status="not run", message=f"not run ({why} failed first)")
    return out


# ---------------------------------------------------------------- rendering (pure)
def line(r: HostResult) -> str:
    """One line per host: what passed, or the first check that did not and why."""
    if r.ok:
        who = []
        if r.ranks is not None and r.world is not None:
            a, b = r.ranks
            who.append(f"rank {a} of {r.world}" if a == b else f"ranks {a}-{b} of {r.world}")
        who += [x for x in (r.device, r.torch and f"torch {r.torch}", r.nccl and f"nccl {r.nccl}", r.gpu) if x]
        done = ", ".join(f"{c} {s:.1f}s" for c, _, s, _ in r.checks if c in ("init", "nccl", "gloo"))
        return f"{r.host}: ok ({', '.join(who)}): {done}" + (f" [{'; '.join(r.notes)}]" if r.notes else "")
    if r.status == "not run":
        return f"{r.host}: FAIL {r.message}"
    if r.status == "error":
        return f"{r.host}: FAIL could not run{f' ({r.step})' if r.step else ''}: {r.message}"
    return f"{r.host}: FAIL at {r.step}: {r.message}"


def verdict(results: dict[str, HostResult]) -> tuple[bool, str]:
    rs = list(results.values())
    if rs and all(r.ok for r in rs):
        world = rs[0].world
        what = "NCCL and GLOO" if rs[0].device == "cuda" else "GLOO"
        return True, f"PASS: {len(rs)} host(s), {world} ranks: rendezvous and {what} all-reduce checked on every host"
    causes = [r.host for r in rs if r.status in ("fail", "error")]
    waited = [r.host for r in rs if r.status in ("stopped", "timeout", "not run")]
    if causes:
        text = f"FAIL: {', '.join(causes)} failed"
        if waited:
            text += f"; {', '.join(waited)} stopped or timed out because of it"
        return False, text
    return False, f"FAIL: timed out on {', '.join(waited)} (each line says whom it waited for)"


def lines(results: dict[str, HostResult]) -> list[str]:
    return [line(r) for r in results.values()] + [f"verdict: {verdict(results)[1]}"]


# ---------------------------------------------------------------- the use case
@dataclass
class NetCheck:
    job: NetJob
    steps: list[Step]
    report: Any
    results: dict[str, HostResult]
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.dry_run and verdict(self.results)[0]

    def as_dict(self) -> dict:
        out: dict = {"dry_run": self.dry_run, "image": self.job.image, "device": self.job.device,
                     "world": self.job.world, "rendezvous": f"{self.job.head.address}:{self.job.port}",
                     "timeout": self.job.timeout}
        if not self.dry_run:
            ok, text = verdict(self.results)
            out.update(verdict="pass" if ok else "fail", summary=text,
                       hosts={n: r.as_dict() for n, r in self.results.items()})
        out["steps"] = [o.as_dict() for o in self.report.outcomes]
        out["plan"] = [s.as_dict() for s in self.steps]
        return out


def check_network(inv: Inventory, prof: Profile, *, timeout: float = DEFAULT_TIMEOUT, port: int = DEFAULT_PORT,
                  dry_run: bool = False, progress: Callable[[str], None] = lambda s: None,
                  accept_new_host_keys: bool = False, break_lock: bool = False,
                  notice: Callable[[str], None] = lambda s: None) -> NetCheck:
    """Take the cluster lease, pull the image where it is missing, then run the check on every inventory host at once."""
    from . import lease as leases
    from . import ops, remote
    from . import plan as planner
    from .executor import Executor, PhaseFailed, Report
    d = ops.make_plan(inv, prof).deployment
    job = make_job(d, inv.hosts, timeout=timeout, port=port)
    hosts = tuple(nh.host for nh in job.hosts)
    todo = [*planner.image_steps(dataclasses.replace(d, setup=dataclasses.replace(d.setup, hosts=hosts))),
            *steps(job)]
    lease = leases.for_operation(inv, "check network", break_lock=break_lock)
    take, release = lease.steps()
    with remote.Hosts(inv, accept_new_host_keys=accept_new_host_keys) as connections:
        if dry_run:     # the lease's check only: a dry run never takes it
            return NetCheck(job, todo, Executor(connections, progress).evaluate([*take, *todo, *release]), {},
                            dry_run=True)
        # an unreachable head: no lease, and the image phase's per-host results say so (nothing starts)
        with leases.Held(lease, connections, progress=progress, notice=notice, unreachable_ok=True) as held:
            try:
                report = held.executor.execute(todo)
            except PhaseFailed as e:       # every host's result is still in the report
                report = e.report
    report = Report(outcomes=held.taken.outcomes + report.outcomes + held.released.outcomes,
                    phases={**held.taken.phases, **report.phases, **held.released.phases})
    return NetCheck(job, todo, report, collect(job, report))
