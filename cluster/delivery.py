"""Model delivery: download the model once, fan it out host to host, verify every copy.

Two halves live in this one file:

* the control side (`deliver`): inspects every host over SSH (manifest + `find` sizes/mtimes +
  `sha256sum` where needed), decides what each host lacks, and orchestrates;
* the agent (`agent_main`, stdlib only, Python >= 3.8): this very file, copied to a host and run as
  `python3 delivery.py agent CMD JOB` inside a throwaway container of the profile's image (or in
  process on the control machine). It lists and downloads from the hub (`sync`), and moves files
  between hosts over one token-authenticated TCP stream (`send` / `recv`).

Module-level imports are stdlib only, so that the file runs as a script inside any image.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import secrets
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from .config import Host
    from .plan import Plan
    from .remote import Hosts

MANIFEST = ".gpucluster-manifest.json"
PARTIAL_DIR = ".gpucluster-partial"
TOKEN_ENV = "GPUCLUSTER_SOURCE_TOKEN"
TRANSFER_ENV = "GPUCLUSTER_TRANSFER_TOKEN"
DEFAULT_REVISION = {"hf-mirror": "main", "huggingface": "main", "modelscope": "master"}
CHUNK = 1 << 20

Entry = Dict[str, Any]   # {"path", "size", "sha256": str|None, "oid": str|None (git blob sha1), "mtime": int ns}


# =============================================================================================
# Pure parts (used by both halves; unit-tested)
# =============================================================================================
def ignored(path: str) -> bool:
    """Files in a model directory that are ours or a client's bookkeeping, never model files."""
    return path.startswith(".gpucluster") or path.startswith(".cache/huggingface/") or path.endswith(
        ".gpucluster-part")


def _pattern(p: str) -> str:
    return p + "*" if p.endswith("/") else p


def select(files: Iterable[Entry], include: Iterable[str] = (), exclude: Iterable[str] = ()) -> List[Entry]:
    """huggingface_hub's allow/ignore semantics: fnmatch on the repo path; `dir/` means `dir/*`."""
    inc, exc = [_pattern(p) for p in include], [_pattern(p) for p in exclude]
    out = []
    for f in files:
        path = f["path"]
        if inc and not any(fnmatch.fnmatch(path, p) for p in inc):
            continue
        if any(fnmatch.fnmatch(path, p) for p in exc):
            continue
        out.append(f)
    return sorted(out, key=lambda f: f["path"])


def mtime_ns(text: str) -> int:
    """`find -printf %T@` (seconds with a fraction) -> integer nanoseconds, exactly."""
    sec, _, frac = text.strip().partition(".")
    return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])


def parse_scan(text: str) -> Dict[str, Tuple[int, int]]:
    """Lines `relpath<TAB>size<TAB>mtime` (find -printf) -> path -> (size, mtime ns); our files skipped."""
    out = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or not parts[0] or ignored(parts[0]):
            continue
        try:
            out[parts[0]] = (int(parts[1]), mtime_ns(parts[2]))
        except ValueError:
            continue
    return out


def parse_sha256sum(text: str) -> Dict[str, str]:
    out = {}
    for line in text.splitlines():
        digest, sep, path = line.partition("  ")
        if sep and len(digest) == 64 and not digest.startswith("\\"):
            out[path] = digest
    return out


def identity_matches(have: Entry, want: Entry) -> bool:
    """Do two entries name the same content? sha256 first, else the git blob id, else size only."""
    if have.get("size") != want.get("size"):
        return False
    if want.get("sha256"):
        return have.get("sha256") == want["sha256"]
    if want.get("oid"):
        return have.get("oid") == want["oid"]
    return True


def plan_host(expected: List[Entry], scanned: Dict[str, Tuple[int, int]], manifest: Optional[Dict[str, Entry]],
              verify: bool = False) -> Tuple[List[str], List[str]]:
    """(need, check): files to transfer (absent or wrong size) and files to hash before trusting them.

    A file is trusted without hashing only when the host's manifest vouches for the same content,
    size and mtime (it was verified and has not been touched since), and `verify` is off."""
    need, check = [], []
    for e in expected:
        seen = scanned.get(e["path"])
        if seen is None or seen[0] != e["size"]:
            need.append(e["path"])
            continue
        m = (manifest or {}).get(e["path"])
        if not verify and m and identity_matches(m, e) and m.get("mtime") == seen[1]:
            continue
        check.append(e["path"])
    return need, check


def mismatched(expected: List[Entry], hashes: Dict[str, str]) -> List[str]:
    """Paths whose sha256 (as measured) differs from the expected one, or that could not be hashed."""
    by_path = {e["path"]: e for e in expected}
    return sorted(p for p in by_path if p in hashes and by_path[p].get("sha256") != hashes[p]) + sorted(
        p for p in by_path if p not in hashes)


def manifest_doc(spec: Dict[str, Any], commit: str, files: List[Entry]) -> Dict[str, Any]:
    return {"version": 1, **spec, "commit": commit, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": [{k: f.get(k) for k in ("path", "size", "sha256", "oid", "mtime") if f.get(k) is not None}
                      for f in sorted(files, key=lambda f: f["path"])]}


def manifest_files(doc: Any, spec: Dict[str, Any]) -> Optional[Dict[str, Entry]]:
    """path -> entry of a manifest written for the same spec (model, revision, filters), else None."""
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("files"), list):
        return None
    if any(doc.get(k) != v for k, v in spec.items()):
        return None
    return {f["path"]: f for f in doc["files"] if isinstance(f, dict) and "path" in f}


