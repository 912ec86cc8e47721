#!/usr/bin/env python3
"""Benchmark: download the model on every host vs. download once and fan out over the LAN (a star or a chain).

    GPUCLUSTER_RIG_DIR=/tmp/rig python3 bench/model_fanout.py [--rate 20mbit] [--lan-rate 100mbit] [--repeat 1]
    python3 bench/model_fanout.py --loopback [--hosts 4] [--size-mb 200] [--files 4] [--uplink-mbps 50]

On the rig (tests/rig), the HF mirror's link is rate-limited with `tc` inside the mirror's network
namespace (a slow uplink to hf-mirror.com), and with --lan-rate every rig host's uplink too; then for
each strategy the script measures the wall time and the bytes the mirror served (its request log):

  (a) every host downloads the model itself (the agent's `sync` on each host, in parallel);
  (b) `gpucluster model pull` as a star: the head downloads once, every other host pulls from it;
  (c) `gpucluster model pull` (the default): the head downloads once, host k pulls from host k-1 while
      k-1 still receives it (a chain).

The tc qdiscs are removed afterwards (also on Ctrl-C); model folders created here are removed too.

--loopback needs no rig: agent processes on 127.0.0.1 (the shipped files, run as on a host), a head with a
verified copy of a generated model, each server's uplink limited inside the process (a token bucket around
serve._send_chunk); it measures the time from the first pull to the last host done, for the star, the chain
passing bytes on as they land, and the chain passing only complete files on; every copy is checked byte for byte.
It prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DELIVERY = REPO / "cluster" / "delivery"

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
    import yaml
    data = yaml.safe_load(Path(rig["inventory"]).read_text())
    data["cluster"]["name"] = name
    for h in data["hosts"]:
        h["model_dir"] = str(Path(next(x for x in rig["hosts"] if x["name"] == h["name"])["model_dir"]) / name)
    data["deploy"]["tensor_parallel"] = 2 * len(data["hosts"])
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def clean(inv_path: Path) -> None:
    import yaml
    data = yaml.safe_load(inv_path.read_text())
    for h in data["hosts"]:
        shutil.rmtree(h["model_dir"], ignore_errors=True)


# `model pull` with the fan-out's shape forced (the plan builds a chain; the star is kept for this comparison)
PULL_AS = ("import dataclasses, sys; import cluster.plan as p; f = p.fanout_steps; shape = sys.argv.pop(1); "
           "p.fanout_steps = lambda job: f(dataclasses.replace(job, fanout=shape)); "
           "sys.argv[0] = 'gpucluster'; from cluster.cli import main; main()")


def pull(inv_path: Path, *extra: str, shape: str = "chain") -> dict:
    r = subprocess.run([sys.executable, "-c", PULL_AS, shape, "model", "pull", str(inv_path), "--json", *extra],
                       cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        sys.exit(f"model pull failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)["hosts"]


def every_host(inv_path: Path) -> dict:
    """(a): each host runs the download itself, all at once (one single-host `model pull` per host)."""
    import yaml
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


def star(inv_path: Path) -> dict:
    """(b): download once on the head, every other host pulls from it over the LAN."""
    return pull(inv_path, shape="star")


def chain(inv_path: Path) -> dict:
    """(c): download once on the head, host k pulls from host k-1 while k-1 still receives it."""
    return pull(inv_path, shape="chain")


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


# ---------------------------------------------------------------- --loopback: agent processes on 127.0.0.1
BOOT = r"""
import os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import agent, serve
rate = float(os.environ.get("UPLINK_BPS") or 0)
if rate:                   # this server's uplink: one token bucket for all its connections
    lock, free, plain = threading.Lock(), [time.monotonic()], serve._send_chunk
    def limited(wfile, data):
        for i in range(0, len(data), 1 << 16):
            piece = data[i:i + (1 << 16)]
            with lock:
                at = max(free[0], time.monotonic())
                free[0] = at + len(piece) / rate
            time.sleep(max(0.0, at - time.monotonic()))
            plain(wfile, piece)
    serve._send_chunk = limited
