"""Views of one list of steps: a table for people, a bash runbook that does the same by hand, dry-run results."""

from __future__ import annotations

import hashlib
import shlex

from .steps import CONTROL, Cmd, Copy, Http, Op, Put, Step, Wait
from .delivery.model_steps import TOKEN_KEYS


def comment(text: str) -> str:
    """Text safe inside a `#` comment: a newline from YAML must never end it."""
    return " ".join(str(text).split())


def _argv_line(argv) -> str:
    """An argv for people: an embedded script is abbreviated (--format sh and --json show it whole)."""
    return shlex.join([a if len(a) <= 100 and "\n" not in a else f"<script: {len(a)} chars>" for a in argv])


def _op_line(op: Op) -> str:
    if isinstance(op, Cmd):
        return _argv_line(op.argv)
    if isinstance(op, Put):
        what = ", ".join(f"{k}=***" for k, _ in op.secrets) if op.secrets else f"{len(op.text.encode())} bytes"
        return f"put {op.path} (mode {op.mode:04o}: {what})"
    if isinstance(op, Wait):
        return f"until {_argv_line(op.argv)} (at most {op.timeout:.0f} s)"
    if isinstance(op, Http):
        return f"{'POST' if op.body is not None else 'GET'} {op.url}" + (f" until 200 (at most {op.until:.0f} s)"
                                                                         if op.until else "")
    return f"copy {op.src_host}:{op.src} -> {op.dst} through this machine"


def table(plan, steps=None) -> str:
    d = plan.deployment
    out = [f"cluster {d.cluster}: {d.profile.name} ({d.profile.image}, engine {d.engine.name}), model "
           f"{d.inventory.deploy.model} as {d.served_name!r}"]
    t = d.topology
    out.append(f"topology: TP {t.tp} x PP {t.pp} on {', '.join(t.nodes)} (head {t.head}); {t.why}")
    m = plan.memory
    if m:
        g = m.as_dict()["gib"]
        out.append(f"memory per GPU ({m.dtype}): total {g['gpu_total']} GiB, budget {g['budget']} GiB "
                   f"({m.utilization:.0%}), weights {g['weights']}, profile peak {g['activations']} "
                   f"({m.batched_tokens} tokens), context {g['context']}, CUDA graphs {g['cuda_graphs']}, "
                   f"KV cache {g['kv_cache']} GiB = {m.blocks} blocks = {m.token_capacity} tokens "
                   f"(max-model-len {m.max_model_len})")
    out.append("")
    for f in plan.findings:
        out += [f"{f.severity.upper():7} {f.code}: {f.message}", f"        fix: {f.fix}"]
    if not plan.findings:
        out.append("no findings")
    out += ["", "steps (each runs only when its check says so; `up --dry-run` evaluates the checks):"]
    out += steps_table(plan.steps if steps is None else steps)
    out += ["", f"verdict: {plan.verdict}"]
    return "\n".join(out)


def steps_table(steps) -> list[str]:
    out = []
    for s in steps:
        out.append(f"  [{s.phase}] {s.id}: {s.reason}")
        if s.check:
            out.append(f"      check: {_argv_line(s.check.argv)}")
        out += [f"      $ {_op_line(op)}" for op in s.ops]
        for i, alt in enumerate(s.otherwise, 1):
            out += [f"      else ({i}) $ {_op_line(op)}" for op in alt]
        for name, ops in s.variants.items():
            out += [f"      when {name}: $ {_op_line(op)}" for op in ops]
    return out


def dry_run(report) -> str:
    out = []
    for host, outcomes in report.by_host().items():
        out.append(f"{host}:")
        for o in outcomes:
            what = o["status"].replace("would-", "")
            variant = f" ({o['variant']})" if o.get("variant") else ""
            out.append(f"  {what:5} [{o['phase']}] {o['id'].split('/', 1)[-1]}{variant}: {o['why']}")
    return "\n".join(out)


# ---------------------------------------------------------------- the runbook
def _secret_hints(plan, steps) -> dict[str, str]:
    """Variable -> where its value comes from, for the runbook's header."""
    inv = plan.inventory
    hints = {TOKEN_KEYS["transfer"]: "any random string, e.g. $(openssl rand -hex 24): guards the model copy"}
    env = {id(v): f"deploy.env.{k}" for k, v in inv.deploy.env.items()}
    env.update({id(v): f"hosts[{h.name}].env.{k} (on {h.name}: its own value)" for h in inv.hosts
                for k, v in h.env.items()})
    for s in steps:
        for op in s.all_ops():
            for key, secret in getattr(op, "secrets", ()):
                if secret is inv.deploy.api_key:
                    hints[key] = "deploy.api_key"
                elif secret is inv.deploy.source.token:
                    hints[key] = "deploy.source.token (the hub token)"
                elif any(secret is f.token for f in inv.deploy.source.fallbacks):
                    i = next(i for i, f in enumerate(inv.deploy.source.fallbacks) if secret is f.token)
                    hints[key] = f"deploy.source.fallbacks[{i}].token (that hub's token)"
                elif id(secret) in env and env[id(secret)] not in hints.get(key, ""):
                    hints[key] = "; ".join(filter(None, (hints.get(key), env[id(secret)])))
    return hints


