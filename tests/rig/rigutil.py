# gpucluster test rig: shared helpers (paths, logging, subprocess, timing).
import contextlib
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CACHE = os.environ.get("GPUCLUSTER_RIG_CACHE", "/var/cache/gpucluster-rig")
VERBOSE = os.environ.get("GPUCLUSTER_RIG_VERBOSE") == "1"


def log(msg):
    sys.stderr.write("[rig %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


@contextlib.contextmanager
def stage(name):
    t = time.monotonic()
    log("%s ..." % name)
    try:
        yield
    finally:
        log("%s: %.1fs" % (name, time.monotonic() - t))


def run(cmd, check=True, quiet=False, capture=False, **kw):
    """Run a command; on failure raise with its output. quiet: swallow output unless it fails."""
    if VERBOSE:
        log("$ " + " ".join(map(str, cmd)))
    if quiet or capture:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT if not capture else subprocess.PIPE)
    else:
        kw.setdefault("stdout", sys.stderr)
    kw.setdefault("stdin", subprocess.DEVNULL) if "input" not in kw else None
    r = subprocess.run(cmd, **kw)
    if check and r.returncode != 0:
        out = r.stdout.decode(errors="replace") if isinstance(r.stdout, bytes) else (r.stdout or "")
        err = r.stderr.decode(errors="replace") if isinstance(r.stderr, bytes) else (r.stderr or "")
        raise RuntimeError("command failed (%d): %s\n%s%s" % (r.returncode, " ".join(map(str, cmd)), out[-4000:], err[-4000:]))
    return r


def wait_for(fn, timeout, what, interval=0.2):
    end = time.monotonic() + timeout
    while True:
        try:
            if fn():
                return
        except Exception:
            pass
        if time.monotonic() > end:
            raise RuntimeError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


class AccessLog:
    """The mirrors' request log: JSON lines {ts, client, method, path, status, bytes} (tests read it)."""

    def __init__(self, path):
        self._f = open(path, "a", buffering=1)
        self._lock = threading.Lock()

    def write(self, handler, status, nbytes):
        line = json.dumps({"ts": time.time(), "client": handler.client_address[0], "method": handler.command,
                           "path": handler.path, "status": status, "bytes": nbytes})
        with self._lock:
            self._f.write(line + "\n")
