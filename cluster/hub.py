"""Facts of a model outside the catalog, from the inventory's model source (HF mirror, huggingface, ModelScope):
config.json and the weights' size (the safetensors index, or the header read with HTTP Range), cached on this
machine under ~/.cache/gpucluster/hub. `--offline` (GPUCLUSTER_OFFLINE=1) reads the cache only.

Everything a hub answers is untrusted: every answer is capped in bytes and in time, JSON is type-checked
before use, and nothing from the network becomes a filesystem path (the cache file is named from the
inventory's own values). A failure is one HubError line naming the model and the endpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, Callable

from .delivery.agent import _NoAuthOnRedirect, file_url   # the hosts' download uses the same URL forms
from .delivery.model_steps import DEFAULT_ENDPOINTS, DEFAULT_REVISION
from .errors import GpuclusterError
from .models import ModelFacts, from_config

OFFLINE_ENV = "GPUCLUSTER_OFFLINE"
CACHE_ENV = "GPUCLUSTER_CACHE_DIR"
FORMAT = 1
TIMEOUT = 10.0                 # seconds per socket operation
DEADLINE = 30.0                # seconds per answer, however slowly a server drips it
BUDGET = 60.0                  # seconds for all the answers about one model
KIB, MIB = 1 << 10, 1 << 20
CAP_LISTING = 16 * MIB         # a revision answer, a file tree page, a ModelScope file list
CAP_CONFIG = 2 * MIB           # config.json
CAP_INDEX = 32 * MIB           # *.index.json (DeepSeek-V3's is ~9 MB)
CAP_HEADER = 32 * MIB          # a safetensors header (JSON after the 8-byte length)
MAX_PAGES = 20                 # of a paginated HF file tree
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")     # architecture, model_type, dtype
BIN = re.compile(r"^pytorch_model(-\d{1,5}-of-\d{1,5})?\.bin$")
INT_KEYS = ("num_attention_heads", "n_head", "num_heads", "hidden_size", "d_model", "n_embd", "num_key_value_heads",
            "num_kv_heads", "n_head_kv", "num_hidden_layers", "n_layer", "num_layers", "head_dim", "intermediate_size",
            "ffn_hidden_size", "vocab_size", "max_position_embeddings")
FALLBACK_INT_KEYS = ("model_max_length", "max_seq_len", "seq_length")   # read only without max_position_embeddings
BOOL_KEYS = ("tie_word_embeddings", "multi_query")


class HubError(GpuclusterError):
    """The hub could not tell: one line naming the model and the endpoint."""

    def __init__(self, message: str, *, model: str, endpoint: str):
        self.model, self.endpoint = model, endpoint
        super().__init__(f"{model} at {endpoint}: {message}")


@dataclass(frozen=True)
class Endpoint:
    kind: str                  # hf-mirror | huggingface | modelscope
    url: str
    revision: str
    token: str | None = dataclasses.field(default=None, repr=False)


def offline_requested() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    """GPUCLUSTER_CACHE_DIR, else $XDG_CACHE_HOME/gpucluster, else ~/.cache/gpucluster."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "gpucluster"


def endpoints(source) -> list[Endpoint]:
    """The source's endpoints in the order to ask them. The token goes only to an endpoint the user chose:
    one named in `source.endpoint`, or the official hub named by `kind`; never to the default public mirror."""
    if source is None or source.kind not in DEFAULT_ENDPOINTS:
        return []
    token = None
    if source.token is not None and (source.endpoint or source.kind in ("huggingface", "modelscope")):
        try:
            token = source.token.reveal()
        except GpuclusterError:      # an unset {env: ...}: the plan says so (secret-unset); ask without it
            token = None
    return [Endpoint(kind=source.kind, url=(source.endpoint or DEFAULT_ENDPOINTS[source.kind]).rstrip("/"),
                     revision=source.revision or DEFAULT_REVISION[source.kind], token=token or None)]


_failed: dict[tuple, HubError] = {}   # one attempt per process: a plan is built several times per command


