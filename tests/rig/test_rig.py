"""Tests of the simulated-host rig itself: Ray across two hosts by hand, the vLLM stand-in, the mirrors, SSH."""
import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.rig

MODEL = "gpucluster--tiny-qwen2"
MODEL_8H = "gpucluster--tiny-qwen2-8heads"  # same weights, config claims 8 heads: gets past the head check at TP 8
HEAD, WORKER = "rigtest-ray-head", "rigtest-ray-worker"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def http(url, data=None, headers=None, timeout=10):
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers=dict({"Content-Type": "application/json"}, **(headers or {})))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def image(rig, version="0.3.0"):
    return rig.facts["registry"]["images"]["vllm/vllm-openai:v%s" % version]


def place_model(rig, host):
    src = rig.facts["model"]["source_dir"]
    base = rig.host(host)["model_dir"]
    for name, heads in ((MODEL, None), (MODEL_8H, 8)):
        dst = os.path.join(base, name)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git"))
        if heads:
            with open(os.path.join(dst, "config.json")) as f:
                cfg = json.load(f)
            cfg["num_attention_heads"] = heads
            with open(os.path.join(dst, "config.json"), "w") as f:
                json.dump(cfg, f)


@pytest.fixture(scope="module")
def ray_cluster(rig):
    """Ray head on h1 and worker on h2, started by hand the way vLLM's run_cluster.sh does."""
    h1, h2 = rig.host("h1"), rig.host("h2")
    img = image(rig)
    started = []
    try:
        for name in ("h1", "h2"):
            place_model(rig, name)
            rig.docker(name, "pull", "-q", img, timeout=600)
        for name, cname, cmd in (
                ("h1", HEAD, ["--head", "--node-ip-address=" + h1["address"], "--port=6379"]),
                ("h2", WORKER, ["--address=%s:6379" % h1["address"], "--node-ip-address=" + h2["address"]])):
            h = rig.host(name)
            rig.docker(name, "rm", "-f", cname, check=False)
            rig.docker(name, "run", "-d", "--name", cname, "--label", "gpucluster-rig-test=1", "--net=host",
                       "--ipc=host", "--gpus", "all", "-v", "%s:/models" % h["model_dir"],
                       "-e", "VLLM_HOST_IP=" + h["address"], "-e", "VLLM_STANDIN_PG_TIMEOUT=20",
                       "--entrypoint", "ray", img, "start", "--block", "--num-gpus=2", *cmd)
            started.append((name, cname))
        script = ("import json, ray; ray.init(address='auto', logging_level='ERROR'); "
                  "print(json.dumps({'nodes': sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']), "
                  "'gpus': ray.cluster_resources().get('GPU', 0)}))")
        state, end = None, time.monotonic() + 120
        while time.monotonic() < end:
            r = rig.docker("h1", "exec", HEAD, "python3", "-c", script, check=False, timeout=60)
            if r.returncode == 0:
                state = json.loads(r.stdout.strip().splitlines()[-1])
                if len(state["nodes"]) == 2:
                    break
            time.sleep(2)
        yield {"state": state, "head": h1, "worker": h2, "image": img}
    finally:
        for name, cname in started:
            rig.docker(name, "rm", "-f", cname, check=False)
        for name in ("h1", "h2"):  # leave the hosts' daemons without images: the product pulls them itself
            rig.docker(name, "rmi", img, check=False)
            for m in (MODEL, MODEL_8H):
                shutil.rmtree(os.path.join(rig.host(name)["model_dir"], m), ignore_errors=True)


def api_server(rig, *flags, timeout=120):
    return rig.docker("h1", "exec", HEAD, "python3", "-m", "vllm.entrypoints.openai.api_server", *flags,
                      check=False, timeout=timeout)


def test_a_ray_cluster_spans_two_hosts(ray_cluster):
    st = ray_cluster["state"]
    assert st is not None, "ray cluster never answered"
    assert st["nodes"] == sorted([ray_cluster["head"]["address"], ray_cluster["worker"]["address"]])
    assert st["gpus"] == 4.0


def test_a_ray_status_cli(rig, ray_cluster):
    end = time.monotonic() + 60  # the autoscaler's report lags ray.nodes() by a few seconds
    while True:
        out = rig.docker("h1", "exec", HEAD, "ray", "status").stdout
        if "0.0/4.0 GPU" in out or time.monotonic() > end:
            break
        time.sleep(2)
    assert "0.0/4.0 GPU" in out, out
    assert out.count(" node_") == 2


def test_b_unknown_flag_refused_like_argparse(rig, ray_cluster):
    r = api_server(rig, "--model", "/models/" + MODEL, "--distributed-executor-backend", "ray")
    assert r.returncode == 2
    assert "api_server.py: error: unrecognized arguments: --distributed-executor-backend ray" in r.stderr


