"""Diagnostics that read the hosts without changing them: the causes a failed engine phase's logs show (matched by
cluster/failures.py), `doctor --logs`, and the in-image torch check run by `doctor`."""

from __future__ import annotations

from typing import Any, Callable

from . import facts, failures
from . import plan as planner
from .checks import ERROR, WARNING, Finding
from .executor import Executor, PhaseFailed

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _remote():
    from . import remote  # SSH only where hosts are touched
    return remote


LOG_TAIL = 200           # lines per container read to explain a failure
LOG_TIMEOUT = 20.0       # seconds one log read may take: the failure itself is reported whatever happens here


class ExplainedFailure(PhaseFailed):
    """A failed engine phase of `up`, with the known causes its containers' logs show (cluster/failures.py)."""

    def __init__(self, original: PhaseFailed, causes: list):
        self.report, self.failed, self.phase, self.causes = original.report, original.failed, original.phase, causes
        self.original = original
        # the causes first: the original failure stays the message's last line(s)
        Exception.__init__(self, "the logs show why:\n  " + "\n  ".join(failures.summary(causes)) + "\n"
                           + str(original))


def read_logs(d, hosts, names, *, tail: int = LOG_TAIL, timeout: float = LOG_TIMEOUT) -> list[dict]:
    """The last `tail` lines of the deployment's containers on the hosts `names` (running or exited), explained:
    per source its host, component, status and findings. Never raises for a host or a container."""
    sources = [s for s in d.engine.logs(d, tail=tail, follow=False) if s.host in names]

    def one(src):
        h = hosts.host(src.host)
        r = hosts.run(h, list(src.argv), timeout=timeout)
        fallback = failures.stopped_fallback(src.argv) if not r.ok else None
        if fallback:        # a log file inside a container that has exited: docker cp still reads it
            again = hosts.run(h, list(fallback), timeout=timeout)
            if again.ok and again.stdout.strip():
                r = again
        return r
    results = hosts.each(sources, one, key=lambda s: f"{s.host} {s.component}")
    out = []
    for src in sources:
        r = results[f"{src.host} {src.component}"]
        row: dict[str, Any] = {"host": src.host, "component": src.component, "lines": 0, "findings": []}
        if isinstance(r, BaseException):
            row["status"] = "unreachable: " + failures.clean(_remote().describe(r))[:200]
        elif not r.ok and "No such container" in r.stderr:
            row["status"] = "no container"
        else:
            lines = failures.lines_of([r.stdout, r.stderr])
            row["lines"] = len(lines)
            row["status"] = "ok" if r.ok else f"exit {r.rc}: {failures.clean(r.last_line())[:200]}"
            row["findings"] = failures.explain(lines, host=src.host, component=src.component)
        out.append(row)
    return out


def explain_failure(e: PhaseFailed, plan: planner.Plan, hosts, progress: Progress = _quiet) -> PhaseFailed:
    """`e` with the causes the logs show, or `e` itself (not an engine phase, nothing known, logs unreadable)."""
    try:
        d = plan.deployment
        if e.phase not in {s.phase for s in d.engine.steps(d, join_timeout=1, ready_timeout=1)}:
            return e
        nodes = [h.name for h in d.hosts]
        failed = {o.step.host for o in e.failed}
        # a wait that watches other hosts (joined, readiness from this machine) failed: any host's log may say why
        watching = any(o.step.readonly or o.step.host not in nodes for o in e.failed)
        names = nodes if watching else [n for n in nodes if n in failed]
        progress(f"== explain: the last {LOG_TAIL} log lines on {', '.join(names)}")
        found = [f for row in read_logs(d, hosts, names) for f in row["findings"]]
        codes = {f.code for f in found}
        for o in e.failed:      # the failure's own text (e.g. a container the runtime refused to start)
            found += [f for f in failures.explain(o.why.splitlines(), host=o.step.host,
                                                  component=o.step.id.split("/", 1)[-1]) if f.code not in codes]
        causes = failures.merge(found)
    except Exception:  # noqa: BLE001 - reading the logs must never hide the failure itself
        return e
    return ExplainedFailure(e, causes) if causes else e


def scan_logs(plan: planner.Plan, *, accept_new_host_keys: bool = False, tail: int = LOG_TAIL) -> dict:
    """Every container log of the deployment explained: per source its status; the findings merged per code."""
    d = plan.deployment
    with _remote().Hosts(plan.inventory, accept_new_host_keys=accept_new_host_keys) as hosts:
        rows = read_logs(d, hosts, [h.name for h in d.hosts], tail=tail)
    found = failures.merge(f for row in rows for f in row.pop("findings"))
    return {"tail": tail, "sources": rows, "findings": [f.as_dict() for f in found],
            "errors": sum(f.severity == ERROR for f in found)}


def image_check_findings(plan: planner.Plan, probed: dict[str, facts.HostFacts],
                         accept_new_host_keys: bool = False) -> list[Finding]:
    """The image-check steps of `up` on every reachable host that already has the image (read-only)."""
    steps = [s for s in plan.steps if s.phase == "image-check" and probed[s.host].reachable]
    if not steps:
        return []
    with _remote().Hosts(plan.inventory, accept_new_host_keys=accept_new_host_keys) as hosts:
        try:
            outcomes = Executor(hosts).execute(steps, keep_going=True).outcomes
        except PhaseFailed as e:
            outcomes = e.report.outcomes
    found = []
    for o in outcomes:
        if o.status != "failed":
            continue
        if "No such image" in o.why or "Unable to find image" in o.why:
            found.append(Finding(code="image-absent", severity=WARNING, message=f"{o.step.host}: "
                                 f"{plan.deployment.profile.image} is not pulled yet, so its torch was not checked",
                                 fix="`gpucluster up` checks it right after the pull (or `gpucluster model pull` first)"))
            continue
        code, _, rest = o.why.partition(": ")
        code = code if code in ("compute-capability", "no-gpu") else "image-check"
        found.append(Finding(code=code, severity=ERROR, message=f"{o.step.host}: {rest if code != 'image-check' else o.why}",
                             fix="use an image whose torch supports these GPUs (gpucluster plan --profile auto)"))
    return found