sys.exit(agent.agent_main(sys.argv[2:]))
"""
SPEC = {"model": "bench/model", "revision": "main", "include": [], "exclude": []}


class Agent:
    def __init__(self, work: Path, name: str, cmd: str, job: dict, rate: float = 0):
        """work: this run's folder, beside the shipped agent files and the token."""
        path = work / f"{name}.json"
        path.write_text(json.dumps({**job, "token_file": str(work.parent / "token")}))
        self.lines: list[dict] = []
        self.p = subprocess.Popen([sys.executable, "-c", BOOT, str(work.parent / "shipped"), cmd, str(path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "UPLINK_BPS": str(rate)})
        self.t = threading.Thread(target=lambda: [self.lines.append(json.loads(x)) for x in self.p.stdout
                                                  if x.startswith("{")], daemon=True)
        self.t.start()

    def port(self) -> int:
        while not any(e.get("ev") == "listening" for e in self.lines):
            if self.p.poll() is not None:
                sys.exit(f"a server did not start: {self.p.stderr.read()[-2000:]}")
            time.sleep(0.02)
        return next(e["port"] for e in self.lines if e.get("ev") == "listening")


def loopback_model(work: Path, size_mb: int, files: int) -> Path:
    sys.path.insert(0, str(REPO))
    from cluster.delivery import agent
    head = work / "h0"
    head.mkdir(parents=True)
    (head / "config.json").write_text('{"model_type": "qwen2"}\n')
    each = size_mb * 1_000_000 // files
    for i in range(files):
        with open(head / f"model-{i + 1:05d}-of-{files:05d}.safetensors", "wb") as f:
            for at in range(0, each, 1 << 22):
                f.write(os.urandom(min(1 << 22, each - at)))
    agent.agent_index({"spec": SPEC}, str(head), lambda e: None)
    shipped = work / "shipped"
    shipped.mkdir()
    for m in ("agent.py", "manifest.py", "serve.py"):
        shutil.copy(DELIVERY / m, shipped / m)
    (work / "token").write_text("GPUCLUSTER_TRANSFER_TOKEN=bench\n")
    return head


def loopback_run(work: Path, head: Path, hosts: int, shape: str, rate: float) -> float:
    """Seconds from the first pull to the last host done; every copy checked against the head's bytes."""
    run = work / f"run-{shape}"
    run.mkdir()
    folders = [head] + [run / f"h{k}" for k in range(1, hosts)]
    for f in folders[1:]:
        f.mkdir()
    up = (lambda k: 0) if shape == "star" else (lambda k: k - 1)
    feeds = {up(k) for k in range(1, hosts)}
    servers, ports = [], {}
    for k in sorted(feeds):
        job = {"bind": "127.0.0.1", "port": 0, "idle": 600, "name": f"h{k}", "target": str(folders[k]),
               "stall": 60, "whole_files": shape == "chain-files"}
        a = Agent(run, f"h{k}-serve", "serve" if k == 0 else "relay", job, rate)
        servers.append(a)
        ports[k] = a.port()
    t0 = time.monotonic()
    pulls = [Agent(run, f"h{k}-sync", "sync", {
        "kind": "peer", "endpoint": f"http://127.0.0.1:{ports[up(k)]}", "peer_name": f"h{up(k)}",
        "repo": SPEC["model"], "revision": "main", "include": [], "exclude": [], "verify": False, "spec": SPEC,
        "target": str(folders[k]), "read_timeout": 90, **({"relay": True} if k in feeds else {})})
        for k in range(1, hosts)]
    done = {}
    for k, a in enumerate(pulls, 1):
        if a.p.wait() != 0:
            sys.exit(f"h{k} failed: {a.lines[-1:]} {a.p.stderr.read()[-2000:]}")
        done[k] = time.monotonic() - t0
    wall = max(done.values())
    for a in servers:
        a.p.kill()
    want = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in head.iterdir() if p.is_file()
            and not p.name.startswith(".")}
    for f in folders[1:]:
        got = {n: hashlib.sha256((f / n).read_bytes()).hexdigest() for n in want}
        if got != want:
            sys.exit(f"{f.name}: its copy differs from the head's")
    shutil.rmtree(run)
    return wall