def facts(model_id: str, source, *, offline: bool | None = None, cache_dir: str | Path | None = None
          ) -> ModelFacts | None:
    """Facts from the cache, else (unless offline) from the source's endpoints in order; None: offline, not cached."""
    offline = offline_requested() if offline is None else offline
    from . import gguf
    if gguf.is_ref(model_id):     # an Ollama name or hub GGUF (qwen3:32b, hf.co/ORG/REPO:Q4_K_M): cluster/gguf.py
        return gguf.facts(model_id, source, offline=offline, cache_dir=cache_dir)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    eps = endpoints(source)
    if not eps:
        return None
    if not MODEL_ID.match(model_id) or ".." in model_id:
        raise HubError("not a hub model id (owner/name)", model=model_id[:100], endpoint=eps[0].url)
    for ep in eps:
        record = _cache_read(_cache_path(root, ep, model_id), ep, model_id)
        if record is not None:
            return _to_facts(model_id, record, ep)
    if offline:
        return None
    errors = []
    for ep in eps:
        key = (str(root), ep, model_id)
        if key in _failed:
            errors.append(_failed[key])
            continue
        try:
            record = _fetch(_Client(ep, model_id))
            result = _to_facts(model_id, record, ep)
        except HubError as e:
            _failed[key] = e
            errors.append(e)
            continue
        _cache_write(_cache_path(root, ep, model_id), record)
        return result
    raise errors[0]


def forget() -> None:
    """Forget this process's failed attempts (tests)."""
    _failed.clear()


# ---------------------------------------------------------------- cache
def _cache_path(root: Path, ep: Endpoint, model_id: str) -> Path:
    key = hashlib.sha256(json.dumps([ep.kind, ep.url, model_id, ep.revision]).encode()).hexdigest()[:16]

    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip(".")[:80] or "_"
    return root / "hub" / safe(ep.kind) / f"{safe(model_id.replace('/', '--'))}@{safe(ep.revision)}-{key}.json"


def _cache_read(path: Path, ep: Endpoint, model_id: str) -> dict | None:
    """A cached record, or None when absent or not ours (then it is fetched again)."""
    try:
        if path.stat().st_size > CAP_INDEX:
            return None
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("model") != model_id \
            or doc.get("kind") != ep.kind or doc.get("endpoint") != ep.url or doc.get("revision") != ep.revision:
        return None
    try:
        _to_facts(model_id, doc, ep)
    except HubError:
        return None
    return doc


def _cache_write(path: Path, record: dict) -> None:
    """Atomically; a cache that cannot be written (read-only home) only costs a fetch next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:
        pass


# ---------------------------------------------------------------- validation
def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def normalise_config(cfg: Any) -> dict:
    """config.json checked for the types the planner reads (ValueError says what is wrong); a composite
    (vision-language) config's `text_config` supplies the language model's sizes."""
    if not isinstance(cfg, dict):
        raise ValueError(f"config.json is a JSON {type(cfg).__name__}, not an object")
    text = cfg.get("text_config")
    if isinstance(text, dict) and cfg.get("num_hidden_layers") is None and cfg.get("n_layer") is None:
        cfg = {**text, **{k: cfg[k] for k in ("architectures", "torch_dtype", "dtype", "auto_map",
                                               "tie_word_embeddings") if k in cfg}}
    cfg = dict(cfg)
    for key in INT_KEYS + FALLBACK_INT_KEYS:
        v = cfg.get(key)
        if isinstance(v, float) and v.is_integer():
            v = cfg[key] = int(v)
        if v is not None and not (_int(v) and 0 < v < 1 << 40):
            if key in FALLBACK_INT_KEYS:
                del cfg[key]
                continue
            raise ValueError(f"config.json {key} is {str(v)[:40]!r}, not a positive integer")
    for key in BOOL_KEYS:
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise ValueError(f"config.json {key} is not true or false")
    archs = cfg.get("architectures")
    if archs is not None and not (isinstance(archs, list) and 0 < len(archs) <= 16
                                  and all(isinstance(a, str) and NAME.match(a) for a in archs)):
        raise ValueError("config.json architectures is not a list of class names")
    for key in ("model_type", "torch_dtype", "dtype"):
        v = cfg.get(key)
        if v is not None and not (isinstance(v, str) and NAME.match(v)):
            raise ValueError(f"config.json {key} is not a plain name")
    if cfg.get("auto_map") is not None and not isinstance(cfg["auto_map"], dict):
        raise ValueError("config.json auto_map is not an object")
    for group in (("num_attention_heads", "n_head", "num_heads"), ("hidden_size", "d_model", "n_embd"),
                  ("num_hidden_layers", "n_layer", "num_layers"), ("vocab_size",)):
        if all(cfg.get(k) is None for k in group):
            raise ValueError(f"config.json has no {group[0]}")
    return cfg


def _to_facts(model_id: str, record: dict, ep: Endpoint) -> ModelFacts:
    weight = record.get("weight_bytes")
    try:
        if not (_int(weight) and 0 < weight < 1 << 50):
            raise ValueError(f"weights of {str(weight)[:40]!r} bytes")
        cfg = normalise_config(record.get("config"))
        found = from_config(model_id, cfg, weight)
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        raise HubError(f"unusable model facts: {_clean(str(e))}", model=model_id, endpoint=ep.url) from None
    return dataclasses.replace(found, gated=record.get("gated") is True)


def _clean(text: Any, limit: int = 160) -> str:
    """A server's words in one printable line."""
    return re.sub(r"[^\x20-\x7e]+", " ", str(text)).strip()[:limit]


