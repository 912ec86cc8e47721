"""The delivery agent's server (stdlib, Python >= 3.8; shipped beside agent.py): a host's model folder to the hosts
that pull from it, behind a token. Also the receiving side's note to its server (Incoming).

Two modes:
  complete  the folder's verified manifest; every file it lists is served whole, at once (the head; a host whose
            copy was already complete);
  relay     what this host's own `sync` is receiving: the listing it got from its upstream (INCOMING, written
            once it knows which of its files are verified) is served; a file it holds is served whole, a file
            still arriving (its `*.gpucluster-part`) is served as its bytes land, up to the listed size (with
            `whole_files`: only once complete). When nothing new has arrived on this host for `stall` seconds,
            a waiting answer ends: before its headers with HTTP 409 and one line, within its body by closing
            the connection (the next request then gets the 409 at once).
Listings stay untrusted: only plain relative paths with a size are served, confined to the folder."""

from __future__ import annotations

import hmac
import json
import os
import socketserver
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Optional, Tuple

try:
    from .manifest import INCOMING, MANIFEST, PARTIAL_DIR, confined, human, safe_relpath
except ImportError:   # run as a script on a host, manifest.py beside it
    from manifest import INCOMING, MANIFEST, PARTIAL_DIR, confined, human, safe_relpath  # type: ignore

CHUNK = 1 << 20
POLL = 0.02     # seconds between looks at a file that is still arriving
SIGN = 0.5      # seconds between looks at the whole folder (what it holds: the stall clock)


class ServeError(Exception):
    """One line for the user (the agent turns it into its error event)."""


class Stalled(Exception):
    """Nothing new arrived on this host for the stall time: the answer is refused (409) or cut."""


def _send_chunk(wfile, data: bytes) -> None:
    """One piece of a body onto the socket (the test harness wraps this to limit a host's uplink)."""
    wfile.write(data)


