"""What `up` left running, recorded on every node it runs on, so that `status` and `logs` judge the deployment
that actually runs (profile, topology, hosts, --set values), not a re-plan of today's inventory and command line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .config import Inventory, Profile, load_profile
from .delivery.model_steps import STATE_DIR
from .deployment import Deployment
from .steps import Check, Cmd, Put, Step

PATH = STATE_DIR + "/deployment-{cluster}.json"
_SAME = 'grep -qF "$1" "$0" 2>/dev/null && echo "skip recorded"; true'
_PRESENT = 'if [ -e "$0" ]; then echo "run an older deployment is recorded here"; else echo "skip none"; fi'


def content(d: Deployment, sets: dict[str, Any]) -> dict:
    """The inputs that rebuild this plan from the same inventory (no secrets: those stay references)."""
    prof = {k: v for k, v in dataclasses.asdict(d.profile).items() if k not in ("path", "lines")}
    return {"cluster": d.cluster, "profile": prof, "model": d.inventory.deploy.model,
            "tensor_parallel": d.topology.tp, "pipeline_parallel": d.topology.pp, "nodes": list(d.topology.nodes),
            "sets": dict(sets)}


def steps(d: Deployment, sets: dict[str, Any]) -> list[Step]:
    """Write the record on every node (any one answers `status`); remove it from the inventory's other hosts."""
    path = PATH.format(cluster=d.cluster)
    body = content(d, sets)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    text = json.dumps({"digest": digest, **body}, indent=1) + "\n"     # key order kept: flags keep their order
    out = [Step(id=f"{h.name}/record", host=h.name, phase="record",
                reason=f"record what runs ({d.profile.image}, TP {d.topology.tp} x PP {d.topology.pp} on "
                       f"{', '.join(d.topology.nodes)}) for status and logs",
                check=Check(argv=("sh", "-c", _SAME, path, f'"digest": "{digest}"')),
                ops=(Cmd(argv=("mkdir", "-p", "-m", "700", STATE_DIR)), Put(path=path, mode=0o644, text=text)))
           for h in d.hosts]
    out += [Step(id=f"{h.name}/record", host=h.name, phase="record", reason="this host left the deployment",
                 check=Check(argv=("sh", "-c", _PRESENT, path)), ops=(Cmd(argv=("rm", "-f", path)),))
            for h in d.inventory.hosts if h.name not in d.topology.nodes]
    return out


def parse(text: str) -> dict | None:
    """A record read from a host (untrusted): the fields `replan` uses, with their types, or None."""
    try:
        rec = json.loads(text)
    except ValueError:
        return None
    ok = (isinstance(rec, dict) and isinstance(rec.get("profile"), dict) and isinstance(rec.get("model"), str)
          and all(isinstance(rec.get(k), int) and not isinstance(rec.get(k), bool) and rec[k] > 0
                  for k in ("tensor_parallel", "pipeline_parallel"))
          and isinstance(rec.get("nodes"), list) and rec["nodes"] and all(isinstance(n, str) for n in rec["nodes"])
          and isinstance(rec.get("sets"), dict) and isinstance(rec.get("digest"), str))
    return rec if ok else None


def choose(found: dict[str, str]) -> dict | None:
    """host -> file text: the record most hosts agree on (a node that missed an update is outvoted)."""
    records = [r for r in (parse(t) for t in found.values()) if r is not None]
    if not records:
        return None
    votes: dict[str, list[dict]] = {}
    for r in records:
        votes.setdefault(r["digest"], []).append(r)
    return max(votes.values(), key=len)[0]


def profile(rec: dict, inventory: Inventory) -> Profile:
    """The recorded profile, validated as a profile file is."""
    with tempfile.TemporaryDirectory(prefix="gpucluster-record-") as tmp:
        path = Path(tmp) / f"{rec['profile'].get('name') or 'recorded'}.yaml"
        path.write_text(yaml.safe_dump(rec["profile"], sort_keys=False))
        loaded = load_profile(str(path), inventory=inventory)
    return dataclasses.replace(loaded, path="")


def differences(running: dict, planned: dict) -> list[str]:
    """What today's inventory (and command line) would change in the recorded deployment."""
    out = []
    for key, what in (("model", "model"), ("tensor_parallel", "TP"), ("pipeline_parallel", "PP"), ("nodes", "hosts")):
        if running.get(key) != planned.get(key):
            out.append(f"{what}: running {running.get(key)}, the inventory plans {planned.get(key)}")
    if running["profile"].get("image") != planned["profile"].get("image"):
        out.append(f"image: running {running['profile'].get('image')}, the inventory plans "
                   f"{planned['profile'].get('image')}")
    if running.get("sets") != planned.get("sets") or running["profile"] != planned["profile"]:
        if not any(x.startswith("image") for x in out):
            out.append("profile or --set values differ from what runs")
    return out
