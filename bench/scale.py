#!/usr/bin/env python3
"""Benchmark (issue 13): the image leaves the mirror once, the LAN carries it, bring-up time stays flat in N.

    GPUCLUSTER_RIG_DIR=/tmp/rig python3 bench/scale.py [--hosts 2,4,6] [--modes lan,mirror]
        [--mirror-rate 200mbit] [--lan-rate 500mbit] [--model-fanout chain|star] [--json]

Needs a rig with at least max(--hosts) hosts (`tests/rig/rig up --hosts 6`) and root (tc in the namespaces).
Links, limited with a tc tbf qdisc for the whole run (removed at the end, also on Ctrl-C or an error):
  - the mirror: egress of eth0 in gcrig-reg (registry 10.77.0.2:5000) and gcrig-hf (HF mirror), each --mirror-rate;
  - the LAN: egress of eth0 in every host's namespace (its uplink), --lan-rate ("none": unlimited), so a host
    that sends one copy per peer (a star) pays for each.
For N = 1 (the single copy) and each N of --hosts and each mode of cluster.image_fanout (lan: the head pulls once,
a chain head -> h2 -> ... carries it; mirror: every host pulls through the registry itself), from cold (every
image and the model removed on h1..hN, as bench/up_phases.py does): `gpucluster up INV --yes --json` with the
rig's inventory cut to N hosts, vllm-v0.6.3, TP 2 x PP N (the tiny model's 12 heads / 2 KV heads allow TP 4 and
12 but not 8, so TP 2*N fails at N=4; PP N with TP 2 fits every N), then `down`.

Figures (seconds are wall clock on the rig; bytes from the services' logs, requests of the rig's machines only):
  up s         `up` from start to a healthy endpoint (the command's wall time)
  image s      time until the last host has the image: phases image + image-fanout
  model s      time until the last host has the model: every phase model*
  vs 1 copy    (image s + model s) / the same for N = 1 (a pipeline stays near 1; per-host pulls grow with N)
  registry MB  sum of http.response.written in the registry's log during the run (blobs, manifests)
  pullers      hosts that fetched blobs from the registry (lan: 1; more means the chain fell back to mirror pulls)
  HF MB        sum of "bytes" of the HF mirror's access-log lines written during the run
  mirror x     (registry + HF bytes) / (image size + model size): copies that left the mirror (ideal: 1)
  LAN MB       bytes the N hosts' eth0 sent during the run (image as uncompressed `docker save` tar, model, Ray,
               ssh); max host MB: the busiest uplink (a star's head sends N-1 copies, a chain's hosts one each)
Image size = sum of the compressed layer sizes in the registry's manifest; model size = rig.json model.total_bytes.
Ratios: up(max N) / up(min N) per mode. A second table gives every phase of report["phases"].
It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_fanout import PULL_AS, log_size, served_since, tc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROFILE, IMAGE = "vllm-v0.6.3", ("vllm/vllm-openai", "v0.6.3")
UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
WRITTEN = re.compile(r'http\.request\.remoteaddr="?([0-9.]+):\d+.*?http\.response\.written=(\d+)')
BLOB = re.compile(r'http\.request\.uri="?/v2/.+/blobs/')


def rate_bits(rate: str) -> float:
    """tc's rate syntax (200mbit, 1gbit, 50mbps = bytes) -> bits/s; one clear line on anything else."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]+)", rate.strip().lower())
    if not m or m.group(2) not in UNITS or float(m.group(1)) <= 0:
        sys.exit(f"bad rate {rate!r}: use tc's syntax, e.g. 200mbit, 1gbit, 50mbps (bytes/s)")
    return float(m.group(1)) * UNITS[m.group(2)]


def limit(netns: str, rate: str) -> None:
    """tbf on eth0's egress in netns; burst = 10 ms at the rate (tbf needs at least rate/HZ)."""
    burst = max(int(rate_bits(rate) / 8 / 100), 16384)
    tc(netns, "qdisc", "del", "dev", "eth0", "root", check=False)
    r = tc(netns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", str(burst),
           "latency", "400ms", check=False)
    if r.returncode != 0:
        sys.exit(f"tc in {netns} failed (root? rig up?): {r.stderr.strip()}")


def registry_served(path: str, offset: int, clients: set[str]) -> tuple[int, set[str]]:
    """(bytes written, hosts that fetched blobs) of the registry log's lines after offset."""
    total, pullers = 0, set()
    with open(path, errors="replace") as f:
        f.seek(offset)
        for line in f:
            m = WRITTEN.search(line)
            if m and m.group(1) in clients:
                total += int(m.group(2))
                if BLOB.search(line) and int(m.group(2)):
                    pullers.add(m.group(1))
    return total, pullers


def image_size(registry: str, repo: str, tag: str) -> int:
    """Sum of the compressed layer sizes in the registry's manifest (a list: its linux/amd64 entry)."""
    accept = ("application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json, "
              "application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json")

    def get(ref: str) -> dict:
        req = urllib.request.Request(f"http://{registry}/v2/{repo}/manifests/{ref}", headers={"Accept": accept})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    doc = get(tag)
    if "manifests" in doc:
        doc = get(next(m["digest"] for m in doc["manifests"]
                       if m.get("platform", {}).get("architecture") in ("amd64", None)))
    return sum(int(layer["size"]) for layer in doc["layers"])


