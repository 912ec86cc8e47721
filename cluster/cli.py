"""The gpucluster command line: parse, call core, render. Nothing else imports typer."""

from __future__ import annotations

import json
import shlex
import sys
from typing import List, Optional

import typer

from .errors import GpuclusterError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Bring up a vLLM endpoint on bare-metal GPU hosts from a YAML inventory, and take it down.")

InventoryArg = typer.Argument(..., metavar="INVENTORY", help="inventory YAML file")
ProfileOpt = typer.Option(None, "--profile", help="profile name under profiles/ or a path")
ModelOpt = typer.Option(None, "--model", help="hub id or local model directory")
TpOpt = typer.Option(None, "--tp", min=1, help="tensor parallel size")
PpOpt = typer.Option(None, "--pp", min=1, help="pipeline parallel size")
HostsOpt = typer.Option(None, "--hosts", help="comma-separated host names to use")
SetOpt = typer.Option(None, "--set", help="engine arg override KEY=VALUE (repeatable)")
JsonOpt = typer.Option(False, "--json", help="print one JSON object on stdout")


def _hosts(value: str | None) -> list[str] | None:
    return [h.strip() for h in value.split(",") if h.strip()] if value else None


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def err(text: str) -> None:
    """Progress and diagnostics go to stderr; results to stdout."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- rendering
def render_table(p) -> str:
    out = []
    inv = p.inventory
    out.append(f"cluster {inv.cluster.name}: {p.profile.name} ({p.profile.image}), model {inv.deploy.model} "
               f"as {p.served_name!r}")
    t = p.topology
    out.append(f"topology: TP {t.tp} x PP {t.pp} on {', '.join(t.nodes)} (head {t.head}); {t.why}")
    m = p.memory
    if m:
        g = m.as_dict()["gib"]
        out.append(f"memory per GPU ({m.dtype}): total {g['gpu_total']} GiB, budget {g['budget']} GiB "
                   f"({m.utilization:.0%}), weights {g['weights']}, profile peak {g['activations']} "
                   f"({m.batched_tokens} tokens), context {g['context']}, CUDA graphs {g['cuda_graphs']}, "
                   f"KV cache {g['kv_cache']} GiB = {m.blocks} blocks = {m.token_capacity} tokens "
                   f"(max-model-len {m.max_model_len})")
    out.append("")
    if p.findings:
        for f in p.findings:
            out.append(f"{f.severity.upper():7} {f.code}: {f.message}")
            out.append(f"        fix: {f.fix}")
    else:
        out.append("no findings")
    out.append("")
    out.append("steps:")
    for s in p.steps:
        out.append(f"  [{s.phase}] {s.host}: {s.reason}")
        out.append(f"      $ {s.shell()}")
    out.append("")
    out.append(f"verdict: {p.verdict}")
    return "\n".join(out)


def render_sh(p) -> str:
    """A commented bash runbook, a section per host, that performs the same bring-up by hand."""
    lines = ["#!/usr/bin/env bash", f"# gpucluster runbook for cluster {p.inventory.cluster.name}: "
             f"{p.profile.image}, {p.inventory.deploy.model}, TP {p.topology.tp} x PP {p.topology.pp}",
             f"# verdict: {p.verdict}" + "".join(f"\n#   {f.severity} {f.code}: {f.message}" for f in p.findings),
             "# Run each section on its host, in order; wait for each phase before the next.", "set -euo pipefail", ""]
    current = None
    for s in p.steps:
        if (s.host, s.phase) != current:
            where = "this machine" if s.host == "control" else f"host {s.host}"
            if s.host != "control":
                where += f" ({p.host(s.host).address})"
            lines.append(f"# ---- {s.phase} on {where}")
            current = (s.host, s.phase)
        lines.append(f"# {s.reason}")
        if s.phase == "ready":
            lines.append(f"until {shlex.join(s.argv)}; do sleep 10; done")
        else:
            lines.append(s.shell())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- commands
@app.callback()
def _root() -> None:
    """Bring up a vLLM endpoint on bare-metal GPU hosts from a YAML inventory, and take it down."""


@app.command()
def plan(inventory: str = InventoryArg, profile: Optional[str] = ProfileOpt, model: Optional[str] = ModelOpt,
         tp: Optional[int] = TpOpt, pp: Optional[int] = PpOpt, hosts: Optional[str] = HostsOpt,
         set_: Optional[List[str]] = typer.Option(None, "--set", help="engine arg override KEY=VALUE (repeatable)"),
         json_: bool = JsonOpt,
         format_: str = typer.Option("table", "--format", help="table | json | sh")) -> None:
    """Offline: every finding that would make the deployment fail, and the exact per-host commands."""
    from . import config, core
    if format_ not in ("table", "json", "sh"):
        raise config.ConfigError(f"--format {format_!r}: use table, json or sh")
    inv, prof = core.load(inventory, profile=profile, model=model, hosts=_hosts(hosts))
    p = core.make_plan(inv, prof, tp=tp, pp=pp, sets=config.parse_set(set_ or []))
    fmt = "json" if json_ else format_
    if fmt == "json":
        _emit(p.as_dict())
    elif fmt == "sh":
        sys.stdout.write(render_sh(p))
    else:
        sys.stdout.write(render_table(p) + "\n")
    raise typer.Exit(1 if p.verdict == "fail" else 0)


def main() -> None:
    """Console entry point: click handles usage errors (exit 2); ours become one line and an exit code."""
    try:
        app()
    except GpuclusterError as e:
        err(f"gpucluster: error: {e}")
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
