"""One plan, executed: what `up` and `down` run on the rig hosts is exactly what their dry runs listed, and the
`plan --format sh` runbook, run by hand over ssh, brings up a serving endpoint.

A shim in front of `docker` on every rig host (first on the PATH its sshd gives) records each argv it receives."""

from __future__ import annotations

import json
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from test_lifecycle import chat, gc, inventory, labelled

pytestmark = pytest.mark.rig

SHIM = """#!/bin/sh
# test shim: records this argv and its caller's command line (one JSON line), then runs the real docker
python3 -c 'import json, sys; print(json.dumps([open("/proc/%s/cmdline" % sys.argv[1], "rb").read().decode(
    errors="replace").replace(chr(0), " "), *sys.argv[2:]]))' "$PPID" "$@" >> {log}
exec {docker} "$@"
"""
AGENT = "image_fanout_agent.py"     # a step's own program: the docker commands it runs belong to that step


@pytest.fixture
def docker_calls(rig):
    """host -> list of docker argv (without `docker`) recorded since the last read; the shims go away after."""
    real = subprocess.run(["sh", "-c", "command -v docker"], capture_output=True, text=True).stdout.strip()
    logs = {}
    for h in rig.facts["hosts"]:
        log = Path(rig.dir) / f"{h['name']}-docker-calls.jsonl"
        log.write_text("")
        shim = Path(h["bin_dir"]) / "docker"
        shim.write_text(SHIM.format(log=log, docker=real))
        shim.chmod(0o755)
        logs[h["name"]] = log

    def read() -> dict[str, list[list[str]]]:
        """docker argvs the steps ran themselves; those run by the image agent (a step's program, listed as its
        `python3 ... image_fanout_agent.py` op) are kept apart under the host name + "/agent"."""
        out = {}
        for name, log in logs.items():
            calls = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            out[name] = [c[1:] for c in calls if AGENT not in c[0]]
            out[name + "/agent"] = [c[1:] for c in calls if AGENT in c[0]]
            log.write_text("")
        return out
    yield read
    for h in rig.facts["hosts"]:
        (Path(h["bin_dir"]) / "docker").unlink(missing_ok=True)


def _ops(step: dict, outcome: dict) -> list[list[str]]:
    """The docker argvs a step runs when its dry run said `would-run` (variant, names appended)."""
    ops = step["variants"][outcome["variant"]] if outcome.get("variant") else step["ops"]
    out = []
    for i, op in enumerate(ops):
        if "argv" in op and op["argv"][0] == "docker":
            out.append(op["argv"][1:] + (outcome.get("names", []) if i == 0 else []))
    return out


def expectations(dry: dict) -> tuple[dict, dict]:
    """(host -> docker argvs of the steps that would run, in order; host -> read-only docker argvs: checks, probes)."""
    plan = {s["id"]: s for s in dry["plan"]}
    changes, looks = defaultdict(list), defaultdict(set)
    for host, argvs in dry.get("probes", {}).items():     # the facts `up` reads before any step
        looks[host] |= {tuple(a[1:]) for a in argvs if a[0] == "docker"}
    for s in plan.values():
        probes = [s.get("check")] + [op.get("wait") for op in s["ops"]]
        for op in s["ops"]:
            for key in ("abort", "log"):
                if isinstance(op.get(key), dict):          # an Http op's probe names its host
                    looks[op[key]["host"]].add(tuple(op[key]["argv"][1:]))
                elif isinstance(op.get(key), list) and op[key][:1] == ["docker"]:    # a Wait's runs on its step's
                    looks[s["host"]].add(tuple(op[key][1:]))
        if s.get("readonly"):    # changes nothing (the in-image torch check: `docker run --rm`): may run every time
            probes += [op.get("argv") for op in s["ops"]]
        for argv in probes:
            if argv and argv[0] == "docker":
                looks[s["host"]].add(tuple(argv[1:]))
    for o in dry["steps"]:
        if o["status"] == "would-run" and not plan[o["id"]].get("readonly"):
            changes[o["host"]] += _ops(plan[o["id"]], o)
    return changes, looks


def assert_matches(recorded: dict, changes: dict, looks: dict, agents: set[str] = frozenset()) -> None:
    """Every docker command a host ran is a listed change or a read-only look; the image agent ran docker only on
    the hosts where a step of it was listed to run."""
    for host, calls in recorded.items():
        if host.endswith("/agent"):
            assert not calls or host.split("/")[0] in agents, f"{host}: the image agent ran {calls} unlisted"
            continue
        done = [c for c in calls if tuple(c) not in looks[host] and not read_only(c)]
        assert done == changes.get(host, []), f"{host}: ran {done}\nlisted {changes.get(host, [])}"


