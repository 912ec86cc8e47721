"""Any hub model: `gpucluster plan` with a model the catalog lacks reads config.json and the weights' size from the
rig's HF mirror (olah) and its ModelScope server, caches them, and runs the model checks; `--offline` asks nothing.

The rig's tiny Qwen2 (`gpucluster/tiny-qwen2`) ships two shards with an index; its real-engine model
(`gpucluster/tiny-qwen2-real`, after `rig setup --real-engine`) one model.safetensors, whose header is read with
HTTP Range (both rig servers ignore Range: only the header's bytes are read, then the connection is closed; the
servers may not log a request whose client left early, so the facts are compared with the folder's instead)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.rig, pytest.mark.hub_online]
REPO = Path(__file__).resolve().parents[2]
SOURCES = {"hf-mirror": "hf", "modelscope": "modelscope"}   # source kind -> rig.json key


def plan(inv: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GPUCLUSTER_OFFLINE"}
    env["GPUCLUSTER_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, "-m", "cluster", "plan", str(inv), "--json", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)


def access(rig, key: str, since: int) -> list[dict]:
    with open(rig.facts[key]["access_log"]) as f:
        f.seek(since)
        return [json.loads(x) for x in f if x.strip()]


def log_size(rig, key: str) -> int:
    path = rig.facts[key]["access_log"]
    return os.path.getsize(path) if os.path.exists(path) else 0


def codes(out: dict) -> list[str]:
    return [f["code"] for f in out["findings"]]


@pytest.mark.parametrize("which", ["model", "real_model"])
@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_plan_reads_a_model_outside_the_catalog_from_the_hub(rig, tmp_path, kind, which):
    key = SOURCES[kind]
    if not rig.facts.get(key, {}).get("endpoint"):
        pytest.skip(f"the rig has no {kind} endpoint")
    if which not in rig.facts:
        pytest.skip("the rig's real-engine model is there only after `rig setup --real-engine`")
    model = rig.facts[which]["id"]
    from cluster import knowledge
    assert model not in knowledge.catalog()
    data = yaml.safe_load(Path(rig.inventory).read_text())
    data["deploy"]["source"] = {"kind": kind, "endpoint": rig.facts[key]["endpoint"]}
    inv = tmp_path / f"{kind}.yaml"
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    cache = tmp_path / "cache"
    control = rig.facts["control_address"]

    mark = log_size(rig, key)
    r = plan(inv, cache, "--model", model)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert "model-unknown" not in codes(out) and "model-hub-error" not in codes(out), out["findings"]
    assert out["memory"] is not None and out["memory"]["weights"] > 0     # the memory checks ran
    asked = [e for e in access(rig, key, mark) if e["client"] == control]
    assert any("config.json" in e["path"] for e in asked), asked
    assert list((cache / "hub" / kind).glob("*.json")), "nothing cached"
    # the same facts as the repository's own folder read on this machine (config.json, index or header)
    local = plan(inv, tmp_path / "local-cache", "--model", rig.facts[which]["source_dir"], "--offline")
    assert local.returncode == 0, local.stderr[-3000:]
    assert json.loads(local.stdout)["memory"] == out["memory"]

    wrong = plan(inv, cache, "--model", model, "--tp", "5")   # heads split over TP: a model check, from hub facts
    assert "heads-not-divisible" in codes(json.loads(wrong.stdout)), wrong.stdout[-3000:]

    mark = log_size(rig, key)
    cached = plan(inv, cache, "--model", model, "--offline")  # the cache answers, the hub is not asked
    assert cached.returncode == 0 and json.loads(cached.stdout)["memory"] == out["memory"]
    cold = plan(inv, tmp_path / "empty-cache", "--model", model, "--offline")
    assert "model-unknown" in codes(json.loads(cold.stdout))
    assert [e for e in access(rig, key, mark) if e["client"] == control] == []


def test_a_model_the_hub_lacks_is_a_warning_naming_model_and_endpoint(rig, tmp_path):
    data = yaml.safe_load(Path(rig.inventory).read_text())
    inv = tmp_path / "inv.yaml"
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    r = plan(inv, tmp_path / "cache", "--model", "gpucluster/no-such-model")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    hub = [f for f in json.loads(r.stdout)["findings"] if f["code"] == "model-hub-error"]
    assert len(hub) == 1 and "gpucluster/no-such-model" in hub[0]["message"]
    assert rig.facts["hf"]["endpoint"] in hub[0]["message"]
