"""The real vLLM (its CPU build 0.32.0, image vllm/vllm-openai-cpu:v0.32.0 built by `rig setup --real-engine`)
brought up by gpucluster on the rig: one host, TP 2 across two hosts, PP 2 across two hosts, without Ray; and a
wrong interface stopped with one line instead of a hang. Nothing here is a stand-in."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_lifecycle import gc, labelled

pytestmark = pytest.mark.rig

PROFILE = """# the rig's real engine: vLLM's CPU build 0.32.0, across hosts without Ray
engine: vllm-mp
device: cpu
image: vllm/vllm-openai-cpu:v0.32.0
docker: {shm_size: 1g, ipc: null, network: host}   # private IPC: rig hosts share this machine's, real ones do not
env: {VLLM_CPU_KVCACHE_SPACE: "1"}
engine_args: {max-model-len: 512%s}
"""


@pytest.fixture
def real(rig):
    if not rig.facts.get("real_model") or "vllm/vllm-openai-cpu:v0.32.0" not in str(rig.facts.get("real_engine")):
        pytest.skip("the rig has no real engine: run `tests/rig/rig setup --real-engine` before `rig up`")
    return rig.facts["real_model"]


def cpu_inventory(rig, tmp_path: Path, name: str, hosts: int, *, eager: bool = True, **deploy) -> Path:
    data = yaml.safe_load(Path(rig.inventory).read_text())
    data["cluster"]["name"] = name
    data["hosts"] = data["hosts"][:hosts]
    for i, h in enumerate(data["hosts"]):
        h.pop("gpus", None)                  # CPU hosts: nothing GPU about them
        # rig hosts share this machine's 2 cores; the rig has no DNS, and torch's c10d asks it for every peer
        # (glibc's resolver would wait 5 s x 2 per lookup): one attempt of 1 s
        h["env"] = {"VLLM_CPU_OMP_THREADS_BIND": str(i % 2), "RES_OPTIONS": "timeout:1 attempts:1"}
    profile = tmp_path / "vllm-cpu.yaml"
    profile.write_text(PROFILE % (", enforce-eager: true" if eager else ""))
    data["deploy"].update(model=rig.facts["real_model"]["id"], profile=str(profile), **deploy)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _serve_cycle(rig, inv: Path, cluster: str, nodes: int) -> None:
    t0 = time.time()
    r = gc("up", str(inv), "--yes", "--json", "--ready-timeout", "300", timeout=900)
    ready = time.time() - t0
    assert r.returncode == 0, r.stderr[-4000:]
    up = json.loads(r.stdout)
    endpoint, served = up["endpoint"], up["served_model_name"]
    models = json.loads(urllib.request.urlopen(f"{endpoint}/models", timeout=30).read())
    assert [m["id"] for m in models["data"]] == [served]
    text = post(f"{endpoint}/completions", {"model": served, "prompt": "Hello, world! The cluster",
                                           "max_tokens": 8, "temperature": 0})
    assert text["choices"][0]["text"] and text["usage"]["prompt_tokens"] > 0
    chat = post(f"{endpoint}/chat/completions", {"model": served, "max_tokens": 8, "temperature": 0,
                                                "messages": [{"role": "user", "content": "What is a GPU?"}]})
    assert chat["choices"][0]["message"]["content"] is not None
    assert chat["usage"]["prompt_tokens"] > 8          # the chat template wrapped the one short message
    st = gc("status", str(inv), "--json")
    assert st.returncode == 0 and json.loads(st.stdout)["healthy"], st.stdout[-2000:]
    before = labelled(rig, cluster)
    assert len(before) == nodes
    again = gc("up", str(inv), "--yes", "--json", timeout=600)
    assert again.returncode == 0 and not json.loads(again.stdout)["changed"], again.stdout[-3000:]
    assert labelled(rig, cluster) == before
    print(f"\nREAL ENGINE {cluster}: up to a served completion in {ready:.1f} s")


def test_one_host(rig, real, tmp_path):
    inv = cpu_inventory(rig, tmp_path, "real-one", 1, tensor_parallel=1, pipeline_parallel=1)
    try:
        _serve_cycle(rig, inv, "real-one", 1)
    finally:
        assert gc("down", str(inv), "--yes").returncode == 0
    assert labelled(rig, "real-one") == {}


def test_tp2_across_two_hosts(rig, real, tmp_path):
    inv = cpu_inventory(rig, tmp_path, "real-tp2", 2, tensor_parallel=2, pipeline_parallel=1)
    try:
        _serve_cycle(rig, inv, "real-tp2", 2)
        # a dead headless node is seen even while the head still answers /health
        rig.docker("h2", "kill", "gpucluster-real-tp2-vllm-node-1")
        st = gc("status", str(inv), "--json")
        out = json.loads(st.stdout)
        assert st.returncode == 1 and any("h2" in p for p in out["problems"]), out["problems"]
    finally:
        assert gc("down", str(inv), "--yes").returncode == 0
    assert labelled(rig, "real-tp2") == {}


def test_pp2_across_two_hosts(rig, real, tmp_path):
    # with --enforce-eager the first request kills this build's engine under PP (seen with 0.32.0 CPU)
    inv = cpu_inventory(rig, tmp_path, "real-pp2", 2, eager=False, tensor_parallel=1, pipeline_parallel=2)
    try:
        _serve_cycle(rig, inv, "real-pp2", 2)
    finally:
        assert gc("down", str(inv), "--yes").returncode == 0
    assert labelled(rig, "real-pp2") == {}


def test_wrong_interface_is_one_line_not_a_hang(rig, real, tmp_path):
    inv = cpu_inventory(rig, tmp_path, "real-nic", 2, tensor_parallel=2, pipeline_parallel=1)
    data = yaml.safe_load(inv.read_text())
    data["hosts"][1]["interface"] = "eth9"
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    t0 = time.time()
    r = gc("up", str(inv), "--yes", timeout=300)
    assert r.returncode == 1 and time.time() - t0 < 120, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "interface-mismatch" in last or ("h2" in last and "eth9" in last), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    doctor = gc("doctor", str(inv))
    assert doctor.returncode == 1 and "h2: interface eth9" in doctor.stdout and "GLOO_SOCKET_IFNAME" in doctor.stdout
    assert labelled(rig, "real-nic") == {}
