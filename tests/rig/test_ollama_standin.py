"""The Ollama stand-in (tests/rig/image/ollama) as a plain process on loopback, pulling the tiny GGUF
(ggufmodel.py) over Ollama's registry protocol from a local server; no rig needed."""
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "image", "ollama"))
import envconfig  # noqa: E402  (the stand-in's own reading of Ollama's env)
import ggufmodel  # noqa: E402

OLLAMA = os.path.join(HERE, "image", "ollama", "ollama")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A registry over ROOT/gpucluster/tiny-qwen2-GGUF, as the rig's ModelScope server answers /v2/."""
    root = tmp_path_factory.mktemp("hub")
    files = ggufmodel.generate(str(root / "gpucluster" / "tiny-qwen2-GGUF"))
    seen = []

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            seen.append(self.path)
            code, ctype, body = ggufmodel.registry(str(root), [p for p in self.path.split("?")[0].split("/") if p])
            if isinstance(body, str):
                body = open(body, "rb").read()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield {"url": "127.0.0.1:%d" % srv.server_address[1], "files": files, "seen": seen}
    srv.shutdown()


def start(tmp_path, extra=None, gpus=None):
    port = free_port()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OLLAMA_HOST": "127.0.0.1:%d" % port,
           "OLLAMA_MODELS": str(tmp_path / "models"), "OLLAMA_SCHED_SPREAD": "1", "OLLAMA_KEEP_ALIVE": "-1m"}
    if gpus is not None:
        (tmp_path / "gpus.json").write_text(json.dumps(gpus))
        env["GCRIG_OLLAMA_GPUS"] = str(tmp_path / "gpus.json")
    else:
        env["GCRIG_OLLAMA_GPUS"] = str(tmp_path / "no-gpus.json")
    env.update(extra or {})
    log = open(tmp_path / "serve.log", "wb")
    p = subprocess.Popen([sys.executable, OLLAMA, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(200):
        if p.poll() is not None:
            break
        try:
            get(port, "/api/version")
            break
        except OSError:
            time.sleep(0.05)
    return p, env, port


def get(port, path):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as r:
        return json.loads(r.read())


def post(port, path, body, raw=False):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        data = r.read()
    return data if raw else json.loads(data)


@pytest.fixture
def server(tmp_path):
    procs = []

    def run(**kw):
        p, env, port = start(tmp_path, **kw)
        procs.append(p)
        return p, env, port
    yield run
    for p in procs:
        p.terminate()
        p.wait(10)


V100 = {"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160, "compute_capability": "7.0",
        "driver": "550.54.15", "memory_used_mib": 0}


def test_pull_tags_ps_chat(hub, server, tmp_path):
    p, env, port = server(gpus=V100)
    name = "http://%s/gpucluster/tiny-qwen2-GGUF:Q4_K_M" % hub["url"]
    lines = [json.loads(x) for x in post(port, "/api/pull", {"model": name, "insecure": True}, raw=True).splitlines()]
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    gguf = next(f for f in hub["files"] if f["path"].endswith(".gguf"))
    prog = [x for x in lines if x.get("digest") == "sha256:" + gguf["sha256"]]
    assert prog[-1]["completed"] == prog[-1]["total"] == gguf["size"] and len(prog) > 3
    assert {"status": "verifying sha256 digest"} in lines
    blob = tmp_path / "models" / "blobs" / ("sha256-" + gguf["sha256"])
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == gguf["sha256"]
    listed = "%s/gpucluster/tiny-qwen2-GGUF:Q4_K_M" % hub["url"]
    assert [m["name"] for m in get(port, "/api/tags")["models"]] == [listed]
    # `ollama list` and `ollama cp`, as gpucluster's read-only check and alias use them
    out = subprocess.run([sys.executable, OLLAMA, "cp", listed, "tiny"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = subprocess.run([sys.executable, OLLAMA, "list"], env=env, capture_output=True, text=True).stdout
    ids = {r.split()[0]: r.split()[1] for r in rows.splitlines()[1:]}
    assert ids["tiny:latest"] == ids[listed]
    chat = post(port, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}],
                                               "max_tokens": 8})
    again = post(port, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}],
                                                "max_tokens": 8})
    assert chat["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"]
    assert chat["usage"]["completion_tokens"] == 8
    ps = get(port, "/api/ps")["models"]
    assert ps[0]["name"] == "tiny:latest" and ps[0]["size_vram"] == ps[0]["size"] > gguf["size"]
    assert ps[0]["context_length"] == 4096          # 2 x 16 GiB: tier 32768, capped at the GGUF's trained 4096
    show = post(port, "/api/show", {"model": "tiny"})
    assert show["model_info"]["qwen2.block_count"] == ggufmodel.LAYERS
    # a second pull downloads nothing
    n = len(hub["seen"])
    post(port, "/api/pull", {"model": name, "insecure": True, "stream": False})
    assert not [s for s in hub["seen"][n:] if "/blobs/" in s]