def loopback(a) -> int:
    work = Path(tempfile.mkdtemp(prefix="gpucluster-bench-loop-"))
    try:
        head = loopback_model(work, a.size_mb, a.files)
        rate = a.uplink_mbps * 1e6 if a.uplink_mbps else 0.0
        shapes = ("star", "chain-bytes", "chain-files")
        best = {s: min(loopback_run(work, head, a.hosts, s, rate) for _ in range(a.repeat)) for s in shapes}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ideal = f", one copy at the uplink rate {a.size_mb / a.uplink_mbps:.1f} s" if a.uplink_mbps else ""
    print(f"loopback: {a.hosts} hosts, model {a.size_mb} MB in {a.files} file(s) + config.json, uplink "
          f"{f'{a.uplink_mbps:g} MB/s per host' if a.uplink_mbps else 'unlimited'}{ideal} (best of {a.repeat})")
    print(f"{'fan-out':<40} {'last host done, s':>18}")
    for s, label in (("star", "star (all pull from the head)"), ("chain-bytes", "chain, bytes passed on as they land"),
                     ("chain-files", "chain, complete files passed on")):
        print(f"{label:<40} {best[s]:>18.2f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rig-dir", default=os.environ.get("GPUCLUSTER_RIG_DIR", "/tmp/rig"))
    p.add_argument("--rate", default="20mbit", help="tc tbf rate of the mirror's link (default 20mbit)")
    p.add_argument("--lan-rate", default="", help="tc tbf rate of every rig host's uplink (e.g. 100mbit)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--loopback", action="store_true", help="agent processes on 127.0.0.1; no rig")
    p.add_argument("--hosts", type=int, default=4, help="--loopback: hosts, the head included")
    p.add_argument("--size-mb", type=int, default=200, help="--loopback: model size (MB)")
    p.add_argument("--files", type=int, default=4, help="--loopback: weight files")
    p.add_argument("--uplink-mbps", type=float, default=0, help="--loopback: each server's uplink, MB/s (0: none)")
    a = p.parse_args()
    if a.loopback:
        return loopback(a)
    rig = json.loads((Path(a.rig_dir) / "rig.json").read_text())
    ns = rig["hf"]["netns"]
    work = Path(tempfile.mkdtemp(prefix="gpucluster-bench-"))
    invs = {k: inventory(rig, work, f"dl-bench-{k}") for k in "abc"}
    model = rig["model"]
    print(f"model {model['id']}: {len(model['files'])} files, {model['total_bytes'] / 1e6:.2f} MB; "
          f"{len(rig['hosts'])} hosts; mirror link limited to {a.rate}", file=sys.stderr)
    limited = [(ns, a.rate)] + [(h["netns"], a.lan_rate) for h in rig["hosts"] if a.lan_rate and h.get("netns")]
    for netns, rate in limited:
        tc(netns, "qdisc", "del", "dev", "eth0", "root", check=False)
        tc(netns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")
    runs: dict = {"a": [], "b": [], "c": []}
    strategies = {"a": ("(a) every host downloads  ", every_host), "b": ("(b) once + LAN star       ", star),
                  "c": ("(c) once + LAN chain      ", chain)}
    try:
        for i in range(a.repeat):
            for k, (label, fn) in strategies.items():
                runs[k].append(measure(label, fn, invs[k], rig))
    finally:
        for netns, _ in limited:
            tc(netns, "qdisc", "del", "dev", "eth0", "root", check=False)
        for inv in invs.values():
            clean(inv)
        shutil.rmtree(work, ignore_errors=True)
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    print(f"\nmirror link {a.rate}, LAN uplinks {a.lan_rate or 'unlimited'}, {len(rig['hosts'])} hosts, model "
          f"{model['total_bytes'] / 1e6:.2f} MB (best of {a.repeat})")
    print(f"{'strategy':<32} {'wall s':>8} {'mirror MB':>10} {'requests':>9}")
    for k, label in (("a", "(a) download on every host"), ("b", "(b) download once + star"),
                     ("c", "(c) download once + chain")):
        r = best[k]
        print(f"{label:<32} {r['wall_s']:>8.1f} {r['mirror_bytes'] / 1e6:>10.2f} {r['requests']:>9}")
    a_, c_ = best["a"], best["c"]
    print(f"ratio (a)/(c): wall {a_['wall_s'] / c_['wall_s']:.2f}x, "
          f"mirror bytes {a_['mirror_bytes'] / max(c_['mirror_bytes'], 1):.2f}x; "
          f"(b)/(c): wall {best['b']['wall_s'] / c_['wall_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
