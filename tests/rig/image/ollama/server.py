# stand-in for `ollama serve` (gpucluster test rig): Ollama's HTTP API as far as gpucluster uses it; replies are canned.
"""Env read as Ollama 0.32.15 reads it (envconfig.py); models pulled over the registry protocol (pull.py) into
OLLAMA_MODELS; GPUs from /etc/gpucluster-rig/gpus.json (written by the rig's GPU hook into --gpus containers),
filtered by the driver floor; /api/ps reports size and size_vram so that a model larger than the GPUs shows CPU
offload. Completions are deterministic text derived from the prompt (nothing runs the weights)."""
import datetime
import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import envconfig
import gguf_read
import pull

VERSION = "0.32.15"
GIB, MIB = 1 << 30, 1 << 20
CUDA_MINIMUM = 457 * MIB
GPUS_FILE = os.environ.get("GCRIG_OLLAMA_GPUS", "/etc/gpucluster-rig/gpus.json")   # stand-in only


def log(msg):
    sys.stderr.write("time=%s level=INFO source=standin msg=%s\n" % (
        datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"), msg))
    sys.stderr.flush()


def gpus(cfg):
    """[(name, total bytes, free bytes)] Ollama would use: none without the file, none under the driver floor."""
    try:
        with open(GPUS_FILE) as f:
            g = json.load(f)
    except (OSError, ValueError):
        log('"no compatible GPUs were discovered"')
        return []
    floor = envconfig.DEFS["cuda_driver"]
    major = int(str(g.get("driver", "0")).split(".")[0] or 0)
    cc = str(g.get("compute_capability", "0.0"))
    need = floor["min_major_below_cc7"] if int(cc.split(".")[0]) < 7 else floor["min_major"]
    if major < need:
        log('"NVIDIA driver too old" driver=%s required=%d (the GPUs are not used; the model runs on the CPU)'
            % (g.get("driver"), need))
        return []
    total = int(g["memory_mib"]) * MIB
    free = total - int(g.get("memory_used_mib", 0)) * MIB
    return [(g.get("name", "GPU"), total, free)] * int(g.get("count", 0))


class State:
    def __init__(self, env):
        self.cfg, warns = envconfig.load(env)
        for w in warns:
            sys.stderr.write(w + "\n")
        self.models = self.cfg["OLLAMA_MODELS"].replace("$HOME", os.path.expanduser("~"))
        self.gpus = gpus(self.cfg)
        total = sum(t - self.cfg["OLLAMA_GPU_OVERHEAD"] for _, t, _ in self.gpus)
        tiers = envconfig.DEFS["context_tiers"]
        self.default_ctx = next((c for g, c in zip(tiers["gib"], tiers["ctx"]) if total >= g * GIB), tiers["ctx"][-1])
        log('"vram-based default context" total_vram=%d default_num_ctx=%d' % (total, self.default_ctx))
        self.loaded = {}
        self.lock = threading.Lock()

    # ------------------------------------------------------------ the store
    def manifests(self):
        root = os.path.join(self.models, "manifests")
        out = []
        for dp, _, fns in os.walk(root):
            for fn in fns:
                rel = os.path.relpath(os.path.join(dp, fn), root).split(os.sep)
                if len(rel) == 4:
                    out.append("%s/%s/%s:%s" % tuple(rel))
        return sorted(out)

    def find(self, name):
        """The stored name (case-insensitive, :latest added) or None."""
        if not name or not pull.valid(name):
            return None
        want = pull.parse_name(name)[1:]
        for n in self.manifests():
            if tuple(x.lower() for x in pull.parse_name(n)[1:]) == tuple(x.lower() for x in want):
                return n
        return None

    def read(self, stored):
        path = pull.manifest_path(self.models, stored)
        raw = open(path, "rb").read()
        mf = json.loads(raw)
        layer = next(l for l in mf["layers"] if l["mediaType"] == "application/vnd.ollama.image.model")
        kv = gguf_read.header(pull.blob_path(self.models, layer["digest"]))
        size = sum(int(l["size"]) for l in mf["layers"])
        return {"digest": hashlib.sha256(raw).hexdigest(), "size": size, "weights": int(layer["size"]), "kv": kv,
                "mtime": os.path.getmtime(path)}

    def details(self, info):
        arch = info["kv"]["general.architecture"]
        return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
                "parameter_size": "%.2fM" % (info["weights"] / 4 / 1e6), "quantization_level": "Q4_K_M"
                if info["kv"].get("general.file_type") == 15 else "F32"}

    # ------------------------------------------------------------ loading
    def load(self, stored):
        info = self.read(stored)
        kv, arch = info["kv"], info["kv"]["general.architecture"]
        trained = int(kv.get(arch + ".context_length", 2048))
        ctx = self.cfg["OLLAMA_CONTEXT_LENGTH"] or self.default_ctx
        if ctx > trained:
            log('"requested context size too large for model" num_ctx=%d n_ctx_train=%d' % (ctx, trained))
            ctx = trained
        layers = int(kv.get(arch + ".block_count", 1))
        heads = int(kv.get(arch + ".attention.head_count", 1))
        kvh = int(kv.get(arch + ".attention.head_count_kv", heads))
        hd = int(kv.get(arch + ".attention.key_length", int(kv.get(arch + ".embedding_length", 64)) // heads))
        par = self.cfg["OLLAMA_NUM_PARALLEL"] or 1
        kvbytes = ctx * par * layers * kvh * hd * 2 * 2
        size = info["weights"] + kvbytes
        per_layer = size / layers
        usable = [max(0, free - CUDA_MINIMUM - self.cfg["OLLAMA_GPU_OVERHEAD"]) for _, _, free in self.gpus]
        if usable and not self.cfg["OLLAMA_SCHED_SPREAD"] and max(usable) >= size + per_layer:
            usable = [max(usable)]                     # fits on one GPU: Ollama uses one unless told to spread
        fit = min(layers, int(sum(max(0, u - per_layer) for u in usable) // per_layer)) if usable else 0
        vram = size if fit >= layers else int(fit * per_layer)
        ka = self.cfg["OLLAMA_KEEP_ALIVE"]
        expires = "2318-08-05T12:00:00Z" if ka == float("inf") else datetime.datetime.fromtimestamp(
            time.time() + ka, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        log('"loaded model" model=%s layers.offload=%d layers.model=%d size=%d size_vram=%d num_ctx=%d gpus=%d'
            % (stored, fit if usable else 0, layers, size, vram, ctx, len(usable)))
        with self.lock:
            self.loaded[stored] = {"name": pull.display(stored), "model": pull.display(stored), "size": size,
                                   "digest": info["digest"], "details": self.details(info), "expires_at": expires,
                                   "size_vram": vram, "context_length": ctx}


def reply(model, messages, limit):
    """Deterministic text: a few words chosen by the hash of the model and the last message."""
    last = messages[-1].get("content", "") if messages else ""
    words = ["stand-in", "reply", "from", model.split("/")[-1]]
    h = hashlib.sha256(("%s\0%s" % (model, last)).encode()).hexdigest()
    words += [h[i:i + 4] for i in range(0, 32, 4)]
    n = max(1, min(limit or 16, len(words)))
    return " ".join(words[:n]), n


def handler(state):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            sys.stderr.write("[GIN] %s | %s\n" % (self.command, self.path))

        def send(self, code, obj):
            body = (json.dumps(obj) + "\n").encode() if not isinstance(obj, bytes) else obj
            self.send_response(code)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def body(self):
            n = int(self.headers.get("Content-Length") or 0)
            try:
                obj = json.loads(self.rfile.read(n) or b"{}")
                return obj if isinstance(obj, dict) else {}
            except ValueError:
                return None

        def do_HEAD(self):
            self.send(200, b"")

        def do_GET(self):
            p = self.path.split("?")[0].rstrip("/")
            if p == "":
                return self.send(200, b"Ollama is running")
            if p == "/api/version":
                return self.send(200, {"version": VERSION})
            if p == "/api/tags":
                out = []
                for n in state.manifests():
                    try:
                        i = state.read(n)
                    except (OSError, ValueError, StopIteration, KeyError):
                        continue
                    out.append({"name": pull.display(n), "model": pull.display(n), "size": i["size"],
                                "digest": i["digest"], "details": state.details(i), "modified_at":
                                datetime.datetime.fromtimestamp(i["mtime"], datetime.timezone.utc).isoformat()})
                return self.send(200, {"models": out})
            if p == "/api/ps":
                with state.lock:
                    return self.send(200, {"models": list(state.loaded.values())})
            if p == "/v1/models":
                return self.send(200, {"object": "list", "data": [
                    {"id": pull.display(n), "object": "model", "created": int(state.read(n)["mtime"]),
                     "owned_by": pull.parse_name(n)[2]} for n in state.manifests()]})
            self.send(404, b"404 page not found")

        def do_POST(self):
            p, req = self.path.split("?")[0].rstrip("/"), self.body()
            if req is None:
                return self.send(400, {"error": "invalid request body"})
            name = req.get("model") or req.get("name") or ""
            if p == "/api/pull":
                return self.pull(name, req)
            if p == "/api/copy":
                src, dst = state.find(req.get("source", "")), req.get("destination", "")
                if src is None:
                    return self.send(404, {"error": "model \"%s\" not found" % req.get("source")})
                if not pull.valid(dst):
                    return self.send(400, {"error": "invalid destination name"})
                mp = pull.manifest_path(state.models, dst)
                os.makedirs(os.path.dirname(mp), exist_ok=True)
                with open(pull.manifest_path(state.models, src), "rb") as f, open(mp, "wb") as g:
                    g.write(f.read())
                return self.send(200, b"")
            if p == "/api/show":
                stored = state.find(name)
                if stored is None:
                    return self.send(404, {"error": "model '%s' not found" % name})
                i = state.read(stored)
                return self.send(200, {"details": state.details(i), "model_info": {
                    k: v for k, v in i["kv"].items() if not k.startswith("__") and not k.startswith("tokenizer.")},
                    "capabilities": ["completion"], "modified_at": i["mtime"]})
            if p in ("/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions"):
                return self.complete(p, name, req)
            self.send(404, b"404 page not found")

        def pull(self, name, req):
            if not pull.valid(name):
                return self.send(400, {"error": "invalid model name"})
            stream = req.get("stream", True) is not False
            if stream:
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
            last = [None]

            def emit(ev):
                if not stream:
                    last[0] = ev
                    return
                data = (json.dumps(ev) + "\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            try:
                pull.pull(state.models, name, bool(req.get("insecure")), emit)
            except (pull.PullError, OSError) as e:
                log('"pull failed" model=%s error="%s"' % (name, e))
                if not stream:
                    return self.send(500, {"error": str(e)})
                emit({"error": str(e)})
            if stream:
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.send(200, last[0])

        def complete(self, p, name, req):
            stored = state.find(name)
            if stored is None:
                msg = "model \"%s\" not found, try pulling it first" % name
                return self.send(404, {"error": {"message": msg, "type": "api_error"}} if p.startswith("/v1")
                                 else {"error": msg})
            try:
                state.load(stored)
            except (OSError, ValueError, KeyError, StopIteration) as e:
                return self.send(500, {"error": "llama runner process has terminated: %s" % e})
            msgs = req.get("messages") or [{"role": "user", "content": req.get("prompt", "")}]
            limit = req.get("max_tokens") or req.get("max_completion_tokens") or (req.get("options") or {}).get(
                "num_predict")
            text, n = reply(pull.display(stored), msgs, limit if isinstance(limit, int) else None)
            now = int(time.time())
            if p.startswith("/v1"):
                usage = {"prompt_tokens": sum(len(str(m.get("content", "")).split()) for m in msgs),
                         "completion_tokens": n}
                usage["total_tokens"] = usage["prompt_tokens"] + n
                choice = {"index": 0, "finish_reason": "length" if limit and n >= limit else "stop"}
                if p.endswith("chat/completions"):
                    choice["message"] = {"role": "assistant", "content": text}
                    obj = "chat.completion"
                else:
                    choice["text"] = text
                    obj = "text_completion"
                return self.send(200, {"id": "chatcmpl-%d" % (now % 1000), "object": obj, "created": now,
                                       "model": name, "system_fingerprint": "fp_ollama", "choices": [choice],
                                       "usage": usage})
            out = {"model": name, "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "done": True, "done_reason": "stop", "eval_count": n}
            if p == "/api/chat":
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            self.send(200, out)
    return H


def serve():
    state = State(os.environ)
    scheme, host, port = state.cfg["OLLAMA_HOST"]
    log('"server config" env="%s"' % json.dumps({k: (v if v != float("inf") else "forever")
                                                  for k, v in state.cfg.items()}, default=str))
    os.makedirs(state.models, exist_ok=True)
    srv = ThreadingHTTPServer((host, port), handler(state))
    srv.daemon_threads = True
    log('"Listening on %s:%d (version %s, stand-in)"' % (host or "[::]", port, VERSION))
    srv.serve_forever()
