"""Model facts from a hub for a model outside the catalog (cluster/hub.py), against an in-process server on
127.0.0.1 that answers HF-style (huggingface.co, olah) and ModelScope-style URLs: fetch, cache, --offline,
HTTP Range, hostile answers, trust_remote_code, and the plan built from them."""

from __future__ import annotations

import json
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster import cli, config, hub, models, ops
from cluster.config import Secret, Source

pytestmark = pytest.mark.hub_online   # every hub here is on 127.0.0.1
MODEL = "acme/tiny-custom"
SHA = "0123456789abcdef0123456789abcdef01234567"
CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 512,
          "intermediate_size": 1024, "num_attention_heads": 8, "num_hidden_layers": 4, "num_key_value_heads": 2,
          "vocab_size": 4224, "max_position_embeddings": 4096, "torch_dtype": "float16",
          "tie_word_embeddings": False}
TOTAL = 123_456_768


def safetensors(tensors: dict[str, int]) -> tuple[bytes, int]:
    """A safetensors file of float16 tensors {name: elements}, and its tensor bytes."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, n in tensors.items():
        header[name] = {"dtype": "F16", "shape": [n], "data_offsets": [off, off + 2 * n]}
        off += 2 * n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * off, off


def sharded(cfg=CONFIG) -> dict[str, bytes]:
    return {"config.json": json.dumps(cfg).encode(), "README.md": b"# tiny\n",
            "model.safetensors.index.json": json.dumps({"metadata": {"total_size": TOTAL}, "weight_map": {
                "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode(),
            "model-00001-of-00002.safetensors": b"x" * 64, "model-00002-of-00002.safetensors": b"y" * 64}


class Hub:
    """A hub on 127.0.0.1: `repos` {model: {path: bytes}}; `routes` {url path: (status, body, headers)} overrides;
    `log` the requests (path, headers); Range honoured unless `honour_range` is False (olah, the rig's ModelScope)."""

    def __init__(self, repos: dict[str, dict[str, bytes]] | None = None):
        self.repos = repos if repos is not None else {MODEL: sharded()}
        self.routes: dict[str, tuple] = {}
        self.log: list[tuple[str, dict]] = []
        self.honour_range = True
        self.sent = 0
        hub_ = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                hub_.log.append((self.path, dict(self.headers)))
                status, body, headers = hub_.answer(self.path, self.headers.get("Range"))
                if callable(body):           # a hostile writer (drip, no length)
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    body(self.wfile)
                    self.close_connection = True
                    return
                self.send_response(status)
                headers = {"Content-Type": "application/json", **headers}
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                    hub_.sent += len(body)
                except OSError:              # the client stopped reading (a header read from a whole file)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def requests(self) -> list[str]:
        return [p for p, _ in self.log]

    def _file(self, model: str, path: str, rng: str | None):
        files = self.repos.get(model)
        if files is None or path not in files:
            return 404, b'{"error": "Entry not found"}', {}
        data = files[path]
        if rng and self.honour_range and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            a, b = int(a), min(int(b), len(data) - 1)
            return 206, data[a:b + 1], {"Content-Range": f"bytes {a}-{b}/{len(data)}"}
        return 200, data, {}

    def answer(self, raw: str, rng: str | None):
        u = urllib.parse.urlsplit(raw)
        if u.path in self.routes:
            return self.routes[u.path]
        q = {k: v[0] for k, v in urllib.parse.parse_qs(u.query).items()}
        parts = [urllib.parse.unquote(p) for p in u.path.split("/") if p]
        if parts[:3] == ["api", "v1", "models"] and len(parts) >= 6:       # ModelScope
            model = "/".join(parts[3:5])
            if model not in self.repos:
                return 404, json.dumps({"Code": 404, "Success": False, "Message": "not found"}).encode(), {}
            if parts[5:] == ["repo", "files"]:
                files = [{"Path": p, "Name": p, "Type": "blob", "Size": len(b)} for p, b in self.repos[model].items()]
                return 200, json.dumps({"Code": 200, "Success": True, "Data": {"Files": files}}).encode(), {}
            return self._file(model, q.get("FilePath", ""), rng)
        if parts[:2] == ["api", "models"] and len(parts) >= 6:             # HF API
            model = "/".join(parts[2:4])
            if model not in self.repos:
                return 401, b'{"error": "Repository not found"}', {}
            if parts[4] == "revision":
                return 200, json.dumps({"id": model, "sha": SHA, "gated": False, "siblings": [
                    {"rfilename": p} for p in self.repos[model]]}).encode(), {}
            if parts[4] == "tree":
                return 200, json.dumps([{"type": "file", "path": p, "size": len(b), "oid": "0" * 40}
                                        for p, b in self.repos[model].items()]).encode(), {}
        if len(parts) >= 5 and parts[2] == "resolve":                       # HF file
            return self._file("/".join(parts[:2]), "/".join(parts[4:]), rng)
        return 404, b"{}", {}


@pytest.fixture
def server():
    h = Hub()
    yield h
    h.stop()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GPUCLUSTER_CACHE_DIR", str(tmp_path / "cache"))
    hub.forget()


def src(h: Hub, kind: str = "hf-mirror", **kw) -> Source:
    return Source(kind=kind, endpoint=h.url, **kw)


def test_hf_style_fetch_reads_config_and_index_and_caches(server, tmp_path):
    f = hub.facts(MODEL, src(server))
    assert (f.architecture, f.layers, f.heads, f.kv_heads, f.hidden, f.vocab, f.weight_bytes) == (
        "Qwen2ForCausalLM", 4, 8, 2, 512, 4224, TOTAL)
    assert not f.remote_code and f.local_path is None
    assert server.requests() == [f"/api/models/{MODEL}/revision/main", f"/{MODEL}/resolve/{SHA}/config.json",
                                 f"/{MODEL}/resolve/{SHA}/model.safetensors.index.json"]
    cached = list((tmp_path / "cache" / "hub" / "hf-mirror").glob("*.json"))
    assert len(cached) == 1 and cached[0].name.startswith("acme--tiny-custom@main-")
    doc = json.loads(cached[0].read_text())
    assert (doc["endpoint"], doc["commit"], doc["weight_bytes"]) == (server.url, SHA, TOTAL)
    server.stop()                                     # the cache answers without the server
    assert hub.facts(MODEL, src(server)) == f


def test_modelscope_fetch_uses_its_url_forms_and_revision(server):
    f = hub.facts(MODEL, src(server, "modelscope"))
    assert (f.layers, f.weight_bytes) == (4, TOTAL)
    reqs = server.requests()
    assert reqs[0] == f"/api/v1/models/{MODEL}/repo/files?Revision=master&Recursive=True"
    assert reqs[1] == f"/api/v1/models/{MODEL}/repo?Revision=master&FilePath=config.json"
    assert len(reqs) == 3
    assert hub.facts(MODEL, src(server, "modelscope", revision="v1.0.0")).weight_bytes == TOTAL   # its own key
    assert "Revision=v1.0.0" in server.requests()[3]


def test_offline_asks_nothing_and_falls_back_to_the_catalog(server, monkeypatch):
    assert hub.facts(MODEL, src(server), offline=True) is None
    monkeypatch.setenv("GPUCLUSTER_OFFLINE", "1")
    assert hub.facts(MODEL, src(server)) is None
    assert models.load("Qwen/Qwen2.5-7B-Instruct", source=src(server)).layers == 28
    assert server.log == []
    monkeypatch.delenv("GPUCLUSTER_OFFLINE")
    hub.facts(MODEL, src(server))                     # fetched once, then offline reads the cache
    n = len(server.log)
    assert hub.facts(MODEL, src(server), offline=True).weight_bytes == TOTAL and len(server.log) == n


def test_a_catalog_model_never_touches_the_network(server):
    server.repos["Qwen/Qwen2.5-7B-Instruct"] = sharded()
    assert models.load("Qwen/Qwen2.5-7B-Instruct", source=src(server)).weight_bytes != TOTAL
    assert server.log == []


def test_single_safetensors_header_read_with_range(server):
    data, tensor_bytes = safetensors({"model.embed_tokens.weight": 4224 * 64, "lm_head.weight": 4224 * 64})
    server.repos["acme/one-file"] = {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": data}
    assert hub.facts("acme/one-file", src(server)).weight_bytes == tensor_bytes
    ranges = [h.get("Range") for p, h in server.log if p.endswith("/model.safetensors")]
    n = struct.unpack("<Q", data[:8])[0]
    assert ranges == ["bytes=0-7", f"bytes=8-{8 + n - 1}"]
    assert server.sent < 8 + n + 2000                # the tensors were never sent


def test_a_server_that_ignores_range_sends_the_file_but_only_the_header_is_read(server):
    data, tensor_bytes = safetensors({"w": 8 << 20})  # 16 MiB of tensor data
    server.repos["acme/one-file"] = {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": data}
    server.honour_range = False                      # olah, the rig's ModelScope server
    assert hub.facts("acme/one-file", src(server, "modelscope")).weight_bytes == tensor_bytes
    assert [p for p in server.requests() if "model.safetensors" in p] == [
        "/api/v1/models/acme/one-file/repo?Revision=master&FilePath=model.safetensors"]


def test_pytorch_bin_sizes_from_the_listing(server):
    server.repos["acme/old"] = {"config.json": json.dumps(CONFIG).encode(), "pytorch_model.bin": b"z" * 5000,
                                "training_args.bin": b"t" * 100}
    assert hub.facts("acme/old", src(server)).weight_bytes == 5000
    assert f"/api/models/acme/old/tree/{SHA}?recursive=true" in server.requests()
    assert hub.facts("acme/old", src(server, "modelscope")).weight_bytes == 5000


def test_composite_config_reads_text_config(server):
    server.repos["acme/vl"] = {**sharded(), "config.json": json.dumps({
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "torch_dtype": "bfloat16",
        "text_config": {k: v for k, v in CONFIG.items() if k not in ("architectures", "torch_dtype")}}).encode()}
    f = hub.facts("acme/vl", src(server))
    assert (f.architecture, f.layers, f.dtype) == ("Qwen2VLForConditionalGeneration", 4, "bfloat16")


def test_integral_floats_and_a_huge_fallback_length_are_read(server):
    server.repos[MODEL]["config.json"] = json.dumps({**CONFIG, "max_position_embeddings": 4096.0,
                                                     "model_max_length": 10 ** 30}).encode()
    assert hub.facts(MODEL, src(server)).max_positions == 4096


# ---------------------------------------------------------------- hostile or broken answers: one line
def one_line_error(source: Source, model: str = MODEL) -> str:
    with pytest.raises(hub.HubError) as e:
        hub.facts(model, source)
    text = str(e.value)
    assert "\n" not in text and model in text and source.endpoint in text, text
    return text


def test_huge_answers_are_cut_off(server, monkeypatch):
    monkeypatch.setattr(hub, "CAP_CONFIG", 4096)
    server.routes[f"/{MODEL}/resolve/{SHA}/config.json"] = (200, b" " * 100_000 + b"{}", {})
    assert "more than the 4 KiB allowed" in one_line_error(src(server))

    def endless(w):                                  # no Content-Length: read until the cap, then stop
        try:
            for _ in range(1000):
                w.write(b" " * 65536)
        except OSError:
            pass
    server.routes[f"/{MODEL}/resolve/{SHA}/config.json"] = (200, endless, {})
    hub.forget()
    assert "more than the 4 KiB allowed" in one_line_error(src(server))


def test_a_slow_drip_is_bounded_in_time(server, monkeypatch):
    monkeypatch.setattr(hub, "DEADLINE", 0.5)

    def drip(w):
        try:
            for _ in range(40):
                w.write(b" ")
                w.flush()
                time.sleep(0.05)
        except OSError:
            pass
    server.routes[f"/api/models/{MODEL}/revision/main"] = (200, drip, {})
    t0 = time.monotonic()
    assert "took more than" in one_line_error(src(server))
    assert time.monotonic() - t0 < 1.8


def test_all_answers_about_one_model_share_a_budget(server, monkeypatch):
    monkeypatch.setattr(hub, "BUDGET", 0.3)
    real = server.answer

    def slow(path, rng):
        time.sleep(0.2)
        return real(path, rng)
    server.answer = slow
    assert "more than 0.3 s to describe the model" in one_line_error(src(server))
    assert len(server.log) <= 2


@pytest.mark.parametrize("body, expect", [
    (b"{not json", "not JSON"),
    (b"[" * 100_000, "not JSON"),
    (json.dumps([1, 2]).encode(), "not an object"),
    (json.dumps({**CONFIG, "num_attention_heads": "many"}).encode(), "num_attention_heads"),
    (json.dumps({**CONFIG, "num_attention_heads": 0}).encode(), "num_attention_heads"),
    (json.dumps({**CONFIG, "hidden_size": True}).encode(), "hidden_size"),
    (json.dumps({**CONFIG, "vocab_size": 10 ** 30}).encode(), "vocab_size"),
    (json.dumps({**CONFIG, "architectures": ["Evil\x1b[31mForCausalLM"]}).encode(), "architectures"),
    (json.dumps({**CONFIG, "torch_dtype": {"x": 1}}).encode(), "torch_dtype"),
    (json.dumps({k: v for k, v in CONFIG.items() if k != "vocab_size"}).encode(), "no vocab_size"),
], ids=["syntax", "nesting", "list", "str-heads", "zero-heads", "bool-hidden", "huge-vocab", "escape-arch",
        "dict-dtype", "no-vocab"])
def test_bad_config_is_one_clear_error(server, body, expect):
    server.routes[f"/{MODEL}/resolve/{SHA}/config.json"] = (200, body, {})
    text = one_line_error(src(server))
    assert expect in text and "\x1b" not in text


@pytest.mark.parametrize("route, answer, expect", [
    (f"/api/models/{MODEL}/revision/main", (200, b'{"sha": "../../etc"}', {}), "no commit sha"),
    (f"/api/models/{MODEL}/revision/main", (500, b"oops", {}), "HTTP 500"),
    (f"/api/models/{MODEL}/revision/main", (302, b"", {"Location": "file:///etc/passwd"}), "HTTP 302"),
    (f"/{MODEL}/resolve/{SHA}/config.json", (404, b"", {}), "not found"),
    (f"/{MODEL}/resolve/{SHA}/model.safetensors.index.json", (200, b'{"metadata": {"total_size": "big"}}', {}),
     "no metadata.total_size"),
], ids=["bad-sha", "http-500", "redirect-file", "config-404", "index-total-str"])
def test_bad_answers_are_one_clear_error(server, route, answer, expect):
    server.routes[route] = answer
    assert expect in one_line_error(src(server))


def test_hostile_safetensors_header(server):
    server.repos["acme/one-file"] = {"config.json": json.dumps(CONFIG).encode(),
                                     "model.safetensors": struct.pack("<Q", 1 << 40) + b"{}"}
    assert "safetensors header of" in one_line_error(src(server), "acme/one-file")
    bad = json.dumps({"w": {"dtype": "F16", "shape": [1], "data_offsets": [10, 2]}}).encode()
    server.repos["acme/one-file"]["model.safetensors"] = struct.pack("<Q", len(bad)) + bad
    hub.forget()
    assert "data_offsets" in one_line_error(src(server), "acme/one-file")


def test_unreachable_and_unknown_models(server):
    assert "cannot reach" in one_line_error(Source(kind="hf-mirror", endpoint="http://127.0.0.1:9"))
    assert "not found, gated or private" in one_line_error(src(server), "acme/missing")
    assert "not a hub model id" in one_line_error(src(server), "../../etc/passwd")


def test_a_corrupt_cache_file_is_fetched_again(server, tmp_path):
    hub.facts(MODEL, src(server))
    (cached,) = (tmp_path / "cache" / "hub" / "hf-mirror").glob("*.json")
    cached.write_text(json.dumps({**json.loads(cached.read_text()), "weight_bytes": "lots"}))
    n = len(server.log)
    assert hub.facts(MODEL, src(server)).weight_bytes == TOTAL and len(server.log) > n


# ---------------------------------------------------------------- secrets
def test_token_goes_only_to_an_endpoint_the_user_named(server):
    assert hub.endpoints(Source(kind="hf-mirror", token=Secret(literal="hf_x")))[0].token is None
    assert hub.endpoints(Source(kind="hf-mirror", token=Secret(literal="hf_x")))[0].url == "https://hf-mirror.com"
    assert hub.endpoints(Source(kind="huggingface", token=Secret(literal="hf_x")))[0].token == "hf_x"
    assert hub.endpoints(Source(kind="hf-mirror", endpoint=server.url, token=Secret(env="GC_UNSET_TOKEN")))[0] \
        .token is None
    assert "hf_x" not in repr(hub.endpoints(Source(kind="huggingface", token=Secret(literal="hf_x"))))
    other = Hub()                                    # a redirect to another host gets no Authorization
    try:
        other.repos = {MODEL: sharded()}
        server.routes[f"/{MODEL}/resolve/{SHA}/config.json"] = (
            302, b"", {"Location": other.url.replace("127.0.0.1", "localhost") + f"/{MODEL}/resolve/{SHA}/config.json"})
        hub.facts(MODEL, src(server, token=Secret(literal="hf_SECRET")))
        assert all(h.get("Authorization") == "Bearer hf_SECRET" for _, h in server.log)
        assert other.log and all("Authorization" not in h for _, h in other.log)
    finally:
        other.stop()
    assert "hf_SECRET" not in "".join(p.read_text() for p in Path(hub.cache_root()).rglob("*.json"))


def test_cache_root_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("GPUCLUSTER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_root() == tmp_path / "xdg" / "gpucluster"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hub.cache_root() == Path.home() / ".cache" / "gpucluster"


# ---------------------------------------------------------------- the plan
INV = """\
cluster: {{name: lab}}
hosts:
  - {{name: h0, address: 10.0.0.1, gpus: {{count: 2, name: Tesla V100-PCIE-16GB, memory_mib: 16160, compute_capability: "7.0"}}}}
deploy:
  profile: vllm-v0.3.0
  model: {model}
  tensor_parallel: 2
  engine_args: {{max-model-len: 2048}}
  source: {{kind: {kind}, endpoint: "{url}"}}
"""


def inventory(tmp_path, h: Hub, model: str = MODEL, kind: str = "hf-mirror") -> str:
    path = tmp_path / f"inv-{kind}.yaml"
    path.write_text(INV.format(model=model, kind=kind, url=h.url))
    return str(path)


def codes(p) -> dict[str, str]:
    return {f.code: f.severity for f in p.findings}


@pytest.mark.parametrize("kind", ["hf-mirror", "modelscope"])
def test_plan_runs_the_model_checks_for_a_hub_model(server, tmp_path, kind):
    p = ops.make_plan(*ops.load(inventory(tmp_path, server, kind=kind)))
    assert "model-unknown" not in codes(p) and p.memory is not None and p.model.weight_bytes == TOTAL
    bad = ops.make_plan(*ops.load(inventory(tmp_path, server, kind=kind)), tp=3)   # 8 heads over 3 GPUs
    assert codes(bad)["heads-not-divisible"] == "error"


def test_plan_with_a_failing_hub_is_a_warning_not_a_crash(server, tmp_path):
    server.routes[f"/{MODEL}/resolve/{SHA}/config.json"] = (200, b"{oops", {})
    p = ops.make_plan(*ops.load(inventory(tmp_path, server)))
    c = codes(p)
    assert c["model-hub-error"] == "warning" and c["model-unknown"] == "warning" and p.memory is None
    n = len(server.log)
    ops.make_plan(*ops.load(inventory(tmp_path, server)))      # one attempt per process
    assert len(server.log) == n


def test_cli_plan_online_and_offline(server, tmp_path, monkeypatch):
    inv = inventory(tmp_path, server)
    r = CliRunner().invoke(cli.app, ["plan", inv, "--offline", "--json"])
    assert r.exit_code == 0, r.output
    assert "model-unknown" in [f["code"] for f in json.loads(r.stdout)["findings"]] and server.log == []
    monkeypatch.delenv("GPUCLUSTER_OFFLINE")                   # --offline set it for the process
    r = CliRunner().invoke(cli.app, ["plan", inv, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert "model-unknown" not in [f["code"] for f in out["findings"]] and out["memory"] is not None
    server.stop()
    r = CliRunner().invoke(cli.app, ["plan", inv, "--offline", "--json"])   # offline now reads the cache
    assert r.exit_code == 0 and json.loads(r.stdout)["memory"] is not None


# ---------------------------------------------------------------- trust_remote_code
@pytest.mark.parametrize("arch, severity", [("AcmeForCausalLM", "error"), ("Qwen2ForCausalLM", "warning")])
def test_auto_map_needs_trust_remote_code(server, tmp_path, arch, severity):
    cfg = {**CONFIG, "architectures": [arch], "auto_map": {"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"}}
    server.repos[MODEL] = sharded(cfg)
    inv, prof = ops.load(inventory(tmp_path, server))
    p = ops.make_plan(inv, prof)
    assert p.model.remote_code and codes(p)["trust-remote-code"] == severity
    f = next(f for f in p.findings if f.code == "trust-remote-code")
    assert MODEL in f.message and "trust-remote-code=true" in f.fix
    assert "trust-remote-code" not in codes(ops.make_plan(inv, prof, sets=config.parse_set(["trust-remote-code=true"])))


def test_no_auto_map_no_trust_remote_code_finding(server, tmp_path):
    assert "trust-remote-code" not in codes(ops.make_plan(*ops.load(inventory(tmp_path, server))))
