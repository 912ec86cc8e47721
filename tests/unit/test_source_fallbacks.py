"""deploy.source.fallbacks: the head's download tries each hub in turn when the one before fails (its retries spent),
each with its own job file and token; a token never goes to the public default mirror the user did not name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster import ops
from cluster.errors import ConfigError
from cluster.executor import Executor
from cluster.steps import CONTROL, Cmd, Put, Step

REPO = Path(__file__).resolve().parents[2]


def _inventory(tmp_path: Path, source: dict) -> Path:
    inv = {"cluster": {"name": "lab", "model_dir": "/Data/models"},
           "hosts": [{"name": "h1", "address": "10.0.0.1", "interface": "eth0",
                      "gpus": {"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160,
                               "compute_capability": "7.0"}}],
           "deploy": {"profile": "vllm-v0.3.0", "model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel": 2,
                      "source": source}}
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def _model_step(path: Path) -> Step:
    plan = ops.make_plan(*ops.load(str(path)))
    return next(s for s in plan.steps if s.id == "h1/model")


def _jobs(ops_: tuple) -> dict:
    """job file name -> its JSON, and which secret files are written, for one alternative's ops."""
    out = {}
    for op in ops_:
        if isinstance(op, Put) and op.path.endswith(".json") and "/sync" in op.path:
            out[op.path.rsplit("/", 1)[1]] = json.loads(op.text)
        if isinstance(op, Put) and op.path.endswith(".secret"):
            out[op.path.rsplit("/", 1)[1]] = [k for k, _ in op.secrets]
    return out


def test_each_fallback_is_an_alternative_with_its_own_hub_and_token(tmp_path):
    step = _model_step(_inventory(tmp_path, {
        "kind": "hf-mirror", "endpoint": "http://mirror.lab:8090", "token": "hf_primary_tok",
        "fallbacks": [{"kind": "modelscope"}, {"kind": "huggingface", "token": {"env": "HF_TOKEN"}}]}))
    first, (ms, hf) = _jobs(step.ops), [_jobs(alt) for alt in step.otherwise]
    assert first["sync.json"]["endpoint"] == "http://mirror.lab:8090" and first["sync.secret"]
    assert (ms["sync-fallback-1.json"]["kind"], ms["sync-fallback-1.json"]["endpoint"],
            ms["sync-fallback-1.json"]["revision"]) == ("modelscope", "https://www.modelscope.cn", "master")
    assert "sync-fallback-1.secret" not in ms, "the primary's token must not go to the fallback"
    assert hf["sync-fallback-2.json"]["endpoint"] == "https://huggingface.co" and "sync-fallback-2.secret" in hf
    # every alternative ends by recording the same verified-listing stamp (a later run skips the host)
    stamps = {alt[-1].argv[-1] for alt in (step.ops, *step.otherwise)}
    assert len(stamps) == 1
    assert "then https://www.modelscope.cn, https://huggingface.co" in step.reason


@pytest.mark.parametrize("source, field", [
    ({"kind": "hf-mirror", "token": "t"}, "deploy.source"),
    ({"kind": "huggingface", "token": "t", "fallbacks": [{"kind": "hf-mirror", "token": "t"}]},
     "deploy.source.fallbacks[0]"),
])
def test_a_token_never_goes_to_the_default_public_mirror(tmp_path, source, field):
    path = _inventory(tmp_path, source)
    with pytest.raises(ConfigError) as e:
        ops.load(str(path))
    assert field in str(e.value) and "hf-mirror.com" in str(e.value) and "endpoint" in e.value.fix
    r = subprocess.run([sys.executable, "-m", "cluster", "plan", str(path)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_executor_goes_to_the_next_hub_only_when_the_one_before_fails(tmp_path):
    tried = tmp_path / "tried"

    def hub(name: str, ok: bool) -> tuple:
        return (Cmd(argv=("sh", "-c", f'echo {name} >> "$0"; exit {0 if ok else 1}', str(tried))),)
    step = Step(id=f"{CONTROL}/model", host=CONTROL, phase="model", reason="download",
                ops=hub("mirror", False), otherwise=(hub("modelscope", False), hub("huggingface", True),
                                                    hub("never", True)))
    lines = []
    report = Executor(None, lines.append).execute([step])
    assert report.outcomes[0].status == "ran"
    assert report.outcomes[0].as_dict()["fallback"].startswith("fallback 2 worked after: `sh -c")   # --json too
    assert tried.read_text().split() == ["mirror", "modelscope", "huggingface"]
    assert any("fallback 2 worked after:" in ln for ln in lines), lines