def runbook(plan, steps=None) -> str:
    """A commented bash runbook: one section per phase and host, run in order on that host."""
    steps = list(plan.steps if steps is None else steps)
    d = plan.deployment
    needed = sorted({k for s in steps for op in s.all_ops() if isinstance(op, Put) for k, _ in op.secrets})
    hints = _secret_hints(plan, steps)
    lines = ["#!/usr/bin/env bash",
             "# " + comment(f"gpucluster runbook for cluster {d.cluster}: {d.profile.image}, "
                            f"{d.inventory.deploy.model}, TP {d.topology.tp} x PP {d.topology.pp}"),
             f"# verdict: {plan.verdict}", *(f"#   {comment(f'{f.severity} {f.code}: {f.message}')}"
                                             for f in plan.findings),
             "# Run each section on the host it names (control: this machine), in order; a phase ends before the",
             "# next begins. Each step first runs its read-only check and skips what is already done.",
             *([f"# Export first: {', '.join(needed)}"] + [f"#   {k}: {hints.get(k, '')}" for k in needed]
               if needed else []),
             "set -euo pipefail"]
    current = None
    for s in steps:
        if (s.phase, s.host) != current:
            current = (s.phase, s.host)
            where = "this machine" if s.host == CONTROL else f"host {s.host} ({plan.host(s.host).address})"
            lines += ["", f"# ==== phase {s.phase} on {where}"]
        lines += [f"# --- {s.id}: {comment(s.reason)}", *_step_sh(s)]
    return "\n".join(lines) + "\n"


def _step_sh(s: Step) -> list[str]:
    body = _ops_sh(s.ops)
    for alt in s.otherwise:
        body = f"{{ {body}; }} || {{ {_ops_sh(alt)}; }}"
    out = []
    if s.needed_by:
        out.append(f"# needed only while one of {', '.join(s.needed_by)} has work to do")
    if s.after:
        restart = "; ".join(_op_sh(op) for op in s.variants.get("restart", ()))
        out.append(f"# if {', '.join(s.after)} ran above (a new head), run instead: {comment(restart)}")
    if s.check is None:
        return out + [body]
    probe = shlex.join(s.check.argv)
    if s.use_output:
        first = s.ops[0]
        assert isinstance(first, Cmd)
        keep = "".join(f" -e {shlex.quote(k)}" for k in s.keep)
        names = f"names=$({probe}{f' | grep -vxF{keep} || true' if keep else ''})"
        return out + [names, f'if [ -n "$names" ]; then {shlex.join(first.argv)} $names; fi']
    out.append(f"out=$({probe} 2>/dev/null) || out=")
    out.append('case "$out" in')
    out.append(f'  skip*) echo {shlex.quote(s.id + ": already done: ")}"${{out#skip }}" ;;')
    out.append('  fail*) echo "${out#fail }" >&2; exit 1 ;;')
    for name, ops in s.variants.items():
        if name != "restart":
            out.append(f"  {name}*) {_ops_sh(ops)} ;;")
    out += [f"  *) {body} ;;", "esac"]
    return out


def _ops_sh(ops) -> str:
    return " && ".join(_op_sh(op) for op in ops) or "true"


def _op_sh(op: Op) -> str:
    if isinstance(op, Cmd):
        return shlex.join(op.argv)
    if isinstance(op, Put):
        folder = shlex.quote(op.path.rsplit("/", 1)[0])
        target = shlex.quote(op.path)
        if op.secrets:
            fmt = "".join(f"{k}=%s\\n" for k, _ in op.secrets)
            args = " ".join(f'"${k}"' for k, _ in op.secrets)
            write = f"printf '{fmt}' {args} > {target}"
        else:
            write = f"printf '%s' {shlex.quote(op.text)} > {target}"
        return f"{{ mkdir -p -m 700 {folder} && (umask 077; {write}) && chmod {op.mode:04o} {target}; }}"
    if isinstance(op, Wait):
        return (f"{{ end=$((SECONDS+{int(op.timeout)})); until {shlex.join(op.argv)} > /dev/null 2>&1; do "
                f"[ $SECONDS -lt $end ] || {{ echo 'timed out: {_sh_text(op.argv[0])}' >&2; exit 1; }}; "
                f"sleep {op.interval:g}; done; }}")
    if isinstance(op, Http):
        curl = ["curl", "-fsS", "-m", f"{op.timeout:g}"]
        auth = f' -H "Authorization: Bearer ${op.auth_env}"' if op.auth is not None else ""
        if op.body is not None:
            curl += ["-H", "Content-Type: application/json", "-d", op.body]
        request = f"{shlex.join(curl)}{auth} {shlex.quote(op.url)}"
        if op.expect:
            request += f" | grep -qF -- {shlex.quote(op.expect)}"
        if not op.until:
            return request
        return (f"{{ end=$((SECONDS+{int(op.until)})); until {request} > /dev/null 2>&1; do [ $SECONDS -lt $end ] "
                f"|| {{ echo 'timed out waiting for the API' >&2; exit 1; }}; sleep 5; done; }}")
    assert isinstance(op, Copy)
    src = op.src if op.src_host == CONTROL else f"{op.src_host}:{op.src}"
    return (f"{{ echo {shlex.quote(f'copy the model through your machine: scp -3 -r {src}/. THIS-HOST:{op.dst}/')}"
            " >&2; exit 1; }")


def _sh_text(text: str) -> str:
    return "".join(c for c in text if c.isalnum() or c in "-_./") or hashlib.sha256(text.encode()).hexdigest()[:8]
