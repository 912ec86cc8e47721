"""Ollama (issue 12 part 2, plan level; part 4's alternatives): one host and all its GPUs, the environment gpucluster
sets, GGUF facts (curated, hub listing + header), the memory check, the pull through Ollama's API with progress,
readiness and the /api/ps check, the runbook, and alternatives that propose Ollama where no vLLM image fits."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cluster import alternatives, config, engines, gguf, hub, models, ops
from cluster import plan as planner
from cluster.config import Source
from cluster.engines import ollama as eng
from cluster.errors import ConfigError
from cluster.executor import EventLines, Result
from cluster.knowledge import ollama as knowledge

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "inventories" / "ollama-1node.yaml")
V100 = str(ROOT / "inventories" / "v100-3node.yaml")
PROFILE = "ollama-0.32.15"
ONE_V100 = """\
cluster: {name: v100-one, model_dir: /Data/models}
hosts:
  - {name: gpu208, address: 172.18.8.208, gpus: {count: 2, name: Tesla V100-PCIE-16GB, memory_mib: 16160, compute_capability: "7.0"}}
deploy: {profile: vllm-v0.19.1, model: Qwen/Qwen3-32B, engine_args: {max-model-len: 8192}}
"""


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cluster", *args], capture_output=True, text=True, cwd=ROOT)


def _inventory(tmp_path, text: str, name: str = "inv.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _with(tmp_path, *, model: str | None = None, env: dict | None = None, profile: str = PROFILE) -> str:
    """The example inventory with another model and/or env."""
    text = Path(EXAMPLE).read_text().replace("profile: ollama-0.32.15", f"profile: {profile}")
    if model:
        text = text.replace("model: modelscope.cn/Qwen/Qwen3-32B-GGUF:Q4_K_M", f"model: {model}")
    if env is not None:
        text = text.split("  env:\n")[0] + "  env: " + json.dumps(env) + "\n"
    return _inventory(tmp_path, text)


def _plan(path: str, **kw):
    inv, prof = ops.load(path, profile=kw.pop("profile", None))
    return ops.make_plan(inv, prof, **kw)


@pytest.fixture(scope="module")
def example():
    inv, prof = ops.load(EXAMPLE)
    return ops.make_plan(inv, prof)


# ---------------------------------------------------------------- the example: one V100 host, Qwen3-32B 4-bit GGUF
def test_example_plans_ok(example):
    p = example
    assert p.verdict == "ok", [f.as_dict() for f in p.findings]
    assert (p.profile.engine, p.profile.version, p.profile.image) == ("ollama", "0.32.15", "ollama/ollama:0.32.15")
    assert (p.topology.tp, p.topology.pp, p.topology.nodes) == (1, 1, ("gpu208",))
    d = p.deployment
    spec = d.engine.container(d, d.head)
    assert (spec.entrypoint, spec.command, spec.gpus, spec.network) == ("/bin/ollama", ("serve",), "all", "host")
    assert dict(spec.env) == {"OLLAMA_HOST": "0.0.0.0:11434", "OLLAMA_MODELS": "/Data/models/ollama",
                              "OLLAMA_SCHED_SPREAD": "1", "OLLAMA_KEEP_ALIVE": "-1m",
                              "OLLAMA_CONTEXT_LENGTH": "32768"}
    assert spec.mounts == (("/Data/models/ollama", "/Data/models/ollama", "rw"),)
    assert set(d.engine.containers(d)) == {"gpu208"}
    m = p.memory
    assert m.generation == "ollama" and m.dtype == "Q4_K_M" and m.max_model_len == 32768
    assert m.token_capacity >= 32768 and abs(m.weights - 19762149024 / 2) < 2


def test_model_facts_offline_from_the_curated_table():
    f = models.load("modelscope.cn/Qwen/Qwen3-32B-GGUF:q4_k_m", source=Source())     # the quant: any case
    assert (f.weight_bytes, f.layers, f.kv_heads, f.head_dim, f.max_positions) == (19762149024, 64, 8, 128, 40960)
    f = models.load("qwen3:32b", source=Source())
    assert (f.id, f.dtype, f.weight_bytes) == ("qwen3:32b", "Q4_K_M", 20_200_000_000)
    assert models.load("hf.co/acme/unknown-GGUF:Q4_K_M", source=Source()) is None      # offline, not cached


def test_env_values_exact_and_user_values_kept(tmp_path):
    p = _plan(_with(tmp_path, env={"OLLAMA_KEEP_ALIVE": "24h", "OLLAMA_SCHED_SPREAD": "0",
                                   "OLLAMA_CONTEXT_LENGTH": "8192", "OLLAMA_NUM_PARALLEL": "2"}))
    assert p.verdict == "ok", [f.as_dict() for f in p.findings]
    env = dict(p.deployment.engine.container(p.deployment, p.deployment.head).env)
    assert (env["OLLAMA_KEEP_ALIVE"], env["OLLAMA_SCHED_SPREAD"], env["OLLAMA_CONTEXT_LENGTH"]) == ("24h", "0", "8192")
    assert p.memory.max_model_len == 16384                       # 8192 tokens x 2 parallel sequences


def test_a_secret_env_value_reaches_the_server_only_through_its_mounted_file(tmp_path, monkeypatch):
    from cluster.containers import WITH_SECRETS
    from cluster.steps import Put
    monkeypatch.setenv("GC_OLLAMA_PROXY", "http://user:pw-secret-77@proxy:3128")
    p = _plan(_with(tmp_path, env={"HTTPS_PROXY": {"env": "GC_OLLAMA_PROXY"}, "OLLAMA_KEEP_ALIVE": "24h"}))
    assert p.verdict == "ok", [f.as_dict() for f in p.findings]
    d = p.deployment
    spec = d.engine.container(d, d.head)
    assert "HTTPS_PROXY" not in dict(spec.env) and dict(spec.env)["OLLAMA_KEEP_ALIVE"] == "24h"
    assert spec.entrypoint == "sh" and spec.command[:3] == ("-c", WITH_SECRETS, "/run/gpucluster/env")
    assert spec.command[3:] == ("/bin/ollama", "serve")
    step = next(s for s in p.steps if s.phase == "engine")
    assert isinstance(step.ops[0], Put) and step.ops[0].mode == 0o600
    assert "HTTPS_PROXY=http://user:pw-secret-77@proxy:3128\n" in step.ops[0].content()
    assert "pw-secret-77" not in json.dumps(p.as_dict()) + json.dumps([s.as_dict() for s in p.steps])


@pytest.mark.parametrize("key, value, needle", [
    ("OLLAMA_SCHED_SPREAD", "yes", "1\" or \"0"), ("OLLAMA_SCHED_SPREAD", "off", "'off'"),
    ("OLLAMA_KEEP_ALIVE", "300", "unit"), ("OLLAMA_KEEP_ALIVE", "5 minutes", "unit"),
    ("OLLAMA_CONTEXT_LENGTH", "8k", "positive integer"), ("OLLAMA_KV_CACHE_TYPE", "q5_1", "q8_0"),
])
def test_env_value_that_ollama_would_misread_is_an_error(tmp_path, key, value, needle):
    p = _plan(_with(tmp_path, env={key: value}))
    f = next(x for x in p.findings if x.code == "env-invalid")
    assert f.severity == "error" and key in f.message and needle in f.message + f.fix and "\n" not in f.message


# ---------------------------------------------------------------- memory
def test_gguf_larger_than_the_gpus_is_a_memory_error(tmp_path):
    path = _with(tmp_path, model="qwen3:32b-q8_0")
    p = _plan(path)
    assert p.verdict == "fail"
    f = next(x for x in p.findings if x.code == "weights-exceed-memory")
    assert f.severity == "error" and "qwen3:32b-q8_0" in f.message and "CPU" in f.message
    assert "quantization" in f.fix
    r = _cli("plan", path)
    assert r.returncode == 1 and "ERROR   weights-exceed-memory" in r.stdout


def test_a_context_set_too_large_is_an_error_naming_one_that_fits(tmp_path):
    p = _plan(_with(tmp_path, env={"OLLAMA_CONTEXT_LENGTH": "40960", "OLLAMA_NUM_PARALLEL": "4"}))
    f = next(x for x in p.findings if x.code == "ollama-cpu-offload")
    fit = int(re.search(r'OLLAMA_CONTEXT_LENGTH: "(\d+)"', f.fix).group(1))
    assert f.severity == "error" and fit % 1024 == 0
    ok = _plan(_with(tmp_path, env={"OLLAMA_CONTEXT_LENGTH": str(fit), "OLLAMA_NUM_PARALLEL": "4"}))
    assert not [x for x in ok.findings if x.severity == "error"], [x.as_dict() for x in ok.findings]


def test_without_flash_attention_the_default_context_is_lowered_to_what_fits(tmp_path):
    p = _plan(_with(tmp_path, env={"OLLAMA_FLASH_ATTENTION": "0"}))
    f = next(x for x in p.findings if x.code == "ollama-context-lowered")
    assert f.severity == "warning" and "32768" in f.message
    ctx = int(dict(p.deployment.engine.container(p.deployment, p.deployment.head).env)["OLLAMA_CONTEXT_LENGTH"])
    assert 2048 <= ctx < 32768 and ctx % 1024 == 0 and p.memory.token_capacity >= ctx


@pytest.mark.parametrize("version, gpus, expect", [
    ("0.6.6", 2, 2048), ("0.6.7", 2, 4096), ("0.15.4", 2, 4096), ("0.15.5", 1, 4096), ("0.15.5", 2, 32768),
    ("0.32.15", 4, 262144),
])
def test_default_context_follows_the_release(example, version, gpus, expect):
    s = example.deployment.setup
    host = dataclasses.replace(s.hosts[0], gpus=dataclasses.replace(s.hosts[0].gpus, count=gpus))
    s = dataclasses.replace(s, facts=knowledge.facts(version), hosts=(host,))
    assert eng.default_context(s) == expect
    assert eng.context_length(s)[0] <= 40960                  # capped at the model's trained context


# ---------------------------------------------------------------- inputs refused, in one line
def test_multi_host_is_refused_with_the_fix():
    inv, prof = ops.load(V100, profile=PROFILE)
    with pytest.raises(ConfigError) as e:
        ops.make_plan(inv, prof)
    msg = str(e.value)
    assert msg.startswith(f"{V100}: hosts: Ollama serves from one host; the inventory lists 3") and "\n" not in msg
    assert "--hosts gpu208" in e.value.fix


def test_one_host_picked_from_a_multi_host_inventory_is_accepted():
    inv, prof = ops.load(V100, profile=PROFILE, hosts=["gpu209"], model="qwen3:14b")
    inv = dataclasses.replace(inv, deploy=dataclasses.replace(inv.deploy, engine_args={}, tensor_parallel=None,
                                                              pipeline_parallel=None))
    p = ops.make_plan(inv, prof)
    assert p.verdict == "ok" and p.topology.nodes == ("gpu209",)


@pytest.mark.parametrize("model, needle", [
    ("Qwen/Qwen3-32B", "use deploy.model: qwen3:32b (Q4_K_M GGUF)"),
    ("/data/models/Qwen3-32B", "an Ollama name"),
    ("qwen3:32b; rm -rf /", "e.g. qwen3:32b"),
])
def test_a_model_ollama_cannot_pull_is_refused(tmp_path, model, needle):
    inv, prof = ops.load(_with(tmp_path, model=json.dumps(model)))
    with pytest.raises(ConfigError) as e:
        planner.build(inv, prof, model=None)                   # the engine's own check, before any lookup
    assert "deploy.model" in str(e.value) and needle in (e.value.fix or "")


@pytest.mark.parametrize("extra, needle", [
    ("  api_key: {env: KEY}\n", "without authentication"),
    ("  engine_args: {max-model-len: 8192}\n", "OLLAMA_CONTEXT_LENGTH"),
    ("  tensor_parallel: 2\n", "no tensor or pipeline parallelism"),
])
def test_inputs_ollama_has_no_use_for_are_refused(tmp_path, extra, needle):
    text = Path(EXAMPLE).read_text().replace("  served_model_name: qwen3-32b\n", "  served_model_name: qwen3-32b\n" + extra)
    with pytest.raises(ConfigError) as e:
        _plan(_inventory(tmp_path, text))
    assert needle in str(e.value) + (e.value.fix or "") and "\n" not in str(e.value)


def test_managed_env_is_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        _plan(_with(tmp_path, env={"OLLAMA_HOST": "0.0.0.0:1"}))
    assert "gpucluster sets OLLAMA_HOST itself" in str(e.value) and "deploy.port" in e.value.fix


def test_unknown_release_is_one_located_error(tmp_path):
    path = tmp_path / "old-ollama.yaml"
    path.write_text("engine: ollama\nimage: ollama/ollama:0.4.0\n")
    inv = config.load_inventory(EXAMPLE)
    with pytest.raises(ConfigError) as e:
        planner.build(inv, config.load_profile(str(path)), model=None)
    assert str(e.value).startswith(f"{path}:2: image: no engine data for ollama 0.4.0") and "0.5.13" in e.value.fix


# ---------------------------------------------------------------- image knowledge
def test_every_release_runs_on_sm70_through_its_cuda12_runner():
    versions = knowledge.versions()
    assert versions[0] == "0.5.13" and versions[-1] == "0.32.15" and len(versions) == 130
    for v in versions:
        f = engines.get("ollama").facts(v)
        assert f.runs_on((7, 0)) and f.runs_on((9, 0)) and not f.runs_on((3, 7)) and f.cuda == "12.8", v
    assert "cuda_v13" in knowledge.image("0.11.11")["runners"] and "cuda_v13" not in knowledge.image("0.11.10")["runners"]
    assert "75-virtual" in knowledge.image("0.32.15")["runners"]["cuda_v13"].split(": ")[1].split(";")[0]
    assert (knowledge.facts("0.30.10").min_driver, knowledge.facts("0.30.11").min_driver) == ("531", "550")
    assert engines.get("ollama").image("0.32.15") == "ollama/ollama:0.32.15"          # no "v" on Docker Hub
    assert all(img.get("confirmed") is False and img.get("sources") for img in knowledge.curated()["images"])
    p = config.load_profile(PROFILE)
    assert (p.engine, p.version, p.port) == ("ollama", "0.32.15", 11434)


# ---------------------------------------------------------------- steps: pull, readiness, /api/ps; the runbook
def test_steps_pull_then_readiness(example):
    d = example.deployment
    steps = d.engine.steps(d)
    assert [s.phase for s in steps] == ["engine", "engine-api", "pull", "ready", "ready", "ready"]
    api, pull, tags, chat, vram = steps[1:]
    assert api.ops[0].url == "http://172.18.8.208:11434/api/tags" and api.ops[0].until
    argv = pull.ops[0].argv
    assert argv[:5] == ("docker", "exec", "gpucluster-v100-ollama-ollama", "bash", "-c")
    assert argv[5] == eng.PULL_SCRIPT and argv[6:] == ("pull", "modelscope.cn/Qwen/Qwen3-32B-GGUF:Q4_K_M", "11434")
    assert pull.ops[0].stream and pull.ops[0].timeout is None
    assert pull.ops[1].argv[-3:] == ("cp", "modelscope.cn/Qwen/Qwen3-32B-GGUF:Q4_K_M", "qwen3-32b")
    assert pull.check.argv[-2:] == ("modelscope.cn/Qwen/Qwen3-32B-GGUF:Q4_K_M", "qwen3-32b:latest")
    assert tags.ops[0].url.endswith("/api/tags") and tags.ops[0].expect == '"qwen3-32b:latest"'
    assert chat.ops[0].url == "http://172.18.8.208:11434/v1/chat/completions" and chat.ops[0].expect == '"choices"'
    assert json.loads(chat.ops[0].body)["model"] == "qwen3-32b"
    assert vram.ops[0].argv[5] == eng.PS_SCRIPT and vram.ops[0].argv[6:] == ("ps", "qwen3-32b:latest", "11434")
    assert d.engine.model_steps(d) == [] and d.engine.image_check_steps(d) == []


def test_plan_has_no_torch_check_and_no_hub_download(example):
    phases = {s.phase for s in example.steps}
    assert not phases & {"image-check", "model", "model-download", "model-serve", "model-copy", "model-done"}


def _sections(runbook: str) -> list[tuple[str, str]]:
    return re.findall(r"^# ==== phase (\S+) on (?:host (\S+) \(|this machine)", runbook, re.M)


def test_runbook_has_the_pull_and_the_readiness():
    r = _cli("plan", EXAMPLE, "--format", "sh")
    assert r.returncode == 0, r.stderr
    phases = [p for p, _ in _sections(r.stdout)]
    assert phases.index("engine") < phases.index("engine-api") < phases.index("pull") < phases.index("ready")
    assert "POST /api/pull HTTP/1.0" in r.stdout and " pull modelscope.cn/Qwen/Qwen3-32B-GGUF:Q4_K_M 11434" in r.stdout
    assert "http://172.18.8.208:11434/api/tags" in r.stdout
    assert "http://172.18.8.208:11434/v1/chat/completions" in r.stdout and "GET /api/ps" in r.stdout
    assert "-e OLLAMA_SCHED_SPREAD=1" in r.stdout and "-e OLLAMA_KEEP_ALIVE=-1m" in r.stdout
    assert subprocess.run(["bash", "-n"], input=r.stdout, text=True).returncode == 0


def test_runbook_runs_by_hand(tmp_path, example):
    """`plan --format sh` runs as a script (docker and curl stubbed out, paths under tmp_path) to its end."""
    from cluster import render
    bin_dir, work, root = tmp_path / "bin", tmp_path / "work", tmp_path / "root"
    bin_dir.mkdir()
    work.mkdir()
    for tool in ("docker", "curl"):
        (bin_dir / tool).write_text(f"#!/bin/sh\nprintf '%s\\0' {tool} \"$@\" >> {tmp_path}/calls.log\n"
                                    f'[ {tool} = curl ] && cat {tmp_path}/answer\nexit 0\n')
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "answer").write_text(json.dumps({"models": [{"name": "qwen3-32b:latest"}], "choices": []}))
    steps = [step for part in ops.up_steps(example) for step in part]
    text = render.runbook(example, steps).replace("/var/lib/gpucluster", f"{root}/var").replace(
        "/Data/models", f"{root}/models").replace("/tmp/gpucluster-", f"{root}/lock-")
    (tmp_path / "runbook.sh").write_text(text)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "GPUCLUSTER_TRANSFER_TOKEN": "t"}
    r = subprocess.run(["bash", str(tmp_path / "runbook.sh")], cwd=work, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    calls = (tmp_path / "calls.log").read_text().split("\0")
    pull = next(i for i, c in enumerate(calls) if c == "pull" and calls[i - 1] == eng.PULL_SCRIPT)
    assert calls[pull + 1:pull + 3] == ["modelscope.cn/Qwen/Qwen3-32B-GGUF:Q4_K_M", "11434"]
    run = next(i for i, c in enumerate(calls) if c == "run" and calls[i + 1] == "-d")
    assert run < pull < calls.index("http://172.18.8.208:11434/v1/chat/completions")


# ---------------------------------------------------------------- the scripts, against a fake Ollama on 127.0.0.1
class FakeOllama:
    """/api/pull (NDJSON progress, as Go writes it) and /api/ps on 127.0.0.1."""

    def __init__(self, size_vram: int = 20_000_000_000):
        fake = self
        self.size_vram = size_vram

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                lines = [{"status": "pulling manifest"}]
                if body["model"] == "missing:1b":
                    lines.append({"error": "pull model manifest: file does not exist"})
                else:
                    lines += [{"status": "pulling 3291abe70f16", "digest": "sha256:3291abe70f16", "total": 20 * 10**9,
                               "completed": c * 10**9} for c in (0, 5, 10, 20)]
                    lines += [{"status": "pulling eb4402837c78", "digest": "sha256:eb44", "total": 1500,
                               "completed": 1500}, {"status": "verifying sha256 digest"}, {"status": "success"}]
                for line in lines:
                    self.wfile.write((json.dumps(line, separators=(",", ":")) + "\n").encode())
                    self.wfile.flush()

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps({"models": [
                    {"name": "other:latest", "size": 5, "size_vram": 5},
                    {"name": "qwen3-32b:latest", "model": "qwen3-32b:latest", "size": 20 * 10**9, "digest": "x",
                     "details": {"parameter_size": "32.8B", "families": ["qwen3"]}, "size_vram": fake.size_vram,
                     "context_length": 32768}]}, separators=(",", ":")).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = str(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    f = FakeOllama()
    yield f
    f.stop()


def _feed(script: str, *args: str):
    """Run a script the way `up` does (docker exec ... bash -c SCRIPT ARGS), its lines through EventLines."""
    said: list[str] = []
    events = EventLines("gpu208", said.append)
    r = subprocess.run(["bash", "-c", script, *args], capture_output=True, text=True, timeout=30)
    for line in r.stdout.splitlines():
        events.feed(line)
    return r, events, said


def test_pull_reports_progress_and_fails_on_an_error(fake):
    r, events, said = _feed(eng.PULL_SCRIPT, "pull", "qwen3:32b", fake.port)
    assert r.returncode == 0 and not events.error and events.summary == "pulled qwen3:32b"
    assert said[:2] == ["gpu208: pulling manifest", "gpu208: downloading 1 of 1 file(s) (20.0 GB)"]
    assert said[-1].startswith("gpu208: download: 20.0 GB / 20.0 GB, "), said       # the meter's last line
    assert "gpu208: success" in said and not any("1.5 KB" in s or "eb44" in s for s in said)   # small layers quiet
    r, events, _ = _feed(eng.PULL_SCRIPT, "pull", "missing:1b", fake.port)
    assert r.returncode == 1 and events.error == "ollama pull missing:1b: pull model manifest: file does not exist"
    r, events, _ = _feed(eng.PULL_SCRIPT, "pull", "qwen3:32b", "1")
    assert r.returncode == 1 and "cannot reach Ollama" in events.error


def test_api_ps_warns_on_cpu_fallback_and_passes_when_all_in_vram(fake):
    r, events, said = _feed(eng.PS_SCRIPT, "ps", "Qwen3-32B:latest", fake.port)       # names compare like Ollama's
    assert r.returncode == 0 and said == ["gpu208: Qwen3-32B:latest: 100% in GPU memory (19073 MiB, context 32768)"]
    fake.size_vram = 15 * 10**9
    r, events, said = _feed(eng.PS_SCRIPT, "ps", "qwen3-32b:latest", fake.port)
    assert r.returncode == 0 and said[0].startswith("gpu208: WARNING: qwen3-32b:latest runs 25% on the CPU")
    assert events.summary == "WARNING: 25% of qwen3-32b:latest on the CPU"
    r, events, said = _feed(eng.PS_SCRIPT, "ps", "absent:latest", fake.port)
    assert r.returncode == 0 and "is not loaded" in said[0]


def test_pull_check_skips_only_when_both_names_are_the_same_model(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ollama").write_text("#!/bin/sh\ncat <<'EOF'\nNAME                                        ID              SIZE      MODIFIED\n"
                                    "modelscope.cn/Qwen/Qwen3-32B-GGUF:Q4_K_M    aaaa1111bbbb    19 GB     1 minute ago\n"
                                    "qwen3-32b:latest                            aaaa1111bbbb    19 GB     1 minute ago\n"
                                    "old:latest                                  cccc2222dddd    1 GB      1 day ago\nEOF\n")
    (bin_dir / "ollama").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}

    def check(*names):
        return subprocess.run(["sh", "-c", eng.HAVE_SCRIPT, *names], capture_output=True, text=True, env=env).stdout
    assert check("modelscope.cn/Qwen/Qwen3-32B-GGUF:q4_k_m", "QWEN3-32B:latest").startswith("skip present")
    assert check("modelscope.cn/Qwen/Qwen3-32B-GGUF:Q4_K_M", "old:latest").startswith("run")
    assert check("qwen3:32b", "qwen3:32b").startswith("run")


# ---------------------------------------------------------------- status and logs
def test_status_and_logs(example):
    d = example.deployment

    def run(host, argv):
        if argv[1] == "inspect":
            return Result(rc=0, stdout="running\n")
        return Result(rc=0, stdout='{"ev":"note","msg":"qwen3-32b:latest: 100% in GPU memory (19073 MiB)"}\n')
    state, summary, problems = d.engine.status(d, run)
    assert state == {"server": "running"} and problems == []
    assert summary == ["ollama: qwen3-32b:latest: 100% in GPU memory (19073 MiB)"]
    state, summary, problems = d.engine.status(d, lambda h, a: Result(rc=1, stdout=""))
    assert problems == ["gpu208: Ollama (gpucluster-v100-ollama-ollama) is missing"]
    logs = d.engine.logs(d, tail=50, follow=True)
    assert [(s.host, s.component, s.argv[-1]) for s in logs] == [("gpu208", "server", "gpucluster-v100-ollama-ollama")]


# ---------------------------------------------------------------- alternatives (part 4)
def test_alternatives_for_qwen3_32b_on_two_v100s_include_ollama(tmp_path):
    path = _inventory(tmp_path, ONE_V100)
    inv = config.load_inventory(path)
    model = models.load(inv.deploy.model)
    found = alternatives.search(inv, model, engine="vllm", limit=4)
    assert found and all(a.profile.engine == "ollama" for a in found)      # no vLLM image fits 65 GB of bf16
    a = found[0]
    assert (a.profile.name, a.shipped, a.model, a.tp, a.pp, a.engine_args) == (PROFILE, True, "qwen3:32b", 1, 1, {})
    assert a.as_dict()["model"] == "qwen3:32b" and "in place of Qwen/Qwen3-32B" in a.why
    r = _cli("plan", path)
    assert r.returncode == 1 and "--profile ollama-0.32.15 --tp 1 --pp 1" in r.stdout
    inv2, prof = ops.load(path, profile="auto")                                 # --profile auto takes it
    assert (prof.name, inv2.deploy.model, inv2.deploy.engine_args) == (PROFILE, "qwen3:32b", {})
    assert ops.make_plan(inv2, prof).verdict == "ok"


def test_sglang_never_proposed_below_cc_75(tmp_path):
    inv = config.load_inventory(_inventory(tmp_path, ONE_V100))
    model = models.load(inv.deploy.model)
    for engine in ("sglang", "vllm", "ollama"):
        found = alternatives.search(inv, model, engine=engine, limit=3)
        assert found and all(a.profile.engine != "sglang" for a in found), engine


def test_ollama_is_not_proposed_for_several_hosts_nor_vllm_for_an_ollama_name(tmp_path):
    inv = config.load_inventory(V100)
    inv = dataclasses.replace(inv, deploy=dataclasses.replace(inv.deploy, model="Qwen/Qwen3-32B", engine_args={},
                                                              tensor_parallel=None, pipeline_parallel=None))
    found = alternatives.search(inv, models.load("Qwen/Qwen3-32B"), limit=3)
    assert found and all(a.profile.engine == "vllm" for a in found)
    inv = config.load_inventory(EXAMPLE)
    found = alternatives.search(inv, models.load(inv.deploy.model, source=inv.deploy.source), engine="vllm", limit=2)
    assert found and all(a.profile.engine == "ollama" and a.model is None for a in found)


# ---------------------------------------------------------------- references and GGUF facts from a hub
@pytest.mark.parametrize("text, kind, repo, tag, listed", [
    ("qwen3:32b", "library", "qwen3", "32b", "qwen3:32b"),
    ("qwen3", "library", "qwen3", None, "qwen3:latest"),
    ("huihui_ai/qwen3-abliterated:32b", "library", "huihui_ai/qwen3-abliterated", "32b",
     "huihui_ai/qwen3-abliterated:32b"),
    ("hf.co/unsloth/Qwen3-32B-GGUF:Q4_K_M", "huggingface", "unsloth/Qwen3-32B-GGUF", "Q4_K_M", None),
    ("hf-mirror.com/unsloth/Qwen3-32B-GGUF:Q4_K_M", "hf-mirror", "unsloth/Qwen3-32B-GGUF", "Q4_K_M", None),
    ("modelscope.cn/Qwen/Qwen3-32B-GGUF", "modelscope", "Qwen/Qwen3-32B-GGUF", None,
     "modelscope.cn/Qwen/Qwen3-32B-GGUF:latest"),
])
def test_references(text, kind, repo, tag, listed):
    r = gguf.parse(text)
    assert (r.kind, r.repo, r.tag, r.listed) == (kind, repo, tag, listed or text)
    assert gguf.is_ref(text) == (r.host is not None or tag is not None)


@pytest.mark.parametrize("text", ["", "/data/x.gguf", "qwen3:32b; rm -rf /", "hf.co/justrepo:Q4", "a/b/c", "q:$(x)"])
def test_not_references(text):
    with pytest.raises(ValueError):
        gguf.parse(text)
    assert not gguf.is_ref(text)
    assert not gguf.is_ref("Qwen/Qwen3-32B") and not gguf.is_ref("gpt2")      # hub ids stay hub ids


def test_choose_the_quant_file():
    listing = {"Qwen3-32B-Q4_K_M.gguf": 10, "Qwen3-32B-UD-Q4_K_M.gguf": 11, "Qwen3-32B-Q8_0.gguf": 20,
               "mmproj-F16.gguf": 1, "README.md": 1,
               "Q6_K/Qwen3-32B-Q6_K-00001-of-00002.gguf": 5, "Q6_K/Qwen3-32B-Q6_K-00002-of-00002.gguf": 6}
    assert gguf.choose(listing, None) == ["Qwen3-32B-Q4_K_M.gguf"]
    assert gguf.choose(listing, "q8_0") == ["Qwen3-32B-Q8_0.gguf"]
    assert gguf.choose(listing, "Q6_K") == ["Q6_K/Qwen3-32B-Q6_K-00001-of-00002.gguf",
                                            "Q6_K/Qwen3-32B-Q6_K-00002-of-00002.gguf"]
    assert gguf.choose(listing, "Qwen3-32B-Q8_0.gguf") == ["Qwen3-32B-Q8_0.gguf"]
    with pytest.raises(ValueError, match="no IQ2_XS GGUF.*Q4_K_M, Q6_K, Q8_0"):
        gguf.choose(listing, "IQ2_XS")


def gguf_file(arch: str = "qwen3", tokens: int = 150_000, tail: int = 1000) -> bytes:
    """A GGUF v3 file: the architecture's sizes first, then a tokenizer of `tokens` strings, then `tail` bytes."""
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    def kv_u32(key: str, v: int) -> bytes:
        return s(key) + struct.pack("<II", 4, v)
    entries = [s("general.architecture") + struct.pack("<I", 8) + s(arch), kv_u32("general.file_type", 15),
               kv_u32(f"{arch}.block_count", 4), kv_u32(f"{arch}.context_length", 8192),
               kv_u32(f"{arch}.embedding_length", 512), kv_u32(f"{arch}.attention.head_count", 8),
               s(f"{arch}.attention.head_count_kv") + struct.pack("<IIQ", 9, 5, 4) + struct.pack("<4i", 2, 2, 4, 2),
               kv_u32(f"{arch}.attention.key_length", 64),
               s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, tokens) + b"".join(s(f"t{i}") for i in range(tokens))]
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries)) + b"".join(entries) + b"\0" * tail


