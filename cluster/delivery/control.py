"""Control side of delivery: the agent's progress events as lines, and the copy through this machine."""

from __future__ import annotations

import json
import os
import time
from typing import Callable

from .manifest import (MANIFEST, PARTIAL_DIR, confined, human, parse_sha256sum, safe_relpath, usable_hash,
                       verified_counts)
from ..steps import CONTROL

CHUNK = 1 << 20


class Meter:
    """Per-host progress lines: bytes, rate, ETA; at most one line a second."""

    def __init__(self, progress: Callable[[str], None], host: str, what: str, total: int):
        self.progress, self.host, self.what, self.total = progress, host, what, total
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < 1.0:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-6)
        eta = (self.total - done) / rate if rate > 0 and self.total > done else 0
        self.progress(f"{self.host}: {self.what}: {human(done)} / {human(self.total)}, {human(rate)}/s"
                      + ("" if final else f", ETA {int(eta) // 60}:{int(eta) % 60:02d}"))


def on_event(lines, ev: dict) -> None:
    """One agent event (untrusted text: only known fields, printed as data) -> progress / summary / error."""
    kind = ev.get("ev")
    if kind == "plan" and ev.get("need"):
        what = "copy" if str(ev.get("source", "")) == "peer" else "download"
        lines.meter = Meter(lines.progress, lines.host, what, _int(ev.get("bytes")))
        lines.progress(f"{lines.host}: {what}ing {len(ev['need'])} of {_int(ev.get('files'))} file(s) "
                       f"({human(_int(ev.get('bytes')))})")
    elif kind == "progress" and lines.meter is not None:
        lines.meter.update(max(_int(ev.get("done")), 0))
    elif kind == "note":
        lines.progress(f"{lines.host}: {_text(ev.get('msg'))}")
    elif kind == "done":
        if lines.meter is not None:
            lines.meter.update(_int(ev.get("bytes")), final=True)
        lines.summary = _text(ev.get("summary")) or "done"
    elif kind == "error":
        lines.error = _text(ev.get("msg")) or "the agent failed"


def _int(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _text(v) -> str:
    return " ".join(str(v).split())[:500] if v is not None else ""


def copy_tree(ex, src_host: str, src: str, dst_host: str, dst: str, progress: Callable[[str], None]) -> str:
    """Copy the files of src's manifest that dst lacks (or holds with another sha256), through this machine.

    Used when the model was downloaded here, or when a host cannot reach the head; says what it did. Every file is
    checked against the sha256 in src's manifest: the source's, or the one the downloading host computed when the
    source listed none."""
    doc = json.loads(_read(ex, src_host, f"{src}/{MANIFEST}"))
    files = [f for f in doc.get("files", []) if isinstance(f, dict) and safe_relpath(str(f.get("path", "")))]
    unhashed = [str(f["path"]) for f in files if not usable_hash(f.get("sha256"), 64)]
    if unhashed:
        raise RuntimeError(f"{src_host}: its manifest has no sha256 for {', '.join(unhashed[:3])}: the copy could "
                           "not be verified (run `gpucluster model pull --verify`)")
    for f in files:
        f["sha256"] = usable_hash(f["sha256"], 64)      # sha256sum prints lowercase
    have = _hashes(ex, dst_host, dst, [f["path"] for f in files])
    todo = [f for f in files if have.get(f["path"]) != f.get("sha256")]
    total = sum(int(f["size"]) for f in todo)
    meter = Meter(progress, dst_host, f"copy {len(todo)} file(s) from {src_host} via this machine", total)
    dst_sftp = ex.hosts.sftp(ex.hosts.host(dst_host))
    src_sftp = None if src_host == CONTROL else ex.hosts.sftp(ex.hosts.host(src_host))
    done = 0
    try:
        for f in todo:
            part, final = f"{dst}/{PARTIAL_DIR}/{f['path']}", f"{dst}/{f['path']}"
            ex.run(dst_host, ["mkdir", "-p", os.path.dirname(part), os.path.dirname(final)]).ok or _fail(dst_host)
            reader = src_sftp.open(f"{src}/{f['path']}", "rb") if src_sftp else open(confined(src, f["path"]), "rb")
            try:
                with dst_sftp.open(part, "wb") as w:
                    w.set_pipelined(True)
                    for chunk in iter(lambda: reader.read(CHUNK), b""):
                        w.write(chunk)
                        done += len(chunk)
                        meter.update(done)
            finally:
                reader.close()
            ex.run(dst_host, ["mv", "-f", part, final]).ok or _fail(dst_host)
        dst_sftp.putfo(_Bytes(json.dumps(doc, indent=1).encode()), f"{dst}/{MANIFEST}")
    finally:
        dst_sftp.close()
        if src_sftp:
            src_sftp.close()
    bad = [f["path"] for f in todo if _hashes(ex, dst_host, dst, [f["path"]]).get(f["path"]) != f.get("sha256")]
    if bad:
        raise RuntimeError(f"{dst_host}: checksum mismatch after copy: {', '.join(bad[:3])}")
    meter.update(total, final=True)
    if not todo:
        return "present"
    verb = "repaired" if any(f["path"] in have for f in todo) else "copied"
    how = "this machine" if src_host == CONTROL else f"{src_host} via this machine"
    counts = verified_counts(files)
    return (f"{verb} {len(todo)} file(s), {human(total)} from {how}; verified: {counts['source']} by the source's "
            f"hash, {counts['head']} by the head's")


class _Bytes:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.data[self.pos:] if n < 0 else self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk


def _read(ex, host: str, path: str) -> str:
    if host == CONTROL:
        with open(path) as f:
            return f.read()
    r = ex.run(host, ["cat", path])
    if not r.ok:
        raise RuntimeError(f"{host}: cannot read {path}: {r.last_line()}")
    return r.stdout


def _hashes(ex, host: str, root: str, paths: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i in range(0, len(paths), 200):
        r = ex.run(host, ["sh", "-c", 'cd "$0" 2>/dev/null && exec sha256sum -- "$@"', root, *paths[i:i + 200]],
                   timeout=3600)
        out.update(parse_sha256sum(r.stdout))
    return out


def _fail(host: str):
    raise RuntimeError(f"{host}: cannot write into the model folder")
