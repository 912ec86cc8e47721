"""PURE (stdlib only, Python >= 3.8): model file lists, manifests and what a host lacks.

Shipped to the hosts beside agent.py; the control side imports it too."""

from __future__ import annotations

import fnmatch
import os
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

MANIFEST = ".gpucluster-manifest.json"
STAMP = ".gpucluster-stamp"
PARTIAL_DIR = ".gpucluster-partial"
INCOMING = ".gpucluster-incoming.json"   # what a host receiving a copy tells its own server (serve.py, relay mode)

Entry = Dict[str, Any]   # {"path", "size", "sha256": str|None, "oid": str|None (git blob sha1), "mtime": int ns,
#                           "hash_by": "source" | "head" (in manifests: who gave the sha256 it was verified by)}
HASH_BY = ("source", "head")


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






def parse_sha256sum(text: str) -> Dict[str, str]:
    out = {}
    for line in text.splitlines():
        digest, sep, path = line.partition("  ")
        if sep and len(digest) == 64 and not digest.startswith("\\"):
            out[path] = digest
    return out


def usable_hash(value: Any, length: int) -> Optional[str]:
    """A hex digest of `length` characters (lowercased), else None: a malformed one from a listing verifies nothing."""
    if isinstance(value, str) and len(value) == length and all(c in "0123456789abcdefABCDEF" for c in value):
        return value.lower()
    return None


def has_source_hash(e: Entry) -> bool:
    return bool(e.get("sha256") or e.get("oid"))


def reference(e: Entry, m: Optional[Entry]) -> Tuple[Optional[str], Optional[str], str]:
    """(sha256, git oid, by) a present file must match: the listing's (by its hash_by, "source" from a hub), else
    the sha256 this host recorded when it fetched the file (by "head": the source lists none); ("", ...) none."""
    if has_source_hash(e):
        return e.get("sha256"), e.get("oid"), e.get("hash_by") or "source"
    sha = usable_hash((m or {}).get("sha256"), 64)
    if sha and (m or {}).get("size") == e.get("size"):
        return sha, None, "head"
    return None, None, ""


def verified_counts(files: Iterable[Entry]) -> Dict[str, int]:
    """How many files of a copy were verified by the source's hash, and how many by the head's."""
    out = {"source": 0, "head": 0}
    for f in files:
        out["source" if f.get("hash_by") == "source" else "head"] += 1
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
    size and mtime (it was verified, its sha256 recorded, and it has not been touched since), and `verify` is off."""
    need, check = [], []
    for e in expected:
        seen = scanned.get(e["path"])
        if seen is None or seen[0] != e["size"]:
            need.append(e["path"])
            continue
        m = (manifest or {}).get(e["path"])
        if not verify and m and usable_hash(m.get("sha256"), 64) and identity_matches(m, e) \
                and m.get("mtime") == seen[1]:
            continue
        check.append(e["path"])
    return need, check




def manifest_doc(spec: Dict[str, Any], commit: str, files: List[Entry]) -> Dict[str, Any]:
    return {"version": 1, **spec, "commit": commit, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": [{k: f.get(k) for k in ("path", "size", "sha256", "oid", "mtime", "hash_by")
                       if f.get(k) is not None}
                      for f in sorted(files, key=lambda f: f["path"])]}


def manifest_files(doc: Any, spec: Dict[str, Any]) -> Optional[Dict[str, Entry]]:
    """path -> entry of a manifest written for the same spec (model, revision, filters), else None."""
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("files"), list):
        return None
    if any(doc.get(k) != v for k, v in spec.items()):
        return None
    return {f["path"]: f for f in doc["files"] if isinstance(f, dict) and "path" in f}




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



def confined(target: str, path: str) -> str:
    """The absolute path of a listed file inside target; a path that could leave it is refused."""
    if not safe_relpath(path):
        raise ValueError(f"unsafe path {path!r}")
    root = os.path.realpath(target)
    full = os.path.realpath(os.path.join(root, path))
    if not full.startswith(root + os.sep):
        raise ValueError(f"path {path!r} leaves the model folder")
    return full
