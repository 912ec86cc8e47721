"""The in-image torch check: its verdict on output captured from a real torch on real NVIDIA GPUs, and its step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster import image_check_agent as agent
from cluster import plan as planner
from cluster.ops import load, make_plan

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "torch-arch"
INV = Path(__file__).resolve().parents[2] / "inventories" / "v100-3node.yaml"


def real_info() -> dict:
    events = [json.loads(line) for line in (FIX / "h200-torch-2.11.0-cu130.jsonl").read_text().splitlines()]
    return next(e["info"] for e in events if e["ev"] == "info")


def test_real_h200_is_covered_by_its_torch():
    ok, line = agent.verdict(real_info(), "img")
    assert ok, line
    assert "torch 2.11.0+cu130" in line and "sm_90" in line


def test_real_cuda13_torch_refuses_a_v100():
    info = dict(real_info(), devices=[{"index": 1, "name": "Tesla V100-PCIE-16GB", "cc": [7, 0]}])
    ok, line = agent.verdict(info, "vllm/vllm-openai:v0.20.0")
    assert not ok
    assert line.startswith("compute-capability: GPU 1 Tesla V100-PCIE-16GB (sm_70)")
    assert "vllm/vllm-openai:v0.20.0" in line and "sm_75 sm_80" in line


@pytest.mark.parametrize("arch, cc, ok", [
    (["sm_70", "sm_80"], (7, 0), True),
    (["sm_70", "sm_80"], (7, 5), True),          # sm_70 binaries run on 7.5 (same major, lower minor)
    (["sm_75", "sm_80"], (7, 0), False),         # a newer minor does not run on an older one
    (["sm_80", "sm_90"], (8, 9), True),          # sm_80 on an Ada 8.9
    (["sm_80", "sm_90"], (10, 0), False),        # no sm_100 and no PTX
    (["sm_80", "compute_90"], (10, 0), True),    # PTX of an older capability is JIT-compiled
    (["sm_80", "compute_90"], (8, 6), True),     # sm_80 binary
    (["compute_90"], (8, 6), False),             # PTX of a newer capability does not run
    ([], (7, 0), False),
])
def test_covers(arch, cc, ok):
    assert agent.covers(arch, cc) is ok


def test_no_gpu_seen_is_its_own_line():
    ok, line = agent.verdict({"torch": "2.4.0+cu121", "cuda": "12.1", "arch": [], "devices": []}, "img")
    assert not ok and line.startswith("no-gpu:")


def test_up_checks_the_image_right_after_the_pull_and_before_the_model():
    inv, prof = load(str(INV))
    p = make_plan(inv, prof)
    phases = list(dict.fromkeys(s.phase for s in p.steps))
    assert phases.index("image-check") == phases.index("image") + 1
    assert phases.index("image-check") < min(i for i, ph in enumerate(phases) if ph.startswith("model"))
    checks = [s for s in p.steps if s.phase == "image-check"]
    assert {s.host for s in checks} == {h.name for h in p.deployment.hosts}
    argv = checks[0].ops[0].argv
    assert argv[:3] == ("docker", "run", "--rm") and "--pull" in argv and argv[argv.index("--pull") + 1] == "never"
    assert prof.image in argv and agent.__doc__.splitlines()[0] in argv[argv.index("-c") + 1]


def test_model_pull_does_not_run_the_image_check():
    inv, prof = load(str(INV))
    assert all(s.phase != "image-check" for s in planner.model_steps(make_plan(inv, prof)))
