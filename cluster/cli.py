"""The gpucluster command line: parse, call a use case (ops), render. Nothing else imports typer."""

from __future__ import annotations

import json
import shlex
import sys
from typing import List, Optional

import typer

from .errors import GpuclusterError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Bring up an LLM endpoint on bare-metal GPU hosts from a YAML inventory, and take it down.")

InventoryArg = typer.Argument(..., metavar="INVENTORY", help="inventory YAML file")
ProfileOpt = typer.Option(None, "--profile", help="profile name under profiles/ or a path")
ModelOpt = typer.Option(None, "--model", help="hub id or local model directory")
TpOpt = typer.Option(None, "--tp", min=1, help="tensor parallel size")
PpOpt = typer.Option(None, "--pp", min=1, help="pipeline parallel size")
HostsOpt = typer.Option(None, "--hosts", help="comma-separated host names to use")
JsonOpt = typer.Option(False, "--json", help="print one JSON object on stdout")
OfflineOpt = typer.Option(False, "--offline", help="plan without asking the model hub from this machine: a model "
                          "outside the catalog is read from the cache only (~/.cache/gpucluster/hub); also "
                          "GPUCLUSTER_OFFLINE=1")


def _offline(flag: bool) -> None:
    """--offline reaches every plan this command builds (cluster/hub.py reads it)."""
    if flag:
        import os
        os.environ["GPUCLUSTER_OFFLINE"] = "1"


