"""Failures explained on the rig: an engine that fails with a known message makes `up` print the cause and the fix,
and `gpucluster doctor --logs` finds it in the containers' logs, running or stopped.

The failure is the field notes' "No available memory for the cache blocks" for the reason vLLM #20860 describes:
another process holds the GPUs' memory. The planner cannot see that offline; the rig's vLLM stand-in computes its
KV blocks from the GPU description its container got at start (memory_used_mib in the host's gpus.json, which
nvidia-smi on the host reports too), and fails with vLLM's message when none are left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_lifecycle import gc, inventory, labelled

pytestmark = pytest.mark.rig
CLUSTER = "e2e-explain"


def _findings(doctor_stdout: str) -> dict[str, dict]:
    out = json.loads(doctor_stdout)
    return {f["code"]: f for f in out["logs"]["findings"]}


def test_engine_failure_is_explained_by_up_and_doctor_logs(rig, tmp_path):
    inv = inventory(rig, tmp_path, name=CLUSTER, hosts=1, tensor_parallel=2, pipeline_parallel=1)
    gpus = Path(rig.host("h1")["gpus_file"])
    original = gpus.read_text()
    cfg = json.loads(original)
    cfg["memory_used_mib"] = int(cfg["memory_mib"]) - 600      # "another process" holds all but 600 MiB per GPU
    gpus.write_text(json.dumps(cfg))
    try:
        up = gc("up", str(inv), "--yes", "--ready-timeout", "300", timeout=900)
        err = up.stderr
        assert up.returncode == 1, err[-4000:]
        assert "the logs show why:" in err, err[-4000:]
        block = err[err.index("the logs show why:"):]
        cause = next((ln for ln in block.splitlines() if ": kv-cache-insufficient: " in ln), "")
        assert cause.strip().startswith("h1 api"), block[:3000]
        assert "(fix: raise gpu-memory-utilization" in cause and "nothing else holds GPU memory" in cause
        assert err.index("kv-cache-insufficient") < err.index("ready failed on 1 host(s)"), \
            "the cause comes before the failure, which stays last"

        # the head container still runs (Ray); the API server process is gone: its log file is read in place
        doc = gc("doctor", str(inv), "--logs", "--json")
        assert doc.returncode == 1, doc.stdout[-3000:] + doc.stderr[-2000:]
        found = _findings(doc.stdout)
        assert "kv-cache-insufficient" in found and "h1 api" in found["kv-cache-insufficient"]["seen"], found
        assert found["kv-cache-insufficient"]["severity"] == "error"
        assert "No available memory for the cache blocks" in found["kv-cache-insufficient"]["excerpt"]
        status = {(s["host"], s["component"]): s["status"] for s in json.loads(doc.stdout)["logs"]["sources"]}
        assert status[("h1", "api")] == "ok" and status[("h1", "ray-head")] == "ok", status

        text = gc("doctor", str(inv), "--logs")
        assert text.returncode == 1
        assert "ERROR h1 api: kv-cache-insufficient: " in text.stdout and "    fix: raise gpu-memory-utilization" \
            in text.stdout, text.stdout[-3000:]

        # the last deployment, stopped: `docker logs` works on exited containers, the API log is read with docker cp
        rig.docker("h1", "stop", "-t", "5", f"gpucluster-{CLUSTER}-ray-head")
        stopped = gc("doctor", str(inv), "--logs", "--json")
        assert stopped.returncode == 1, stopped.stdout[-3000:] + stopped.stderr[-2000:]
        assert "h1 api" in _findings(stopped.stdout)["kv-cache-insufficient"]["seen"]
    finally:
        gpus.write_text(original)
        assert gc("down", str(inv), "--yes").returncode == 0
    assert labelled(rig, CLUSTER) == {}
    healthy = gc("doctor", str(inv), "--logs", "--json")        # nothing deployed: no container, nothing known
    assert healthy.returncode == 0, healthy.stdout[-3000:] + healthy.stderr[-2000:]
    scan = json.loads(healthy.stdout)["logs"]
    assert scan["findings"] == [] and {s["status"] for s in scan["sources"]} == {"no container"}
