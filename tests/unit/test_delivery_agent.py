"""The delivery agent against an in-process HF-like server (with and without Range, hostile listings), and
one host serving another over loopback."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cluster.delivery import agent as d

FILES = {"config.json": b'{"model_type": "qwen2"}\n', "model.safetensors": os.urandom(300_000) + b"end",
         "sub/tokenizer.json": b"{}" * 1000, "weights.pth": b"p" * 10}
LFS = {"model.safetensors"}


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()  # noqa: S324


class Hub:
    def __init__(self, *, ranges: bool, token: str | None = None):
        self.log: list[tuple[str, str, int]] = []
        self.ranges, self.token = ranges, token
        hub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._send(401, b"unauthorized")
                p = self.path
                if p.startswith("/api/models/org/model/revision/"):
                    return self._send(200, json.dumps({"sha": "c0ffee"}).encode())
                if p.startswith("/api/models/org/model/tree/c0ffee"):
                    tree = [{"type": "directory", "path": "sub", "oid": "x", "size": 0}]
                    for path, data in FILES.items():
                        e = {"type": "file", "path": path, "size": len(data), "oid": git_oid(data)}
                        if path in LFS:
                            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}
                        tree.append(e)
                    return self._send(200, json.dumps(tree).encode())
                prefix = "/org/model/resolve/c0ffee/"
                if p.startswith(prefix) and p[len(prefix):] in FILES:
                    data = FILES[p[len(prefix):]]
                    rng = self.headers.get("Range")
                    if rng and hub.ranges:
                        start = int(rng.split("=")[1].rstrip("-"))
                        return self._send(206, data[start:], p[len(prefix):])
                    return self._send(200, data, p[len(prefix):])
                self._send(401, b"no such repo")   # like olah

            def _send(self, code, body, path=""):
                hub.log.append((self.command, path or self.path, len(body)))
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def files_served(self):
        return [p for m, p, n in self.log if not p.startswith("/api/")]


@pytest.fixture
def hub():
    h = Hub(ranges=True)
    yield h
    h.server.shutdown()


def job(endpoint, **kw):
    j = {"kind": "hf-mirror", "endpoint": endpoint, "repo": "org/model", "revision": "main", "include": [],
         "exclude": ["*.pth"], "verify": False}
    j.update(kw)
    j["spec"] = {"model": "org/model", "revision": j["revision"], "include": sorted(j["include"]),
                 "exclude": sorted(j["exclude"])}
    return j


def test_sync_downloads_verifies_and_second_run_fetches_nothing(hub, tmp_path):
    events = []
    res = d.agent_sync(job(hub.endpoint), str(tmp_path), events.append)
    assert sorted(res["fetched"]) == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    for p in res["fetched"]:
        assert (tmp_path / p).read_bytes() == FILES[p]
    assert not (tmp_path / "weights.pth").exists()
    doc = json.loads((tmp_path / d.MANIFEST).read_text())
    assert {f["path"]: f["sha256"] for f in doc["files"]} == {p: hashlib.sha256(FILES[p]).hexdigest()
                                                              for p in res["fetched"]}
    hub.log.clear()
    res = d.agent_sync(job(hub.endpoint), str(tmp_path), events.append)
    assert res["fetched"] == [] and hub.files_served() == []


def test_sync_repairs_truncated_and_corrupt_files_only(hub, tmp_path):
    d.agent_sync(job(hub.endpoint), str(tmp_path), lambda e: None)
    (tmp_path / "config.json").write_bytes(FILES["config.json"][:5])                  # truncated
    data = bytearray(FILES["model.safetensors"])
    data[1000] ^= 0xFF
    (tmp_path / "model.safetensors").write_bytes(bytes(data))                         # same size, new mtime
    hub.log.clear()
    res = d.agent_sync(job(hub.endpoint), str(tmp_path), lambda e: None)
    assert sorted(res["fetched"]) == ["config.json", "model.safetensors"]
    assert sorted(hub.files_served()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == FILES["model.safetensors"]


@pytest.mark.parametrize("ranges", [True, False])
def test_partial_download_resumes_where_range_is_honoured(tmp_path, ranges):
    h = Hub(ranges=ranges)
    try:
        part = tmp_path / d.PARTIAL_DIR / "model.safetensors"
        part.parent.mkdir(parents=True)
        part.write_bytes(FILES["model.safetensors"][:200_000])
        res = d.agent_sync(job(h.endpoint, include=["model.safetensors"]), str(tmp_path), lambda e: None)
        assert (tmp_path / "model.safetensors").read_bytes() == FILES["model.safetensors"]
        assert res["bytes"] == (len(FILES["model.safetensors"]) - 200_000 if ranges else len(FILES["model.safetensors"]))
        assert not part.exists()
    finally:
        h.server.shutdown()


def test_missing_repo_and_token_errors_are_one_line(tmp_path):
    h = Hub(ranges=True, token="s3cret")
    try:
        with pytest.raises(d.AgentError) as e:
            d.agent_sync(job(h.endpoint), str(tmp_path), lambda e: None)
        msg = str(e.value)
        assert "\n" not in msg and "HTTP 401" in msg and "org/model@main" in msg and "source.token" in msg
        res = d.agent_sync(job(h.endpoint), str(tmp_path), lambda e: None, token="s3cret")
        assert res["fetched"]
        with pytest.raises(d.AgentError, match="gated or private"):
            d.agent_sync(job(h.endpoint, repo="org/nope"), str(tmp_path), lambda e: None, token="s3cret")
    finally:
        h.server.shutdown()


class HostileHub(Hub):
    """A hub whose file list names paths outside the model folder."""

    def __init__(self, path: str):
        super().__init__(ranges=False)
        bad = {"type": "file", "path": path, "size": 4, "oid": git_oid(b"evil")}
        handler = self.server.RequestHandlerClass
        original = handler.do_GET

        def do_GET(h):
            if h.path.startswith("/api/models/org/model/tree/c0ffee"):
                return h._send(200, json.dumps([bad]).encode())
            if "/resolve/" in h.path:
                return h._send(200, b"evil")
            return original(h)
        handler.do_GET = do_GET


@pytest.mark.parametrize("path", ["../escaped.txt", "/tmp/gpucluster-test-abs.txt", "sub/../../up.txt"])
def test_hostile_listing_writes_nothing_outside_the_folder(tmp_path, path):
    h = HostileHub(path)
    target = tmp_path / "inside" / "model"
    target.mkdir(parents=True)
    try:
        with pytest.raises(d.AgentError, match="not a plain relative path"):
            d.agent_sync(job(h.endpoint, exclude=[]), str(target), lambda e: None)
    finally:
        h.server.shutdown()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert not os.path.exists("/tmp/gpucluster-test-abs.txt")
    assert h.files_served() == [], "nothing was downloaded"


def test_one_host_serves_another_over_loopback_with_a_token(tmp_path, hub):
    src, dst = tmp_path / "src", tmp_path / "dst"
    d.agent_sync(job(hub.endpoint), str(src), lambda e: None)       # a verified copy with a manifest
    (tmp_path / "token").write_text(f"{d.TRANSFER_ENV}=tok\n")
    events: list = []
    server = threading.Thread(target=d.agent_serve, daemon=True, args=(
        {"bind": "127.0.0.1", "port": 0, "idle": 5}, str(src), events.append, "tok"))
    server.start()
    while not any(e["ev"] == "listening" for e in events):
        threading.Event().wait(0.05)
    port = next(e["port"] for e in events if e["ev"] == "listening")
    peer = {**job(f"http://127.0.0.1:{port}"), "kind": "peer", "peer_name": "h1"}
    with pytest.raises(d.AgentError, match="HTTP 401"):                       # a wrong token is refused
        d.agent_sync(peer, str(dst), lambda e: None, token="nope")
    (dst / "sub").mkdir(parents=True)
    (dst / "sub" / "tokenizer.json").write_bytes(b"x" * len(FILES["sub/tokenizer.json"]))   # corrupt, same size
    done = d.agent_sync(peer, str(dst), lambda e: None, token=d.read_token(str(tmp_path / "token")))
    assert done["summary"].startswith("repaired 3 file(s)") and done["summary"].endswith("from h1")
    for p, data in FILES.items():
        if p != "weights.pth":                                               # excluded on the source
            assert (dst / p).read_bytes() == data
    again = d.agent_sync(peer, str(dst), lambda e: None, token="tok")
    assert again["summary"] == "present" and again["fetched"] == []