def _hosts(value: str | None) -> list[str] | None:
    return [h.strip() for h in value.split(",") if h.strip()] if value else None


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def err(text: str) -> None:
    """Progress and diagnostics go to stderr; results to stdout."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- commands
@app.callback()
def _root() -> None:
    """Bring up an LLM endpoint on bare-metal GPU hosts from a YAML inventory, and take it down."""


@app.command()
def plan(inventory: str = InventoryArg, profile: Optional[str] = ProfileOpt, model: Optional[str] = ModelOpt,
         tp: Optional[int] = TpOpt, pp: Optional[int] = PpOpt, hosts: Optional[str] = HostsOpt,
         set_: Optional[List[str]] = typer.Option(None, "--set", help="engine arg override KEY=VALUE (repeatable)"),
         json_: bool = JsonOpt, offline: bool = OfflineOpt,
         format_: str = typer.Option("table", "--format", help="table | json | sh")) -> None:
    """Offline: every finding that would make the deployment fail, and the exact steps `up` runs per host."""
    from . import config, ops, render
    _offline(offline)
    if format_ not in ("table", "json", "sh"):
        raise config.ConfigError(f"--format {format_!r}: use table, json or sh")
    inv, prof = ops.load(inventory, profile=profile, model=model, hosts=_hosts(hosts))
    p = ops.make_plan(inv, prof, tp=tp, pp=pp, sets=config.parse_set(set_ or []))
    steps = [step for part in ops.up_steps(p) for step in part]
    fmt = "json" if json_ else format_
    alts = _alternatives(inv, p, set_ or []) if fmt == "json" or p.verdict == "fail" else []
    if fmt == "json":
        _emit({**p.as_dict(), "steps": [s.as_dict() for s in steps], "alternatives": [a.as_dict() for a in alts]})
    elif fmt == "sh":
        sys.stdout.write(render.runbook(p, steps))
    else:
        text = render.table(p, steps)
        if p.verdict == "fail":   # before the last line, which stays the verdict
            body, _, last = text.rpartition("\n")
            text = body + "\n" + _alternatives_text(alts) + "\n" + last
        sys.stdout.write(text + "\n")
    raise typer.Exit(1 if p.verdict == "fail" else 0)


def _alternatives(inv, p, sets: list[str]) -> list:
    """What would pass instead (searched only when asked for JSON or when the plan fails)."""
    from . import alternatives, config
    return alternatives.search(inv, p.model, sets=config.parse_set(sets), engine=p.profile.engine)


def _alternatives_text(alts: list) -> str:
    if not alts:
        return "\nno known release passes every check for this model on these hosts\n"
    lines = ["", "alternatives that pass every check (newest engine first, then fewest GPUs):"]
    for a in alts:
        d = a.as_dict()
        use = f"--profile {d['profile']}" if d["profile"] else f"a profile with `image: {d['image']}`"
        args = " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in d["engine_args"].items())
        lines += [f"  {use} --tp {a.tp} --pp {a.pp} {args}".rstrip(), f"      {d['verdict']}: {d['why']}"]
    return "\n".join(lines) + "\n"


AcceptOpt = typer.Option(False, "--accept-new-host-keys", help="trust and record unknown SSH host keys")
YesOpt = typer.Option(False, "--yes", "-y", help="do not ask for confirmation")
BreakLockOpt = typer.Option(False, "--break-lock", help=(
    "take the cluster lease even while another operation holds it (when that operation is gone)"))


def _progress(quiet: bool):
    return (lambda s: None) if quiet else (lambda s: err(f"gpucluster: {s}"))


def _notice(text: str) -> None:
    """Said whatever --quiet or --json: a lease taken over, broken or lost."""
    err(f"gpucluster: warning: {text}")


def _confirm(yes: bool, question: str) -> None:
    from .errors import ConfigError
    if yes:
        return
    if not sys.stdin.isatty():
        raise ConfigError(f"{question}: refusing without --yes when stdin is not a terminal", fix="add --yes")
    if not typer.confirm(question, default=False, err=True):
        raise typer.Exit(1)


@app.command()
def probe(inventory: str = InventoryArg, json_: bool = JsonOpt, accept: bool = AcceptOpt) -> None:
    """Connect to every host in parallel, gather facts, compare them with the inventory."""
    from . import config, facts, ops
    inv = config.load_inventory(inventory)
    probed = ops.probe(inv, accept_new_host_keys=accept)
    bad = {h.name: facts.contradictions(h, probed[h.name]) for h in inv.hosts}
    if json_:
        _emit({"hosts": {n: f.as_dict() for n, f in probed.items()}, "contradictions": bad})
    else:
        for h in inv.hosts:
            f = probed[h.name]
            if not f.reachable:
                sys.stdout.write(f"{h.name:12} {h.address:15} UNREACHABLE: {f.error}\n")
                continue
            gpus = f"{len(f.gpus)} x {f.gpus[0].name} {f.gpus[0].memory_mib} MiB cc {f.gpus[0].compute_capability} " \
                   f"driver {f.gpus[0].driver}" if f.gpus else "no GPUs"
            disk = f"{f.disk_free / 1e9:.1f} GB free at {f.disk_path}" if f.disk_free is not None else "disk ?"
            sys.stdout.write(f"{h.name:12} {h.address:15} {f.os}, {f.kernel}, docker {f.docker_version or '-'}"
                             f"{' (gpu runtime)' if f.gpu_runtime else ''}\n{'':28} {gpus}; {disk}; nic "
                             f"{f.interface or '?'}; route src {f.route_src or 'none'}; clock "
                             f"{f.clock_offset if f.clock_offset is not None else '?'} s\n")
            for c in bad[h.name]:
                sys.stdout.write(f"{'':28} MISMATCH {c}\n")
    raise typer.Exit(3 if any(bad.values()) else 0)


@app.command()
def up(inventory: str = InventoryArg, profile: Optional[str] = ProfileOpt, model: Optional[str] = ModelOpt,
       tp: Optional[int] = TpOpt, pp: Optional[int] = PpOpt, hosts: Optional[str] = HostsOpt,
       set_: Optional[List[str]] = typer.Option(None, "--set", help="engine arg override KEY=VALUE (repeatable)"),
       yes: bool = YesOpt, dry_run: bool = typer.Option(False, "--dry-run", help=(
           "connect, run only the read-only checks, and print per host what would run and what is skipped")),
       json_: bool = JsonOpt, accept: bool = AcceptOpt, break_lock: bool = BreakLockOpt,
       ready_timeout: float = typer.Option(1800, "--ready-timeout", help="seconds to wait for the model to load"),
       join_timeout: float = typer.Option(180, "--join-timeout", "--ray-timeout",
                                          help="seconds to wait for every host to join the engine's cluster"),
       quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress on stderr"),
       offline: bool = OfflineOpt) -> None:
    """Probe, then run the plan's steps: image, model, engine containers, API server; wait until it answers."""
    from . import config, ops, render
    _offline(offline)
    inv, prof = ops.load(inventory, profile=profile, model=model, hosts=_hosts(hosts))
    result = ops.up(inv, prof, dry_run=dry_run, progress=_progress(quiet or json_ or dry_run),
                    accept_new_host_keys=accept, tp=tp, pp=pp, sets=config.parse_set(set_ or []),
                    ready_timeout=ready_timeout, join_timeout=join_timeout, break_lock=break_lock, notice=_notice)
    if json_:
        _emit(result.as_dict())
        return
    if dry_run:
        sys.stdout.write(render.dry_run(result.report) + "\n")
        return
    p = result.plan
    auth = ' -H "Authorization: Bearer $API_KEY"' if inv.deploy.api_key is not None else ""
    body = json.dumps({"model": p.served_name, "messages": [{"role": "user", "content": "Hello"}]})
    sys.stdout.write(f"endpoint: {p.endpoint}\nmodel: {p.served_name}\n"
                     f"phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.report.phases.items()) + "\n"
                     f"try: curl {p.endpoint}/chat/completions -H 'Content-Type: application/json'{auth} "
                     f"-d {shlex.quote(body)}\n")