def test_c_more_gpus_than_cluster(rig, ray_cluster):
    t = time.monotonic()
    r = api_server(rig, "--model", "/models/" + MODEL_8H, "--tensor-parallel-size", "8", "--dtype", "half")
    assert r.returncode != 0
    assert "exceeds the total number of available GPUs" in r.stdout + r.stderr
    assert time.monotonic() - t < 90
    # with the real config (heads not divisible by 8) vLLM stops earlier, at the divisibility check
    with open(os.path.join(rig.facts["model"]["source_dir"], "config.json")) as f:
        heads = json.load(f)["num_attention_heads"]
    r = api_server(rig, "--model", "/models/" + MODEL, "--tensor-parallel-size", "8")
    assert r.returncode != 0
    if heads % 8:
        assert ("Total number of attention heads (%d) must be divisible by tensor parallel size (8)." % heads
                ) in r.stderr


def test_d_serves_completions_with_tp4_over_two_hosts(rig, ray_cluster):
    addr = ray_cluster["head"]["address"]
    rig.docker("h1", "exec", "-d", HEAD, "sh", "-c",
               "exec python3 -m vllm.entrypoints.openai.api_server --model /models/%s --tensor-parallel-size 4 "
               "--dtype half --disable-custom-all-reduce --served-model-name tiny --api-key k3y --port 8000 "
               ">/tmp/api.log 2>&1" % MODEL)
    base = "http://%s:8000" % addr
    end, ok = time.monotonic() + 120, False
    while time.monotonic() < end and not ok:
        try:
            ok = http(base + "/health", timeout=2)[0] == 200
        except OSError:
            time.sleep(1)
    log = rig.docker("h1", "exec", HEAD, "cat", "/tmp/api.log").stdout
    assert ok, log
    assert "# GPU blocks:" in log and "Uvicorn running on http://0.0.0.0:8000" in log
    assert http(base + "/v1/models")[0] == 401
    code, body = http(base + "/v1/models", headers={"Authorization": "Bearer k3y"})
    assert code == 200 and [m["id"] for m in json.loads(body)["data"]] == ["tiny"]
    req = {"model": "tiny", "prompt": "hello rig", "max_tokens": 5}
    code, body = http(base + "/v1/completions", req, {"Authorization": "Bearer k3y"})
    assert code == 200, body
    c = json.loads(body)
    assert c["object"] == "text_completion" and len(c["choices"][0]["text"].split()) == 5
    assert http(base + "/v1/completions", req, {"Authorization": "Bearer k3y"})[1].count(c["choices"][0]["text"]) == 1
    # all four GPUs of the two hosts are held by the server's workers
    script = "import ray; ray.init(address='auto', logging_level='ERROR'); print(ray.available_resources().get('GPU', 0))"
    assert float(rig.docker("h1", "exec", HEAD, "python3", "-c", script).stdout.split()[-1]) == 0.0
    rig.docker("h1", "exec", HEAD, "pkill", "-f", "vllm.entrypoints.openai.api_server", check=False)


