"""`status` and `logs` judge the deployment `up` recorded on the hosts, not a re-plan of today's inventory."""

from __future__ import annotations

import json

import pytest

from test_lifecycle import gc, inventory, labelled

pytestmark = pytest.mark.rig


def test_status_checks_what_up_ran_not_what_the_inventory_plans(rig, tmp_path):
    # The inventory alone plans one host (TP 2 on h1); up is told otherwise on the command line.
    inv = inventory(rig, tmp_path, name="e2e-record", hosts=3, profile="vllm-v0.3.0")
    try:
        r = gc("up", str(inv), "--yes", "--json", "--profile", "vllm-v0.6.3", "--tp", "2", "--pp", "3")
        assert r.returncode == 0, r.stderr[-3000:]

        st = gc("status", str(inv), "--json")
        out = json.loads(st.stdout)
        assert st.returncode == 0 and out["healthy"], st.stdout[-2000:]
        assert out["recorded"] and out["topology"]["nodes"] == ["h1", "h2", "h3"]
        assert out["image"] == "vllm/vllm-openai:v0.6.3"
        assert len(out["engine"]["ray"]["nodes"]) == 3
        assert any("the inventory differs" in n and "image" in n for n in out["notes"]), out["notes"]

        # A dead worker: status must say unhealthy and name h3 (whatever /health answers: V1 says 200).
        worker = [n for n in labelled(rig, "e2e-record") if n.startswith("h3/")]
        assert worker
        rig.docker("h3", "kill", worker[0].split("/", 1)[1])
        st = gc("status", str(inv))
        assert st.returncode == 1, st.stdout
        assert "PROBLEM h3: the worker container is not running" in st.stdout
        assert "NOTE the inventory differs" in st.stdout

        logs = gc("logs", str(inv), "--component", "ray-worker", "--tail", "5")
        assert "[h3 ray-worker]" in logs.stdout or "[h2 ray-worker]" in logs.stdout, logs.stdout + logs.stderr

        # A second up with the same command line repairs it.
        r = gc("up", str(inv), "--yes", "--profile", "vllm-v0.6.3", "--tp", "2", "--pp", "3")
        assert r.returncode == 0, r.stderr[-3000:]
        assert gc("status", str(inv)).returncode == 0
    finally:
        assert gc("down", str(inv), "--yes").returncode == 0
    assert labelled(rig, "e2e-record") == {}
    for h in ("h1", "h2", "h3"):
        assert rig.ssh(h, "test -e /var/lib/gpucluster/deployment-e2e-record.json", check=False).returncode != 0


def test_status_with_the_profile_renamed_uses_the_record(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-record2", hosts=1, profile="vllm-v0.6.3")
    try:
        assert gc("up", str(inv), "--yes").returncode == 0
        inv.write_text(inv.read_text().replace("profile: vllm-v0.6.3", "profile: vllm-v0.6.3-renamed"))
        st = gc("status", str(inv), "--json")
        out = json.loads(st.stdout)
        assert st.returncode == 0 and out["healthy"], st.stdout + st.stderr
        assert any("cannot be built" in n and "vllm-v0.6.3-renamed" in n for n in out["notes"]), out["notes"]
    finally:
        assert gc("down", str(inv), "--yes").returncode == 0
