"""Ollama model references and the facts of their GGUF weights (engine `ollama`).

A reference is what `ollama pull` takes:
  library   qwen3:32b, qwen3 (tag latest), user/model:tag                   (registry.ollama.ai)
  hub GGUF  hf.co/ORG/REPO[:QUANT] (huggingface.co, hf-mirror.com too), modelscope.cn/ORG/REPO[:QUANT]
            (QUANT is case-insensitive and defaults to Q4_K_M; Ollama asks that hub itself)

Facts: the curated models of cluster/knowledge/ollama (no network), else for a hub GGUF the hub's file listing
(the size of the quant's .gguf, split parts summed) and the GGUF header read with HTTP Range (layers, heads,
context). Cached beside hub.py's (`gguf/` under the cache root); `--offline` reads the cache only. Every answer
is capped and bounded in time by hub.py's client; nothing from the network becomes a path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .models import ModelFacts

FORMAT = 1
HUB_HOSTS = {"hf.co": "huggingface", "huggingface.co": "huggingface", "hf-mirror.com": "hf-mirror",
             "modelscope.cn": "modelscope", "www.modelscope.cn": "modelscope"}
ENDPOINTS = {"huggingface": "https://huggingface.co", "hf-mirror": "https://hf-mirror.com",
             "modelscope": "https://www.modelscope.cn"}
REVISIONS = {"huggingface": "main", "hf-mirror": "main", "modelscope": "master"}
DEFAULT_QUANT = "Q4_K_M"          # what Hugging Face and ModelScope serve Ollama when no tag is given
_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,95}"
REF = re.compile(rf"^(?:(?P<host>[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*\.[a-z]{{2,}})/)?"
                 rf"(?P<repo>{_PART}(?:/{_PART})?)(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}))?$")
SPLIT = re.compile(r"-\d{5}-of-\d{5}(?=\.gguf$)", re.I)
QUANT = re.compile(r"^(i?q\d\w*|f16|bf16|f32|mxfp4)$", re.I)
KIB, MIB = 1 << 10, 1 << 20
FIRST_READ = 1 * MIB              # the architecture keys come first; the tokenizer's arrays follow
CAP_HEADER = 32 * MIB             # at most this much of a GGUF is read (hub.py's cap for a safetensors header)


# ---------------------------------------------------------------- references
@dataclass(frozen=True)
class Ref:
    text: str
    kind: str                     # library | registry | huggingface | hf-mirror | modelscope
    host: str | None
    repo: str                     # qwen3, user/model, ORG/REPO
    tag: str | None               # the tag, or a hub GGUF's quantization (None: latest / Q4_K_M)

    @property
    def hub(self) -> bool:
        return self.kind in ENDPOINTS

    @property
    def listed(self) -> str:
        """The name as `ollama list` and /api/tags show it (":latest" when no tag)."""
        return f"{self.text}:latest" if self.tag is None else self.text


def parse(text: str) -> Ref:
    """A reference Ollama can pull, or ValueError saying why not."""
    m = REF.match(text or "")
    if not m or len(text) > 300 or ".." in text:
        raise ValueError(f"{text!r} is not an Ollama model name (qwen3:32b, user/model:tag) or hub GGUF "
                         "(hf.co/ORG/REPO:QUANT, modelscope.cn/ORG/REPO:QUANT)")
    host, repo, tag = m.group("host"), m.group("repo"), m.group("tag")
    if host is None:
        return Ref(text, "library", None, repo, tag)
    kind = HUB_HOSTS.get(host, "registry")
    if kind != "registry" and "/" not in repo:
        raise ValueError(f"{text!r}: a GGUF on {host} is named {host}/ORG/REPO[:QUANT]")
    return Ref(text, kind, host, repo, tag)


def is_ref(text: str) -> bool:
    """Unmistakably an Ollama reference (never a hub model id): a host prefix, a tag, or a curated name."""
    try:
        r = parse(text)
    except ValueError:
        return False
    return r.host is not None or r.tag is not None or curated(r) is not None


def curated(ref: Ref) -> dict | None:
    """The curated entry for a reference (names compared as Ollama does: case-insensitively, ":latest" added)."""
    from .knowledge import ollama
    want = ref.listed.lower()
    for entry in ollama.models():
        for name in (entry["name"], *entry.get("also", ())):
            if parse(name).listed.lower() == want:
                return entry
    return None


def for_hub_id(model_id: str) -> dict | None:
    """The curated GGUF that serves a hub model id (Qwen/Qwen3-32B -> qwen3:32b), if any."""
    from .knowledge import ollama
    return next((m for m in ollama.models() if model_id in m.get("hf", ())), None)


def _from_entry(text: str, entry: dict) -> ModelFacts:
    from . import knowledge
    from .models import _from_catalog
    base = _from_catalog(entry["base"], knowledge.catalog()[entry["base"]])
    return dataclasses.replace(base, id=text, weight_bytes=int(entry["size_bytes"]), dtype=str(entry["quant"]),
                               max_positions=int(entry.get("context") or base.max_positions), gated=False)


# ---------------------------------------------------------------- facts
def facts(text: str, source=None, *, offline: bool = False, cache_dir: str | Path | None = None) -> ModelFacts | None:
    """Facts of an Ollama reference: curated, else (a hub GGUF) cached, else asked of the hub unless offline.
    None: nothing knows it (an Ollama library name outside the curated table, or offline and not cached)."""
    from . import hub
    ref = parse(text)
    entry = curated(ref)
    if entry is not None:
        return _from_entry(text, entry)
    if not ref.hub:
        return None
    ep = _endpoint(ref, source)
    path = _cache_path(Path(cache_dir) if cache_dir is not None else hub.cache_root(), ep, ref)
    record = _cache_read(path, ep, ref)
    if record is not None:
        return _to_facts(ref, record, ep)
    if offline:
        return None
    key = ("gguf", str(path))
    if key in hub._failed:
        raise hub._failed[key]
    try:
        record = _fetch(ref, ep)
        found = _to_facts(ref, record, ep)
    except hub.HubError as e:
        hub._failed[key] = e
        raise
    hub._cache_write(path, record)
    return found


def _endpoint(ref: Ref, source):
    """The hub the reference names; the inventory's source (endpoint, revision, token) when it names that hub."""
    from . import hub
    if source is not None and source.kind == ref.kind:
        eps = hub.endpoints(source)
        if eps:
            return eps[0]
    return hub.Endpoint(kind=ref.kind, url=ENDPOINTS[ref.kind], revision=REVISIONS[ref.kind])