@app.command()
def down(inventory: str = InventoryArg, purge_model: bool = typer.Option(False, "--purge-model",
         help="also delete the model files on the hosts"), yes: bool = YesOpt, json_: bool = JsonOpt,
         dry_run: bool = typer.Option(False, "--dry-run", help="show what would be removed, remove nothing"),
         accept: bool = AcceptOpt, break_lock: bool = BreakLockOpt) -> None:
    """Remove exactly this cluster's containers (workers, then heads, then helpers) and its files on the hosts."""
    from . import config, ops, render
    inv = config.load_inventory(inventory)
    if not dry_run:
        _confirm(yes, f"remove every gpucluster container of cluster {inv.cluster.name!r} on {len(inv.hosts)} "
                 "host(s)" + (" and the model files" if purge_model else ""))
    report = ops.down(inv, purge_model=purge_model, dry_run=dry_run, accept_new_host_keys=accept,
                      break_lock=break_lock, notice=_notice)
    if json_:
        _emit({"dry_run": dry_run, "steps": [o.as_dict() for o in report.outcomes],
               "plan": [o.step.as_dict() for o in report.outcomes]})
    elif dry_run:
        sys.stdout.write(render.dry_run(report) + "\n")
    else:
        done = {}
        for o in report.outcomes:
            if o.status == "ran" and o.step.phase not in ("lock", "unlock"):
                done.setdefault(o.step.host, []).append(o.why)
        for h in inv.hosts:
            sys.stdout.write(f"{h.name}: {'; '.join(done.get(h.name, [])) or 'nothing to remove'}\n")


@app.command()
def status(inventory: str = InventoryArg, json_: bool = JsonOpt, accept: bool = AcceptOpt) -> None:
    """Containers per host, the engine's own view (e.g. Ray nodes and GPUs), API health; exit 0 only when healthy."""
    from . import ops
    from . import config
    inv = config.load_inventory(inventory)      # the profile only matters when no deployment is recorded
    healthy, out = ops.status(inv, lambda: ops.load(inventory), accept_new_host_keys=accept)
    if json_:
        _emit(out)
    else:
        for name, h in out["hosts"].items():
            if not h["reachable"]:
                sys.stdout.write(f"{name}: UNREACHABLE {h['error']}\n")
                continue
            cs = ", ".join(f"{c['role']} {c['state']} ({c['id']})" for c in h["containers"]) or "no containers"
            sys.stdout.write(f"{name}: {cs}\n")
        for line in out["engine_summary"]:
            sys.stdout.write(line + "\n")
        sys.stdout.write(f"api: {'healthy' if out['api']['health'] else 'not answering'}"
                         f"{', serving ' + ', '.join(out['api']['models']) if out['api']['models'] else ''}\n")
        for note in out["notes"]:
            sys.stdout.write(f"NOTE {note}\n")
        for problem in out["problems"]:
            sys.stdout.write(f"PROBLEM {problem}\n")
        sys.stdout.write(f"{'healthy' if healthy else 'unhealthy'}: {out['endpoint']}\n")
    raise typer.Exit(0 if healthy else 1)


@app.command()
def logs(inventory: str = InventoryArg, host: Optional[str] = typer.Option(None, "--host"),
         component: Optional[str] = typer.Option(None, "--component", help="e.g. api, ray-head, ray-worker"),
         follow: bool = typer.Option(False, "--follow", "-f"), tail: int = typer.Option(100, "--tail", min=0)) -> None:
    """Logs from the hosts' containers, each line prefixed by host and component."""
    from . import ops
    from . import config
    inv = config.load_inventory(inventory)
    lock = __import__("threading").Lock()

    def sink(line: str) -> None:
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    try:
        code = ops.logs(inv, lambda: ops.load(inventory), host=host, component=component, tail=tail, follow=follow,
                        sink=sink)
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(0 if code == 0 else 1)


