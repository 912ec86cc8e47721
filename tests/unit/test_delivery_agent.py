"""The delivery agent against an in-process HF-like server (with and without Range, hostile listings), and
one host serving another over loopback."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
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
    assert done["summary"].startswith("repaired 3 file(s)") and "from h1;" in done["summary"]
    assert done["summary"].endswith("verified: 3 by the source's hash, 0 by the head's")
    for p, data in FILES.items():
        if p != "weights.pth":                                               # excluded on the source
            assert (dst / p).read_bytes() == data
    again = d.agent_sync(peer, str(dst), lambda e: None, token="tok")
    assert again["summary"] == "present" and again["fetched"] == []


# ---------------------------------------------------------------- a source that lists no hash
class HashlessHub(Hub):
    """A mirror whose file tree gives sizes only: no LFS sha256, no git blob id."""

    def __init__(self):
        super().__init__(ranges=True)
        handler = self.server.RequestHandlerClass
        original = handler.do_GET

        def do_GET(h):
            if h.path.startswith("/api/models/org/model/tree/c0ffee"):
                tree = [{"type": "file", "path": p, "size": len(data)} for p, data in FILES.items()]
                return h._send(200, json.dumps(tree).encode())
            return original(h)
        handler.do_GET = do_GET


@pytest.fixture
def hashless():
    h = HashlessHub()
    yield h
    h.server.shutdown()


def _serve(src, events):
    server = threading.Thread(target=d.agent_serve, daemon=True, args=(
        {"bind": "127.0.0.1", "port": 0, "idle": 5}, str(src), events.append, "tok"))
    server.start()
    while not any(e["ev"] == "listening" for e in events):
        threading.Event().wait(0.05)
    port = next(e["port"] for e in events if e["ev"] == "listening")
    return {**job(f"http://127.0.0.1:{port}"), "kind": "peer", "peer_name": "h1"}


def _flip(path, at=1000):
    data = bytearray(path.read_bytes())
    data[min(at, len(data) - 1)] ^= 0xFF
    path.write_bytes(bytes(data))          # same size, new mtime


def test_hashless_listing_head_records_its_own_sha256(hashless, tmp_path):
    res = d.agent_sync(job(hashless.endpoint), str(tmp_path), lambda e: None)
    doc = json.loads((tmp_path / d.MANIFEST).read_text())
    kept = [p for p in FILES if p != "weights.pth"]
    assert {f["path"]: f["sha256"] for f in doc["files"]} == {p: hashlib.sha256(FILES[p]).hexdigest() for p in kept}
    assert {f["hash_by"] for f in doc["files"]} == {"head"}
    assert res["verified"] == {"source": 0, "head": 3}
    assert res["summary"].endswith("verified: 0 by the source's hash, 3 hashed here (the source lists none)")


def test_hashless_listing_head_checks_against_its_own_hash(hashless, tmp_path):
    d.agent_sync(job(hashless.endpoint), str(tmp_path), lambda e: None)
    _flip(tmp_path / "model.safetensors")                  # corrupt on the head: its recorded sha256 catches it
    (tmp_path / "config.json").touch()                     # touched only: hashed again, matches, kept
    hashless.log.clear()
    res = d.agent_sync(job(hashless.endpoint), str(tmp_path), lambda e: None)
    assert res["fetched"] == ["model.safetensors"] and hashless.files_served() == ["model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    hashless.log.clear()
    res = d.agent_sync(job(hashless.endpoint, verify=True), str(tmp_path), lambda e: None)   # --verify: all hashed
    assert res["fetched"] == [] and hashless.files_served() == []


def test_hashless_listing_never_hashed_file_is_fetched_again(hashless, tmp_path):
    """A file present before any manifest vouched for it, with no hash anywhere, is not trusted on its size."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tokenizer.json").write_bytes(b"x" * len(FILES["sub/tokenizer.json"]))
    res = d.agent_sync(job(hashless.endpoint), str(tmp_path), lambda e: None)
    assert "sub/tokenizer.json" in res["fetched"]
    assert (tmp_path / "sub" / "tokenizer.json").read_bytes() == FILES["sub/tokenizer.json"]


