"""Ollama against what the real server does (v0.32.15): env values read as envconfig reads them, and a hub GGUF
pulled from the inventory's mirror (deploy.source) by naming the mirror as the registry host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster import ops
from cluster.engines import ollama as eng
from cluster.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
INV = """\
cluster: {name: rig-ollama, model_dir: /tmp/m}
hosts:
  - {name: h1, address: 10.77.0.11, gpus: {count: 2, name: Tesla V100-PCIE-16GB, memory_mib: 16160, compute_capability: "7.0"}}
deploy:
  profile: ollama-0.32.15
  model: MODEL
  env: ENV
SOURCE"""


def _plan(tmp_path, model="modelscope.cn/gpucluster/tiny-qwen2-GGUF:Q4_K_M", env=None, source=""):
    path = tmp_path / "inv.yaml"
    path.write_text(INV.replace("MODEL", model).replace("ENV", json.dumps(env or {})).replace("SOURCE", source))
    inv, prof = ops.load(str(path))
    return ops.make_plan(inv, prof)


def _pull(p):
    d = p.deployment
    return next(s for s in d.engine.steps(d) if s.phase == "pull")


@pytest.mark.parametrize("value", ["true", "TRUE", "t", "False", "0", "'1'", " 1 "])
def test_go_booleans_and_quoted_values_are_accepted(tmp_path, value):
    p = _plan(tmp_path, env={"OLLAMA_SCHED_SPREAD": value, "OLLAMA_FLASH_ATTENTION": value})
    assert not [f for f in p.findings if f.code == "env-invalid"]


def test_a_context_length_of_zero_is_ollamas_default_not_an_error(tmp_path):
    p = _plan(tmp_path, env={"OLLAMA_CONTEXT_LENGTH": "0"})
    assert not [f for f in p.findings if f.code == "env-invalid"]


def test_flash_attention_read_as_a_go_boolean(tmp_path):
    p = _plan(tmp_path, env={"OLLAMA_FLASH_ATTENTION": "false"})
    assert eng.flash_attention(p.deployment.setup) is False
    p = _plan(tmp_path, env={"OLLAMA_FLASH_ATTENTION": "True"})
    assert eng.flash_attention(p.deployment.setup) is True


def test_hub_gguf_pulled_from_the_mirror_named_as_registry(tmp_path):
    p = _plan(tmp_path, source="  source: {kind: modelscope, endpoint: \"http://10.77.0.4:8080/\"}\n")
    pull = _pull(p)
    argv = pull.ops[0].argv
    assert argv[5] == eng.PULL_SCRIPT
    assert argv[6:] == ("pull", "http://10.77.0.4:8080/gpucluster/tiny-qwen2-GGUF:Q4_K_M", "11434", "true")
    listed = "10.77.0.4:8080/gpucluster/tiny-qwen2-GGUF:Q4_K_M"
    assert pull.ops[1].argv[-3:] == ("cp", listed, "modelscope.cn/gpucluster/tiny-qwen2-GGUF:Q4_K_M")
    assert pull.check.argv[-2:] == (listed, "modelscope.cn/gpucluster/tiny-qwen2-GGUF:Q4_K_M")
    assert "mirror http://10.77.0.4:8080" in pull.reason


def test_https_mirror_is_not_insecure_and_another_hub_is_not_redirected(tmp_path):
    p = _plan(tmp_path, model="hf.co/gpucluster/tiny-qwen2-GGUF",
              source="  source: {kind: huggingface, endpoint: \"https://hf.lan\"}\n")
    assert _pull(p).ops[0].argv[6:] == ("pull", "https://hf.lan/gpucluster/tiny-qwen2-GGUF", "11434")
    assert _pull(p).check.argv[-2] == "hf.lan/gpucluster/tiny-qwen2-GGUF:latest"
    p = _plan(tmp_path, source="  source: {kind: huggingface, endpoint: \"http://10.77.0.3:8090\"}\n")
    assert _pull(p).ops[0].argv[6:] == ("pull", "modelscope.cn/gpucluster/tiny-qwen2-GGUF:Q4_K_M", "11434")


def test_a_mirror_with_a_path_is_one_located_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        _plan(tmp_path, source="  source: {kind: modelscope, endpoint: \"http://mirror.lan/ms\"}\n")
    assert e.value.field == "deploy.source.endpoint" and "no path" in str(e.value)


def test_pull_script_sends_insecure_only_when_asked(tmp_path):
    """The body the pull script writes (bash /dev/tcp): captured by a one-shot listener."""
    import socket
    import subprocess
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = []

    def serve():
        c, _ = srv.accept()
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
        got.append(data.decode())
        c.sendall(b'HTTP/1.1 200 OK\r\n\r\n{"status":"success"}\n')
        c.close()
    t = threading.Thread(target=serve)
    t.start()
    r = subprocess.run(["bash", "-c", eng.PULL_SCRIPT, "pull", "http://10.77.0.4:8080/a/b:Q4_K_M",
                        str(srv.getsockname()[1]), "true"], capture_output=True, text=True, timeout=30)
    t.join(10)
    srv.close()
    body = json.loads(got[0].split("\r\n\r\n", 1)[1])
    assert body == {"model": "http://10.77.0.4:8080/a/b:Q4_K_M", "insecure": True, "stream": True}
    assert r.returncode == 0, r.stdout