# ---------------------------------------------------------------- HTTP
class _Redirects(_NoAuthOnRedirect):
    """Authorization follows a redirect only to the same host; a redirect leaves HTTP(S) never."""

    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-HTTP address refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Client:
    """GETs against one endpoint for one model: capped, bounded in time, every failure a HubError."""

    def __init__(self, ep: Endpoint, model_id: str):
        self.ep, self.model = ep, model_id
        self.commit = ""           # the revision's commit (HF-style) or the revision itself (ModelScope)
        self.deadline = time.monotonic() + BUDGET
        self.job = {"kind": ep.kind, "endpoint": ep.url, "repo": model_id}
        self.opener = urllib.request.build_opener(_Redirects())

    def fail(self, message: str) -> HubError:
        return HubError(message, model=f"{self.model}@{self.ep.revision}", endpoint=self.ep.url)

    def open(self, url: str, what: str, headers: dict[str, str] | None = None):
        if time.monotonic() > self.deadline:
            raise self.fail(f"{what}: the hub took more than {BUDGET:g} s to describe the model")
        req = urllib.request.Request(url, headers={"User-Agent": "gpucluster-hub/1", **(headers or {})})
        if self.ep.token:
            req.add_unredirected_header("Authorization", f"Bearer {self.ep.token}")
        try:
            return self.opener.open(req, timeout=TIMEOUT)
        except urllib.error.HTTPError as e:
            e.close()
            raise self.fail(f"{what}: {self._status(e.code)}") from None
        except (urllib.error.URLError, OSError, HTTPException, ValueError) as e:
            raise self.fail(f"{what}: cannot reach the model source ({_clean(getattr(e, 'reason', e))})") from None

    def _status(self, code: int) -> str:
        if code in (401, 403):
            return (f"access denied, gated or private (check source.token) [HTTP {code}]" if self.ep.token else
                    f"not found, gated or private (check deploy.model, source.revision, source.token; a token "
                    f"goes only to an endpoint named in source.endpoint or to kind huggingface/modelscope) "
                    f"[HTTP {code}]")
        if code == 404:
            return "not found (check deploy.model and source.revision) [HTTP 404]"
        if 300 <= code < 400:
            return f"a redirect that is not followed (too many, or away from HTTP) [HTTP {code}]"
        return f"the server answered HTTP {code}"

    def read(self, resp, cap: int, what: str, *, exact: int | None = None) -> bytes:
        """The body (at most `cap` bytes), or exactly `exact` bytes of it; within DEADLINE seconds."""
        length = resp.headers.get("Content-Length", "")
        if exact is None and length.isdigit() and int(length) > cap:
            raise self.fail(f"{what}: the answer is {int(length)} bytes, more than the {cap // KIB} KiB allowed")
        want = cap + 1 if exact is None else exact
        deadline, chunks, got = min(time.monotonic() + DEADLINE, self.deadline), [], 0
        try:
            while got < want:
                if time.monotonic() > deadline:
                    raise self.fail(f"{what}: " + (f"the hub took more than {BUDGET:g} s to describe the model"
                                                   if deadline == self.deadline else
                                                   f"the answer took more than {DEADLINE:g} s"))
                chunk = resp.read1(min(64 * KIB, want - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except (OSError, HTTPException, ValueError) as e:
            raise self.fail(f"{what}: the answer broke off ({_clean(e)})") from None
        if exact is None and got > cap:
            raise self.fail(f"{what}: the answer is more than the {cap // KIB} KiB allowed")
        if exact is not None and got < exact:
            raise self.fail(f"{what}: the answer ended after {got} of {exact} bytes")
        return b"".join(chunks)

    def json(self, url: str, cap: int, what: str) -> tuple[Any, Any]:
        with self.open(url, what) as resp:
            data, headers = self.read(resp, cap, what), resp.headers
        try:
            return json.loads(data.decode("utf-8")), headers
        except (ValueError, RecursionError):
            raise self.fail(f"{what}: the answer is not JSON (is source.endpoint a hub?)") from None

    def file(self, path: str, cap: int) -> Any:
        return self.json(file_url(self.job, self.commit, path), cap, path)[0]

    def safetensors_weights(self, path: str) -> int:
        """Tensor bytes from a safetensors header: `Range: bytes=0-7` for its length, then the header alone.
        A server that ignores Range (olah) sends the whole file: its first 8 + n bytes are read, the rest never."""
        url = file_url(self.job, self.commit, path)
        with self.open(url, path, {"Range": "bytes=0-7"}) as resp:
            (n,) = struct.unpack("<Q", self.read(resp, 8, path, exact=8))
            if not 2 <= n <= CAP_HEADER:
                raise self.fail(f"{path}: a safetensors header of {n} bytes (at most {CAP_HEADER // MIB} MiB)")
            ranged = resp.status == 206
            if not ranged:
                body = self.read(resp, n, path, exact=n)
        if ranged:
            with self.open(url, path, {"Range": f"bytes=8-{8 + n - 1}"}) as resp:
                if resp.status != 206:
                    self.read(resp, 8, path, exact=8)
                body = self.read(resp, n, path, exact=n)
        try:
            header = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):
            raise self.fail(f"{path}: the safetensors header is not JSON") from None
        if not isinstance(header, dict):
            raise self.fail(f"{path}: the safetensors header is not an object")
        total = 0
        for name, t in header.items():
            if name == "__metadata__":
                continue
            offsets = t.get("data_offsets") if isinstance(t, dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) for o in offsets)
                    and 0 <= offsets[0] <= offsets[1]):
                raise self.fail(f"{path}: tensor {_clean(name, 60)!r} has no valid data_offsets")
            total += offsets[1] - offsets[0]
        return total


