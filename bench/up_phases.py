#!/usr/bin/env python3
"""Benchmark: time of each `gpucluster up` phase on the rig for 1 and 3 hosts, a second up, and down.

Usage: GPUCLUSTER_RIG_DIR=/tmp/rig python3 bench/up_phases.py
Cold start: every image and the model are removed from the hosts first, so `up` pulls the image
(all its layers) through the rig's registry mirror and fetches the model from the rig's HF mirror.
Prints figures; asserts nothing about speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import cold  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def gc(*args: str) -> dict | None:
    r = subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        sys.exit(f"gpucluster {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout) if "--json" in args else None


def main() -> None:
    rig_dir = Path(os.environ.get("GPUCLUSTER_RIG_DIR", "/tmp/rig"))
    facts = json.loads((rig_dir / "rig.json").read_text())
    base = yaml.safe_load((rig_dir / "inventory.yaml").read_text())
    rows = []
    for n, profile, tp, pp in ((1, "vllm-v0.3.0", 2, 1), (3, "vllm-v0.3.0", 6, 1), (3, "vllm-v0.6.3", 2, 3)):
        inv = json.loads(json.dumps(base))
        inv["cluster"]["name"] = f"bench-{n}h-{tp}x{pp}"
        inv["hosts"] = inv["hosts"][:n]
        inv["deploy"].update(profile=profile, tensor_parallel=tp, pipeline_parallel=pp)
        path = rig_dir / f"{inv['cluster']['name']}.yaml"
        path.write_text(yaml.safe_dump(inv, sort_keys=False))
        cold(facts["hosts"][:n], facts["model"]["id"])   # no image (no shared layer either), no model
        t = time.time()
        first = gc("up", str(path), "--yes", "--json")
        t_up = time.time() - t
        t = time.time()
        second = gc("up", str(path), "--yes", "--json")
        t_again = time.time() - t
        t = time.time()
        gc("down", str(path), "--yes")
        t_down = time.time() - t
        rows.append((f"{n} host(s), {profile}, TP {tp} x PP {pp}", first["phases"], t_up, second["changed"],
                     t_again, t_down))
    phases = list(dict.fromkeys(p for row in rows for p in row[1]))
    print("| deployment | " + " | ".join(phases) + " | up total | 2nd up (changed?) | down |")
    print("|---" * (len(phases) + 4) + "|")
    for name, ph, t_up, changed, t_again, t_down in rows:
        print(f"| {name} | " + " | ".join(f"{ph.get(p, 0):.1f}" for p in phases)
              + f" | {t_up:.1f} | {t_again:.1f} ({'changed' if changed else 'no change'}) | {t_down:.1f} |")
    print("seconds, wall clock on the rig (2-core machine); engine = the rig's vLLM stand-in")


if __name__ == "__main__":
    main()