def test_hashless_listing_moved_revision_is_not_vouched_by_old_hashes(hashless, tmp_path):
    d.agent_sync(job(hashless.endpoint), str(tmp_path), lambda e: None)
    doc = json.loads((tmp_path / d.MANIFEST).read_text())
    doc["commit"] = "0ld"                                   # what the head hashed belongs to another commit
    (tmp_path / d.MANIFEST).write_text(json.dumps(doc))
    hashless.log.clear()
    res = d.agent_sync(job(hashless.endpoint), str(tmp_path), lambda e: None)
    assert sorted(res["fetched"]) == ["config.json", "model.safetensors", "sub/tokenizer.json"]


def test_hashless_listing_peer_copy_detects_a_corrupted_byte(hashless, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    d.agent_sync(job(hashless.endpoint), str(src), lambda e: None)
    peer = _serve(src, [])
    first = d.agent_sync(peer, str(dst), lambda e: None, token="tok")
    assert first["summary"].startswith("copied 3 file(s)")
    assert first["summary"].endswith("verified: 0 by the source's hash, 3 by the head's")
    peer_doc = json.loads((dst / d.MANIFEST).read_text())
    assert {f["path"]: (f["sha256"], f["hash_by"]) for f in peer_doc["files"]} == {
        p: (hashlib.sha256(FILES[p]).hexdigest(), "head") for p in FILES if p != "weights.pth"}
    _flip(dst / "model.safetensors")                       # one byte on the peer, same size
    again = d.agent_sync(peer, str(dst), lambda e: None, token="tok")
    assert again["fetched"] == ["model.safetensors"] and again["summary"].startswith("repaired 1 file(s)")
    assert (dst / "model.safetensors").read_bytes() == FILES["model.safetensors"]


def test_hashless_listing_peer_refuses_bytes_the_head_did_not_hash(hashless, tmp_path):
    """The head's file changed after it was hashed: the peer's download fails the head's sha256."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    d.agent_sync(job(hashless.endpoint), str(src), lambda e: None)
    _flip(src / "model.safetensors")
    peer = _serve(src, [])
    with pytest.raises(d.AgentError, match="checksum mismatch"):
        d.agent_sync(peer, str(dst), lambda e: None, token="tok")
    assert not (dst / "model.safetensors").exists()


def test_peer_refuses_a_manifest_without_sha256(hub, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    d.agent_sync(job(hub.endpoint), str(src), lambda e: None)
    doc = json.loads((src / d.MANIFEST).read_text())
    for f in doc["files"]:
        if f["path"] == "config.json":
            del f["sha256"]                                 # an old manifest, or a head that never hashed it
    (src / d.MANIFEST).write_text(json.dumps(doc))
    peer = _serve(src, [])
    with pytest.raises(d.AgentError, match="no sha256 for 'config.json'.*--verify"):
        d.agent_sync(peer, str(dst), lambda e: None, token="tok")
    assert not (dst / "config.json").exists()


def test_malformed_listing_hash_is_no_hash(tmp_path):
    h = HashlessHub()
    handler = h.server.RequestHandlerClass
    hashless_get = handler.do_GET

    def do_GET(r):
        if r.path.startswith("/api/models/org/model/tree/c0ffee"):
            tree = [{"type": "file", "path": "config.json", "size": len(FILES["config.json"]), "oid": "not-hex",
                     "lfs": None}]
            return r._send(200, json.dumps(tree).encode())
        return hashless_get(r)
    handler.do_GET = do_GET
    try:
        res = d.agent_sync(job(h.endpoint, include=["config.json"]), str(tmp_path), lambda e: None)
    finally:
        h.server.shutdown()
    assert res["fetched"] == ["config.json"] and res["verified"] == {"source": 0, "head": 1}


# ---------------------------------------------------------------- the relay through this machine
class _LocalHosts:
    """Stands in for the executor's hosts: every "host" is a folder on this machine."""

    class _Sftp:
        def open(self, path, mode):
            f = open(path, mode)
            f.set_pipelined = lambda _on: None
            return f

        def putfo(self, fo, path):
            with open(path, "wb") as f:
                f.write(fo.read())

        def close(self):
            pass

    def sftp(self, host):
        return self._Sftp()

    def host(self, name):
        return name


class _LocalEx:
    hosts = _LocalHosts()

    def run(self, host, argv, timeout=None):
        import subprocess

        class R:
            pass
        r = subprocess.run(list(argv), capture_output=True, text=True)
        out = R()
        out.ok, out.stdout, out.rc = r.returncode == 0, r.stdout, r.returncode
        out.last_line = lambda: (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        return out


def test_relay_through_this_machine_verifies_against_the_heads_hash(hashless, tmp_path):
    from cluster.delivery import control
    src, dst = tmp_path / "head", tmp_path / "other"
    d.agent_sync(job(hashless.endpoint), str(src), lambda e: None)      # no source hash: the head's sha256
    dst.mkdir()
    out = control.copy_tree(_LocalEx(), "head", str(src), "other", str(dst), lambda line: None)
    assert out.startswith("copied 3 file(s)") and out.endswith("verified: 0 by the source's hash, 3 by the head's")
    _flip(dst / "config.json", at=3)
    out = control.copy_tree(_LocalEx(), "head", str(src), "other", str(dst), lambda line: None)
    assert out.startswith("repaired 1 file(s)") and (dst / "config.json").read_bytes() == FILES["config.json"]
    _flip(src / "sub" / "tokenizer.json", at=5)           # the head's bytes no longer match its own hash
    _flip(dst / "sub" / "tokenizer.json", at=7)
    with pytest.raises(RuntimeError, match="checksum mismatch after copy"):
        control.copy_tree(_LocalEx(), "head", str(src), "other", str(dst), lambda line: None)
    doc = json.loads((src / d.MANIFEST).read_text())
    del doc["files"][0]["sha256"]
    (src / d.MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(RuntimeError, match="no sha256"):
        control.copy_tree(_LocalEx(), "head", str(src), "other", str(dst), lambda line: None)


# ---------------------------------------------------------------- retry policies at the I/O edge
BIG = "/org/model/resolve/c0ffee/model.safetensors"
REVISION = "/api/models/org/model/revision/"


class FlakyHub(Hub):
    """A hub whose first answers for one path prefix follow a script (a status, optionally with headers; "drop":
    no answer; "cut": half the body, then closed; "stall": half the body, then silence), then are normal."""

    def __init__(self, prefix: str, script: list, *, ranges: bool = True):
        super().__init__(ranges=ranges)
        self.prefix, self.script, self.hits = prefix, list(script), []     # hits: (time, Range header)
        self.release = threading.Event()
        hub, handler = self, self.server.RequestHandlerClass
        original = handler.do_GET

        def do_GET(h):
            if not h.path.startswith(hub.prefix):
                return original(h)
            hub.hits.append((time.monotonic(), h.headers.get("Range")))
            how = hub.script.pop(0) if hub.script else "ok"
            if how == "ok":
                return original(h)
            if how == "drop":
                return None
            if how in ("cut", "stall"):
                data = FILES[h.path.rsplit("/", 1)[-1]]
                h.send_response(200)
                h.send_header("Content-Length", str(len(data)))
                h.end_headers()
                h.wfile.write(data[:len(data) // 2])
                h.wfile.flush()
                if how == "stall":
                    hub.release.wait(10)
                return None
            code, headers = how if isinstance(how, tuple) else (how, {})
            h.send_response(code)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", "4")
            h.end_headers()
            h.wfile.write(b"busy")
        handler.do_GET = do_GET

    def stop(self):
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def fast(monkeypatch):
    """Policies with the same tries, in milliseconds: tests count tries, never wall time."""
    monkeypatch.setattr(d, "LISTING", d.LISTING._replace(base=0.01, cap=0.05, within=30.0))
    monkeypatch.setattr(d, "FILE", d.FILE._replace(base=0.01, cap=0.05, within=30.0))
    monkeypatch.setattr(d, "READ_TIMEOUT", 0.5)


def _notes(events):
    return [e["msg"] for e in events if e["ev"] == "note" and " try " in e["msg"]]


@pytest.mark.parametrize("prefix,script", [(BIG, [503, 503]), (REVISION, [503, 503]), (BIG, [429, "drop"]),
                                           (BIG, ["cut", 502])])
def test_transient_failures_are_retried_with_a_note_each(tmp_path, fast, prefix, script):
    h = FlakyHub(prefix, script)
    events: list = []
    try:
        res = d.agent_sync(job(h.endpoint), str(tmp_path), events.append)
    finally:
        h.stop()
    assert (tmp_path / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert len(h.hits) == 3 and res["summary"].startswith("fetched 3 file(s)")
    notes = _notes(events)
    assert len(notes) == 2 and "try 2 of" in notes[0] and "try 3 of" in notes[1]
    what = "file model.safetensors" if prefix == BIG else "revision"
    assert all(f"org/model@main at {h.endpoint}: {what}: " in n for n in notes)


def test_a_source_that_keeps_failing_ends_after_the_policys_tries_with_one_error_line(tmp_path, fast, capsys):
    h = FlakyHub(BIG, [503] * 50)
    jobfile = tmp_path / "sync.json"
    jobfile.write_text(json.dumps({**job(h.endpoint), "target": str(tmp_path / "model")}))
    try:
        rc = d.agent_main(["sync", str(jobfile)])
    finally:
        h.stop()
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    errors = [e["msg"] for e in events if e["ev"] == "error"]
    assert rc == 1 and len(h.hits) == d.FILE.tries == 5
    assert len(errors) == 1 and len(_notes(events)) == d.FILE.tries - 1
    msg = errors[0]
    assert f"org/model@main at {h.endpoint}: file model.safetensors: HTTP 503 GET {h.endpoint}{BIG}" in msg
    assert "gave up after 5 tries (file policy: at most 5 tries within 30 s)" in msg
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_a_listing_that_keeps_failing_names_the_mirror_hint(tmp_path, fast):
    h = FlakyHub(REVISION, [503] * 50)
    try:
        with pytest.raises(d.AgentError) as e:
            d.agent_sync(job(h.endpoint), str(tmp_path), lambda ev: None)
    finally:
        h.stop()
    assert len(h.hits) == d.LISTING.tries == 4
    assert "revision: HTTP 503" in str(e.value) and "mirrors answer 5xx for missing repositories too" in str(e.value)
    assert "gave up after 4 tries (listing policy" in str(e.value)


@pytest.mark.parametrize("ranges", [True, False])
def test_a_body_that_stalls_times_out_and_the_file_resumes_or_restarts(tmp_path, fast, ranges):
    h = FlakyHub(BIG, ["stall"], ranges=ranges)
    events: list = []
    try:
        res = d.agent_sync(job(h.endpoint, include=["model.safetensors"]), str(tmp_path), events.append)
    finally:
        h.stop()
    size = len(FILES["model.safetensors"])
    assert (tmp_path / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert [r for _, r in h.hits] == [None, f"bytes={size // 2}-"]       # the second try asks for the rest
    assert res["bytes"] == (size if ranges else size // 2 + size)          # ignored Range: the file starts again
    notes = _notes(events)
    assert len(notes) == 1 and "timed out" in notes[0]


def test_not_found_is_not_retried_and_names_the_path(tmp_path, fast):
    h = FlakyHub(BIG, [404] * 5)
    events: list = []
    try:
        with pytest.raises(d.AgentError) as e:
            d.agent_sync(job(h.endpoint), str(tmp_path), events.append)
    finally:
        h.stop()
    assert len(h.hits) == 1 and _notes(events) == []
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(f"[HTTP 404 GET {h.endpoint}{BIG}]") and "file model.safetensors" in msg


@pytest.mark.parametrize("retry_after,cap,waits", [("0.4", 5.0, 0.4), ("3600", 0.3, 0.3)])
def test_retry_after_is_honoured_up_to_the_cap(tmp_path, fast, monkeypatch, retry_after, cap, waits):
    monkeypatch.setattr(d, "FILE", d.FILE._replace(cap=cap))
    h = FlakyHub(BIG, [(503, {"Retry-After": retry_after})])
    events: list = []
    try:
        d.agent_sync(job(h.endpoint), str(tmp_path), events.append)
    finally:
        h.stop()
    (t1, _), (t2, _) = h.hits
    assert waits <= t2 - t1 < 30
    assert _notes(events)[0].endswith(f"try 2 of 5 in {waits:.1f} s")


def test_backoff_doubles_with_jitter_and_caps():
    p = d.Policy(name="t", tries=9, within=99.0, base=1.0, cap=6.0)
    for tries, step in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 6.0), (8, 6.0)]:
        assert all(step / 2 <= d.backoff(p, tries, None) <= step for _ in range(50))
    assert d.backoff(p, 1, 2.5) == 2.5 and d.backoff(p, 1, 600.0) == 6.0
    assert d._retry_after({"Retry-After": " 7 "}) == 7.0
    assert d._retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert d._retry_after({"Retry-After": "-1"}) is None and d._retry_after({}) is None


def test_messages_name_urls_without_credentials_or_query():
    assert d.bare("https://u:p@hf-mirror.com:8443/a/b?token=x#f") == "https://hf-mirror.com:8443/a/b"
