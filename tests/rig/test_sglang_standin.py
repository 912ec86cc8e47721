"""The SGLang stand-in (image/sglang) as plain processes on loopback (no docker, no rig): SGLang 0.5.15's own
argument parser from the wheel source that `rig setup` caches (CACHE/sglang-src; skipped without it), the
process group over TCP, the HTTP API, and gpucluster's own SGLang command line through SGLang's parser."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import rigimage  # noqa: E402
import sglangimage  # noqa: E402

SRC = sglangimage.source_dir()
DEPS = os.path.join(rigimage.CACHE, "realparser-deps-" + rigimage.realparser_key())

pytestmark = pytest.mark.skipif(
    not (os.path.exists(os.path.join(SRC, "gcrig-wheel.json")) and os.path.exists(os.path.join(DEPS, ".complete"))),
    reason="needs SGLang's wheel source and the real-parser deps in the rig cache (%s, %s): run `tests/rig/rig "
           "setup` or sglangimage.ensure()" % (SRC, DEPS))

QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 384, "num_attention_heads": 12,
         "num_key_value_heads": 2, "num_hidden_layers": 6, "intermediate_size": 768, "vocab_size": 4224,
         "max_position_embeddings": 4096, "torch_dtype": "float16"}


def free_port():
    """A free port below 55536: SGLang 0.5.15 also opens --port + 10000 and refuses one above 65535."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] <= 55535:
                return s.getsockname()[1]