def _cache_path(root: Path, ep, ref: Ref) -> Path:
    key = hashlib.sha256(json.dumps([ep.kind, ep.url, ref.repo, (ref.tag or "").lower(), ep.revision]).encode()
                         ).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{ref.repo.replace('/', '--')}@{ref.tag or 'default'}").strip(".")[:80]
    return root / "gguf" / ep.kind / f"{safe or '_'}-{key}.json"


def _cache_read(path: Path, ep, ref: Ref) -> dict | None:
    from . import hub
    try:
        if path.stat().st_size > MIB:
            return None
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("repo") != ref.repo \
            or doc.get("tag") != ref.tag or doc.get("endpoint") != ep.url or doc.get("revision") != ep.revision:
        return None
    try:
        _to_facts(ref, doc, ep)
    except hub.HubError:
        return None
    return doc


def choose(listing: dict[str, int], tag: str | None) -> list[str]:
    """The .gguf file(s) of one quantization (split parts, in order); ValueError naming what the repository has."""
    ggufs = sorted(p for p in listing if p.lower().endswith(".gguf") and "mmproj" not in p.lower().rsplit("/", 1)[-1])
    if not ggufs:
        raise ValueError("the repository lists no .gguf file")
    want = (tag or DEFAULT_QUANT).lower()

    def stem(p: str) -> str:
        return SPLIT.sub("", p.lower().rsplit("/", 1)[-1])[:-len(".gguf")]

    def matches(p: str) -> bool:
        folder = p.lower().rsplit("/", 2)[-2] if "/" in p else ""
        return p.lower().rsplit("/", 1)[-1] in (want, want + ".gguf") or folder == want or \
            re.search(rf"(^|[-_.]){re.escape(want)}$", stem(p)) is not None
    hits = [p for p in ggufs if matches(p)]
    if not hits and tag is None and len({stem(p) for p in ggufs}) == 1:
        hits = ggufs
    if not hits:
        quants = sorted({s.rsplit("-", 1)[-1].rsplit(".", 1)[-1].upper() for s in map(stem, ggufs)})
        raise ValueError(f"no {want.upper()} GGUF in the repository; it has: {', '.join(quants[:20])}")
    groups: dict[str, list[str]] = {}
    for p in hits:
        groups.setdefault(p.lower().rsplit("/", 1)[0] + "/" + stem(p) if "/" in p else stem(p), []).append(p)
    best = min(groups, key=lambda k: (len(k), k))
    return sorted(groups[best])