def test_read_header_stops_once_it_has_what_it_needs():
    data = gguf_file()
    kv = gguf.read_header(data[:4096], final=False)
    assert kv == {"general.architecture": "qwen3", "block_count": 4, "context_length": 8192, "embedding_length": 512,
                  "attention.head_count": 8, "attention.head_count_kv": 4, "attention.key_length": 64,
                  "tokens": 150_000, "file_type": 15}
    assert gguf.read_header(data[:40], final=False) is None
    for bad, needle in ((b"GGML" + data[4:], "magic"), (data[:40], "general.architecture")):
        with pytest.raises(ValueError, match=needle):
            gguf.read_header(bad)


class GGUFHub:
    """HF-style and ModelScope-style answers on 127.0.0.1 for repositories {repo: {path: bytes}}."""

    SHA = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repos: dict[str, dict[str, bytes]], honour_range: bool = True):
        hub_ = self
        self.log: list[tuple[str, str | None]] = []

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                hub_.log.append((self.path, rng))
                status, body, headers = hub_.answer(self.path, rng)
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

        self.repos, self.honour_range = repos, honour_range
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def _file(self, repo, path, rng):
        data = self.repos[repo][path]
        if rng and self.honour_range:
            a, _, b = rng[6:].partition("-")
            a, b = int(a), min(int(b), len(data) - 1)
            return 206, data[a:b + 1], {"Content-Range": f"bytes {a}-{b}/{len(data)}"}
        return 200, data, {}

    def answer(self, raw, rng):
        u = urllib.parse.urlsplit(raw)
        q = {k: v[0] for k, v in urllib.parse.parse_qs(u.query).items()}
        parts = [urllib.parse.unquote(p) for p in u.path.split("/") if p]
        if parts[:3] == ["api", "v1", "models"]:
            repo = "/".join(parts[3:5])
            if parts[5:] == ["repo", "files"]:
                files = [{"Path": p, "Type": "blob", "Size": len(b)} for p, b in self.repos[repo].items()]
                return 200, json.dumps({"Code": 200, "Success": True, "Data": {"Files": files}}).encode(), {}
            return self._file(repo, q["FilePath"], rng)
        if parts[:2] == ["api", "models"]:
            repo = "/".join(parts[2:4])
            if parts[4] == "revision":
                return 200, json.dumps({"sha": self.SHA, "siblings": [{"rfilename": p} for p in self.repos[repo]]}
                                       ).encode(), {}
            return 200, json.dumps([{"type": "file", "path": p, "size": len(b)} for p, b in self.repos[repo].items()]
                                   ).encode(), {}
        return self._file("/".join(parts[:2]), "/".join(parts[4:]), rng)