def sent(netns: list[str]) -> list[int]:
    """Bytes each namespace's eth0 has sent (its uplink: the LAN's share of the work)."""
    out = [subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "eth0"], capture_output=True, text=True).stdout
           for ns in netns]
    return [json.loads(o)[0]["stats64"]["tx"]["bytes"] if o.strip() else 0 for o in out]


def no_images(h: dict) -> None:
    """No image (no shared layer either) on this host; a warning where a container keeps some."""
    docker = ["docker", "-H", h["docker_host"]]
    tags = subprocess.run([*docker, "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                          text=True).stdout.split()
    if tags:
        subprocess.run([*docker, "rmi", "-f", *tags], capture_output=True)
    subprocess.run([*docker, "image", "prune", "-af"], capture_output=True)
    left = subprocess.run([*docker, "images", "-aq"], capture_output=True, text=True).stdout.split()
    if left:
        print(f"warning: {h['name']} keeps {len(left)} image(s) (a container uses them): not cold", file=sys.stderr)


def cold(hosts: list[dict], model_id: str) -> None:
    """No image and no model on these hosts."""
    for h in hosts:
        no_images(h)
        shutil.rmtree(Path(h["model_dir"]) / model_id.replace("/", "--"), ignore_errors=True)


def inventory(rig_dir: Path, base: dict, n: int, mode: str) -> Path:
    inv = json.loads(json.dumps(base))
    inv["cluster"].update(name=f"scale-{mode}-{n}h", image_fanout=mode)
    inv["hosts"] = inv["hosts"][:n]
    inv["deploy"].update(profile=PROFILE, tensor_parallel=2, pipeline_parallel=n)
    path = rig_dir / f"scale-{mode}-{n}h.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def gc(model_fanout: str, *args: str) -> dict | None:
    head = ["-m", "cluster"] if model_fanout == "chain" else ["-c", PULL_AS, model_fanout]
    r = subprocess.run([sys.executable, *head, *args], cwd=REPO, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        sys.exit(f"gpucluster {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout) if "--json" in args else None


def measure(a, rig: dict, base: dict, n: int, mode: str, sizes: int, live: list) -> dict:
    clients = {h["address"] for h in rig["hosts"]} | {rig.get("control_address", "10.77.0.1")}
    reg_log, hf_log = rig["registry"]["log"], rig["hf"]["access_log"]
    path = inventory(Path(a.rig_dir), base, n, mode)
    cold(rig["hosts"][:n], rig["model"]["id"])
    reg0, hf0, tx0 = log_size(reg_log), log_size(hf_log), sent([h["netns"] for h in rig["hosts"][:n]])
    live.append(path)
    t = time.monotonic()
    report = gc(a.model_fanout, "up", str(path), "--yes", "--json")
    up_s = time.monotonic() - t
    reg_b, pullers = registry_served(reg_log, reg0, clients)
    hf_b = served_since(hf_log, hf0, clients)[0]
    tx = [b - b0 for b, b0 in zip(sent([h["netns"] for h in rig["hosts"][:n]]), tx0)]
    gc(a.model_fanout, "down", str(path), "--yes")
    live.remove(path)
    ph = report["phases"]
    row = {"mode": mode if n > 1 else "single", "hosts": n, "up_s": up_s, "phases": ph,
           "image_s": sum(v for k, v in ph.items() if k in ("image", "image-fanout")),
           "model_s": sum(v for k, v in ph.items() if k.startswith("model")),
           "registry_bytes": reg_b, "pullers": len(pullers), "hf_bytes": hf_b,
           "mirror_copies": (reg_b + hf_b) / sizes, "lan_bytes": sum(tx), "lan_max_host_bytes": max(tx)}
    print(f"  {row['mode']:6} N={n}: up {up_s:6.1f} s, image {row['image_s']:6.1f} s, model {row['model_s']:6.1f} s,"
          f" registry {reg_b / 1e6:8.1f} MB ({len(pullers)} pullers), HF {hf_b / 1e6:6.1f} MB", file=sys.stderr)
    return row


def report(rows: list[dict], single: dict, head: str, ratios: dict) -> None:
    one = single["image_s"] + single["model_s"]
    print(head + "\n")
    print("| image_fanout | hosts | up s | image s | model s | vs 1 copy | registry MB | pullers | HF MB | mirror x "
          "| LAN MB | max host MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in [single, *rows]:
        vs = (r["image_s"] + r["model_s"]) / max(one, 1e-9)
        print(f"| {r['mode']} | {r['hosts']} | {r['up_s']:.1f} | {r['image_s']:.1f} | {r['model_s']:.1f} | {vs:.2f} | "
              f"{r['registry_bytes'] / 1e6:.1f} | {r['pullers']} | {r['hf_bytes'] / 1e6:.1f} | "
              f"{r['mirror_copies']:.2f} | {r['lan_bytes'] / 1e6:.1f} | {r['lan_max_host_bytes'] / 1e6:.1f} |")
    phases = list(dict.fromkeys(p for r in [*rows, single] for p in r["phases"]))
    print("\n| image_fanout | hosts | " + " | ".join(phases) + " |")
    print("|---|---:|" + "---:|" * len(phases))
    for r in [single, *rows]:
        print(f"| {r['mode']} | {r['hosts']} | " + " | ".join(f"{r['phases'].get(p, 0):.1f}" for p in phases) + " |")
    print()
    for k, v in ratios.items():
        print(f"- {k}: {v:.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rig-dir", default=os.environ.get("GPUCLUSTER_RIG_DIR", "/tmp/rig"))
    p.add_argument("--hosts", default="2,4,6", help="host counts, comma-separated (default 2,4,6)")
    p.add_argument("--modes", default="lan,mirror", help="cluster.image_fanout values (default lan,mirror)")
    p.add_argument("--mirror-rate", default="200mbit", help="registry's and HF mirror's egress (tc rate)")
    p.add_argument("--lan-rate", default="500mbit", help="each host's uplink (tc rate; none: unlimited)")
    p.add_argument("--model-fanout", choices=("chain", "star"), default="chain", help="the model's fan-out shape")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    a = p.parse_args()
    try:
        counts = sorted({int(x) for x in a.hosts.split(",")})
    except ValueError:
        sys.exit(f"--hosts: comma-separated host counts, e.g. 2,4,6 (got {a.hosts!r})")
    modes = [m for m in a.modes.split(",") if m]
    if not counts or counts[0] < 2 or not modes or set(modes) - {"lan", "mirror"}:
        sys.exit("--hosts: counts of 2 or more; --modes: lan and/or mirror")
    rate_bits(a.mirror_rate)
    lan = a.lan_rate.lower() not in ("none", "0", "")
    if lan:
        rate_bits(a.lan_rate)
    rig_path = Path(a.rig_dir) / "rig.json"
    if not rig_path.exists():
        sys.exit(f"no rig at {a.rig_dir} (tests/rig/rig up --hosts {counts[-1]}; GPUCLUSTER_RIG_DIR)")
    rig = json.loads(rig_path.read_text())
    if len(rig["hosts"]) < counts[-1]:
        sys.exit(f"the rig has {len(rig['hosts'])} hosts; --hosts {a.hosts} needs `tests/rig/rig up --hosts "
                 f"{counts[-1]}`")
    base = yaml.safe_load(Path(rig["inventory"]).read_text())
    image_b = image_size(rig["registry"]["address"], *IMAGE)
    model_b = int(rig["model"]["total_bytes"])
    used = rig["hosts"][:counts[-1]]
    limited = [(rig["registry"]["netns"], a.mirror_rate), (rig["hf"]["netns"], a.mirror_rate)] \
        + ([(h["netns"], a.lan_rate) for h in used] if lan else [])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    live: list[Path] = []
    rows = []
    try:
        for netns, rate in limited:
            limit(netns, rate)
        single = measure(a, rig, base, 1, modes[0], image_b + model_b, live)
        for mode in modes:
            rows += [measure(a, rig, base, n, mode, image_b + model_b, live) for n in counts]
    finally:
        for netns, _ in limited:
            tc(netns, "qdisc", "del", "dev", "eth0", "root", check=False)
        for path in live:   # an up that failed or was interrupted: take its containers down
            subprocess.run([sys.executable, "-m", "cluster", "down", str(path), "--yes"], cwd=REPO,
                           capture_output=True, stdin=subprocess.DEVNULL)
    ratios = {}
    for mode in modes:
        by_n = {r["hosts"]: r for r in rows if r["mode"] == mode}
        top = by_n[counts[-1]]
        ratios[f"{mode}: up({counts[-1]}) / up({counts[0]})"] = top["up_s"] / by_n[counts[0]]["up_s"]
        ratios[f"{mode}: mirror bytes / (image + model) at N={counts[-1]}"] = top["mirror_copies"]
        ratios[f"{mode}: image+model time of the last host / single copy at N={counts[-1]}"] = \
            (top["image_s"] + top["model_s"]) / max(single["image_s"] + single["model_s"], 1e-9)
    head = (f"{PROFILE}, TP 2 x PP N, model {rig['model']['id']} {model_b / 1e6:.1f} MB in "
            f"{len(rig['model']['files'])} files, image {image_b / 1e6:.1f} MB compressed; mirror links "
            f"{a.mirror_rate}, host uplinks {a.lan_rate if lan else 'unlimited'}, model fan-out {a.model_fanout}")
    if a.json:
        print(json.dumps({"image_bytes": image_b, "model_bytes": model_b, "mirror_rate": a.mirror_rate,
                          "lan_rate": a.lan_rate if lan else None, "model_fanout": a.model_fanout,
                          "single": single, "runs": rows, "ratios": ratios}, indent=1))
    else:
        report(rows, single, head, ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
