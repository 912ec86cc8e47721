"""The field notes' other engines on the rig: SGLang across 3 hosts, Ollama on one host with a GGUF from the rig's
ModelScope server. Each: up, a real completion, status healthy, a second up changes nothing, down leaves nothing.

The engines inside the images are stand-ins (tests/rig/image/sglang: SGLang's own argument parser and validation
from its released wheel, ranks joined over TCP; tests/rig/image/ollama: Ollama's registry pull and API, its env
read by its own rules); everything else is real. The rig's GPUs are V100s (cc 7.0, driver 535): each test gives
its hosts the GPUs the engine needs (SGLang: cc >= 7.5; Ollama 0.32: driver >= 550) and puts them back."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_lifecycle import chat, gc, inventory, labelled

pytestmark = pytest.mark.rig
A10 = {"name": "NVIDIA A10", "memory_mib": 23028, "compute_capability": "8.6", "driver": "550.54.15"}


@contextlib.contextmanager
def gpus_as(rig, hosts: list[str], **gpu):
    """The hosts' nvidia-smi (and the GPUs their containers see) report these GPUs for the block."""
    saved = {}
    for h in hosts:
        path = Path(rig.host(h)["gpus_file"])
        saved[path] = path.read_text()
        path.write_text(json.dumps({**json.loads(saved[path]), **gpu}))
    try:
        yield
    finally:
        for path, text in saved.items():
            path.write_text(text)


def with_gpus(inv: Path, **gpu) -> None:
    data = yaml.safe_load(inv.read_text())
    for h in data["hosts"]:
        h["gpus"].update(gpu)
    inv.write_text(yaml.safe_dump(data, sort_keys=False))


def cycle(rig, inv: Path, cluster: str, served: str, nodes: int) -> dict:
    first = json.loads(_ok(gc("up", str(inv), "--yes", "--json")).stdout)
    assert served in chat(first["endpoint"], served)
    st = gc("status", str(inv), "--json")
    status = json.loads(st.stdout)
    assert st.returncode == 0 and status["healthy"], status["problems"]
    before = labelled(rig, cluster)
    assert len(before) == nodes, before
    second = json.loads(_ok(gc("up", str(inv), "--yes", "--json")).stdout)
    assert second["changed"] is False, second["steps"]           # read-only checks only (e.g. Ollama's /api/ps)
    assert labelled(rig, cluster) == before
    _ok(gc("down", str(inv), "--yes"))
    assert labelled(rig, cluster) == {}
    return status


def _ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_sglang_across_three_hosts(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-sglang", hosts=3, profile="sglang-v0.5.15", tensor_parallel=6)
    gpu = {k: A10[k] for k in ("name", "memory_mib", "compute_capability", "driver")}
    with_gpus(inv, **gpu)
    with gpus_as(rig, ["h1", "h2", "h3"], **gpu):
        try:
            status = cycle(rig, inv, "e2e-sglang", "gpucluster/tiny-qwen2", nodes=3)
            assert "gpucluster/tiny-qwen2" in status["api"]["models"]
        finally:
            gc("down", str(inv), "--yes")


def test_sglang_on_v100_is_refused_before_anything_is_pulled(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-sglang-v100", hosts=3, profile="sglang-v0.5.15", tensor_parallel=6)
    r = gc("up", str(inv), "--yes")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "compute-capability" in r.stderr and "sm75" in r.stderr.replace("sm_75", "sm75"), r.stderr[-2000:]
    assert labelled(rig, "e2e-sglang-v100") == {}


@pytest.mark.hub_online
def test_ollama_on_one_host_with_a_gguf_from_the_modelscope_mirror(rig, tmp_path):
    gguf = rig.facts["gguf_model"]
    inv = inventory(rig, tmp_path, name="e2e-ollama", hosts=1, profile="ollama-0.32.15",
                    model=f"modelscope.cn/{gguf['id']}:Q4_K_M", served_model_name="tiny-gguf",
                    source={"kind": "modelscope", "endpoint": rig.facts["modelscope"]["endpoint"]})
    data = yaml.safe_load(inv.read_text())
    data["deploy"].pop("tensor_parallel", None)
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    with_gpus(inv, driver=A10["driver"])
    with gpus_as(rig, ["h1"], driver=A10["driver"]):
        try:
            status = cycle(rig, inv, "e2e-ollama", "tiny-gguf", nodes=1)
            assert "tiny-gguf" in " ".join(status["api"]["models"]), status["api"]
        finally:
            gc("down", str(inv), "--yes")


def test_openwebui_in_front_driven_in_headless_chromium(rig, tmp_path):
    """The real OpenWebUI (open-webui 0.6.36 from PyPI, `rig setup --openwebui`) in front of the vLLM stand-in: up
    waits until it lists the model; a person's chat in Chromium gets the engine's reply; the screenshot is kept as
    a CI artifact (artifacts/openwebui-chat.png)."""
    import webui_browser
    if not rig.facts.get("openwebui"):
        pytest.skip("the rig has no OpenWebUI image: run `tests/rig/rig setup --openwebui` before `rig up`")
    inv = inventory(rig, tmp_path, name="e2e-webui", hosts=1, served_model_name="tiny-chat")
    data = yaml.safe_load(inv.read_text())
    data["ui"] = {"kind": "openwebui", "port": 3000}
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    shot = Path(__file__).resolve().parents[2] / "artifacts" / "openwebui-chat.png"
    shot.parent.mkdir(exist_ok=True)
    try:
        status = cycle_keep(rig, inv)
        assert status["ui"]["healthy"] and "tiny-chat" in status["ui"]["models"], status["ui"]
        reply = webui_browser.chat(f"http://{rig.address('h1')}:3000", "tiny-chat", "Hello from the rig", str(shot))
        # the engine's answer to the same message, asked directly (the stand-in's text depends on the prompt only)
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello from the rig"}]}
        req = urllib.request.Request(f"{status['endpoint']}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            direct = json.loads(resp.read())["choices"][0]["message"]["content"]
        assert reply.strip() == direct.strip(), (reply, direct)
        second = json.loads(_ok(gc("up", str(inv), "--yes", "--json")).stdout)
        assert second["changed"] is False, second["steps"]
    finally:
        _ok(gc("down", str(inv), "--yes"))
    assert labelled(rig, "e2e-webui") == {}


def cycle_keep(rig, inv: Path) -> dict:
    first = json.loads(_ok(gc("up", str(inv), "--yes", "--json")).stdout)
    assert "tiny-chat" in chat(first["endpoint"], "tiny-chat")
    st = gc("status", str(inv), "--json")
    status = json.loads(st.stdout)
    assert st.returncode == 0 and status["healthy"], status["problems"]
    return status
