"""The field notes' goal on the rig: Qwen3-32B on three hosts with 2 x V100-16GB, `--profile auto` picking an image
that runs on sm_70; and the in-image torch check stopping `up` before the model phase when the image's torch lacks
the GPUs' architecture.

The engine is the rig's vLLM stand-in (flags and architectures from the real release's code, torch arch list from
the torch build that release pins); the model is Qwen3-32B's real config.json with tiny weights (shapemodel.py)."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from test_lifecycle import chat, gc, inventory, labelled

pytestmark = pytest.mark.rig


@pytest.fixture
def large_model_disks(rig):
    """The hosts' model folders on a 200 GB tmpfs (a limit, not an allocation: the shape model is a few KB), as
    hosts that can hold Qwen3-32B's 65.5 GB would have; the rig's hosts otherwise share this machine's disk."""
    dirs = [h["model_dir"] for h in rig.facts["hosts"][:3]]
    for d in dirs:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200g,mode=0755", "gcrig-large", d], check=True)
    try:
        yield
    finally:
        for d in dirs:
            subprocess.run(["umount", "-l", d], check=False)


def test_auto_profile_runs_qwen3_32b_on_three_v100_hosts(rig, tmp_path, large_model_disks):
    shape = rig.facts["shape_model"]
    inv = inventory(rig, tmp_path, name="e2e-auto", hosts=3, profile="auto", model=shape["id"])
    data = yaml.safe_load(inv.read_text())
    del data["deploy"]["tensor_parallel"]                    # auto chooses the topology too
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    planned = gc("plan", str(inv), "--json")
    assert planned.returncode == 0, planned.stdout[-2000:] + planned.stderr
    p = json.loads(planned.stdout)
    assert p["verdict"] in ("ok", "warn")
    assert p["image"] == "vllm/vllm-openai:v0.19.1", (p["profile"], p["image"])
    assert (p["topology"]["tensor_parallel"], p["topology"]["pipeline_parallel"]) == (2, 3)
    assert p["alternatives"] and p["alternatives"][0]["verdict"] in ("ok", "warn")
    try:
        r = gc("up", str(inv), "--yes", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        report = json.loads(r.stdout)
        checked = [o for o in report["steps"] if o["id"].endswith("/image-check")]
        assert len(checked) == 3 and all(o["status"] == "ran" for o in checked), checked
        assert all("sm_70" in o.get("detail", "") for o in checked), checked
        assert shape["id"] in chat(report["endpoint"], report["served_model_name"])
        st = gc("status", str(inv), "--json")
        assert st.returncode == 0 and json.loads(st.stdout)["healthy"], st.stdout[-2000:]
    finally:
        assert gc("down", str(inv), "--yes").returncode == 0
    assert labelled(rig, "e2e-auto") == {}


def test_image_whose_torch_lacks_the_gpu_arch_stops_up_before_the_model(rig, tmp_path):
    """A lab's own build tagged like 0.19.1 (which the tables say runs on sm_70) whose torch is a cu128 2.7 build
    without sm_70: only running the image's torch on the host can tell."""
    tag = "lab/vllm-openai:v0.19.1"
    src = rig.facts["registry"]["images"]["vllm/vllm-openai:v0.10.1.1"]
    rig.docker("h1", "pull", "-q", src)
    rig.docker("h1", "tag", src, tag)
    profile = tmp_path / "lab.yaml"
    profile.write_text(f"image: {tag}\nengine_args: {{dtype: half}}\n")
    inv = inventory(rig, tmp_path, name="e2e-imgcheck", hosts=1, profile=str(profile))
    try:
        assert gc("plan", str(inv)).returncode == 0            # the tables cannot know
        r = gc("up", str(inv), "--yes")
        assert r.returncode == 1
        last = r.stderr.strip().splitlines()[-1]
        assert "image-check failed on 1 host(s): h1: image-check: compute-capability: GPU 0 Tesla V100-PCIE-16GB " \
               f"(sm_70) is not supported by {tag}: its torch 2.7.1+cu128" in last, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        assert "== model" not in r.stderr                        # stopped before the model phase
        assert labelled(rig, "e2e-imgcheck") == {}

        doc = gc("doctor", str(inv), "--json")
        assert doc.returncode == 1
        codes = {f["code"]: f["message"] for f in json.loads(doc.stdout)["findings"]}
        assert "compute-capability" in codes and codes["compute-capability"].startswith("h1: GPU 0")
    finally:
        gc("down", str(inv), "--yes")
        rig.docker("h1", "rmi", tag, check=False)
