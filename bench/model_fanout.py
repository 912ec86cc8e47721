#!/usr/bin/env python3
"""Benchmark: download the model on every host vs. download once and fan out over the LAN.

    GPUCLUSTER_RIG_DIR=/tmp/rig python3 bench/model_fanout.py [--rate 20mbit] [--repeat 1]

On the rig (tests/rig), the HF mirror's link is rate-limited with `tc` inside the mirror's network
namespace (a slow uplink to hf-mirror.com), then for each strategy the script measures the wall
time and the bytes the mirror served (from its request log):

  (a) every host downloads the model itself (the agent's `sync` on each host, in parallel);
  (b) `gpucluster model pull`: the head downloads once, the others pull from it over the LAN.

The tc qdisc is removed afterwards (also on Ctrl-C); model folders created here are removed too.
It prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

def tc(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "tc", *args], capture_output=True, text=True,
                          check=check)


def log_size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def served_since(path: str, offset: int, clients: set[str]) -> tuple[int, int]:
    """(bytes, requests) the mirror served to these clients after offset."""
    total = n = 0
    with open(path) as f:
        f.seek(offset)
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("client") in clients:
                total += int(e.get("bytes") or 0)
                n += 1
    return total, n


def inventory(rig: dict, work: Path, name: str) -> Path:
    data = yaml.safe_load(Path(rig["inventory"]).read_text())
    data["cluster"]["name"] = name
    for h in data["hosts"]:
        h["model_dir"] = str(Path(next(x for x in rig["hosts"] if x["name"] == h["name"])["model_dir"]) / name)
    data["deploy"]["tensor_parallel"] = 2 * len(data["hosts"])
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def clean(inv_path: Path) -> None:
    data = yaml.safe_load(inv_path.read_text())
    for h in data["hosts"]:
        shutil.rmtree(h["model_dir"], ignore_errors=True)


def pull(inv_path: Path, *extra: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "cluster", "model", "pull", str(inv_path), "--json", *extra], cwd=REPO,
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        sys.exit(f"model pull failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)["hosts"]


def every_host(inv_path: Path) -> dict:
    """(a): each host runs the download itself, all at once (one single-host `model pull` per host)."""
    names = [h["name"] for h in yaml.safe_load(inv_path.read_text())["hosts"]]
    out: dict = {}

    def one(name):
        data = yaml.safe_load(inv_path.read_text())
        data["hosts"] = [h for h in data["hosts"] if h["name"] == name]
        data["hosts"][0]["role"] = "head"
        data["deploy"]["tensor_parallel"] = 2
        solo = inv_path.with_name(f"{inv_path.stem}-{name}.yaml")
        solo.write_text(yaml.safe_dump(data, sort_keys=False))
        out.update(pull(solo))
    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def fan_out(inv_path: Path) -> dict:
    """(b): download once on the head, the other hosts pull from it over the LAN."""
    return pull(inv_path)


def measure(label: str, fn, inv_path: Path, rig: dict) -> dict:
    log = rig["hf"]["access_log"]
    clients = {h["address"] for h in rig["hosts"]}
    clean(inv_path)
    off = log_size(log)
    t0 = time.monotonic()
    result = fn(inv_path)
    wall = time.monotonic() - t0
    nbytes, requests = served_since(log, off, clients)
    print(f"  {label}: {wall:6.1f} s, mirror served {nbytes / 1e6:7.2f} MB in {requests} requests  {result}",
          file=sys.stderr)
    return {"wall_s": wall, "mirror_bytes": nbytes, "requests": requests}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rig-dir", default=os.environ.get("GPUCLUSTER_RIG_DIR", "/tmp/rig"))
    p.add_argument("--rate", default="20mbit", help="tc tbf rate of the mirror's link (default 20mbit)")
    p.add_argument("--repeat", type=int, default=1)
    a = p.parse_args()
    rig = json.loads((Path(a.rig_dir) / "rig.json").read_text())
    ns = rig["hf"]["netns"]
    work = Path(tempfile.mkdtemp(prefix="gpucluster-bench-"))
    inv_a, inv_b = inventory(rig, work, "dl-bench-a"), inventory(rig, work, "dl-bench-b")
    model = rig["model"]
    print(f"model {model['id']}: {len(model['files'])} files, {model['total_bytes'] / 1e6:.2f} MB; "
          f"{len(rig['hosts'])} hosts; mirror link limited to {a.rate}", file=sys.stderr)
    tc(ns, "qdisc", "del", "dev", "eth0", "root", check=False)
    tc(ns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", a.rate, "burst", "32kbit", "latency", "400ms")
    runs = {"a": [], "b": []}
    try:
        for i in range(a.repeat):
            runs["a"].append(measure("(a) every host downloads", every_host, inv_a, rig))
            runs["b"].append(measure("(b) once + LAN fan-out  ", fan_out, inv_b, rig))
    finally:
        tc(ns, "qdisc", "del", "dev", "eth0", "root", check=False)
        clean(inv_a)
        clean(inv_b)
        shutil.rmtree(work, ignore_errors=True)
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    a_, b_ = best["a"], best["b"]
    print(f"\nmirror link {a.rate}, {len(rig['hosts'])} hosts, model {model['total_bytes'] / 1e6:.2f} MB "
          f"(best of {a.repeat})")
    print(f"{'strategy':<32} {'wall s':>8} {'mirror MB':>10} {'requests':>9}")
    print(f"{'(a) download on every host':<32} {a_['wall_s']:>8.1f} {a_['mirror_bytes'] / 1e6:>10.2f} "
          f"{a_['requests']:>9}")
    print(f"{'(b) download once + fan out':<32} {b_['wall_s']:>8.1f} {b_['mirror_bytes'] / 1e6:>10.2f} "
          f"{b_['requests']:>9}")
    print(f"ratio (a)/(b): wall {a_['wall_s'] / b_['wall_s']:.2f}x, "
          f"mirror bytes {a_['mirror_bytes'] / max(b_['mirror_bytes'], 1):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
