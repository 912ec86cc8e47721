# Stand-in for vLLM (which needs GPUs), used only to test gpucluster's orchestration; not an inference engine.
"""Behaves like the pinned vLLM version where orchestration can tell: accepted flags (vLLM's own argument
parser of that release, run from the release's wheel source by /opt/gcrig-realparser/realparse.py, never
gpucluster's tables), supported architectures (the release's model registry), Ray cluster use and placement
groups, config checks with vLLM's messages, vLLM-style logs, and an OpenAI-compatible HTTP API with
deterministic text."""
import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_HERE, "standin_build.json")) as _f:
    BUILD = json.load(_f)
VERSION = BUILD["version"]
REALPARSE = BUILD["realparse"]
GPUS_FILE = "/etc/gpucluster-rig/gpus.json"  # written into --gpus containers by the rig's runtime hook


def vkey(v):
    return tuple(int(x) if x.isdigit() else 0 for x in v.split("."))


V = vkey(VERSION)
PG_TIMEOUT = float(os.environ.get("VLLM_STANDIN_PG_TIMEOUT", "60"))  # real vLLM waits 1800 s


def log(level, fname, line, msg):
    ts = time.strftime("%m-%d %H:%M:%S")
    fmt = "%s %s [%s:%d] %s" if V >= (0, 7) else "%s %s %s:%d] %s"
    sys.stdout.write(fmt % (level, ts, fname, line, msg) + "\n")
    sys.stdout.flush()


def uvicorn(msg):
    sys.stderr.write("INFO:     %s\n" % msg)
    sys.stderr.flush()


# ------------------------------------------------------------------ argv
def real_parse(mode, argv):
    """vLLM's own parser of this release (see realparse.py): the parsed arguments, or exit as vLLM exits
    (status 2 and argparse's message for an unknown flag or a bad choice; 0 after --help)."""
    fd, out = tempfile.mkstemp(prefix="gcrig-realparse-", suffix=".json")
    os.close(fd)
    try:
        r = subprocess.run([sys.executable, REALPARSE, mode] + list(argv),
                           env=dict(os.environ, GCRIG_REALPARSE_OUT=out))
        if r.returncode != 0:
            sys.exit(r.returncode)
        with open(out) as f:
            text = f.read()
        if not text.strip():  # --help, --version: vLLM printed it and exits 0
            sys.exit(0)
        return json.loads(text)
    finally:
        os.unlink(out)


def opt(args, name, default=None):
    v = getattr(args, name, None)
    return default if v is None else v


# ------------------------------------------------------------------ helpers
def get_ip():
    """vLLM's get_ip(): 0.3.x knows only the UDP trick (no packet is sent by connect())."""
    if V >= (0, 4):
        for var in ("VLLM_HOST_IP", "HOST_IP"):
            if os.environ.get(var):
                return os.environ[var]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("8.8.8.8", 80))
        return s.getsockname()[0]
    except OSError:
        if V < (0, 4):
            raise
        log("WARNING", "utils.py", 418, "Failed to get the IP address, using 0.0.0.0 by default."
            "The value can be set by the environment variable VLLM_HOST_IP or HOST_IP.")
        return "0.0.0.0"
    finally:
        s.close()


def local_gpus():
    try:
        with open(GPUS_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_model_config(model):
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file, couldn't find it in "
                      "the cached files and it looks like %s is not the path to a directory containing a file "
                      "named config.json.\nCheckout your internet connection or see how to run the library in "
                      "offline mode at 'https://huggingface.co/docs/transformers/installation#offline-mode'." % model)
    with open(path) as f:
        return json.load(f)


def weights_bytes(model):
    total = 0
    for n in os.listdir(model):
        if n.endswith(".safetensors") or n.endswith(".bin"):
            total += os.path.getsize(os.path.join(model, n))
    return total