def _identity(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _load(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _files(doc: Any) -> Dict[str, Dict[str, Any]]:
    """path -> entry of a listing's plain relative paths with a size; anything else is not served."""
    files = doc.get("files") if isinstance(doc, dict) else None
    return {f["path"]: f for f in files if isinstance(f, dict) and isinstance(f.get("path"), str)
            and safe_relpath(f["path"]) and isinstance(f.get("size"), int) and f["size"] >= 0} \
        if isinstance(files, list) else {}


class Incoming:
    """The receiving side (`sync` with `relay`): tells this host's server what it is receiving.

    checking() while it hashes what it already holds (its mtime is the heartbeat), publish(doc) once every file
    of the listing that exists in the folder is verified (the others were removed), done() after the manifest is
    written, failed(msg) when the copy ends without it."""

    def __init__(self, target: str):
        self.path = os.path.join(target, INCOMING)
        self.last = 0.0

    def _write(self, doc: Dict[str, Any]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.path)

    def checking(self) -> None:
        self._write({"state": "checking"})
        self.last = time.monotonic()

    def beat(self) -> None:
        if time.monotonic() - self.last >= 2.0:
            self.last = time.monotonic()
            try:
                os.utime(self.path)
            except OSError:
                pass

    def publish(self, doc: Dict[str, Any]) -> None:
        self._write({**doc, "state": "receiving"})

    def done(self) -> None:
        try:
            os.remove(self.path)
        except OSError:
            pass

    def failed(self, msg: str) -> None:
        try:
            self._write({"state": "failed", "msg": " ".join(msg.split())[:300]})
        except OSError:
            pass


class Holdings:
    """What this host can serve now, and when its own copy last moved (the stall clock)."""

    def __init__(self, target: str, *, relay: bool, name: str, stall: float, whole_files: bool = False):
        self.target, self.relay, self.name, self.stall = target, relay, name, float(stall)
        self.whole_files = whole_files
        self.lock = threading.Lock()
        self.stale = _identity(os.path.join(target, MANIFEST))      # relay: the manifest from before this copy
        self.sig: Any = None
        self.changed = self.polled = time.monotonic()
        self.stuck: Any = None        # the signature at which a stall was declared: later requests refused at once
        self.paths: Dict[str, int] = {}
        self.fixed = None
        if not relay:
            doc = _load(os.path.join(target, MANIFEST))
            if not _files(doc):
                raise ServeError(f"{name}: no verified model to serve (no manifest)")
            self.fixed = doc

    def listing(self) -> Optional[Dict[str, Any]]:
        """The listing to serve now; None while this host's copy has not said what it receives."""
        if self.fixed is not None:
            return self.fixed
        doc = _load(os.path.join(self.target, INCOMING))
        state = doc.get("state") if isinstance(doc, dict) else None
        if state == "failed":
            raise Stalled(f"{self.name} could not receive the model itself: {str(doc.get('msg', ''))[:300]}")
        if state != "receiving":
            manifest = os.path.join(self.target, MANIFEST)
            ident = _identity(manifest)
            doc = _load(manifest) if ident is not None and ident != self.stale else None   # a copy that finished
        if doc is not None and _files(doc):
            with self.lock:
                self.paths = {p: f["size"] for p, f in _files(doc).items()}
            return doc
        return None

    def held(self) -> int:
        total = 0
        with self.lock:
            paths = dict(self.paths)
        for p, size in paths.items():
            for where in (self.target, os.path.join(self.target, PARTIAL_DIR)):
                ident = _identity(os.path.join(where, p))
                if ident is not None:
                    total += min(ident[2], size)
                    break
        return total

    def poll(self) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.polled < SIGN:
                return
            self.polled = now
        sig = (_identity(os.path.join(self.target, INCOMING)), _identity(os.path.join(self.target, MANIFEST)),
               self.held())
        with self.lock:
            if sig != self.sig:
                self.sig, self.changed, self.stuck = sig, time.monotonic(), None

    def wait(self, since: float, what: str) -> None:
        """Sleep a little; Stalled when nothing arrived here for the stall time (since `since` at the earliest)."""
        self.poll()
        with self.lock:
            quiet = time.monotonic() - max(self.changed, since)
            stuck = self.stuck is not None and self.stuck == self.sig or quiet > self.stall
            if stuck:
                self.stuck = self.sig
        if stuck:
            with self.lock:
                total = sum(self.paths.values())
            if not total:
                raise Stalled(f"{self.name} has no listing of the model to pass on after {self.stall:g} s (its own "
                              "copy has not begun)")
            raise Stalled(f"{self.name} stopped receiving the model: nothing arrived for {self.stall:g} s while "
                          f"{what} (it holds {human(self.held())} of {human(total)})")
        time.sleep(POLL)

    def open(self, path: str, start: int, since: float):
        """(file, whole) to read `path` from `start`: the final file, else the growing part once it holds a byte
        beyond start (whole_files: the final file only); waits, Stalled when nothing comes."""
        final, part = confined(self.target, path), confined(os.path.join(self.target, PARTIAL_DIR), path)
        if self.fixed is not None:
            return open(final, "rb"), True      # a complete copy: a missing file is an error, not a wait
        while True:
            for where, whole in ((final, True), (part, False)):
                if not whole and self.whole_files:
                    continue
                try:
                    f = open(where, "rb")
                except OSError:
                    continue
                if whole or os.fstat(f.fileno()).st_size > start:
                    return f, whole
                f.close()
            self.wait(since, f"{path} had not arrived")


def serve(job: Dict[str, Any], target: str, emit: Callable[[Dict[str, Any]], None], token: str) -> None:
    """Serve the folder to peers holding the token until no request came for job['idle'] seconds."""
    relay = job.get("mode") == "relay"
    held = Holdings(target, relay=relay, name=str(job.get("name") or job.get("host_path") or target),
                    stall=float(job.get("stall", 60)), whole_files=bool(job.get("whole_files")))
    want = ("Bearer " + token).encode()
    state = {"last": time.monotonic(), "active": 0}
    lock = threading.Lock()

    def say(ev: Dict[str, Any]) -> None:
        with lock:
            emit(ev)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):   # no access log on stdout: stdout carries events
            pass

        def do_GET(self):
            with lock:
                state["active"] += 1
            try:
                self._get()
            except Stalled as e:
                self._refuse(str(e))
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                with lock:
                    state["active"] -= 1
                    state["last"] = time.monotonic()

        def _get(self):
            if not hmac.compare_digest(self.headers.get("Authorization", "").encode("utf-8", "replace"), want):
                self.send_error(401)
                return
            since = time.monotonic()
            doc = held.listing()
            while doc is None:
                held.wait(since, "the listing had not arrived")
                doc = held.listing()
            if self.path == "/manifest":
                body = json.dumps(doc).encode()
                self._head(200, len(body))
                self.wfile.write(body)
                return
            path = urllib.parse.unquote(self.path[len("/files/"):]) if self.path.startswith("/files/") else ""
            entry = _files(doc).get(path)
            if entry is None:
                self.send_error(404)
                return
            start = _range_start(self.headers.get("Range"), entry["size"])
            try:
                f, whole = held.open(path, start, since)
            except OSError:
                self.send_error(404)
                return
            with f:
                size = os.fstat(f.fileno()).st_size if held.fixed is not None else entry["size"]
                start = start if start < size else 0
                say({"ev": "send", "file": path, "start": start, "from": "final" if whole else "part"})
                f.seek(start)
                self._head(206 if start else 200, size - start, start=start, size=size)
                try:
                    self._body(f, start, size, path)
                except Stalled:
                    self.close_connection = True     # cut short: the client retries and gets the 409

        def _body(self, f, pos: int, size: int, path: str) -> None:
            since = time.monotonic()
            while pos < size:
                chunk = f.read(min(CHUNK, size - pos))
                if chunk:
                    _send_chunk(self.wfile, chunk)
                    pos += len(chunk)
                    since = time.monotonic()
                    with lock:
                        state["last"] = since
                    continue
                if os.fstat(f.fileno()).st_nlink == 0:   # this host dropped the file and starts it again
                    raise Stalled(f"{held.name} started {path} again")
                held.wait(since, f"{path} was arriving")

        def _head(self, code: int, length: int, start: int = 0, size: int = 0) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(length))
            if code == 206:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()

        def _refuse(self, msg: str) -> None:
            body = msg.encode("utf-8", "replace")
            self.send_response(409)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = _Server((job["bind"], int(job["port"])), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    say({"ev": "listening", "port": server.server_address[1], "mode": "relay" if relay else "complete"})
    idle = float(job.get("idle", 300))
    while True:
        with lock:
            if not state["active"] and time.monotonic() - state["last"] >= idle:
                break
        time.sleep(min(1.0, idle / 10))
    server.shutdown()
    say({"ev": "done", "summary": "served"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        # HTTPServer.server_bind asks reverse DNS for the address (socket.getfqdn): 10 s on hosts without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


def _range_start(header: Optional[str], size: int) -> int:
    if header and header.startswith("bytes=") and header.endswith("-"):
        try:
            start = int(header[6:-1])
        except ValueError:
            return 0
        return start if 0 <= start < size else 0
    return 0
