"""Checks of the committed vLLM flag tables (cluster/knowledge/vllm/*.json).

The tables are generated from the released wheels by scripts/gen_engine_tables.py;
these tests only read the committed JSON (nothing is downloaded).
"""

import json
from pathlib import Path

import pytest

KNOWLEDGE = Path(__file__).resolve().parents[2] / "cluster" / "knowledge" / "vllm"
VERSIONS = ["0.3.0", "0.6.3", "0.10.1.1"]
TOP_KEYS = {"engine", "version", "wheel", "generated_by", "flags", "aliases", "underscores",
            "api_server_module", "serve_subcommand", "env_vars", "architectures", "requires"}
COMMON_FLAGS = [
    "--enforce-eager", "--disable-custom-all-reduce", "--max-num-batched-tokens", "--max-num-seqs",
    "--block-size", "--quantization", "--served-model-name", "--api-key", "--dtype",
    "--kv-cache-dtype", "--gpu-memory-utilization", "--max-model-len", "--trust-remote-code",
    "--download-dir", "--host", "--port", "--tensor-parallel-size", "--pipeline-parallel-size",
]


def _load(version):
    return json.loads((KNOWLEDGE / f"{version}.json").read_text())


def _newest():
    def key(p):
        return tuple(int(x) for x in p.stem.split(".") if x.isdigit())
    files = sorted(KNOWLEDGE.glob("*.json"), key=key)
    return files[-1].stem


@pytest.fixture(scope="module")
def tables():
    return {v: _load(v) for v in VERSIONS + [_newest()]}


def test_newest_is_newer_than_defaults():
    assert _newest() not in VERSIONS


@pytest.mark.parametrize("version", VERSIONS + ["newest"])
def test_shape(version):
    version = _newest() if version == "newest" else version
    d = _load(version)
    assert set(d) == TOP_KEYS
    assert d["engine"] == "vllm" and d["version"] == version
    assert d["wheel"].startswith(f"vllm-{version}-") and d["wheel"].endswith(".whl")
    assert d["generated_by"] == "scripts/gen_engine_tables.py"
    for name, spec in d["flags"].items():
        assert name.startswith("--"), name
        assert set(spec) == {"value", "choices", "type", "nargs"}, name
        if not spec["value"]:
            assert spec["type"] is None and spec["choices"] is None, name
    for alias, target in d["aliases"].items():
        assert target in d["flags"], alias
    for flag in COMMON_FLAGS:
        assert flag in d["flags"], (version, flag)
    assert d["flags"]["--enforce-eager"]["value"] is False
    assert d["flags"]["--trust-remote-code"]["value"] is False
    assert d["flags"]["--tensor-parallel-size"]["type"] == "int"
    assert d["flags"]["--gpu-memory-utilization"]["type"] == "float"
    assert set(d["flags"]["--dtype"]["choices"]) == {"auto", "half", "float16", "bfloat16", "float", "float32"}
    assert d["aliases"]["-tp"] == "--tensor-parallel-size"
    assert d["aliases"]["-pp"] == "--pipeline-parallel-size"
    assert d["aliases"]["-q"] == "--quantization"
    assert "--ray-cluster-address" not in d["flags"]
    assert d["env_vars"] == sorted(d["env_vars"])
    assert "VLLM_API_KEY" in d["env_vars"]
    assert "LlamaForCausalLM" in d["architectures"]
    assert "Qwen2ForCausalLM" in d["architectures"]
    assert d["requires"]["torch"].startswith("==")


def test_v0_3_0(tables):
    d = tables["0.3.0"]
    f = d["flags"]
    for flag in ("--worker-use-ray", "--max-paddings", "--max-context-len-to-capture", "--swap-space"):
        assert flag in f, flag
    for flag in ("--distributed-executor-backend", "--enable-chunked-prefill", "--enable-prefix-caching",
                 "--cpu-offload-gb", "--max-seq-len-to-capture", "--config"):
        assert flag not in f, flag
    assert f["--worker-use-ray"]["value"] is False
    assert f["--swap-space"]["type"] == "int"
    assert f["--block-size"]["choices"] == [8, 16, 32]
    assert f["--quantization"]["choices"] == ["awq", "gptq", "squeezellm"]
    assert f["--kv-cache-dtype"]["choices"] == ["auto", "fp8_e5m2"]
    assert f["--served-model-name"]["nargs"] is None          # one value only in 0.3.0
    assert d["underscores"] is False
    assert d["serve_subcommand"] is False
    assert d["api_server_module"] == "vllm.entrypoints.openai.api_server"
    assert "VLLM_HOST_IP" not in d["env_vars"] and "HOST_IP" not in d["env_vars"]
    assert "Qwen3ForCausalLM" not in d["architectures"]
    assert d["requires"] == {"ray": ">=2.9", "torch": "==2.1.2", "transformers": ">=4.37.0",
                             "xformers": "==0.0.23.post1"}


def test_v0_6_3(tables):
    d = tables["0.6.3"]
    f = d["flags"]
    assert {"ray", "mp"} <= set(f["--distributed-executor-backend"]["choices"])
    for flag in ("--worker-use-ray", "--swap-space", "--cpu-offload-gb", "--enable-chunked-prefill",
                 "--enable-prefix-caching", "--max-seq-len-to-capture", "--config"):
        assert flag in f, flag
    assert "--max-paddings" not in f
    assert f["--served-model-name"]["nargs"] == "+"
    assert d["underscores"] is True
    assert d["serve_subcommand"] is True
    # 0.6.3 reads VLLM_HOST_IP, falling back to HOST_IP
    assert "VLLM_HOST_IP" in d["env_vars"] and "HOST_IP" in d["env_vars"]
    assert d["requires"]["torch"] == "==2.4.0"


def test_v0_10_1_1(tables):
    d = tables["0.10.1.1"]
    f = d["flags"]
    assert "--worker-use-ray" not in f
    assert set(f["--distributed-executor-backend"]["choices"]) == {"ray", "mp", "uni", "external_launcher"}
    for flag in ("--swap-space", "--cpu-offload-gb", "--max-seq-len-to-capture", "--config",
                 "--enable-chunked-prefill", "--no-enable-chunked-prefill",
                 "--enable-prefix-caching", "--no-enable-prefix-caching"):
        assert flag in f, flag
    assert f["--no-enable-prefix-caching"]["value"] is False
    assert d["underscores"] is True
    assert d["serve_subcommand"] is True
    # HOST_IP is only tested to warn that it is ignored from here on
    assert "VLLM_HOST_IP" in d["env_vars"] and "HOST_IP" not in d["env_vars"]
    assert "Qwen3ForCausalLM" in d["architectures"]
    assert d["requires"]["torch"] == "==2.7.1"


def test_newest(tables):
    d = tables[_newest()]
    f = d["flags"]
    for flag in ("--worker-use-ray", "--swap-space", "--max-seq-len-to-capture", "--max-paddings"):
        assert flag not in f, flag
    for flag in ("--distributed-executor-backend", "--cpu-offload-gb", "--enable-chunked-prefill",
                 "--enable-prefix-caching", "--config", "--nnodes", "--node-rank", "--master-addr"):
        assert flag in f, flag
    assert d["underscores"] is True
    assert d["serve_subcommand"] is True
    assert "VLLM_HOST_IP" in d["env_vars"]