def test_e_hf_mirror_download_is_byte_identical(rig, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    env_before = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = rig.facts["hf"]["endpoint"]
    try:
        import importlib
        import huggingface_hub.constants
        importlib.reload(huggingface_hub.constants)
        out = tmp_path / "hf"
        r = subprocess.run(["python3", "-c", "import sys; from huggingface_hub import snapshot_download; "
                            "print(snapshot_download(sys.argv[1], local_dir=sys.argv[2]))",
                            rig.facts["model"]["id"], str(out)], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hfhome")))
        assert r.returncode == 0, r.stderr
    finally:
        if env_before is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = env_before
    for f in rig.facts["model"]["files"]:
        assert sha256(out / f["path"]) == f["sha256"], f["path"]
    with open(rig.facts["hf"]["access_log"]) as fh:
        sent = sum(json.loads(l)["bytes"] for l in fh if l.strip())
    assert sent >= rig.facts["model"]["total_bytes"]
    assert hub is not None


def test_e_modelscope_download_is_byte_identical(rig, tmp_path):
    pytest.importorskip("modelscope")
    out = tmp_path / "ms"
    r = subprocess.run(["python3", "-c", "import sys; from modelscope import snapshot_download; "
                        "print(snapshot_download(sys.argv[1], local_dir=sys.argv[2], endpoint=sys.argv[3]))",
                        rig.facts["model"]["id"], str(out), rig.facts["modelscope"]["endpoint"]],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, MODELSCOPE_DOWNLOAD_INTRA_CLOUD="false",
                                MODELSCOPE_CACHE=str(tmp_path / "mscache")))
    assert r.returncode == 0, r.stderr[-3000:]
    for f in rig.facts["model"]["files"]:
        assert sha256(out / f["path"]) == f["sha256"], f["path"]
    with open(rig.facts["modelscope"]["access_log"]) as fh:
        sent = sum(json.loads(l)["bytes"] for l in fh if l.strip())
    assert sent >= rig.facts["model"]["total_bytes"]


def test_e_modelscope_git_clone(rig, tmp_path):
    r = subprocess.run(["git", "clone", "-q", rig.facts["modelscope"]["git_url"], str(tmp_path / "g")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    f = rig.facts["model"]["files"][0]
    assert sha256(tmp_path / "g" / f["path"]) == f["sha256"]


def test_f_ssh_reaches_the_hosts_own_docker_and_gpus(rig):
    for h in rig.facts["hosts"]:
        r = rig.ssh(h["name"], "hostname; docker info --format '{{.DockerRootDir}}'; "
                                "nvidia-smi --query-gpu=index,name,memory.total,compute_cap,driver_version,pci.bus_id,uuid "
                                "--format=csv,noheader,nounits; ip -j route get %s; df -B1 --output=avail /; "
                                "date +%%s.%%N; uname -sr; cat /etc/os-release >/dev/null" % rig.facts["control_address"])
        lines = r.stdout.splitlines()
        assert lines[0] == h["name"]
        assert lines[1] == h["data_root"]
        gpu = [l.split(", ") for l in lines[2:2 + h["gpus"]["count"]]]
        assert [g[0] for g in gpu] == [str(i) for i in range(h["gpus"]["count"])]
        assert all(g[1] == h["gpus"]["name"] and g[2] == str(h["gpus"]["memory_mib"]) and g[3] == "7.0" for g in gpu)
        route = json.loads(lines[2 + h["gpus"]["count"]])
        assert route[0]["prefsrc"] == h["address"] and route[0]["dev"] == "eth0"


def test_f_paramiko_verifies_host_keys_from_known_hosts(rig):
    paramiko = pytest.importorskip("paramiko")
    h = rig.host("h2")
    c = paramiko.SSHClient()
    c.load_host_keys(rig.facts["ssh"]["known_hosts"])
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    c.connect(h["address"], port=22, username="root", key_filename=rig.facts["ssh"]["identity_file"],
              look_for_keys=False, allow_agent=False, timeout=10)
    try:
        _, out, _ = c.exec_command("echo $DOCKER_HOST; docker version --format '{{json .}}' >/dev/null && echo ok")
        assert out.read().decode().split() == [h["docker_host"], "ok"]
    finally:
        c.close()


def test_gpus_config_is_per_host(rig):
    h = rig.host("h3")
    with open(h["gpus_file"]) as f:
        orig = f.read()
    try:
        cfg = json.loads(orig)
        cfg.update(count=4, name="NVIDIA A100-SXM4-80GB", memory_mib=81920, compute_capability="8.0")
        with open(h["gpus_file"], "w") as f:
            json.dump(cfg, f)
        out = rig.ssh("h3", "nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader").stdout.splitlines()
        assert out == ["NVIDIA A100-SXM4-80GB, 8.0"] * 4
        assert rig.ssh("h1", "nvidia-smi -L").stdout.count("Tesla V100") == 2
    finally:
        with open(h["gpus_file"], "w") as f:
            f.write(orig)


@pytest.mark.parametrize("version,cuda,has_sm70,entry", [
    ("0.3.0", "12.1", True, ["python3", "-m", "vllm.entrypoints.openai.api_server"]),
    ("0.10.1.1", "12.8", False, None),
    ("newest", "13.0", False, ["vllm", "serve"])])
def test_images_answer_the_capability_probe(rig, version, cuda, has_sm70, entry):
    if version == "newest":
        version = rig.facts["registry"]["versions"][-1]
    img = image(rig, version)
    try:
        rig.docker("h3", "pull", "-q", img, timeout=600)
        r = rig.docker("h3", "run", "--rm", "--gpus", "all", "--entrypoint", "python3", img, "-c",
                       "import torch; print(torch.version.cuda, torch.cuda.get_arch_list())")
        got_cuda, archs = r.stdout.split(" ", 1)
        assert got_cuda == cuda and ("'sm_70'" in archs) == has_sm70
        ep = json.loads(rig.docker("h3", "image", "inspect", "--format", "{{json .Config.Entrypoint}}", img).stdout)
        if entry:
            assert ep == entry
        r = rig.docker("h3", "run", "--rm", img, "--model", "/nonexistent", "--no-such-flag", check=False)
        assert r.returncode == 2 and "error: unrecognized arguments: --no-such-flag" in r.stderr
        r = rig.docker("h3", "run", "--rm", "--entrypoint", "python3", img, "-c",
                       "import torch; print(torch.cuda.device_count())")
        assert r.stdout.strip() == "0"  # no --gpus: no GPUs, as with NVIDIA's toolkit
    finally:
        rig.docker("h3", "rmi", img, check=False)
