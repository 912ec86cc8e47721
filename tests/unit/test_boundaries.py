"""Planning imports no remote/SDK/UI library, and secrets never reach any plan output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("fabric", "paramiko", "docker", "ray", "rich")     # `docker` is the SDK package, not cluster.docker


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_plan_modules_import_no_heavy_packages():
    code = ("import sys, json; import cluster.plan, cluster.checks, cluster.config, cluster.cli; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    import json
    top = set(json.loads(r.stdout))
    assert "cluster" in top and "yaml" in top                 # the probe itself works
    assert not top & set(HEAVY), top & set(HEAVY)


def test_plan_command_imports_no_heavy_packages():
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "cluster", "plan",
                        str(ROOT / "inventories" / "v100-3node.yaml")],
                       capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60)
    assert r.returncode in (0, 1), r.stderr[-2000:]
    names = [m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", r.stderr, re.M)]
    assert "cluster.plan" in names and "yaml" in names        # importtime output was parsed
    bad = sorted({n for n in names if n.split(".")[0] in HEAVY})
    assert bad == []


SECRET_INV = """\
cluster: {name: lab}
hosts:
  - {name: h0, address: 10.0.0.1, gpus: {count: 2, name: Tesla V100-PCIE-16GB, memory_mib: 16160, compute_capability: "7.0"}}
deploy:
  profile: vllm-v0.3.0
  model: Qwen/Qwen2.5-7B-Instruct
  tensor_parallel: 2
  engine_args: {max-model-len: 4096}
  api_key: "sk-SECRET-123"
  source: {kind: huggingface, token: "hf_SECRET"}
"""


@pytest.fixture(scope="module")
def secret_outputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("secret") / "inv.yaml"
    path.write_text(SECRET_INV)
    runs = {name: subprocess.Popen([sys.executable, "-m", "cluster", "plan", str(path), *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
            for name, args in (("json", ["--json"]), ("sh", ["--format", "sh"]), ("table", []))}
    out = {n: p.communicate(timeout=120) for n, p in runs.items()}      # (reading as it goes: no pipe deadlock)
    return {n: (p.returncode, *out[n]) for n, p in runs.items()}


@pytest.mark.parametrize("fmt", ["json", "sh", "table"])
def test_secrets_never_printed(secret_outputs, fmt):
    rc, out, err = secret_outputs[fmt]
    assert rc == 0, err
    assert "Qwen/Qwen2.5-7B-Instruct" in out and "docker" in out        # it is a real plan
    for secret in ("sk-SECRET-123", "hf_SECRET", "SECRET"):
        assert secret not in out and secret not in err


def test_secret_reprs_hide_value():
    from cluster.config import Secret
    s = Secret(literal="sk-SECRET-123")
    assert "SECRET" not in repr(s) and "SECRET" not in str(s) and "SECRET" not in f"{s}"
    assert s.reveal() == "sk-SECRET-123"
