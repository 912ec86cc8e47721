"""OpenWebUI never reaches for huggingface.co by default (OFFLINE_MODE=True in the UI container's env), for the vLLM
and the Ollama connection alike, and ui.env can give the downloads back. Measured against the real open-webui 0.6.36
on a network that drops outside traffic: 277 s to the first /health without it, 20 s with it (cluster/ui.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from cluster import ops, render

V100 = {"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160, "compute_capability": "7.0"}


def _plan(tmp_path: Path, *, ui_env: dict | None = None, profile="vllm-v0.3.0", deploy: dict | None = None):
    inv = {"cluster": {"name": "lab", "model_dir": "/Data/models"},
           "hosts": [{"name": "gpu208", "address": "172.18.8.208", "gpus": V100}],
           "deploy": {"profile": profile, "model": "Qwen/Qwen2.5-7B-Instruct", "served_model_name": "qwen2.5-7b",
                      "tensor_parallel": 2, **(deploy or {})},
           "ui": {"kind": "openwebui", "port": 3000, **({"env": ui_env} if ui_env else {})}}
    if profile.startswith("ollama"):
        del inv["deploy"]["tensor_parallel"]
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return ops.make_plan(*ops.load(str(path)))


def _ui_env(plan) -> dict[str, str]:
    step = next(s for s in plan.steps if s.id == "gpu208/openwebui")
    argv = list(step.ops[-1].argv)
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-e")


def test_offline_by_default_with_vllm(tmp_path):
    plan = _plan(tmp_path)
    assert _ui_env(plan)["OFFLINE_MODE"] == "True"
    assert "OFFLINE_MODE=True" in render.runbook(plan)


def test_offline_by_default_with_ollama(tmp_path):
    plan = _plan(tmp_path, profile="ollama-0.32.15", deploy={"model": "qwen3:32b", "served_model_name": "qwen3-32b"})
    env = _ui_env(plan)
    assert env["OFFLINE_MODE"] == "True" and env["ENABLE_OLLAMA_API"] == "True"


def test_ui_env_gives_the_downloads_back(tmp_path):
    plan = _plan(tmp_path, ui_env={"OFFLINE_MODE": "False", "HF_ENDPOINT": "https://hf-mirror.com"})
    env = _ui_env(plan)
    assert env["OFFLINE_MODE"] == "False" and env["HF_ENDPOINT"] == "https://hf-mirror.com"