def read_only(argv: list[str]) -> bool:
    """docker commands that change nothing, as a check's script runs them (`sh -c '... docker inspect ...'`)."""
    return argv[:1] in (["inspect"], ["ps"], ["images"], ["version"], ["info"]) or argv[:2] == ["image", "inspect"]


def agent_hosts(dry: dict) -> set[str]:
    plan = {s["id"]: s for s in dry["plan"]}
    def ops(o: dict) -> list:
        return plan[o["id"]]["variants"][o["variant"]] if o.get("variant") else plan[o["id"]]["ops"]
    return {o["host"] for o in dry["steps"] if o["status"] == "would-run"
            and any(AGENT in " ".join(op.get("argv") or []) for op in ops(o))}


def test_up_and_down_run_exactly_what_their_dry_runs_list(rig, tmp_path, docker_calls):
    inv = inventory(rig, tmp_path, name="e2e-contract", hosts=3, profile="vllm-v0.6.3", tensor_parallel=2,
                    pipeline_parallel=3)
    try:
        dry = json.loads(gc("up", str(inv), "--dry-run", "--json").stdout)
        assert dry["dry_run"] and {o["status"] for o in dry["steps"]} <= {"would-run", "would-skip"}
        changes, looks = expectations(dry)
        assert changes["h2"] and changes["h3"], "a fresh deployment has work on every host"
        docker_calls()
        r = gc("up", str(inv), "--yes", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        assert_matches(docker_calls(), changes, looks, agent_hosts(dry))
        assert [o["status"] for o in json.loads(r.stdout)["steps"] if o["status"] != "skipped"] != []

        again = gc("up", str(inv), "--yes", "--json")       # nothing to do: only read-only commands
        assert again.returncode == 0 and not json.loads(again.stdout)["changed"]
        assert_matches(docker_calls(), {}, looks)

        dry_down = json.loads(gc("down", str(inv), "--dry-run", "--json").stdout)
        down_changes, down_looks = expectations(dry_down)
        assert sum(len(v) for v in down_changes.values()) == 3, down_changes    # one removal per host
        docker_calls()
        assert gc("down", str(inv), "--yes").returncode == 0
        assert_matches(docker_calls(), down_changes, down_looks)
        assert labelled(rig, "e2e-contract") == {}
    finally:
        gc("down", str(inv), "--yes")


SECTION = re.compile(r"^# ==== phase (\S+) on (?:host (\S+) \(|this machine)", re.M)


def test_runbook_run_by_hand_brings_up_a_serving_endpoint(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-runbook", hosts=2, profile="vllm-v0.6.3", tensor_parallel=2,
                    pipeline_parallel=2)
    text = gc("plan", str(inv), "--format", "sh").stdout
    assert text.startswith("#!/usr/bin/env bash")
    marks = list(SECTION.finditer(text))
    assert {m.group(2) for m in marks} == {"h1", "h2", None}
    env = "export GPUCLUSTER_TRANSFER_TOKEN=runbook-test-token\nset -euo pipefail\n"
    try:
        for i, m in enumerate(marks):
            body = text[m.start():marks[i + 1].start() if i + 1 < len(marks) else len(text)]
            host = m.group(2)
            argv = rig.ssh_argv(host) + ["bash", "-s"] if host else ["bash", "-s"]
            r = subprocess.run(argv, input=env + body, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"phase {m.group(1)} on {host or 'this machine'}:\n{r.stdout[-2000:]}\n" \
                                      f"{r.stderr[-2000:]}"
        answer = chat(f"http://{rig.address('h1')}:8000/v1", "gpucluster/tiny-qwen2")
        assert "gpucluster/tiny-qwen2" in answer and "choices" in answer
        st = gc("status", str(inv), "--json")
        assert st.returncode == 0, st.stdout[-2000:]
        # the runbook and `up` are one plan: `up` finds nothing to change
        up = gc("up", str(inv), "--yes", "--json")
        assert up.returncode == 0 and not json.loads(up.stdout)["changed"], up.stdout[-3000:] + up.stderr[-2000:]
    finally:
        assert gc("down", str(inv), "--yes").returncode == 0
    assert labelled(rig, "e2e-runbook") == {}