# ---------------------------------------------------------------- what each kind of hub answers
def _fetch(c: _Client) -> dict:
    """The record to cache: the validated config.json, the weights' bytes, and where they came from."""
    names, sizes, gated = (_modelscope if c.ep.kind == "modelscope" else _hf_style)(c)
    cfg = c.file("config.json", CAP_CONFIG)
    try:
        normalise_config(cfg)
    except ValueError as e:
        raise c.fail(str(e)) from None
    weight, how = _weights(c, names, sizes)
    return {"format": FORMAT, "model": c.model, "kind": c.ep.kind, "endpoint": c.ep.url, "revision": c.ep.revision,
            "commit": c.commit, "config": cfg, "weight_bytes": weight, "weights_from": how, "gated": gated,
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _hf_style(c: _Client) -> tuple[set[str], Callable[[], dict[str, int]], bool]:
    """huggingface.co and its mirrors (olah): the revision's commit and file names, sizes from the tree on demand."""
    q = urllib.parse.quote
    info, _ = c.json(f"{c.ep.url}/api/models/{q(c.model)}/revision/{q(c.ep.revision, safe='')}", CAP_LISTING,
                     "revision")
    sha = info.get("sha") if isinstance(info, dict) else None
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-fA-F]{7,64}", sha)):
        raise c.fail("the revision answer has no commit sha")
    c.commit = sha
    siblings = info.get("siblings")
    names = {s["rfilename"] for s in siblings if isinstance(s, dict) and isinstance(s.get("rfilename"), str)} \
        if isinstance(siblings, list) else None
    cache: dict[str, int] = {}

    def sizes() -> dict[str, int]:
        if not cache:
            url: str | None = f"{c.ep.url}/api/models/{q(c.model)}/tree/{q(sha, safe='')}?recursive=true"
            for _ in range(MAX_PAGES):
                page, headers = c.json(url, CAP_LISTING, "file tree")
                for f in page if isinstance(page, list) else []:
                    if isinstance(f, dict) and f.get("type") == "file" and isinstance(f.get("path"), str):
                        lfs = f.get("lfs") if isinstance(f.get("lfs"), dict) else {}
                        size = lfs.get("size", f.get("size"))
                        if _int(size) and size >= 0:
                            cache[f["path"]] = size
                url = next((urllib.parse.urljoin(c.ep.url + "/", p.split(";")[0].strip().strip("<>"))
                            for p in (headers.get("Link") or "").split(",") if 'rel="next"' in p), None)
                if url is None or urllib.parse.urlsplit(url).netloc != urllib.parse.urlsplit(c.ep.url).netloc:
                    break
        return cache
    if names is None:
        names = set(sizes())
    return names, sizes, info.get("gated") in (True, "auto", "manual")