@pytest.fixture
def env(tmp_path):
    """PYTHONPATH with the stand-in as `sglang`, an L4-like host with 2 GPUs, a model dir with config + weights."""
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    os.symlink(os.path.join(HERE, "image", "sglang"), pkgs / "sglang")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN2))
    (model / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    gpus = tmp_path / "gpus.json"
    gpus.write_text(json.dumps({"count": 2, "name": "NVIDIA L4", "memory_mib": 23034, "compute_capability": "8.9"}))
    e = {k: v for k, v in os.environ.items() if not k.startswith(("GCRIG_", "SGLANG_"))}
    e.update(PYTHONPATH=str(pkgs), GCRIG_REALPARSER_DIR=os.path.join(HERE, "image", "realparser"),
             GCRIG_REALPARSE_SRC=SRC, GCRIG_REALPARSE_DEPS=DEPS, GCRIG_GPUS_FILE=str(gpus),
             SGLANG_STANDIN_LOAD_SECONDS="1", SGLANG_STANDIN_JOIN_TIMEOUT="60")
    return {"env": e, "model": str(model), "gpus": gpus, "tmp": tmp_path}


def launch(env, args, **extra):
    e = dict(env["env"], **extra)
    return subprocess.Popen([sys.executable, "-m", "sglang.launch_server"] + args, env=e, cwd=str(env["tmp"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(env, args, **extra):
    p = launch(env, args, **extra)
    out, _ = p.communicate(timeout=120)
    return p.returncode, out


def http(url, data=None, key=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return None, ""


def wait_health(port, proc, limit=120):
    """Poll /health until 200; returns every status seen (503 while loading). Stops early if rank 0 exits."""
    seen, end = [], time.monotonic() + limit
    while time.monotonic() < end and proc.poll() is None:
        code, _ = http("http://127.0.0.1:%d/health" % port)
        if code is not None and (not seen or seen[-1] != code):
            seen.append(code)
        if code == 200:
            break
        time.sleep(0.2)
    return seen


def test_three_ranks_form_a_cluster_serve_and_die_together(env):
    port, dist = free_port(), free_port()
    common = ["--model-path", env["model"], "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
              "--tp-size", "6", "--nnodes", "3", "--dist-init-addr", "127.0.0.1:%d" % dist, "--api-key", "k3y",
              "--nccl-port", str(free_port())]
    procs = [launch(env, common + ["--node-rank", str(r)]) for r in (2, 1, 0)][::-1]  # workers first
    try:
        seen = wait_health(port, procs[0])
        assert seen[-1:] == [200], (seen, procs[0].poll())
        assert http("http://127.0.0.1:%d/v1/models" % port)[0] == 401      # --api-key: Bearer needed
        code, body = http("http://127.0.0.1:%d/v1/models" % port, key="k3y")
        assert code == 200 and [m["id"] for m in json.loads(body)["data"]] == ["tiny"]
        code, body = http("http://127.0.0.1:%d/v1/completions" % port,
                          {"model": "tiny", "prompt": "Hello", "max_tokens": 8}, key="k3y")
        c = json.loads(body)
        assert code == 200 and c["object"] == "text_completion" and c["choices"][0]["text"]
        assert c["usage"]["completion_tokens"] == 8
        again = json.loads(http("http://127.0.0.1:%d/v1/completions" % port,
                                {"model": "tiny", "prompt": "Hello", "max_tokens": 8}, key="k3y")[1])
        assert again["choices"][0]["text"] == c["choices"][0]["text"]    # deterministic
        code, body = http("http://127.0.0.1:%d/v1/chat/completions" % port,
                          {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                          key="k3y")
        assert code == 200 and json.loads(body)["choices"][0]["message"]["role"] == "assistant"
        code, body = http("http://127.0.0.1:%d/get_model_info" % port, key="k3y")
        assert json.loads(body)["architectures"] == ["Qwen2ForCausalLM"]
        procs[1].kill()                                                  # one rank dies: the group is gone
        assert procs[0].wait(timeout=60) != 0 and procs[2].wait(timeout=60) != 0
        outs = [p.communicate()[0] for p in procs]
        assert "node_rank 1 disconnected" in outs[0], outs[0][-2000:]
        assert "rank 0 (127.0.0.1:%d) disconnected" % dist in outs[2], outs[2][-2000:]
        assert "tp_size=6 nnodes=3 node_rank=0" in outs[0]               # the parsed line
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_unknown_flag_ends_with_sglang_argparse_error(env):
    rc, out = run(env, ["--model-path", env["model"], "--gcrig-not-a-flag", "1"])
    assert rc == 2 and "sglang serve: error: unrecognized arguments: --gcrig-not-a-flag 1" in out, out[-1500:]


def test_sglang_validation_runs(env):
    rc, out = run(env, ["--model-path", env["model"], "--tp-size", "3", "--nnodes", "2", "--node-rank", "0",
                        "--dist-init-addr", "127.0.0.1:1"])
    assert rc == 1 and "AssertionError: tp_size must be divisible by number of nodes" in out, out[-1500:]


def test_compute_capability_70_refused(env):
    env["gpus"].write_text(json.dumps({"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160,
                                       "compute_capability": "7.0"}))
    rc, out = run(env, ["--model-path", env["model"], "--tp-size", "2", "--port", str(free_port())])
    assert rc != 0 and "RuntimeError: SGLang only supports sm75 and above." in out, out[-1500:]


def test_sglangs_own_arguments_refuse_the_port_the_plan_refuses(env):
    """The plan's port-too-high limit for 0.5.15 (55535) is SGLang's own: 55536 stops in its ServerArgs."""
    rc, out = run(env, ["--model-path", env["model"], "--tp-size", "2", "--port", "55536"])
    assert rc != 0 and "SGLANG_GRPC_PORT (65536) must be between 1 and 65535" in out, out[-1500:]


def test_tp_must_cover_every_gpu(env):
    rc, out = run(env, ["--model-path", env["model"], "--tp-size", "4", "--port", str(free_port())])
    assert rc != 0 and "invalid device ordinal" in out, out[-1500:]


def test_missing_config_fails_like_sglang(env):
    os.unlink(os.path.join(env["model"], "config.json"))
    rc, out = run(env, ["--model-path", env["model"], "--tp-size", "2"])
    assert rc != 0 and "does not appear to have a file named config.json" in out, out[-1500:]


def test_rank0_gives_up_when_a_rank_never_joins(env):
    rc, out = run(env, ["--model-path", env["model"], "--tp-size", "4", "--nnodes", "2", "--node-rank", "0",
                        "--dist-init-addr", "127.0.0.1:%d" % free_port(), "--port", str(free_port())],
                  SGLANG_STANDIN_JOIN_TIMEOUT="2")
    assert rc == 1 and "waiting for clients. 1/2 clients joined" in out, out[-1500:]


def test_gpuclusters_own_sglang_command_passes_sglangs_parser(env, tmp_path):
    """Every rank's command from `gpucluster plan` (inventories/sglang-3node.yaml, SGLang 0.5.15) through SGLang's
    own prepare_server_args + check_server_args; only --model-path points at a local model."""
    r = subprocess.run([sys.executable, "-m", "cluster", "plan", os.path.join(REPO, "inventories", "sglang-3node.yaml"),
                        "--offline", "--format", "json"], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, GPUCLUSTER_CACHE_DIR=str(tmp_path / "cache")))
    assert r.returncode == 0, r.stderr[-1500:]
    argvs = []
    for step in json.loads(r.stdout)["steps"]:
        for op in step.get("ops", []):
            a = op.get("argv") or []
            if a[:2] == ["docker", "run"] and "sglang.launch_server" in a:
                argvs.append(a[a.index("sglang.launch_server") + 1:])
    assert len(argvs) >= 2
    # Qwen2.5-32B-Instruct's shape (the inventory's model; its context-length 32768 is checked against it)
    with open(os.path.join(env["model"], "config.json"), "w") as f:
        json.dump(dict(QWEN2, hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, num_hidden_layers=64,
                       max_position_embeddings=32768, vocab_size=152064, torch_dtype="bfloat16"), f)
    for argv in argvs:
        argv = list(argv)
        argv[argv.index("--model-path") + 1] = env["model"]
        out = tmp_path / "args.json"
        p = subprocess.run([sys.executable, os.path.join(HERE, "image", "sglang", "realparse_sglang.py")] + argv,
                           env=dict(env["env"], GCRIG_REALPARSE_OUT=str(out)), capture_output=True, text=True)
        assert p.returncode == 0, (argv, p.stderr[-2000:])
        a = json.loads(out.read_text())["args"]
        assert a["nnodes"] == len(argvs) and a["tp_size"] == int(argv[argv.index("--tp-size") + 1])
        assert a["dist_init_addr"] == argv[argv.index("--dist-init-addr") + 1]
