# stand-in for Ollama's pull (gpucluster test rig): the registry protocol as server/images.go PullModel speaks it.
"""Name -> {scheme}://{host}/v2/{namespace}/{model}/manifests/{tag}, then each layer's blob by digest, its sha256
checked, the model layer's GGUF header read, the blobs stored as OLLAMA_MODELS/blobs/sha256-<hex> and the manifest
as OLLAMA_MODELS/manifests/<host>/<namespace>/<model>/<tag>. An http:// name needs "insecure": true (else
"insecure protocol http"); "insecure" also turns https into http, as makeRequest does."""
import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request

import gguf_read

DEFAULT_HOST, DEFAULT_NS, DEFAULT_TAG = "registry.ollama.ai", "library", "latest"


class PullError(Exception):
    pass


def parse_name(s):
    """types/model ParseName: (scheme, host, namespace, model, tag), defaults merged."""
    scheme, tag = "", ""
    if s.rfind(":") > s.rfind("/"):
        s, tag = s.rsplit(":", 1)
    parts = s.split("/")
    model = parts.pop()
    ns = parts.pop() if parts else ""
    host = "/".join(parts)
    if "://" in host:
        scheme, host = host.split("://", 1)
    return (scheme or "https", host or DEFAULT_HOST, ns or DEFAULT_NS, model, tag or DEFAULT_TAG)


def valid(name):
    scheme, host, ns, model, tag = parse_name(name)
    return all(p and "/" not in p and ".." not in p for p in (ns, model, tag)) and host and "/" not in host


def display(name):
    """DisplayShortest: library models as model:tag, others as host/namespace/model:tag."""
    _, host, ns, model, tag = parse_name(name)
    if host == DEFAULT_HOST and ns == DEFAULT_NS:
        return "%s:%s" % (model, tag)
    return "%s/%s/%s:%s" % (host, ns, model, tag)


def manifest_path(models, name):
    _, host, ns, model, tag = parse_name(name)
    return os.path.join(models, "manifests", host, ns, model, tag)


def blob_path(models, digest):
    return os.path.join(models, "blobs", digest.replace(":", "-"))


def _get(url, timeout=30):
    req = urllib.request.Request(url, headers={"User-Agent": "ollama/0.32.15 (stand-in)",
                                               "Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise PullError("pull model manifest: file does not exist")
        raise PullError("pull model manifest: %d %s" % (e.code, e.reason))
    except (urllib.error.URLError, OSError) as e:
        raise PullError("pull model manifest: Get \"%s\": %s" % (url, getattr(e, "reason", e)))


def pull(models, name, insecure, emit):
    """Pull `name` into the store, emitting progress dicts as /api/pull streams them."""
    scheme, host, ns, model, tag = parse_name(name)
    if scheme == "http" and not insecure:
        raise PullError("insecure protocol http")
    if insecure:
        scheme = "http"
    base = "%s://%s/v2/%s/%s" % (scheme, host, ns, model)
    emit({"status": "pulling manifest"})
    with _get("%s/manifests/%s" % (base, tag)) as r:
        raw = r.read(1 << 20)
    try:
        mf = json.loads(raw)
        layers = list(mf["layers"]) + ([mf["config"]] if mf.get("config", {}).get("digest") else [])
    except (ValueError, KeyError, TypeError):
        raise PullError("pull model manifest: invalid manifest")
    os.makedirs(os.path.join(models, "blobs"), exist_ok=True)
    for layer in layers:
        digest, size = layer["digest"], int(layer["size"])
        if not digest.startswith("sha256:") or len(digest) != 71:
            raise PullError("invalid digest %r" % digest[:80])
        dst = blob_path(models, digest)
        status = "pulling %s" % digest[7:19]
        if os.path.exists(dst) and os.path.getsize(dst) == size:
            emit({"status": status, "digest": digest, "total": size, "completed": size})
            continue
        h, got = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(dst) + "-partial-", dir=os.path.dirname(dst))
        try:
            with os.fdopen(fd, "wb") as out, _get("%s/blobs/%s" % (base, digest), timeout=60) as r:
                emit({"status": status, "digest": digest, "total": size, "completed": 0})
                while True:
                    chunk = r.read(256 << 10)
                    if not chunk:
                        break
                    out.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    emit({"status": status, "digest": digest, "total": size, "completed": min(got, size)})
            emit({"status": "verifying sha256 digest"})
            if got != size or "sha256:" + h.hexdigest() != digest:
                raise PullError("digest mismatch, file must be downloaded again: want %s, got sha256:%s"
                                % (digest, h.hexdigest()))
            if layer.get("mediaType") == "application/vnd.ollama.image.model":
                try:
                    gguf_read.header(tmp)
                except ValueError as e:
                    raise PullError("%s: %s" % (digest, e))
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    emit({"status": "writing manifest"})
    mp = manifest_path(models, name)
    os.makedirs(os.path.dirname(mp), exist_ok=True)
    with open(mp, "wb") as f:
        f.write(raw)
    emit({"status": "success"})