def _modelscope(c: _Client) -> tuple[set[str], Callable[[], dict[str, int]], bool]:
    """ModelScope: one file list with sizes."""
    q = urllib.parse.quote
    c.commit = c.ep.revision
    doc, _ = c.json(f"{c.ep.url}/api/v1/models/{q(c.model)}/repo/files?Revision={q(c.ep.revision, safe='')}"
                    "&Recursive=True", CAP_LISTING, "file list")
    if not isinstance(doc, dict) or not doc.get("Success", doc.get("Code") == 200):
        raise c.fail(f"file list: {_clean(doc.get('Message') if isinstance(doc, dict) else doc)}")
    data = doc.get("Data")
    files = data.get("Files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        raise c.fail("file list: the answer has no Data.Files list")
    sizes = {f["Path"]: f["Size"] for f in files if isinstance(f, dict) and isinstance(f.get("Path"), str)
             and _int(f.get("Size")) and f["Size"] >= 0 and f.get("Type", "blob") == "blob"}
    return set(sizes), lambda: sizes, False


def _weights(c: _Client, names: set[str], sizes: Callable[[], dict[str, int]]) -> tuple[int, str]:
    """(bytes of weights, how they were counted): an index's total_size, else safetensors headers, else file sizes."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index not in names:
            continue
        doc = c.file(index, CAP_INDEX)
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        total = meta.get("total_size") if isinstance(meta, dict) else None
        if isinstance(total, float) and total.is_integer():
            total = int(total)
        if _int(total) and total > 0:
            return total, index
        shards = doc.get("weight_map") if isinstance(doc, dict) else None
        files = {v for v in shards.values() if isinstance(v, str)} if isinstance(shards, dict) else set()
        known = sizes()
        if files and files <= set(known):
            return sum(known[f] for f in files), f"{index} shard sizes"
        raise c.fail(f"{index} has no metadata.total_size and its shards' sizes are not listed")
    if "model.safetensors" in names:
        return c.safetensors_weights("model.safetensors"), "model.safetensors header"
    top = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
    if top and len(top) <= 4:
        return sum(c.safetensors_weights(n) for n in top), "safetensors header"
    if top:
        known = sizes()
        if set(top) <= set(known):
            return sum(known[n] for n in top), "safetensors file sizes"
    bins = sorted(n for n in names if BIN.match(n))
    known = sizes() if bins else {}
    if bins and set(bins) <= set(known):
        return sum(known[n] for n in bins), "pytorch_model*.bin file sizes"
    raise c.fail("no weights listed (model.safetensors[.index.json] or pytorch_model*.bin)")