@pytest.mark.hub_online
@pytest.mark.parametrize("kind, honour_range", [("huggingface", True), ("modelscope", True), ("huggingface", False)])
def test_hub_gguf_facts_from_listing_and_header(tmp_path, monkeypatch, kind, honour_range):
    monkeypatch.setenv("GPUCLUSTER_CACHE_DIR", str(tmp_path / "cache"))
    hub.forget()
    part = gguf_file()
    h = GGUFHub({"acme/tiny-GGUF": {"tiny-Q8_0.gguf": b"x" * 10, "README.md": b"hi",
                                    "tiny-Q4_K_M-00001-of-00002.gguf": part,
                                    "tiny-Q4_K_M-00002-of-00002.gguf": b"\0" * 5000}}, honour_range)
    try:
        ref = ("hf.co" if kind == "huggingface" else "modelscope.cn") + "/acme/tiny-GGUF:q4_k_m"
        src = Source(kind=kind, endpoint=h.url)
        f = models.load(ref, source=src)
        assert (f.layers, f.heads, f.kv_heads, f.head_dim, f.hidden, f.vocab, f.max_positions, f.architecture) == (
            4, 8, 4, 64, 512, 150_000, 8192, "qwen3")
        assert (f.weight_bytes, f.dtype, f.id) == (len(part) + 5000, "Q4_K_M", ref)
        ranged = [r for p, r in h.log if "tiny-Q4_K_M-00001" in p]
        assert ranged == ["bytes=0-1048575"]                         # one read of the first MiB
        n = len(h.log)
        monkeypatch.setenv("GPUCLUSTER_OFFLINE", "1")
        assert models.load(ref, source=src) == f and len(h.log) == n     # from the cache, offline
    finally:
        h.stop()


@pytest.mark.hub_online
def test_hub_gguf_without_the_quant_is_one_warning_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCLUSTER_CACHE_DIR", str(tmp_path / "cache"))
    hub.forget()
    h = GGUFHub({"acme/tiny-GGUF": {"tiny-Q8_0.gguf": gguf_file(tokens=10)}})
    try:
        found = models.lookup("hf.co/acme/tiny-GGUF:Q4_K_M", source=Source(kind="huggingface", endpoint=h.url))
        assert found.facts is None and "no Q4_K_M GGUF in the repository; it has: Q8_0" in found.problem
        assert "\n" not in found.problem
    finally:
        h.stop()
