"""Topology choice when the inventory gives no tensor_parallel / pipeline_parallel."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster import ops

V100 = {"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160, "compute_capability": "7.0"}


def _plan(tmp_path: Path, model: str, profile: str, hosts: int = 3, **deploy):
    inv = {"cluster": {"name": "t"},
           "hosts": [{"name": f"h{i}", "address": f"10.0.0.{i + 1}", "gpus": dict(V100)} for i in range(hosts)],
           "deploy": {"profile": profile, "model": model, "engine_args": {"max-model-len": 4096}, **deploy}}
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inv))
    return ops.make_plan(*ops.load(str(path)))


def test_pipeline_stages_use_whole_hosts_when_chosen(tmp_path):
    """32B on 3 x 2 V100 with 0.6.3: TP within a host, one PP stage per host."""
    p = _plan(tmp_path, "Qwen/Qwen2.5-32B-Instruct", "vllm-v0.6.3")
    assert (p.topology.tp, p.topology.pp) == (2, 3)
    assert len(p.topology.nodes) == p.topology.pp


def test_chosen_pp_maps_one_stage_per_host(tmp_path):
    p = _plan(tmp_path, "Qwen/Qwen2.5-14B-Instruct", "vllm-v0.6.3")
    assert p.verdict != "fail"
    if p.topology.pp > 1:
        assert len(p.topology.nodes) == p.topology.pp and p.topology.tp == 2, p.topology.why


def test_chosen_topology_passes_every_check(tmp_path):
    for model, profile in (("Qwen/Qwen2.5-7B-Instruct", "vllm-v0.3.0"), ("Qwen/Qwen2.5-14B-Instruct", "vllm-v0.3.0"),
                           ("Qwen/Qwen2.5-14B-Instruct", "vllm-v0.6.3"), ("Qwen/Qwen2.5-1.5B-Instruct", "vllm-v0.6.3")):
        p = _plan(tmp_path, model, profile)
        assert p.verdict in ("ok", "warn"), (model, profile, p.topology.why)
        assert p.topology.tp * p.topology.pp <= sum(p.host(n).gpus.count for n in p.topology.nodes)
        assert "fewest GPUs" in p.topology.why