def test_cpu_fallback_and_insecure(hub, server):
    small = dict(V100, count=1, memory_mib=460)      # under Ollama's CUDA minimum: nothing fits
    p, env, port = server(gpus=small)
    name = "http://%s/gpucluster/tiny-qwen2-GGUF:q4_k_m" % hub["url"]
    try:
        post(port, "/api/pull", {"model": name, "stream": False})
        raise AssertionError("an http:// pull without insecure must fail")
    except urllib.error.HTTPError as e:
        assert json.loads(e.read())["error"] == "insecure protocol http"
    post(port, "/api/pull", {"model": name, "insecure": True, "stream": False})
    post(port, "/api/chat", {"model": name, "messages": [{"role": "user", "content": "hi"}]})
    ps = get(port, "/api/ps")["models"][0]
    assert ps["size_vram"] == 0 < ps["size"]


def test_old_driver_drops_gpus(hub, server):
    p, env, port = server(gpus=dict(V100, driver="535.104.05"))
    post(port, "/api/pull", {"model": "http://%s/gpucluster/tiny-qwen2-GGUF" % hub["url"], "insecure": True,
                             "stream": False})                       # no tag: latest, answered with Q4_K_M
    post(port, "/api/generate", {"model": "http://%s/gpucluster/tiny-qwen2-GGUF" % hub["url"], "prompt": "hi"})
    assert get(port, "/api/ps")["models"][0]["size_vram"] == 0


def test_bad_env_values_read_as_ollama_reads_them(hub, server, tmp_path):
    """Ollama refuses no env value at start: an unparseable boolean is TRUE, an unparseable number logs a warning
    and takes the default, a bad OLLAMA_HOST port falls back to 11434."""
    p, env, port = server(gpus=V100, extra={"OLLAMA_SCHED_SPREAD": "off", "OLLAMA_CONTEXT_LENGTH": "8k",
                                            "OLLAMA_KEEP_ALIVE": "forever"})
    post(port, "/api/pull", {"model": "http://%s/gpucluster/tiny-qwen2-GGUF:Q4_K_M" % hub["url"],
                             "insecure": True, "stream": False})
    post(port, "/api/chat", {"model": "http://%s/gpucluster/tiny-qwen2-GGUF:Q4_K_M" % hub["url"], "messages": []})
    log = (tmp_path / "serve.log").read_text()
    assert 'invalid environment variable, using default" key=OLLAMA_CONTEXT_LENGTH value=8k default=0' in log
    assert '"OLLAMA_SCHED_SPREAD": true' in log                       # "off" is not a Go boolean: true
    ps = get(port, "/api/ps")["models"][0]
    assert ps["context_length"] == 4096
    assert ps["expires_at"] != "2318-08-05T12:00:00Z"                 # "forever" is no duration: 5m
    p.terminate()
    p.wait(10)
    assert envconfig.host("0.0.0.0:99999")[0] == ("http", "0.0.0.0", 11434)