@app.command()
def doctor(inventory: str = InventoryArg, json_: bool = JsonOpt, accept: bool = AcceptOpt,
           offline: bool = OfflineOpt,
           logs: bool = typer.Option(False, "--logs", help=(
               "also read the deployment's container logs on every host (running or exited) and explain known "
               "failures: cause and fix (exit 1 when one is an error)")),
           tail: int = typer.Option(200, "--tail", min=1, max=5000, help="log lines per container for --logs")) -> None:
    """Probe the hosts and re-plan with what was measured: every problem `up` would hit, changing nothing."""
    from . import ops, render
    _offline(offline)
    inv, prof = ops.load(inventory)
    p, found = ops.doctor(inv, prof, accept_new_host_keys=accept, logs=logs, tail=tail)
    unreachable = [n for n, h in found["hosts"].items() if not h["reachable"]]
    if json_:
        _emit({**p.as_dict(), **found})
    else:
        for name, issues in found["contradictions"].items():
            for c in issues:
                sys.stdout.write(f"{name}: {c}\n")
        sys.stdout.write(render.table(p) + "\n")
        if logs:
            sys.stdout.write(_log_findings_text(found["logs"]))
    log_errors = bool(found.get("logs", {}).get("errors"))
    raise typer.Exit(3 if unreachable else (1 if p.verdict == "fail" or log_errors else 0))


def _log_findings_text(scan: dict) -> str:
    """doctor --logs: each container's log read, then one block per known failure (cause, fix, excerpt)."""
    lines = ["", f"logs (the last {scan['tail']} lines of each container):"]
    for row in scan["sources"]:
        what = f"{row['lines']} lines" if row["status"] == "ok" else row["status"]
        lines.append(f"  {row['host']} {row['component']}: {what}")
    for f in scan["findings"]:
        where = ", ".join(f["seen"]) or f"{f['host']} {f['component']}"
        lines += [f"{f['severity'].upper()} {where}: {f['code']}: {f['message']}", f"    fix: {f['fix']}",
                  f"    log: {f['excerpt']}"]
    if not scan["findings"]:
        lines.append("no known failure in the logs")
    return "\n".join(lines) + "\n"


model_app = typer.Typer(help="Model files on the hosts.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("pull")
def model_pull(inventory: str = InventoryArg, model: Optional[str] = ModelOpt, json_: bool = JsonOpt,
               accept: bool = AcceptOpt, verify: bool = typer.Option(
                   False, "--verify", help="re-list the source and sha256 every file on every host"),
               dry_run: bool = typer.Option(False, "--dry-run", help="only the checks: what would be fetched"),
               break_lock: bool = BreakLockOpt,
               offline: bool = OfflineOpt) -> None:
    """Put the model on every host that needs it (the image and model phases of `up`, alone)."""
    from . import ops, render
    _offline(offline)
    inv, prof = ops.load(inventory, model=model)
    result, report = ops.model_pull(inv, prof, progress=_progress(json_), accept_new_host_keys=accept,
                                    verify=verify, dry_run=dry_run, break_lock=break_lock, notice=_notice)
    if json_:
        _emit({"hosts": result, "steps": [o.as_dict() for o in report.outcomes]})
    elif dry_run:
        sys.stdout.write(render.dry_run(report) + "\n")
    else:
        for host, what in result.items():
            sys.stdout.write(f"{host}: {what}\n")


check_app = typer.Typer(help="Checks run on the hosts that change nothing in the deployment.", no_args_is_help=True)
app.add_typer(check_app, name="check")


@check_app.command("network")
def check_network(inventory: str = InventoryArg, profile: Optional[str] = ProfileOpt, hosts: Optional[str] = HostsOpt,
                  timeout: float = typer.Option(120, "--timeout", min=5, help="seconds after which every rank stops"),
                  port: int = typer.Option(29555, "--port", min=1024, max=65535, help="rendezvous port on the head"),
                  dry_run: bool = typer.Option(False, "--dry-run", help="connect, run only the read-only checks, "
                                               "and print the steps"),
                  json_: bool = JsonOpt, accept: bool = AcceptOpt, break_lock: bool = BreakLockOpt,
                  quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress on stderr")) -> None:
    """torch.distributed on every host at once in the deployment's image (NCCL and GLOO all-reduce), per host."""
    from . import netcheck, ops, render
    inv, prof = ops.load(inventory, profile=profile, hosts=_hosts(hosts))
    result = netcheck.check_network(inv, prof, timeout=timeout, port=port, dry_run=dry_run,
                                    progress=_progress(quiet or json_ or dry_run), accept_new_host_keys=accept,
                                    break_lock=break_lock, notice=_notice)
    if json_:
        _emit(result.as_dict())
    elif dry_run:
        sys.stdout.write("\n".join(render.steps_table(result.steps)) + "\n" + render.dry_run(result.report) + "\n")
    else:
        sys.stdout.write("\n".join(netcheck.lines(result.results)) + "\n")
    raise typer.Exit(0 if result.ok or dry_run else 1)


def main() -> None:
    """Console entry point: click handles usage errors (exit 2); ours become one line and an exit code."""
    try:
        app()
    except GpuclusterError as e:
        err(f"gpucluster: error: {e}")
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
