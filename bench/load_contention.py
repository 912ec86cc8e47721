#!/usr/bin/env python3
"""Benchmark (issue 13): why the image fan-out's last host lags on this machine: k `docker load`s at once.

    GPUCLUSTER_RIG_DIR=/tmp/rig python3 bench/load_contention.py [--hosts 1,2,4,6] [--image REF] [--json]

Every fan-out that ends with the image on k hosts runs k image unpacks (a chain's `docker load`, a registry pull's
extraction). On the rig the k hosts' dockerds share this machine's cores, so k unpacks at once cannot finish
sooner than k x (one unpack's CPU) / cores, however the bytes travel. This measures it with the network out of
the picture: the image (default: the rig registry's vllm/vllm-openai:v0.6.3, the stand-in `bench/scale.py` uses)
is pulled on h1 and saved once to a tar file on this machine; then for each k, with every image removed from
h1..hk, k `docker -H <host> load -i <tar>` start together.

Figures:
  k            hosts loading at once
  wall s       until the last of the k loads has finished (mean of each load's wall in brackets)
  x one        wall s / wall s at k = 1
  CPU s        CPU seconds the machine spent meanwhile (all processes, from /proc/stat: dockerd, containerd,
               the docker clients), and CPU s / k
  busy         CPU s / (wall s x cores): 1.00 means every core was busy the whole time
  floor s      k x (CPU s at k = 1) / cores, or wall s at k = 1 if larger: the least time k loads can take here
It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import no_images  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """Busy CPU time of the whole machine (user + nice + system + irq + softirq + steal), in seconds."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / TICK


def docker(host: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "-H", host["docker_host"], *args], capture_output=True, text=True, **kw)


def loads(hosts: list[dict], tar: Path) -> tuple[float, list[float], float]:
    """k loads at once: (wall until the last, each load's wall, machine CPU seconds meanwhile)."""
    c0, t0 = cpu_seconds(), time.monotonic()
    procs = [subprocess.Popen(["docker", "-H", h["docker_host"], "load", "-q", "-i", str(tar)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for h in hosts]
    walls = [0.0] * len(procs)
    while any(w == 0.0 for w in walls):
        for i, p in enumerate(procs):
            if walls[i] == 0.0 and p.poll() is not None:
                if p.returncode != 0:
                    sys.exit(f"{hosts[i]['name']}: docker load failed: {p.stderr.read().strip()[-500:]}")
                walls[i] = time.monotonic() - t0
        time.sleep(0.05)
    return time.monotonic() - t0, walls, cpu_seconds() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rig-dir", default=os.environ.get("GPUCLUSTER_RIG_DIR", "/tmp/rig"))
    ap.add_argument("--hosts", default="1,2,4,6")
    ap.add_argument("--image", help="image reference (default: the rig registry's vllm/vllm-openai:v0.6.3)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rig = json.loads((Path(a.rig_dir) / "rig.json").read_text())
    ks = [int(k) for k in a.hosts.split(",")]
    if max(ks) > len(rig["hosts"]):
        sys.exit(f"the rig has {len(rig['hosts'])} hosts; --hosts asks for {max(ks)} (tests/rig/rig up --hosts N)")
    ref = a.image or f"{rig['registry']['address']}/vllm/vllm-openai:v0.6.3"
    cores = os.cpu_count() or 1
    head = rig["hosts"][0]
    if docker(head, "pull", "-q", ref).returncode != 0:
        sys.exit(f"{head['name']}: docker pull {ref} failed")
    rows = []
    with tempfile.TemporaryDirectory(prefix="load-contention-") as tmp:
        tar = Path(tmp) / "image.tar"
        c0, t0 = cpu_seconds(), time.monotonic()
        r = docker(head, "save", "-o", str(tar), ref)
        if r.returncode != 0:
            sys.exit(f"{head['name']}: docker save failed: {r.stderr.strip()[-500:]}")
        save = {"wall_s": time.monotonic() - t0, "cpu_s": cpu_seconds() - c0, "bytes": tar.stat().st_size}
        print(f"docker save on {head['name']}: {save['wall_s']:.1f} s, {save['cpu_s']:.1f} CPU s, "
              f"{save['bytes'] / 1e6:.1f} MB", file=sys.stderr)
        for k in ks:
            hosts = rig["hosts"][:k]
            for h in hosts:
                no_images(h)
            wall, walls, cpu = loads(hosts, tar)
            rows.append({"k": k, "wall_s": wall, "mean_load_s": sum(walls) / k, "cpu_s": cpu})
            print(f"  k={k}: {wall:.1f} s, {cpu:.1f} CPU s", file=sys.stderr)
    one = next((r for r in rows if r["k"] == 1), rows[0])
    for r in rows:
        r["x_one"] = r["wall_s"] / one["wall_s"]
        r["busy"] = r["cpu_s"] / (r["wall_s"] * cores)
        r["floor_s"] = max(r["k"] * one["cpu_s"] / cores, one["wall_s"])
    if a.json:
        print(json.dumps({"cores": cores, "image": ref, "save": save, "rows": rows}, indent=1))
        return 0
    print(f"{cores} cores; {ref}: docker save {save['wall_s']:.1f} s ({save['cpu_s']:.1f} CPU s), "
          f"{save['bytes'] / 1e6:.1f} MB tar")
    print("| k | wall s (mean) | x one | CPU s | CPU s / k | busy | floor s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['k']} | {r['wall_s']:.1f} ({r['mean_load_s']:.1f}) | {r['x_one']:.2f} | {r['cpu_s']:.1f} | "
              f"{r['cpu_s'] / r['k']:.1f} | {r['busy']:.2f} | {r['floor_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