def _fetch(ref: Ref, ep) -> dict:
    """The record to cache: the quant's file(s) and size from the listing, the architecture from its header."""
    from . import hub
    c = hub._Client(ep, ref.repo)
    _, sizes, _ = (hub._modelscope if ep.kind == "modelscope" else hub._hf_style)(c)
    listing = sizes()
    try:
        files = choose(listing, ref.tag)
    except ValueError as e:
        raise c.fail(str(e)) from None
    kv = _header(c, files[0])
    return {"format": FORMAT, "repo": ref.repo, "tag": ref.tag, "kind": ep.kind, "endpoint": ep.url,
            "revision": ep.revision, "commit": c.commit, "files": files, "size": sum(listing[f] for f in files),
            "kv": kv, "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _header(c, path: str) -> dict:
    """The GGUF header's metadata that the plan needs, read from the file's first bytes (HTTP Range; a server
    that ignores Range sends the file, of which only the first bytes are read)."""
    from .delivery.agent import file_url
    url = file_url(c.job, c.commit, path)
    want = FIRST_READ
    while True:
        with c.open(url, path, {"Range": f"bytes=0-{want - 1}"}) as resp:
            data = c.read(resp, want, path, exact=None) if resp.status == 206 else _first(c, resp, want, path)
        try:
            kv = read_header(data[:want], final=len(data) < want or want >= CAP_HEADER)
        except ValueError as e:
            raise c.fail(f"{path}: {e}") from None
        if kv is not None:
            return kv
        want = min(want * 4, CAP_HEADER)


def _first(c, resp, n: int, what: str) -> bytes:
    """The first n bytes of an answer that ignored Range (the rest is never read)."""
    out = bytearray()
    deadline = min(time.monotonic() + 30.0, c.deadline)
    while len(out) < n:
        if time.monotonic() > deadline:
            raise c.fail(f"{what}: the answer took too long")
        chunk = resp.read1(min(256 * KIB, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


# ---------------------------------------------------------------- the GGUF header
class _More(Exception):
    """The buffer ends before the header does."""


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
WANTED = ("block_count", "context_length", "embedding_length", "attention.head_count", "attention.head_count_kv",
          "attention.key_length", "feed_forward_length", "vocab_size")


def read_header(data: bytes, *, final: bool = True) -> dict | None:
    """The metadata a plan needs from a GGUF's first bytes: general.architecture and its <arch>.* sizes, the
    token count. None when `data` ends too early and more could be read (`final` False); ValueError otherwise."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise _More
        pos += n
        return data[pos - n:pos]

    def unpack(fmt: str):
        return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

    def string(limit: int = 1 << 20) -> str:
        n = unpack("<Q")
        if n > limit:
            raise ValueError(f"a string of {n} bytes in the header")
        return take(n).decode("utf-8", "replace")

    kv: dict = {}
    try:
        if take(4) != b"GGUF":
            raise ValueError("not a GGUF file (no GGUF magic)")
        version = unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (2 and 3 are read)")
        unpack("<Q")
        count = unpack("<Q")
        if count > 100_000:
            raise ValueError(f"{count} metadata entries")
        for _ in range(count):
            key = string(1 << 16)
            vtype = unpack("<I")
            if vtype in _SCALARS:
                kv[key] = unpack(_SCALARS[vtype])
            elif vtype == _STRING:
                kv[key] = string()
            elif vtype == _ARRAY:
                atype, n = unpack("<I"), unpack("<Q")
                if n > 50_000_000:
                    raise ValueError(f"an array of {n} items in the header")
                kv[key] = {"len": n}
                if atype in _SCALARS and atype != 7 and n <= 4096:      # per-layer sizes (head_count_kv ...)
                    fmt = _SCALARS[atype]
                    kv[key]["max"] = max(struct.unpack(f"<{n}{fmt[1]}", take(n * struct.calcsize(fmt))), default=0)
                elif atype in _SCALARS:
                    take(n * struct.calcsize(_SCALARS[atype]))
                elif atype == _STRING:
                    for _ in range(n):
                        string()
                else:
                    raise ValueError(f"an array of type {atype} in the header")
            else:
                raise ValueError(f"metadata type {vtype} for {key[:60]!r}")
    except _More:
        if not final and not _complete(kv):
            return None
    except (UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"unreadable header ({e})") from None
    if not _complete(kv, need_vocab=False):
        raise ValueError("the header has no general.architecture with its block_count, embedding_length, "
                         "attention.head_count and context_length")
    arch = kv["general.architecture"]
    out = {"general.architecture": arch}
    for name in WANTED:
        v = kv.get(f"{arch}.{name}")
        if isinstance(v, dict) and "max" not in v:
            continue
        if v is not None:
            out[name] = v.get("max") if isinstance(v, dict) else v
    tokens = kv.get("tokenizer.ggml.tokens")
    if isinstance(tokens, dict):
        out["tokens"] = tokens["len"]
    if isinstance(kv.get("general.file_type"), int):
        out["file_type"] = kv["general.file_type"]
    return out


def _complete(kv: dict, *, need_vocab: bool = True) -> bool:
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        return False
    have = all(f"{arch}.{k}" in kv for k in ("block_count", "context_length", "embedding_length",
                                              "attention.head_count"))
    return have and (not need_vocab or f"{arch}.vocab_size" in kv or "tokenizer.ggml.tokens" in kv)


def _to_facts(ref: Ref, record: dict, ep) -> ModelFacts:
    from . import hub
    try:
        kv, size = record["kv"], record["size"]
        arch = kv["general.architecture"]
        if not (isinstance(arch, str) and hub.NAME.match(arch)):
            raise ValueError("general.architecture is not a plain name")

        def num(key: str, default=None) -> int:
            v = kv.get(key, default)
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if not (isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 40):
                raise ValueError(f"{arch}.{key} is {str(v)[:40]!r}")
            return v
        if not (isinstance(size, int) and not isinstance(size, bool) and 0 < size < 1 << 50):
            raise ValueError(f"a GGUF of {str(size)[:40]!r} bytes")
        heads, hidden = num("attention.head_count"), num("embedding_length")
        files = record.get("files") or ["?"]
        quant = (ref.tag or "").upper() or files[0].rsplit("/", 1)[-1]
        return ModelFacts(
            id=ref.text, architecture=arch, model_type=arch, layers=num("block_count"), heads=heads,
            kv_heads=num("attention.head_count_kv", heads), head_dim=num("attention.key_length", hidden // heads),
            hidden=hidden, intermediate=num("feed_forward_length", 4 * hidden),
            vocab=num("vocab_size", kv.get("tokens", 32000)), max_positions=num("context_length"), dtype=quant,
            tie_embeddings=False, weight_bytes=size)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise hub.HubError(f"unusable GGUF facts: {hub._clean(str(e))}", model=ref.text, endpoint=ep.url) from None