def check_weights(model):
    """What loading does first on every worker: every shard of the index exists and has a readable header."""
    idx = os.path.join(model, "model.safetensors.index.json")
    shards = []
    if os.path.exists(idx):
        with open(idx) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = [n for n in os.listdir(model) if n.endswith(".safetensors")]
    if not shards:
        raise RuntimeError("Cannot find any model weights with `%s`" % model)
    for s in shards:
        p = os.path.join(model, s)
        if not os.path.exists(p):
            raise FileNotFoundError("[Errno 2] No such file or directory: '%s'" % p)
        with open(p, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            try:
                json.loads(f.read(n))
            except ValueError:
                raise RuntimeError("safetensors_rust.SafetensorError: Error while deserializing header: "
                                   "HeaderTooLarge")


def worker_check(model, cfg, tp, pp, dtype, util, max_len, block_size, rank):
    """Per-GPU-worker checks: GPU present, dtype vs capability, weights readable, vocab split, KV memory."""
    g = local_gpus()
    if not g or int(g.get("count", 0)) < 1:
        raise RuntimeError("No CUDA GPUs are available")
    cc = str(g.get("compute_capability", "7.0"))
    ccv = tuple(int(x) for x in cc.split("."))
    if dtype == "bfloat16" and ccv < (8, 0):
        raise ValueError("Bfloat16 is only supported on GPUs with compute capability of at least 8.0. Your %s "
                         "GPU has compute capability %s. You can use float16 instead by explicitly setting "
                         "the`dtype` flag in CLI, for example: --dtype=half." % (g.get("name"), cc))
    if not os.path.isdir(model):
        raise OSError("%s is not a local folder and is not a valid model identifier" % model)
    check_weights(model)
    vocab = int(cfg.get("vocab_size", 0))
    padded = (vocab + 63) // 64 * 64
    if padded % tp:
        raise AssertionError("%d is not divisible by %d" % (padded, tp))
    heads = int(cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    kv = int(cfg.get("num_key_value_heads", heads))
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    if kv < tp and tp % kv:
        raise AssertionError("%d is not divisible by %d" % (tp, kv))
    dbytes = 4 if dtype in ("float", "float32") else 2
    stage_layers = layers // pp + (layers % pp if rank >= tp * (pp - 1) else 0)
    block = 2 * stage_layers * max(1, kv // tp) * head_dim * dbytes * block_size
    total = int(g.get("memory_mib", 16160)) << 20
    others = int(g.get("memory_used_mib", 0)) << 20
    peak = weights_bytes(model) // (tp * pp) + (512 << 20) + max(max_len, 2048) * int(cfg["hidden_size"]) * 24
    blocks = int((total * util - others - peak) // block)
    return {"ip": None, "blocks": max(blocks, 0), "gpu": g.get("name"), "block_bytes": block}


# ------------------------------------------------------------------ Ray
def start_ray_workers(world, model, cfg, tp, pp, dtype, util, max_len, block_size, driver_ip):
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(address="auto", ignore_reinit_error=True, log_to_driver=True)
    gpus = ray.cluster_resources().get("GPU", 0)
    if world > gpus:
        where = "placement group" if V >= (0, 4) else "cluster"
        raise ValueError("The number of required GPUs exceeds the total number of available GPUs in the %s."
                         % where)
    specs = [{"GPU": 1.0} for _ in range(world)]
    if V >= (0, 6):
        me = ray.get_runtime_context().get_node_id()
        avail = {}
        for n in ray.nodes():
            if n.get("Alive") and n["NodeID"] == me:
                avail = n.get("Resources", {})
        if avail.get("GPU", 0) < 1:
            raise ValueError("Current node has no GPU available. current_node_resource=%r. vLLM engine cannot "
                             "start without GPU. Make sure you have at least 1 GPU available in a node "
                             "current_node_id=%r current_ip=%r." % (avail, me, driver_ip))
        specs[0]["node:" + driver_ip] = 0.001
        node_ips = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
        if driver_ip not in node_ips:
            sys.stderr.write("(autoscaler +%ds) Error: No available node types can fulfill resource request %r. "
                             "Add suitable node types to this cluster to resolve this issue.\n"
                             % (5, specs[0]))
            sys.stderr.flush()
    pg = placement_group(specs, strategy="PACK")
    start = time.monotonic()
    while True:
        ready, _ = ray.wait([pg.ready()], timeout=min(10, PG_TIMEOUT))
        if ready:
            break
        waited = time.monotonic() - start
        if waited >= PG_TIMEOUT:
            ray.util.remove_placement_group(pg)
            if V < (0, 4):
                raise ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready.")
            raise ValueError("Cannot provide a placement group of placement_group_specs=%r within %d seconds. "
                             "See `ray status` to make sure the cluster has enough resources." % (specs, PG_TIMEOUT))
        log("INFO", "ray_utils.py", 165, "Waiting for creating a placement group of specs for %d seconds. specs=%r. "
            "Check `ray status` to see if you have enough resources." % (waited, specs))

    @ray.remote(num_gpus=1, num_cpus=0)
    class RayWorkerWrapper:
        def ping(self):
            return True

        def check(self, *a):
            r = worker_check(*a)
            r["ip"] = ray.util.get_node_ip_address()
            return r

    workers = [RayWorkerWrapper.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=i)).remote() for i in range(world)]
    results = ray.get([w.check.remote(model, cfg, tp, pp, dtype, util, max_len, block_size, i)
                       for i, w in enumerate(workers)])
    if not any(r["ip"] == driver_ip for r in results):
        raise ValueError("Ray does not allocate any GPUs on the driver node. Consider adjusting the Ray "
                         "placement group or running the driver on a GPU node.")
    node_ids = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    ips = {r["ip"] for r in results}
    n_nodes = len({r["ip"] for r in results})
    if V >= (0, 6) and len(ips) < n_nodes:
        raise RuntimeError("Every node should have a unique IP address. Got %d nodes with node ids %r and %d "
                           "unique IP addresses %r. Please check your network configuration. If you set "
                           "`VLLM_HOST_IP` environment variable, make sure it is unique for each node."
                           % (n_nodes, node_ids, len(ips), sorted(ips)))
    return (pg, workers), results


# ------------------------------------------------------------------ engine start-up
def main(mode="api_server", argv=None):
    """mode api_server: python3 -m vllm.entrypoints.openai.api_server ARGV; cli: the `vllm` command."""
    argv = sys.argv[1:] if argv is None else argv
    parsed = real_parse(mode, argv)
    if mode == "cli" and "serve" not in (parsed.get("dispatch") or "").lower():
        sys.stderr.write("vLLM stand-in (gpucluster test rig): only `vllm serve` is implemented, not %s\n"
                         % parsed.get("dispatch"))
        return 2
    args = argparse.Namespace(**parsed["args"])
    archs = parsed.get("architectures")
    if archs is None:
        raise RuntimeError("stand-in: the release's model registry did not load: %s" % parsed.get("architectures_error"))
    if V >= (0, 6):
        log("INFO", "api_server.py", 528, "vLLM API server version %s" % VERSION)
    log("INFO", "api_server.py", 529, "args: %s" % args)

    model = opt(args, "model_tag") or opt(args, "model", "facebook/opt-125m")
    tp = int(opt(args, "tensor_parallel_size", 1))
    pp = int(opt(args, "pipeline_parallel_size", 1))
    dtype = opt(args, "dtype", "auto")
    util = float(opt(args, "gpu_memory_utilization", 0.9))
    block_size = int(opt(args, "block_size", 16))
    swap = float(opt(args, "swap_space", 4))
    served = opt(args, "served_model_name") or model
    served = [served] if isinstance(served, str) else list(served)
    key = opt(args, "api_key") or os.environ.get("VLLM_API_KEY")
    key = key[0] if isinstance(key, list) else key
    backend = opt(args, "distributed_executor_backend")
    world = tp * pp

    cfg = load_model_config(model)
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in archs:
        if V < (0, 4) and cfg.get("model_type") not in ("qwen2", "llama", "mistral", "mixtral", "qwen", "gpt2"):
            raise ValueError("The checkpoint you are trying to load has model type `%s` but Transformers does not "
                             "recognize this architecture. This could be because of an issue with the checkpoint, "
                             "or because your version of Transformers is out of date." % cfg.get("model_type"))
        raise ValueError("Model architectures %r are not supported for now. Supported architectures: %r"
                         % (cfg.get("architectures"), archs))
    if dtype == "auto":
        dtype = {"bfloat16": "bfloat16", "float32": "float16"}.get(cfg.get("torch_dtype"), "float16")
    dtype = {"half": "float16", "float": "float32"}.get(dtype, dtype)
    derived = int(cfg.get("max_position_embeddings", 2048))
    max_len = opt(args, "max_model_len")
    if max_len is not None and int(max_len) > derived:
        raise ValueError("User-specified max_model_len (%d) is greater than the derived max_model_len "
                         "(max_position_embeddings=%d or model_max_length=None in model's config.json). This "
                         "may lead to incorrect model outputs or CUDA errors. Make sure the value is correct "
                         "and within the model context size." % (int(max_len), derived))
    max_len = int(max_len or derived)
    heads = int(cfg["num_attention_heads"])
    if heads % tp:
        raise ValueError("Total number of attention heads (%d) must be divisible by tensor parallel size (%d)."
                         % (heads, tp))
    if pp > 1 and V < (0, 5):
        raise NotImplementedError("Pipeline parallelism is not supported yet.")
    use_ray = bool(opt(args, "worker_use_ray")) or backend == "ray" or (world > 1 and backend != "mp")
    log("INFO", "llm_engine.py", 79, "Initializing an LLM engine%s with config: model=%r, tokenizer=%r, "
        "tokenizer_mode=auto, revision=None, trust_remote_code=%s, dtype=torch.%s, max_seq_len=%d, "
        "download_dir=None, load_format=auto, tensor_parallel_size=%d, pipeline_parallel_size=%d, "
        "disable_custom_all_reduce=%s, quantization=%s, enforce_eager=%s, kv_cache_dtype=%s, seed=0, "
        "served_model_name=%s)" % (" (v%s)" % VERSION if V >= (0, 6) else "", model, model,
                                   bool(opt(args, "trust_remote_code")), dtype, max_len, tp, pp,
                                   bool(opt(args, "disable_custom_all_reduce")), opt(args, "quantization"),
                                   bool(opt(args, "enforce_eager")), opt(args, "kv_cache_dtype", "auto"),
                                   served[0]))
    check_args = (model, cfg, tp, pp, dtype, util, max_len, block_size)
    keep = None
    if use_ray:
        keep, results = start_ray_workers(world, *check_args, driver_ip=get_ip())
    else:
        if world > 1:
            g = local_gpus() or {}
            if int(g.get("count", 0)) < world:
                raise RuntimeError("CUDA error: invalid device ordinal")
        results = [worker_check(*check_args, rank=i) for i in range(world)]
    blocks = min(r["blocks"] for r in results)
    if blocks <= 0:
        raise ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
                         "when initializing the engine.")
    if blocks * block_size < max_len:
        raise ValueError("The model's max seq len (%d) is larger than the maximum number of tokens that can be "
                         "stored in KV cache (%d). Try increasing `gpu_memory_utilization` or decreasing "
                         "`max_model_len` when initializing the engine." % (max_len, blocks * block_size))
    cpu_blocks = int(swap * (1 << 30) // results[0]["block_bytes"])
    if V >= (0, 20):
        log("INFO", "kv_cache_utils.py", 1087, "GPU KV cache size: %d tokens" % (blocks * block_size))
    else:
        log("INFO", "llm_engine.py", 337, "# GPU blocks: %d, # CPU blocks: %d" % (blocks, cpu_blocks))
    serve(args, served, key, max_len, model, keep)


# ------------------------------------------------------------------ HTTP API
WORDS = ("the a cluster of gpu nodes serves tiny model tokens over ray with tensor parallel workers "
         "and every host answers in turn while vllm keeps its cache warm").split()


def gen_words(prompt, n):
    h = hashlib.sha256(prompt.encode()).digest()
    out = []
    for i in range(n):
        if i and i % 32 == 0:
            h = hashlib.sha256(h).digest()
        out.append(WORDS[h[i % 32] % len(WORDS)])
    return out


def dead_workers(keep):
    """As vLLM's Ray executor checks its workers (check_health -> _check_if_any_actor_is_dead): a worker whose node
    left the Ray cluster is dead, and the engine with it: /health and every request fail until it is restarted."""
    if not keep:
        return ""
    import ray
    dead = []
    for i, w in enumerate(keep[1]):
        try:
            ray.get(w.ping.remote(), timeout=10)
        except Exception as e:  # RayActorError, GetTimeoutError: the actor (or its node) is gone
            dead.append("worker %d (%s)" % (i, type(e).__name__))
    return "At least one Worker is dead. Dead Workers: %s. " % ", ".join(dead) if dead else ""


def serve(args, served, key, max_len, model, keep):
    host = opt(args, "host") or "0.0.0.0"
    port = int(opt(args, "port", 8000))
    created = int(time.time())

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "uvicorn"
        sys_version = ""

        def log_message(self, fmt, *a):
            pass

        def _send(self, code, obj, extra=None):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            uvicorn('%s:%d - "%s %s HTTP/1.1" %d' % (self.client_address[0], self.client_address[1],
                                                     self.command, self.path, code))

        def _auth(self):
            if key and self.path.startswith("/v1") and self.headers.get("Authorization") != "Bearer " + key:
                self._send(401, {"error": "Unauthorized"})
                return False
            return True

        def do_GET(self):
            path = self.path.split("?")[0]
            # V0 engines ask their Ray workers on /health; V1's /health kept answering 200 (vLLM #16259, #17714)
            dead = dead_workers(keep) if path == "/health" and V < (0, 8) else ""
            if dead:
                log("ERROR", "api_server.py", 0, "RuntimeError: " + dead)
                return self._send(500, {"object": "error", "message": dead, "type": "InternalServerError"})
            if path == "/health":
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            if not self._auth():
                return
            if path == "/v1/models":
                return self._send(200, {"object": "list", "data": [
                    {"id": n, "object": "model", "created": created, "owned_by": "vllm", "root": model,
                     "parent": None, "max_model_len": max_len,
                     "permission": [{"id": "modelperm-" + uuid.uuid4().hex, "object": "model_permission",
                                     "created": created, "allow_create_engine": False, "allow_sampling": True,
                                     "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                                     "allow_fine_tuning": False, "organization": "*", "group": None,
                                     "is_blocking": False}]} for n in served]})
            if path == "/version":
                return self._send(200, {"version": VERSION})
            self._send(404, {"detail": "Not Found"})

        def do_POST(self):
            path = self.path.split("?")[0]
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            if not self._auth():
                return
            if path not in ("/v1/completions", "/v1/chat/completions"):
                return self._send(404, {"detail": "Not Found"})
            try:
                req = json.loads(raw or b"{}")
            except ValueError:
                return self._send(400, {"object": "error", "message": "invalid JSON", "type": "BadRequestError",
                                        "param": None, "code": 400})
            dead = dead_workers(keep)
            if dead:
                log("ERROR", "async_llm_engine.py", 0, "ray.exceptions.RayActorError: " + dead)
                return self._send(500, {"object": "error", "message": dead, "type": "InternalServerError",
                                        "param": None, "code": 500})
            if req.get("model") not in served:
                return self._send(404, {"object": "error", "message": "The model `%s` does not exist."
                                        % req.get("model"), "type": "NotFoundError", "param": None, "code": 404})
            chat = path.endswith("chat/completions")
            if chat:
                prompt = "\n".join("%s: %s" % (m.get("role"), m.get("content")) for m in req.get("messages", []))
            else:
                prompt = req.get("prompt", "")
                prompt = prompt[0] if isinstance(prompt, list) and prompt else prompt
                prompt = prompt if isinstance(prompt, str) else json.dumps(prompt)
            ntok = int(req.get("max_tokens") or 16)
            words = gen_words(prompt, ntok)
            ptoks = len(prompt.split()) or 1
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            obj = "chat.completion" if chat else "text_completion"
            now = int(time.time())
            usage = {"prompt_tokens": ptoks, "total_tokens": ptoks + ntok, "completion_tokens": ntok}
            if not req.get("stream"):
                text = " ".join(words)
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                           "finish_reason": "length"} if chat else
                          {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"})
                return self._send(200, {"id": rid, "object": obj, "created": now, "model": req["model"],
                                        "choices": [choice], "usage": usage})
            self.send_response(200)
            self.send_header("content-type", "text/event-stream; charset=utf-8")
            self.send_header("connection", "close")
            self.end_headers()
            self.close_connection = True
            cobj = "chat.completion.chunk" if chat else "text_completion"

            def chunk(delta_text, finish, first=False):
                if chat:
                    delta = {"role": "assistant"} if first else ({"content": delta_text} if delta_text else {})
                    c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                else:
                    c = {"index": 0, "text": delta_text, "logprobs": None, "finish_reason": finish}
                d = {"id": rid, "object": cobj, "created": now, "model": req["model"], "choices": [c]}
                self.wfile.write(b"data: " + json.dumps(d).encode() + b"\n\n")
                self.wfile.flush()

            if chat:
                chunk("", None, first=True)
            for i, w in enumerate(words):
                chunk((" " if i else "") + w, "length" if i == len(words) - 1 else None)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            uvicorn('%s:%d - "POST %s HTTP/1.1" 200' % (self.client_address[0], self.client_address[1], path))

    httpd = ThreadingHTTPServer((host, port), H)
    httpd.daemon_threads = True
    uvicorn("Started server process [%d]" % os.getpid())
    uvicorn("Waiting for application startup.")
    uvicorn("Application startup complete.")
    uvicorn("Uvicorn running on http://%s:%d (Press CTRL+C to quit)" % (host, port))
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        uvicorn("Shutting down")
        del keep
