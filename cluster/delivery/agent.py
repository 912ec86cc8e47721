"""The delivery agent: stdlib only (Python >= 3.8), run on a host inside a throwaway container of the
deployment's image (or on this machine), beside manifest.py:

    python3 agent.py sync JOB.json     download what the model folder lacks from a hub or a peer, verify it
    python3 agent.py serve JOB.json    serve a verified model folder to the next hosts (token, read-only; serve.py)
    python3 agent.py relay JOB.json    serve the model folder while this host's own sync fills it (a chain)
    python3 agent.py index JOB.json    hash a local model folder and write its manifest

Events are JSON lines on stdout ({"ev": "plan" | "progress" | "note" | "done" | "error", ...}).
Everything a hub, a mirror or a peer sends is untrusted: paths are confined to the model folder and
every file is checked against the listed size and sha256 (or git blob id) before it is kept.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import http.client
import json
import os
import random
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

try:
    from .manifest import (HASH_BY, MANIFEST, PARTIAL_DIR, Entry, confined, has_source_hash, human, ignored,
                           manifest_doc, manifest_files, plan_host, reference, safe_relpath, select, usable_hash,
                           verified_counts)
except ImportError:   # run as a script on a host, manifest.py beside it (and serve.py where it serves)
    from manifest import (HASH_BY, MANIFEST, PARTIAL_DIR, Entry, confined, has_source_hash, human,  # type: ignore
                          ignored, manifest_doc, manifest_files, plan_host, reference, safe_relpath, select,
                          usable_hash, verified_counts)

TOKEN_ENV = "GPUCLUSTER_SOURCE_TOKEN"
TRANSFER_ENV = "GPUCLUSTER_TRANSFER_TOKEN"
CHUNK = 1 << 20
CONNECT_TIMEOUT = 15.0    # seconds to open a connection (TLS included)
READ_TIMEOUT = 30.0       # seconds any one read may wait: for the answer's headers, then for every chunk of its body


class Policy(NamedTuple):
    """A named retry policy at the I/O edge: at most `tries` attempts, no retry later than `within` seconds after
    the first attempt (for a file: after its last byte arrived); waits double from `base` with jitter, each (a
    server's numeric Retry-After too) at most `cap` seconds."""

    name: str
    tries: int
    within: float
    base: float
    cap: float


LISTING = Policy(name="listing", tries=4, within=120.0, base=1.0, cap=15.0)   # each request of the file list
FILE = Policy(name="file", tries=5, within=600.0, base=2.0, cap=60.0)         # each file, resuming where it can
RETRY_CODES = (429, 500, 502, 503, 504)


class AgentError(Exception):
    """One line for the user."""


class Transient(Exception):
    """A failure worth another try (HTTP 429/5xx, reset, refused, timed out, cut short): the cause in words."""

    def __init__(self, cause: str, *, code: int = 0, retry_after: Optional[float] = None, refused: bool = False):
        super().__init__(cause)
        self.code, self.retry_after, self.refused = code, retry_after, refused
        self.progressed = False    # bytes arrived before it: the next try resumes from them
        self.advice = ""           # said once, when the policy gives up


def _serving():
    """serve.py: shipped only to hosts that serve (a relay's sync tells its server what arrives)."""
    try:
        from . import serve
    except ImportError:
        import serve  # type: ignore
    return serve


def _emit_stdout(event: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _quiet(event: Dict[str, Any]) -> None:
    pass


def with_retries(policy: Policy, what: str, emit: Callable[[Dict[str, Any]], None], attempt: Callable[[], Any]) -> Any:
    """attempt() under the policy: a Transient failure is a note, a wait and another try; when the policy is spent,
    one AgentError naming `what`, the last cause and the policy. Any other failure ends at once."""
    tries, since = 0, time.monotonic()
    while True:
        tries += 1
        try:
            return attempt()
        except Transient as e:
            if e.progressed:
                since = time.monotonic()
            wait = backoff(policy, tries, e.retry_after)
            if tries >= policy.tries or time.monotonic() - since + wait > policy.within:
                raise AgentError(f"{what}: {e}{f' ({e.advice})' if e.advice else ''}; gave up after {tries} "
                                 f"tries ({policy.name} policy: at most {policy.tries} tries within "
                                 f"{policy.within:g} s)") from None
            emit({"ev": "note", "msg": f"{what}: {e}; try {tries + 1} of {policy.tries} in {wait:.1f} s"})
            time.sleep(wait)


def backoff(policy: Policy, tries: int, retry_after: Optional[float]) -> float:
    """Seconds before the next try: the server's Retry-After, else exponential with jitter; at most policy.cap."""
    if retry_after is not None:
        return min(retry_after, policy.cap)
    step = min(policy.cap, policy.base * 2 ** (tries - 1))
    return step / 2 + random.uniform(0, step / 2)


def _retry_after(headers: Any) -> Optional[float]:
    """A numeric Retry-After (seconds); an HTTP date or garbage is ignored (the policy's backoff applies)."""
    value = str((headers.get("Retry-After") if headers is not None else None) or "").strip()
    try:
        secs = float(value)
    except ValueError:
        return None
    return secs if 0 <= secs < float("inf") else None


def bare(url: str) -> str:
    """scheme://host[:port]/path of a URL: no credentials, no query (tokens and signatures stay out of messages)."""
    s = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((s.scheme, s.netloc.rpartition("@")[2], s.path, "", ""))


class _NoAuthOnRedirect(urllib.request.HTTPRedirectHandler):
    """Authorization is added unredirected; it follows a redirect only to the same host (never to a CDN)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new is not None and auth and urllib.parse.urlsplit(newurl).netloc in ("", urllib.parse.urlsplit(
                req.full_url).netloc):
            new.add_unredirected_header("Authorization", auth)
        return new


class _TimedHTTPConnection(http.client.HTTPConnection):
    """Connects within its timeout (CONNECT_TIMEOUT), then every read waits at most READ_TIMEOUT (or the job's
    read_timeout: a chain's upstream may wait for its own copy longer before it answers)."""

    def __init__(self, *args, read_timeout: Optional[float] = None, **kw):
        super().__init__(*args, **kw)
        self.read_timeout = read_timeout

    def connect(self):
        super().connect()
        self.sock.settimeout(self.read_timeout or READ_TIMEOUT)


class _TimedHTTP(urllib.request.HTTPHandler):
    read_timeout: Optional[float] = None

    def http_open(self, req):
        return self.do_open(functools.partial(_TimedHTTPConnection, read_timeout=self.read_timeout), req)


_HANDLERS: List[Any] = [_NoAuthOnRedirect, _TimedHTTP]
if hasattr(http.client, "HTTPSConnection"):   # an interpreter built without ssl reaches only http:// sources
    class _TimedHTTPSConnection(http.client.HTTPSConnection):
        def __init__(self, *args, read_timeout: Optional[float] = None, **kw):
            super().__init__(*args, **kw)
            self.read_timeout = read_timeout

        def connect(self):
            super().connect()
            self.sock.settimeout(self.read_timeout or READ_TIMEOUT)

    class _TimedHTTPS(urllib.request.HTTPSHandler):
        read_timeout: Optional[float] = None

        def https_open(self, req):
            return self.do_open(functools.partial(_TimedHTTPSConnection, read_timeout=self.read_timeout), req,
                                context=self._context)

    _HANDLERS.append(_TimedHTTPS)


def _opener(read_timeout: Optional[float] = None):
    handlers = [h() for h in _HANDLERS]
    for h in handlers:
        if hasattr(h, "read_timeout"):
            h.read_timeout = read_timeout
    return urllib.request.build_opener(*handlers)


def _request(url: str, token: Optional[str], headers: Optional[Dict[str, str]] = None) -> urllib.request.Request:
    req = urllib.request.Request(url, headers={"User-Agent": "gpucluster-delivery/1", **(headers or {})})
    if token:
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    return req


def _where(job: Dict[str, Any]) -> str:
    """The source in messages: repository, revision, and the endpoint without credentials (or the peer's name)."""
    ep = job.get("peer_name") if job["kind"] == "peer" and job.get("peer_name") else bare(job["endpoint"])
    return f"{job['repo']}@{job.get('revision')} at {ep}"


def _http_error(job: Dict[str, Any], code: int, what: str, token: Optional[str], url: str = "") -> AgentError:
    if code in (401, 403):
        why = ("access denied: gated or private (accept the license on the hub, check source.token)" if token else
               "not found, gated or private (olah and HF answer 401 for all three; check deploy.model, "
               "source.revision, or set source.token)")
    elif code == 404:
        why = "not found (check deploy.model and source.revision)"
    else:
        why = f"the server answered HTTP {code}"
    return AgentError(f"{_where(job)}: {what}: {why} [HTTP {code}{' GET ' + bare(url) if url else ''}]")


def _cause(err: BaseException) -> Optional[Transient]:
    """A network failure worth another try (refused, reset, timed out, cut short); None: one that is not (DNS, TLS)."""
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return Transient("timed out (no answer within the socket timeout)")
    if isinstance(reason, ConnectionRefusedError):
        return Transient("connection refused", refused=True)
    if isinstance(reason, (ConnectionError, http.client.IncompleteRead)):
        return Transient(f"connection lost ({type(reason).__name__}: {reason})")
    return None


def _open(job: Dict[str, Any], url: str, token: Optional[str], what: str, headers: Optional[Dict[str, str]] = None):
    """One GET with socket timeouts: the response; None for HTTP 416 to a Range request. A failure worth another
    try raises Transient; 401/403/404 and the rest end this source at once (AgentError)."""
    try:
        return _opener(job.get("read_timeout")).open(_request(url, token, headers), timeout=CONNECT_TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 409 and job["kind"] == "peer":   # the peer's own copy stalled or failed: its words, as data
            reason = " ".join(_read_reason(e).split())[:400] or "the peer refused"
            raise AgentError(f"{_where(job)}: {what}: {reason} [HTTP 409 GET {bare(e.filename or url)}]") from None
        e.close()
        if e.code == 416 and headers and "Range" in headers:
            return None
        if e.code in RETRY_CODES:
            raise Transient(f"HTTP {e.code} GET {bare(e.filename or url)}", code=e.code,
                            retry_after=_retry_after(e.headers)) from None
        raise _http_error(job, e.code, what, token, e.filename or url) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise (_cause(e) or AgentError(f"{_where(job)}: {what}: cannot reach the model source "
                                       f"({getattr(e, 'reason', e)})")) from None


def _read_reason(e: urllib.error.HTTPError) -> str:
    try:
        text = e.read(600).decode("utf-8", "replace")
    except (OSError, ValueError, http.client.HTTPException):
        text = ""
    finally:
        e.close()
    return "".join(c if c.isprintable() else " " for c in text)


def _read(resp, n: int = CHUNK) -> bytes:
    """Up to n bytes of a body; a read that times out or breaks off is Transient."""
    try:
        return resp.read1(n)     # what has arrived: bytes before a stall are kept
    except (OSError, ValueError, http.client.HTTPException) as err:
        raise (_cause(err) or Transient(f"the answer broke off ({type(err).__name__}: {err})")) from None


def _read_all(resp) -> bytes:
    data = b"".join(iter(lambda: _read(resp), b""))
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and len(data) < int(length):
        raise Transient(f"the answer ended after {len(data)} of {length} bytes")
    return data


def _open_waiting(job: Dict[str, Any], url: str, token: Optional[str], what: str):
    """_open; a peer's server may still be starting: connection refused is retried quietly for a while (a hub's
    is the listing policy's), and after that wait ends the source (the host then gets the files another way)."""
    deadline = time.monotonic() + float(job.get("connect_wait", 20))
    while True:
        try:
            return _open(job, url, token, what)
        except Transient as e:
            if not (e.refused and job["kind"] == "peer"):
                raise
            if time.monotonic() > deadline:
                raise AgentError(f"{_where(job)}: {what}: cannot reach the model source (connection refused)") \
                    from None
            time.sleep(0.5)


def _get_json(job: Dict[str, Any], url: str, token: Optional[str], what: str,
              emit: Callable[[Dict[str, Any]], None] = _quiet) -> Tuple[Any, Any]:
    """One listing request under the LISTING policy: (parsed JSON, headers)."""
    def attempt() -> Tuple[bytes, Any]:
        try:
            with _open_waiting(job, url, token, what) as r:
                return _read_all(r), r.headers
        except Transient as e:
            if e.code >= 500:
                e.advice = "mirrors answer 5xx for missing repositories too"
            raise

    body, headers = with_retries(LISTING, f"{_where(job)}: {what}", emit, attempt)
    try:
        return json.loads(body.decode()), headers
    except ValueError:
        raise AgentError(f"{bare(url)}: the answer is not JSON (is source.endpoint a hub?)") from None


def list_remote(job: Dict[str, Any], token: Optional[str],
                emit: Callable[[Dict[str, Any]], None] = _quiet) -> Tuple[str, List[Entry]]:
    """(commit, files) at the revision; a listing is untrusted: a path that could leave the folder is refused, a
    malformed hash is no hash. A peer (the head) must give every file's sha256: it hashed what the source did not."""
    commit, files = _list_remote(job, token, emit)
    for f in files:
        if not isinstance(f.get("path"), str) or not safe_relpath(f["path"]) or not isinstance(f.get("size"), int) \
                or f["size"] < 0:
            raise AgentError(f"{job['endpoint']}: the file list names {str(f.get('path'))[:80]!r} "
                             f"({f.get('size')!r} bytes), which is not a plain relative path: refusing the listing")
        f["sha256"], f["oid"] = usable_hash(f.get("sha256"), 64), usable_hash(f.get("oid"), 40)
        if job["kind"] != "peer":
            f.pop("hash_by", None)
            continue
        if not f["sha256"]:
            raise AgentError(f"{job.get('peer_name', job['endpoint'])}'s manifest has no sha256 for {f['path']!r}: "
                             "its copy was never hashed (run `gpucluster model pull --verify`)")
        f["hash_by"] = f.get("hash_by") if f.get("hash_by") in HASH_BY else "head"
    return commit, files


def _list_remote(job: Dict[str, Any], token: Optional[str],
                 emit: Callable[[Dict[str, Any]], None]) -> Tuple[str, List[Entry]]:
    """(commit, files) of the repository at the revision: sizes, and sha256 / git blob ids."""
    ep, repo, rev = job["endpoint"].rstrip("/"), job["repo"], job["revision"]
    q = urllib.parse.quote
    if job["kind"] == "peer":     # another host's copy, served by `agent serve`
        doc, _ = _get_json(job, f"{ep}/manifest", token, "manifest", emit)
        files = [{k: f.get(k) for k in ("path", "size", "sha256", "oid", "hash_by")} for f in doc.get("files", [])
                 if isinstance(f, dict)] if isinstance(doc, dict) else []
        return str(doc.get("commit", "")) if isinstance(doc, dict) else "", files
    if job["kind"] == "modelscope":
        url = f"{ep}/api/v1/models/{q(repo)}/repo/files?Revision={q(rev, safe='')}&Recursive=True"
        doc, _ = _get_json(job, url, token, "file list", emit)
        if not isinstance(doc, dict) or not doc.get("Success", doc.get("Code") == 200):
            raise AgentError(f"{repo}@{rev} at {ep}: {doc.get('Message') if isinstance(doc, dict) else doc}")
        files = [{"path": f["Path"], "size": int(f["Size"]), "sha256": f.get("Sha256") or None, "oid": None}
                 for f in (doc.get("Data") or {}).get("Files") or [] if f.get("Type", "blob") == "blob"]
        return rev, files
    info, _ = _get_json(job, f"{ep}/api/models/{q(repo)}/revision/{q(rev, safe='')}", token, "revision", emit)
    commit = info.get("sha") if isinstance(info, dict) else None
    if not commit:
        raise AgentError(f"{repo}@{rev} at {ep}: the revision answer has no commit sha")
    files: List[Entry] = []
    url: Optional[str] = f"{ep}/api/models/{q(repo)}/tree/{commit}?recursive=true"
    while url:
        page, headers = _get_json(job, url, token, "file tree", emit)
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
    if job["kind"] == "peer":
        return f"{ep}/files/{q(path)}"
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


def hash_file(path: str, size: int, beat: Callable[[], None] = lambda: None) -> Tuple[str, str]:
    h = _Hashes(size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
            beat()
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
    """Download one file into target under the FILE policy, resuming a partial copy where the server honours Range.

    Returns (sha256, git oid, bytes transferred). The final file appears (atomic rename) only
    after its size and checksum match the listing."""
    path, size = e["path"], e["size"]
    part = confined(os.path.join(target, PARTIAL_DIR), path)
    final = confined(target, path)
    os.makedirs(os.path.dirname(part), exist_ok=True)
    moved = [0]      # bytes transferred, over every try

    def attempt() -> _Hashes:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        if have > size:
            os.remove(part)
            have = 0
        h = _fetch_into(job, commit, path, part, have, size, token, tick, moved)
        got = os.path.getsize(part)
        if got < size:
            err = Transient(f"the answer ended after {got} of {size} bytes")
            err.progressed = got > have
            raise err
        return h

    h = with_retries(FILE, f"{_where(job)}: file {path}", tick.emit, attempt)
    sha, oid, got = h.sha256.hexdigest(), h.sha1.hexdigest(), os.path.getsize(part)
    if got != size or (e.get("sha256") and sha != e["sha256"]) or (e.get("oid") and oid != e["oid"]):
        os.remove(part)
        raise AgentError(f"{path}: checksum mismatch after download (expected "
                         f"{e.get('sha256') or e.get('oid')}, got {sha}); the source serves other bytes")
    os.makedirs(os.path.dirname(final) or target, exist_ok=True)
    os.replace(part, final)
    return sha, oid, moved[0]


def _fetch_into(job: Dict[str, Any], commit: str, path: str, part: str, have: int, size: int,
                token: Optional[str], tick: _Ticker, moved: List[int]) -> _Hashes:
    """One request: append to (206) or restart (200, Range ignored as by olah) the partial file; its hashes.
    A failure worth another try is Transient, marked `progressed` when bytes arrived before it."""
    resp = _open(job, file_url(job, commit, path), token, f"file {path}",
                 {"Range": f"bytes={have}-"} if 0 < have < size else None)
    if resp is None or (resp.status == 206 and not _starts_at(resp, have)):
        if resp is not None:
            resp.close()
        os.remove(part)    # 416, or the rest from another offset: the file starts again
        tick.add(-have, path)
        raise Transient(f"no usable answer for bytes {have}- of {size} "
                        f"({'HTTP 416' if resp is None else 'Content-Range ' + repr(_content_range(resp))[:60]})")
    with resp:
        h = _Hashes(size)
        if resp.status == 206:       # hash what we hold, then append the rest
            with open(part, "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    h.update(chunk)
        else:
            tick.add(-have, path)
        with open(part, "ab" if resp.status == 206 else "wb") as out:
            _copy_body(resp, out, h, size - (have if resp.status == 206 else 0), path, tick, moved)
    return h


def _content_range(resp) -> str:
    return str(resp.headers.get("Content-Range") or "")


def _starts_at(resp, have: int) -> bool:
    """A 206 answer carries the bytes asked for, from `have` on (appended from elsewhere, they would corrupt the
    file); one without Content-Range is taken at its word."""
    words = _content_range(resp).replace("=", " ").split("-")[0].split()
    return not words or words == ["bytes", str(have)]


def _copy_body(resp, out, h: _Hashes, want: int, path: str, tick: _Ticker, moved: List[int]) -> None:
    """The body into out and h, chunk by chunk (each read bounded by READ_TIMEOUT), never more than want + 1 bytes:
    a body longer than listed fails the size check instead of filling the disk."""
    got = 0
    while got <= want:
        try:
            chunk = _read(resp, min(CHUNK, want + 1 - got))
        except Transient as err:
            err.progressed = got > 0
            raise
        if not chunk:
            return
        out.write(chunk)
        h.update(chunk)
        got += len(chunk)
        moved[0] += len(chunk)
        tick.add(len(chunk), path)


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
    """List the source, keep verified files, download the rest (resuming), write the manifest.

    With job["relay"] (the host serves the next one of a chain) it also tells its own server what it receives
    (serve.Incoming): once its present files are verified (the others removed), the listing; at the end that
    it is done, or why it failed."""
    incoming = _serving().Incoming(target) if job.get("relay") else None
    try:
        result = _sync(job, target, emit, token, incoming)
    except BaseException as e:
        if incoming is not None:
            incoming.failed(str(e) if isinstance(e, AgentError) else f"{type(e).__name__}: {e}")
        raise
    if incoming is not None:
        incoming.done()
    return result


def _sync(job: Dict[str, Any], target: str, emit: Callable[[Dict[str, Any]], None], token: Optional[str],
          incoming: Optional[Any]) -> Dict[str, Any]:
    commit, listed = list_remote(job, token, emit)
    files = select(listed, job.get("include") or (), job.get("exclude") or ())
    if not files:
        raise AgentError(f"{job['repo']}@{job['revision']}: no file matches include {job.get('include')} / "
                         f"exclude {job.get('exclude')}")
    if not any(f["path"] == "config.json" for f in files):
        emit({"ev": "note", "msg": "the selected files hold no config.json"})
    os.makedirs(target, exist_ok=True)
    spec = job["spec"]
    doc = read_manifest_at(target)
    have = manifest_files(doc, spec)
    if have and not (isinstance(doc, dict) and doc.get("commit") == commit):
        # the revision moved: what this host hashed for the old commit vouches only where the source has a hash
        hashed = {f["path"] for f in files if has_source_hash(f)}
        have = {p: m for p, m in have.items() if p in hashed}
    scanned = scan_dir(target)
    need, check = plan_host(files, scanned, have, bool(job.get("verify")))
    by_path = {f["path"]: dict(f) for f in files}
    beat = incoming.beat if incoming is not None else (lambda: None)
    if incoming is not None:
        incoming.checking()
    for p in check:   # present with the right size, but not vouched for: hash before trusting
        e = by_path[p]
        want_sha, want_oid, by = reference(e, (have or {}).get(p))
        if not by:    # neither the source nor this host ever hashed it: it cannot be verified, fetch it
            need.append(p)
            continue
        sha, oid = hash_file(os.path.join(target, p), e["size"], beat)
        if (want_sha and sha != want_sha) or (want_oid and oid != want_oid):
            need.append(p)
        else:
            e["sha256"], e["oid"], e["hash_by"] = sha, oid, by
    for p, e in by_path.items():
        if p not in need and p not in check and have and p in have:
            by = reference(e, have[p])[2] or "head"
            e["sha256"] = have[p].get("sha256") or e.get("sha256")
            e["oid"] = have[p].get("oid") or e.get("oid")
            e["hash_by"] = by
    need = sorted(set(need))
    if incoming is not None:     # what exists in the folder is verified from here on: the server serves it whole
        for p in need:
            if os.path.lexists(confined(target, p)):
                os.remove(confined(target, p))
        incoming.publish(manifest_doc(spec, commit, list(by_path.values())))
    total = sum(by_path[p]["size"] for p in need)
    emit({"ev": "plan", "source": job["kind"], "commit": commit, "files": len(files), "need": need, "bytes": total,
          "checked": len(check)})
    tick = _Ticker(emit, total)
    moved = 0
    for p in need:
        e = by_path[p]
        # checked against the source's hash (a peer's: the head's manifest); with none, this host's sha256 is
        # recorded: the head's manifest then holds one for every file, and every copy from it is verified by it
        by = reference(e, None)[2] or "head"
        sha, oid, n = download_file(job, commit, e, target, token, tick)
        e["sha256"], e["oid"], e["hash_by"] = sha, oid, by
        moved += n
    tick.add(0, "", force=True)
    now = scan_dir(target)
    for p, e in by_path.items():
        e["mtime"] = now[p][1]
    doc = manifest_doc(spec, commit, list(by_path.values()))
    write_manifest_at(target, doc)
    counts = verified_counts(by_path.values())
    result = {"ev": "done", "commit": commit, "fetched": need, "bytes": moved, "verified": counts,
              "summary": summary(job, need, moved, scanned, counts)}
    emit(result)
    return result


def summary(job: Dict[str, Any], fetched: List[str], moved: int, before: Dict[str, Tuple[int, int]],
            counts: Optional[Dict[str, int]] = None) -> str:
    """One line for the user: present, fetched from the hub, or copied / repaired from a peer; and how many files
    were verified by the source's hash and how many by the head's (the source listed none for those)."""
    if not fetched:
        return "present"
    n = f"{len(fetched)} file(s), {human(moved)}"
    how = ""
    if counts is not None:
        head = "by the head's" if job["kind"] == "peer" else "hashed here (the source lists none)"
        how = f"; verified: {counts.get('source', 0)} by the source's hash, {counts.get('head', 0)} {head}"
    if job["kind"] == "peer":
        verb = "repaired" if any(p in before for p in fetched) else "copied"
        return f"{verb} {n} from {job.get('peer_name', job['endpoint'])}{how}"
    return f"fetched {n} from {job['endpoint']}{how}"


def agent_index(job: Dict[str, Any], target: str, emit: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    """A local model: the folder is the reference; hash what its manifest does not vouch for, write the manifest."""
    scanned = scan_dir(target)
    if "config.json" not in scanned:
        raise AgentError(f"local model {job.get('host_path', target)} has no config.json on this host; copy the "
                         "model there first (source.kind local: the head's copy is fanned out)")
    spec = job["spec"]
    have = manifest_files(read_manifest_at(target), spec) or {}
    files = select([{"path": p, "size": s} for p, (s, _) in scanned.items()], job.get("include") or (),
                   job.get("exclude") or ())
    for e in files:
        m = have.get(e["path"])
        if not job.get("verify") and m and m.get("size") == e["size"] and m.get("mtime") == scanned[e["path"]][1] \
                and usable_hash(m.get("sha256"), 64):
            e["sha256"], e["oid"] = m.get("sha256"), m.get("oid")
        else:
            e["sha256"], e["oid"] = hash_file(os.path.join(target, e["path"]), e["size"])
        e["mtime"], e["hash_by"] = scanned[e["path"]][1], "head"    # the head's folder is the reference
    write_manifest_at(target, manifest_doc(spec, "local", files))
    result = {"ev": "done", "summary": "present", "files": len(files)}
    emit(result)
    return result


def agent_serve(job: Dict[str, Any], target: str, emit: Callable[[Dict[str, Any]], None], token: str) -> None:
    """Serve the folder to peers holding the token (serve.py: a verified copy, or one still arriving)."""
    serving = _serving()
    try:
        serving.serve(job, target, emit, token)
    except serving.ServeError as e:
        raise AgentError(str(e)) from None


def read_token(path: Optional[str]) -> Optional[str]:
    """A secret from a 0600 file of KEY=value lines (mounted read-only: never in the container's env)."""
    if not path:
        return None
    with open(path) as f:
        for line in f:
            key, sep, value = line.rstrip("\n").partition("=")
            if sep and (key in (TOKEN_ENV, TRANSFER_ENV) or key.startswith(TOKEN_ENV + "_")):  # _N: a fallback's
                return value
    return None


def agent_main(argv: List[str]) -> int:
    """python3 agent.py {sync|serve|relay|index} JOB.json (the model folder is mounted at /target)."""
    if len(argv) != 2 or argv[0] not in ("sync", "serve", "relay", "index"):
        sys.stderr.write(str(agent_main.__doc__) + "\n")
        return 2
    with open(argv[1]) as f:
        job = json.load(f)
    target = job.get("target", "/target")
    try:
        token = read_token(job.get("token_file"))
        if argv[0] == "sync":
            agent_sync(job, target, _emit_stdout, token)
        elif argv[0] in ("serve", "relay"):
            if not token:
                raise AgentError("serve needs a token file")
            agent_serve({**job, "mode": "relay" if argv[0] == "relay" else "complete"}, target, _emit_stdout, token)
        else:
            agent_index(job, target, _emit_stdout)
    except AgentError as e:
        _emit_stdout({"ev": "error", "msg": str(e)})
        return 1
    except OSError as e:
        if e.errno == errno.ENOSPC:
            st = os.statvfs(target)
            _emit_stdout({"ev": "error", "msg": f"no space left on the model disk ({st.f_bavail * st.f_frsize / 1e6:.0f} "
                          f"MB free): free space there or point model_dir at a larger disk; the next run resumes"})
        else:
            _emit_stdout({"ev": "error", "msg": f"{type(e).__name__}: {e}"})
        return 1
    except Exception as e:  # noqa: BLE001 - one line for the control side
        _emit_stdout({"ev": "error", "msg": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(agent_main(sys.argv[1:]))