def same_content(a: Optional[Dict[str, Entry]], b: Optional[Dict[str, Entry]]) -> bool:
    if a is None or b is None or set(a) != set(b):
        return False
    return all(a[p].get("size") == b[p].get("size") and a[p].get("sha256") == b[p].get("sha256") for p in a)


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def safe_relpath(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and "\\" not in path and all(
        p not in ("", ".", "..") for p in parts) and "\x00" not in path


# =============================================================================================
# The agent: stdlib only; runs in a container on a host, or in process on the control machine
# =============================================================================================
class AgentError(Exception):
    """One line for the user."""


def _emit_stdout(event: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class _NoAuthOnRedirect(urllib.request.HTTPRedirectHandler):
    """Authorization is added unredirected; it follows a redirect only to the same host (never to a CDN)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new is not None and auth and urllib.parse.urlsplit(newurl).netloc in ("", urllib.parse.urlsplit(
                req.full_url).netloc):
            new.add_unredirected_header("Authorization", auth)
        return new


def _opener():
    return urllib.request.build_opener(_NoAuthOnRedirect())


def _request(url: str, token: Optional[str], headers: Optional[Dict[str, str]] = None) -> urllib.request.Request:
    req = urllib.request.Request(url, headers={"User-Agent": "gpucluster-delivery/1", **(headers or {})})
    if token:
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    return req


def _http_error(job: Dict[str, Any], code: int, what: str, token: Optional[str]) -> AgentError:
    repo, rev, ep = job["repo"], job.get("revision"), job["endpoint"]
    if code in (401, 403):
        why = ("access denied: gated or private (accept the license on the hub, check source.token)" if token else
               "not found, gated or private (olah and HF answer 401 for all three; check deploy.model, "
               "source.revision, or set source.token)")
    elif code == 404:
        why = "not found (check deploy.model and source.revision)"
    else:
        why = f"the server failed (HTTP {code}; mirrors answer 5xx for missing repositories too)"
    return AgentError(f"{repo}@{rev} at {ep}: {what}: {why} [HTTP {code}]")


def _get_json(job: Dict[str, Any], url: str, token: Optional[str], what: str) -> Tuple[Any, Any]:
    try:
        with _opener().open(_request(url, token), timeout=60) as r:
            return json.loads(r.read().decode()), r.headers
    except urllib.error.HTTPError as e:
        raise _http_error(job, e.code, what, token) from None
    except (urllib.error.URLError, OSError) as e:
        raise AgentError(f"{job['endpoint']}: cannot reach the model source ({getattr(e, 'reason', e)})") from None
    except ValueError:
        raise AgentError(f"{url}: the answer is not JSON (is source.endpoint a hub?)") from None


def list_remote(job: Dict[str, Any], token: Optional[str]) -> Tuple[str, List[Entry]]:
    """(commit, files) of the repository at the revision: sizes, and sha256 / git blob ids."""
    ep, repo, rev = job["endpoint"].rstrip("/"), job["repo"], job["revision"]
    q = urllib.parse.quote
    if job["kind"] == "modelscope":
        url = f"{ep}/api/v1/models/{q(repo)}/repo/files?Revision={q(rev, safe='')}&Recursive=True"
        doc, _ = _get_json(job, url, token, "file list")
        if not isinstance(doc, dict) or not doc.get("Success", doc.get("Code") == 200):
            raise AgentError(f"{repo}@{rev} at {ep}: {doc.get('Message') if isinstance(doc, dict) else doc}")
        files = [{"path": f["Path"], "size": int(f["Size"]), "sha256": f.get("Sha256") or None, "oid": None}
                 for f in (doc.get("Data") or {}).get("Files") or [] if f.get("Type", "blob") == "blob"]
        return rev, files
    info, _ = _get_json(job, f"{ep}/api/models/{q(repo)}/revision/{q(rev, safe='')}", token, "revision")
    commit = info.get("sha") if isinstance(info, dict) else None
    if not commit:
        raise AgentError(f"{repo}@{rev} at {ep}: the revision answer has no commit sha")
    files: List[Entry] = []
    url: Optional[str] = f"{ep}/api/models/{q(repo)}/tree/{commit}?recursive=true"
    while url:
        page, headers = _get_json(job, url, token, "file tree")
        for f in page if isinstance(page, list) else []:
            if f.get("type") != "file":
                continue
            lfs = f.get("lfs") or {}
            files.append({"path": f["path"], "size": int(f.get("size") or lfs.get("size") or 0),
                          "sha256": lfs.get("oid") or lfs.get("sha256") or None,
                          "oid": None if lfs else f.get("oid")})
        url = None
        for part in (headers.get("Link") or "").split(","):   # HF paginates large trees
            if 'rel="next"' in part:
                url = urllib.parse.urljoin(ep + "/", part.split(";")[0].strip().strip("<>"))
    return commit, files


def file_url(job: Dict[str, Any], commit: str, path: str) -> str:
    ep, repo, q = job["endpoint"].rstrip("/"), job["repo"], urllib.parse.quote
    if job["kind"] == "modelscope":
        return f"{ep}/api/v1/models/{q(repo)}/repo?Revision={q(commit, safe='')}&FilePath={q(path, safe='')}"
    return f"{ep}/{q(repo)}/resolve/{q(commit, safe='')}/{q(path)}"


class _Hashes:
    """sha256 and the git blob id (sha1 of `blob <size>\\0` + content) in one pass."""

    def __init__(self, size: int):
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1(b"blob %d\x00" % size)  # noqa: S324 - git's object id, not security

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        self.sha1.update(data)


def hash_file(path: str, size: int) -> Tuple[str, str]:
    h = _Hashes(size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.sha256.hexdigest(), h.sha1.hexdigest()


class _Ticker:
    """Throttled progress events: {"ev": "progress", "done", "total", "file"}."""

    def __init__(self, emit, total: int, every: float = 0.5):
        self.emit, self.total, self.every, self.done, self.last = emit, total, every, 0, 0.0

    def add(self, n: int, file: str = "", force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            self.emit({"ev": "progress", "done": self.done, "total": self.total, "file": file})


def download_file(job: Dict[str, Any], commit: str, e: Entry, target: str, token: Optional[str],
                  tick: _Ticker) -> Tuple[str, str, int]:
    """Download one file into target, resuming a partial copy where the server honours Range.

    Returns (sha256, git oid, bytes transferred). The final file appears (atomic rename) only
    after its size and checksum match the listing."""
    path, size = e["path"], e["size"]
    part = os.path.join(target, PARTIAL_DIR, path)
    final = os.path.join(target, path)
    os.makedirs(os.path.dirname(part), exist_ok=True)
    moved = 0
    for attempt in range(4):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        if have > size:
            os.remove(part)
            have = 0
        headers = {"Range": f"bytes={have}-"} if 0 < have < size else {}
        try:
            resp = _opener().open(_request(file_url(job, commit, path), token, headers), timeout=120)
        except urllib.error.HTTPError as err:
            if err.code == 416:   # we already hold every byte
                resp = None
            else:
                raise _http_error(job, err.code, f"file {path}", token) from None
        except (urllib.error.URLError, OSError) as err:
            if attempt == 3:
                raise AgentError(f"{path}: download failed ({getattr(err, 'reason', err)})") from None
            time.sleep(1 + attempt)
            continue
        try:
            if resp is not None and resp.status == 206:
                h = _Hashes(size)                      # resume: hash what we hold, append the rest
                with open(part, "rb") as f:
                    for chunk in iter(lambda: f.read(CHUNK), b""):
                        h.update(chunk)
                mode = "ab"
            elif resp is not None:
                h, mode = _Hashes(size), "wb"          # Range ignored (olah): start this file again
                tick.add(-have, path)
            else:
                h = _Hashes(size)
                with open(part, "rb") as f:
                    for chunk in iter(lambda: f.read(CHUNK), b""):
                        h.update(chunk)
                mode = None
            if mode:
                with open(part, mode) as out:
                    while True:
                        try:
                            chunk = resp.read(CHUNK)
                        except (OSError, ValueError) as err:
                            raise ConnectionError(str(err)) from None
                        if not chunk:
                            break
                        out.write(chunk)
                        h.update(chunk)
                        moved += len(chunk)
                        tick.add(len(chunk), path)
        except ConnectionError as err:
            if attempt == 3:
                raise AgentError(f"{path}: download interrupted ({err})") from None
            time.sleep(1 + attempt)
            continue
        finally:
            if resp is not None:
                resp.close()
        got = os.path.getsize(part)
        if got < size:
            if attempt == 3:
                raise AgentError(f"{path}: got {got} of {size} bytes")
            continue
        sha, oid = h.sha256.hexdigest(), h.sha1.hexdigest()
        if got != size or (e.get("sha256") and sha != e["sha256"]) or (e.get("oid") and oid != e["oid"]):
            os.remove(part)
            raise AgentError(f"{path}: checksum mismatch after download (expected "
                             f"{e.get('sha256') or e.get('oid')}, got {sha}); the source serves other bytes")
        os.makedirs(os.path.dirname(final) or target, exist_ok=True)
        os.replace(part, final)
        return sha, oid, moved
    raise AgentError(f"{path}: download failed")


def read_manifest_at(target: str) -> Any:
    try:
        with open(os.path.join(target, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def scan_dir(target: str) -> Dict[str, Tuple[int, int]]:
    out = {}
    for dp, dns, fns in os.walk(target):
        for fn in fns:
            full = os.path.join(dp, fn)
            rel = os.path.relpath(full, target).replace(os.sep, "/")
            if ignored(rel) or os.path.islink(full):
                continue
            st = os.stat(full)
            out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def write_manifest_at(target: str, doc: Dict[str, Any]) -> None:
    tmp = os.path.join(target, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(target, MANIFEST))


def agent_sync(job: Dict[str, Any], target: str, emit: Callable[[Dict[str, Any]], None],
               token: Optional[str] = None) -> Dict[str, Any]:
    """List the source, keep verified files, download the rest (resuming), write the manifest."""
    commit, listed = list_remote(job, token)
    files = select(listed, job.get("include") or (), job.get("exclude") or ())
    if not files:
        raise AgentError(f"{job['repo']}@{job['revision']}: no file matches include {job.get('include')} / "
                         f"exclude {job.get('exclude')}")
    if not any(f["path"] == "config.json" for f in files):
        emit({"ev": "note", "msg": "the selected files hold no config.json"})
    os.makedirs(target, exist_ok=True)
    spec = job["spec"]
    have = manifest_files(read_manifest_at(target), spec)
    scanned = scan_dir(target)
    need, check = plan_host(files, scanned, have, bool(job.get("verify")))
    by_path = {f["path"]: dict(f) for f in files}
    for p in check:   # present with the right size, but not vouched for: hash before trusting
        sha, oid = hash_file(os.path.join(target, p), by_path[p]["size"])
        e = by_path[p]
        if (e.get("sha256") and sha != e["sha256"]) or (e.get("oid") and oid != e["oid"]):
            need.append(p)
        else:
            e["sha256"], e["oid"] = sha, oid
    for p, e in by_path.items():
        if p not in need and p not in check and have and p in have:
            e["sha256"] = have[p].get("sha256") or e.get("sha256")
            e["oid"] = have[p].get("oid") or e.get("oid")
    need = sorted(set(need))
    total = sum(by_path[p]["size"] for p in need)
    emit({"ev": "plan", "commit": commit, "files": len(files), "need": need, "bytes": total,
          "checked": len(check)})
    tick = _Ticker(emit, total)
    moved = 0
    for p in need:
        sha, oid, n = download_file(job, commit, by_path[p], target, token, tick)
        by_path[p]["sha256"], by_path[p]["oid"] = sha, oid
        moved += n
    tick.add(0, "", force=True)
    now = scan_dir(target)
    for p, e in by_path.items():
        e["mtime"] = now[p][1]
    doc = manifest_doc(spec, commit, list(by_path.values()))
    write_manifest_at(target, doc)
    result = {"ev": "done", "commit": commit, "fetched": need, "bytes": moved, "manifest": doc}
    emit(result)
    return result


def agent_recv(job: Dict[str, Any], target: str, emit, token: str) -> Dict[str, Any]:
    """Accept one authenticated connection from job['peer'] and receive exactly job['files']."""
    expected = {e["path"]: e for e in job["files"]}
    srv = socket.create_server((job["bind"], int(job.get("port", 0))))
    srv.settimeout(float(job.get("accept_timeout", 120)))
    emit({"ev": "listening", "port": srv.getsockname()[1]})
    deadline = time.monotonic() + float(job.get("accept_timeout", 120))
    while True:
        if time.monotonic() > deadline:
            raise AgentError("no sender connected in time")
        try:
            conn, addr = srv.accept()
        except socket.timeout:
            raise AgentError("no sender connected in time") from None
        conn.settimeout(20)
        if job.get("peer") and addr[0] != job["peer"]:
            emit({"ev": "note", "msg": f"refused a connection from {addr[0]} (expected {job['peer']})"})
            conn.close()
            continue
        rfile = conn.makefile("rb")
        try:
            line = rfile.readline(200).strip().decode(errors="replace")
        except OSError:
            line = ""
        if not hmac.compare_digest(line, token):
            emit({"ev": "note", "msg": f"refused a connection from {addr[0]} (bad token)"})
            conn.close()
            continue
        break
    srv.close()
    conn.settimeout(float(job.get("idle_timeout", 120)))
    tick = _Ticker(emit, sum(e["size"] for e in expected.values()))
    got: Dict[str, str] = {}
    while True:
        header = json.loads(rfile.readline(65536) or b'{"end": "eof"}')
        if header.get("end"):
            break
        path, size = header.get("path"), header.get("size")
        e = expected.get(path)
        if e is None or path in got or size != e["size"] or not safe_relpath(path):
            raise AgentError(f"sender offered an unexpected file {path!r} ({size} bytes)")
        part = os.path.join(target, PARTIAL_DIR, path)
        os.makedirs(os.path.dirname(part), exist_ok=True)
        h = hashlib.sha256()
        left = size
        with open(part, "wb") as out:
            while left:
                chunk = rfile.read(min(CHUNK, left))
                if not chunk:
                    raise AgentError(f"{path}: connection closed after {size - left} of {size} bytes")
                out.write(chunk)
                h.update(chunk)
                left -= len(chunk)
                tick.add(len(chunk), path)
        if e.get("sha256") and h.hexdigest() != e["sha256"]:
            os.remove(part)
            raise AgentError(f"{path}: checksum mismatch in transfer")
        final = os.path.join(target, path)
        os.makedirs(os.path.dirname(final) or target, exist_ok=True)
        os.replace(part, final)
        got[path] = h.hexdigest()
    missing = sorted(set(expected) - set(got))
    conn.sendall((json.dumps({"ok": not missing, "missing": missing}) + "\n").encode())
    conn.close()
    tick.add(0, "", force=True)
    if missing:
        raise AgentError(f"the sender stopped early: {len(missing)} file(s) missing")
    result = {"ev": "done", "received": sorted(got), "bytes": sum(expected[p]["size"] for p in got)}
    emit(result)
    return result


def agent_send(job: Dict[str, Any], source: str, emit, token: str) -> Dict[str, Any]:
    try:
        sock = socket.create_connection((job["host"], int(job["port"])), timeout=float(job.get("connect_timeout", 10)))
    except OSError as e:
        emit({"ev": "connect-failed", "msg": str(e)})
        raise AgentError(f"cannot connect to {job['host']}:{job['port']} ({e})") from None
    sock.settimeout(float(job.get("idle_timeout", 120)))
    sock.sendall((token + "\n").encode())
    sent = 0
    for path in job["files"]:
        full = os.path.join(source, path)
        size = os.path.getsize(full)
        sock.sendall((json.dumps({"path": path, "size": size}) + "\n").encode())
        with open(full, "rb") as f:
            sock.sendfile(f)
        sent += size
    sock.sendall(b'{"end": true}\n')
    ack = json.loads(sock.makefile("rb").readline(65536) or b'{"ok": false}')
    sock.close()
    if not ack.get("ok"):
        raise AgentError(f"the receiver did not confirm: {ack}")
    result = {"ev": "done", "bytes": sent}
    emit(result)
    return result


def agent_main(argv: List[str]) -> int:
    """python3 delivery.py agent {sync|send|recv} JOB.json (the model directory is mounted at /target)."""
    if len(argv) != 3 or argv[0] != "agent" or argv[1] not in ("sync", "send", "recv"):
        sys.stderr.write(agent_main.__doc__ + "\n")
        return 2
    with open(argv[2]) as f:
        job = json.load(f)
    target = job.get("target", "/target")
    try:
        if argv[1] == "sync":
            agent_sync(job, target, _emit_stdout, os.environ.get(TOKEN_ENV) or None)
        elif argv[1] == "recv":
            agent_recv(job, target, _emit_stdout, os.environ[TRANSFER_ENV])
        else:
            agent_send(job, target, _emit_stdout, os.environ[TRANSFER_ENV])
    except AgentError as e:
        _emit_stdout({"ev": "error", "msg": str(e)})
        return 1
    except Exception as e:  # noqa: BLE001 - one line for the control side
        _emit_stdout({"ev": "error", "msg": f"{type(e).__name__}: {e}"})
        return 1
    return 0


# =============================================================================================
# Control side
# =============================================================================================
def _agent_source() -> str:
    with open(os.path.abspath(__file__)) as f:
        return f.read()


def _short(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:40]


class _Meter:
    """Per-host progress lines: bytes, rate, ETA; at most one line a second per host."""

    def __init__(self, progress: Callable[[str], None], host: str, what: str, total: int):
        self.progress, self.host, self.what, self.total = progress, host, what, total
        self.t0 = time.monotonic()
        self.last = self.t0   # first line after a second: no ETA from nothing

    def update(self, done: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < 1.0:
            return
        self.last = now
        dt = max(now - self.t0, 1e-6)
        rate = done / dt
        eta = (self.total - done) / rate if rate > 0 and self.total > done else 0
        self.progress(f"{self.host}: {self.what}: {human(done)} / {human(self.total)}, {human(rate)}/s"
                      + ("" if final else f", ETA {int(eta) // 60}:{int(eta) % 60:02d}"))


class Delivery:
    """One `deliver` call: inspect every host, download once, fan out, verify, write manifests."""

    def __init__(self, hosts: "Hosts", plan: "Plan", progress: Callable[[str], None], verify: bool):
        from . import models
        from .plan import DEFAULT_ENDPOINTS, model_paths
        self.hosts, self.plan, self.progress, self.verify = hosts, plan, progress, verify
        inv = plan.inventory
        self.inv, self.src, self.model = inv, inv.deploy.source, inv.deploy.model
        self.local = self.src.kind == "local" or models.is_local(self.model)
        self.targets = list(plan.setup.hosts)
        self.head = self.targets[0]
        self.shared = inv.cluster.shared_model_dir
        self.paths = {h.name: model_paths(inv, h)[0] for h in self.targets}
        self.endpoint = None if self.local else (self.src.endpoint or DEFAULT_ENDPOINTS[self.src.kind]).rstrip("/")
        self.revision = None if self.local else (self.src.revision or DEFAULT_REVISION[self.src.kind])
        self.spec = {"model": self.model, "revision": self.revision, "include": sorted(self.src.include),
                     "exclude": sorted(self.src.exclude)}
        self.run_id = secrets.token_hex(3)
        self._images: Dict[str, bool] = {}
        self._jobdirs: Dict[str, str] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ remote primitives
    def _put(self, host: "Host", path: str, text: str, *, mode: int) -> None:
        self.hosts.put_text(host, path, text, mode=mode)

    def inspect(self, host: "Host") -> Tuple[Any, Dict[str, Tuple[int, int]]]:
        path = self.paths[host.name]
        m = self.hosts.run(host, ["sh", "-c", 'cat "$0" 2>/dev/null || true', f"{path}/{MANIFEST}"])
        try:
            doc = json.loads(m.stdout) if m.ok and m.stdout.strip() else None
        except ValueError:
            doc = None
        r = self.hosts.check(host, ["sh", "-c", 'test -d "$0" || exit 0; exec find "$0" -type f -printf "$1"',
                                    path, "%P\\t%s\\t%T@\\n"], timeout=600)
        return doc, parse_scan(r.stdout)

    def sha256(self, host: "Host", paths: List[str]) -> Dict[str, str]:
        out: Dict[str, str] = {}
        for i in range(0, len(paths), 200):
            batch = paths[i:i + 200]
            r = self.hosts.run(host, ["sh", "-c", 'cd "$0" && exec sha256sum -- "$@"', self.paths[host.name],
                                      *batch], timeout=3600)
            out.update(parse_sha256sum(r.stdout))
        return out

    def write_manifest(self, host: "Host", commit: str, expected: List[Entry]) -> None:
        _, scanned = self.inspect(host)
        files = [dict(e, mtime=scanned.get(e["path"], (0, 0))[1]) for e in expected]
        doc = manifest_doc(self.spec, commit, files)
        self._put(host, f"{self.paths[host.name]}/{MANIFEST}", json.dumps(doc, indent=1), mode=0o644)

    def ensure_image(self, host: "Host") -> str:
        from .plan import mirror_refs
        image = self.plan.profile.image
        with self._lock:
            if self._images.get(host.name):
                return image
        if not self.hosts.run(host, ["docker", "image", "inspect", "--format", "{{.Id}}", image]).ok:
            errors = []
            for ref in mirror_refs(self.inv, self.plan.profile):
                self.progress(f"{host.name}: docker pull {ref} (the delivery agent runs in the profile's image)")
                r = self.hosts.run(host, ["docker", "pull", ref], timeout=3600)
                if r.ok:
                    if ref != image:
                        self.hosts.check(host, ["docker", "tag", ref, image])
                    break
                errors.append(f"{ref}: {r.last_line()}")
            else:
                raise RuntimeError("image for the delivery agent: no mirror had it: " + "; ".join(errors))
        with self._lock:
            self._images[host.name] = True
        return image

    def jobdir(self, host: "Host") -> str:
        with self._lock:
            d = self._jobdirs.get(host.name)
            if d:
                return d
        d = f"/tmp/gpucluster-delivery-{_short(self.inv.cluster.name)}-{_short(host.name)}-{self.run_id}"
        self._put(host, f"{d}/delivery.py", _agent_source(), mode=0o644)
        with self._lock:
            self._jobdirs[host.name] = d
        return d

    def run_agent(self, host: "Host", cmd: str, job: Dict[str, Any], *, mount_ro: bool,
                  secret: Optional[Tuple[str, str]], on_event: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
        """Run the agent in a throwaway container of the profile's image; events stream back as they come."""
        from .remote import stream
        image = self.ensure_image(host)
        d = self.jobdir(host)
        tag = secrets.token_hex(3)
        self._put(host, f"{d}/{cmd}-{tag}.json", json.dumps(job), mode=0o600)
        name = f"gpucluster-{_short(self.inv.cluster.name)}-{cmd}-{self.run_id}{tag}"
        argv = ["docker", "run", "--rm", "--name", name, "--label", f"gpucluster.delivery={self.inv.cluster.name}",
                "--network", "host", "-v", f"{self.paths[host.name]}:/target" + (":ro" if mount_ro else ""),
                "-v", f"{d}:/job:ro"]
        if secret:   # a 0600 env file: the value never reaches a command line
            self._put(host, f"{d}/{cmd}-{tag}.env", f"{secret[0]}={secret[1]}\n", mode=0o600)
            argv += ["--env-file", f"{d}/{cmd}-{tag}.env"]
        argv += ["--entrypoint", "python3", image, "-u", "/job/delivery.py", "agent", cmd, f"/job/{cmd}-{tag}.json"]
        state: Dict[str, Any] = {"result": None, "error": None, "other": []}

        def sink(line: str) -> None:
            try:
                ev = json.loads(line)
            except ValueError:
                ev = None
            if not isinstance(ev, dict) or "ev" not in ev:
                state["other"].append(line)
                return
            if ev["ev"] == "done":
                state["result"] = ev
            elif ev["ev"] == "error":
                state["error"] = ev["msg"]
            on_event(ev)

        try:
            rc = stream(self.hosts, host, argv, sink)
        finally:
            self.hosts.run(host, ["docker", "rm", "-f", name])   # a no-op unless we were interrupted
            if secret:
                self.hosts.run(host, ["rm", "-f", f"{d}/{cmd}-{tag}.env"])
        if state["error"]:
            raise AgentError(state["error"])
        if rc != 0 or state["result"] is None:
            tail = " | ".join(state["other"][-3:]) or f"exit code {rc}"
            raise AgentError(f"the delivery agent ({cmd}) failed on {host.name}: {tail}")
        return state["result"]

    def cleanup(self) -> None:
        for name, d in list(self._jobdirs.items()):
            try:
                self.hosts.run(self.hosts.host(name), ["rm", "-rf", d])
            except Exception as e:  # noqa: BLE001 - best effort, but said
                self.progress(f"{name}: could not remove {d}: {type(e).__name__}: {e}")
        self._jobdirs.clear()

    # ------------------------------------------------------------------ download
    def source_job(self) -> Dict[str, Any]:
        return {"kind": self.src.kind, "endpoint": self.endpoint, "repo": self.model, "revision": self.revision,
                "include": list(self.src.include), "exclude": list(self.src.exclude), "verify": self.verify,
                "spec": self.spec}

    def token(self) -> Optional[str]:
        return self.src.token.reveal() if self.src.token is not None else None

    def download_on_head(self) -> Tuple[str, List[Entry], int, int]:
        """(commit, reference files, files fetched, bytes fetched): the head lists, verifies, downloads."""
        h = self.head
        self.hosts.check(h, ["mkdir", "-p", self.paths[h.name]])
        meter: Dict[str, _Meter] = {}

        def on_event(ev):
            if ev["ev"] == "plan" and ev["need"]:
                self.progress(f"{h.name}: downloading {len(ev['need'])} of {ev['files']} files "
                              f"({human(ev['bytes'])}) from {self.endpoint}")
                meter["m"] = _Meter(self.progress, h.name, "download", ev["bytes"])
            elif ev["ev"] == "progress" and "m" in meter:
                meter["m"].update(max(ev["done"], 0))
            elif ev["ev"] == "note":
                self.progress(f"{h.name}: {ev['msg']}")

        token = self.token()
        res = self.run_agent(h, "sync", self.source_job(), mount_ro=False,
                             secret=(TOKEN_ENV, token) if token else None, on_event=on_event)
        if "m" in meter:
            meter["m"].update(res["bytes"], final=True)
        files = [{k: f.get(k) for k in ("path", "size", "sha256", "oid")} for f in res["manifest"]["files"]]
        return res["commit"], files, len(res["fetched"]), res["bytes"]

    def cache_dir(self) -> str:
        from . import models
        base = os.environ.get("GPUCLUSTER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpucluster")
        return os.path.join(base, "models", models.host_dir_name(self.model))

    def download_on_control(self) -> Tuple[str, List[Entry], int, int]:
        target = self.cache_dir()
        meter: Dict[str, _Meter] = {}

        def emit(ev):
            if ev["ev"] == "plan" and ev["need"]:
                self.progress(f"control: downloading {len(ev['need'])} of {ev['files']} files "
                              f"({human(ev['bytes'])}) from {self.endpoint} into {target}")
                meter["m"] = _Meter(self.progress, "control", "download", ev["bytes"])
            elif ev["ev"] == "progress" and "m" in meter:
                meter["m"].update(max(ev["done"], 0))

        try:
            res = agent_sync(self.source_job(), target, emit, self.token())
        except AgentError as e:
            raise _fail(str(e)) from None
        files = [{k: f.get(k) for k in ("path", "size", "sha256", "oid")} for f in res["manifest"]["files"]]
        return res["commit"], files, len(res["fetched"]), res["bytes"]

    # ------------------------------------------------------------------ transfers
    def send_direct(self, src: "Host", dst: "Host", files: List[Entry]) -> int:
        """Source host -> target host over one TCP stream, both ends in containers of the image."""
        token = secrets.token_hex(24)
        total = sum(f["size"] for f in files)
        meter = _Meter(self.progress, dst.name, f"copy {len(files)} file(s) from {src.name}", total)
        listening = threading.Event()
        box: Dict[str, Any] = {}

        def on_recv(ev):
            if ev["ev"] == "listening":
                box["port"] = ev["port"]
                listening.set()
            elif ev["ev"] == "progress":
                meter.update(ev["done"])
            elif ev["ev"] == "note":
                self.progress(f"{dst.name}: {ev['msg']}")

        def receiver():
            try:
                box["recv"] = self.run_agent(dst, "recv", {"bind": dst.address, "peer": src.address, "files": files,
                                                           "accept_timeout": 60}, mount_ro=False,
                                             secret=(TRANSFER_ENV, token), on_event=on_recv)
            except BaseException as e:  # noqa: BLE001 - reported by the caller
                box["recv_error"] = e
            finally:
                listening.set()

        self.hosts.check(dst, ["mkdir", "-p", self.paths[dst.name]])
        t = threading.Thread(target=receiver, daemon=True)
        t.start()
        listening.wait(300)
        if "port" not in box:
            t.join(5)
            raise box.get("recv_error") or AgentError(f"{dst.name}: the receiver did not start")
        try:
            self.run_agent(src, "send", {"host": dst.address, "port": box["port"], "files": [f["path"] for f in files]},
                           mount_ro=True, secret=(TRANSFER_ENV, token), on_event=lambda ev: None)
        except BaseException:
            t.join(1)
            self.hosts.run(dst, ["sh", "-c", 'docker ps -q --filter "label=$0" --filter "name=$1" | '
                                             'xargs -r docker rm -f', f"gpucluster.delivery={self.inv.cluster.name}",
                                 f"gpucluster-{_short(self.inv.cluster.name)}-recv-{self.run_id}"])
            t.join(30)
            raise
        t.join(600)
        if "recv_error" in box:
            raise box["recv_error"]
        meter.update(total, final=True)
        return total

    def _sftp(self, host: "Host"):
        return self.hosts.sftp(host)

    def relay(self, src: Optional["Host"], dst: "Host", files: List[Entry], local_root: Optional[str] = None) -> int:
        """Copy through this machine over SFTP (control-downloaded models, or when hosts cannot reach each other)."""
        total = sum(f["size"] for f in files)
        who = src.name if src else "this machine"
        meter = _Meter(self.progress, dst.name, f"copy {len(files)} file(s) from {who} via this machine", total)
        out_sftp = self._sftp(dst)
        in_sftp = self._sftp(src) if src else None
        base_in = self.paths[src.name] if src else local_root
        base_out = self.paths[dst.name]
        done = 0
        for f in files:
            part = f"{base_out}/{PARTIAL_DIR}/{f['path']}"
            final = f"{base_out}/{f['path']}"
            self.hosts.check(dst, ["mkdir", "-p", part.rsplit("/", 1)[0], final.rsplit("/", 1)[0]])
            src_path = f"{base_in}/{f['path']}"
            reader = in_sftp.open(src_path, "rb") if in_sftp else open(src_path, "rb")
            try:
                if in_sftp:
                    reader.prefetch(f["size"])
                with out_sftp.open(part, "wb") as w:
                    w.set_pipelined(True)
                    for chunk in iter(lambda: reader.read(CHUNK), b""):
                        w.write(chunk)
                        done += len(chunk)
                        meter.update(done)
            finally:
                reader.close()
            self.hosts.check(dst, ["mv", "-f", part, final])
        out_sftp.close()
        if in_sftp:
            in_sftp.close()
        got = self.sha256(dst, [f["path"] for f in files])
        bad = mismatched(files, got)
        if bad:
            raise AgentError(f"{dst.name}: checksum mismatch after copy: {', '.join(bad[:3])}")
        meter.update(total, final=True)
        return total

    # ------------------------------------------------------------------ the whole
    def reference_from_head(self, state: Tuple[Any, Dict[str, Tuple[int, int]]]) -> Tuple[str, List[Entry]]:
        """A local model: the head's copy is the reference; hash what its manifest does not vouch for."""
        h = self.head
        doc, scanned = state
        if "config.json" not in scanned:
            raise _fail(f"local model {self.paths[h.name]} is not on {h.name} (config.json missing); "
                        "copy it there first (source.kind local: the head's copy is fanned out)")
        have = manifest_files(doc, self.spec) or {}
        expected = select([{"path": p, "size": s} for p, (s, _) in scanned.items()], self.src.include,
                          self.src.exclude)
        out, unsure = [], []
        for e in expected:
            m = have.get(e["path"])
            if not self.verify and m and m.get("size") == e["size"] and m.get("mtime") == scanned[e["path"]][1]:
                out.append({"path": e["path"], "size": e["size"], "sha256": m.get("sha256")})
            else:
                unsure.append(e)
        if unsure:
            self.progress(f"{h.name}: hashing {len(unsure)} file(s) of the local model")
            got = self.sha256(h, [e["path"] for e in unsure])
            out += [{"path": e["path"], "size": e["size"], "sha256": got.get(e["path"])} for e in unsure]
        return "local", sorted(out, key=lambda e: e["path"])

    def repair(self, host: "Host", state, reference: List[Entry], src: Optional["Host"],
               local_root: Optional[str] = None) -> Tuple[str, int]:
        """Bring one host to the reference: hash what is unvouched, transfer what is missing or bad."""
        doc, scanned = state
        need, check = plan_host(reference, scanned, manifest_files(doc, self.spec), self.verify)
        bad: List[str] = []
        if check:
            bad = mismatched([e for e in reference if e["path"] in check], self.sha256(host, check))
            if bad:
                self.progress(f"{host.name}: {len(bad)} file(s) differ from the reference: {', '.join(bad[:3])}"
                              + (" ..." if len(bad) > 3 else ""))
        todo = [e for e in reference if e["path"] in set(need) | set(bad)]
        if not todo:
            return "present", 0
        how = ""
        if src is None:
            moved = self.relay(None, host, todo, local_root)
            how = " from this machine"
        else:
            try:
                moved = self.send_direct(src, host, todo)
                how = f" from {src.name}"
            except AgentError as e:
                self.progress(f"{host.name}: direct copy from {src.name} failed ({e}); relaying through this machine")
                moved = self.relay(src, host, todo)
                how = f" from {src.name} via this machine"
        verb = "repaired" if bad or any(e["path"] in scanned for e in todo) else "copied"
        return f"{verb} {len(todo)} file(s), {human(moved)}{how}", moved

    def run(self) -> Dict[str, str]:
        hosts = [self.head] if self.shared else self.targets
        states = self.hosts.phase("model check", hosts, self.inspect)
        docs = {n: manifest_files(s[0], self.spec) for n, s in states.items()}
        # Fast path: every host vouches (manifest for this spec, same content) and sizes/mtimes still agree.
        ref_doc = docs.get(self.head.name)
        if ref_doc and all(same_content(ref_doc, d) for d in docs.values()) and not self.verify:
            reference = list(ref_doc.values())
            if all(plan_host(reference, states[h.name][1], docs[h.name])[0:2] == ([], []) for h in hosts):
                return {h.name: "present" for h in self.targets}
        out: Dict[str, str] = {}
        head_doc = docs.get(self.head.name)
        head_ok = (not self.verify and head_doc is not None
                   and plan_host(list(head_doc.values()), states[self.head.name][1], head_doc) == ([], []))
        try:
            if head_ok:   # the head vouches for a complete copy: it is the reference, the source is not asked
                commit = states[self.head.name][0].get("commit") or ""
                reference = [{k: e.get(k) for k in ("path", "size", "sha256", "oid")} for e in head_doc.values()]
                head_result, head_src = "present", self.head
            elif self.local:
                commit, reference = self.reference_from_head(states[self.head.name])
                head_result, head_src = "present", self.head
                if not same_content(docs.get(self.head.name), {e["path"]: e for e in reference}) or self.verify:
                    self.write_manifest(self.head, commit, reference)
            elif self.src.download_on == "control":
                commit, reference, n, moved = self.download_on_control()
                head_result, _ = self.repair(self.head, states[self.head.name], reference, None,
                                             local_root=self.cache_dir())
                if head_result != "present" or docs.get(self.head.name) is None or self.verify or not same_content(
                        docs.get(self.head.name), {e["path"]: e for e in reference}):
                    self.write_manifest(self.head, commit, reference)
                head_src = self.head
            else:
                try:
                    commit, reference, n, moved = self.download_on_head()
                except AgentError as e:
                    raise _fail(str(e)) from None
                head_result = "present" if n == 0 else f"fetched {n} file(s), {human(moved)} from {self.endpoint}"
                head_src = self.head
            out[self.head.name] = head_result
            others = [h for h in self.targets if h is not self.head]
            if self.shared:
                for h in others:
                    out[h.name] = "present"
                return out

            def one(h: "Host") -> str:
                what, _ = self.repair(h, states[h.name], reference, head_src)
                if what != "present" or docs.get(h.name) is None or not same_content(
                        docs.get(h.name), {e["path"]: e for e in reference}) or self.verify:
                    self.write_manifest(h, commit, reference)
                return what

            if others:
                out.update(self.hosts.phase("model fan-out", others, one))
            return out
        finally:
            self.cleanup()


def _fail(message: str):
    from .errors import StepFailed
    return StepFailed(f"model delivery: {message}")


def deliver(hosts: "Hosts", plan: "Plan", *, progress: Callable[[str], None] = lambda s: None,
            verify: bool = False) -> Dict[str, str]:
    """Put the model on every host of the plan; host name -> 'present' (nothing moved) or what was done.

    Downloads once (on the head, or on this machine with `source.download_on: control`), fans out
    host to host, verifies sizes always and sha256 where a manifest does not vouch (or `verify`)."""
    return Delivery(hosts, plan, progress, verify).run()


if __name__ == "__main__":
    sys.exit(agent_main(sys.argv[1:]))
