# Stand-in for SGLang (which needs GPUs), used only to test gpucluster's orchestration; not an inference engine.
"""`python3 -m sglang.launch_server ARGV` as the rig's hosts see SGLang 0.5.15:

- the command line goes through SGLang's own `prepare_server_args` + `check_server_args` (realparse_sglang.py:
  the release's source from its wheel, never gpucluster's tables): an unknown flag ends with SGLang's argparse
  error (status 2), a failed validation with its traceback (status 1);
- GPUs from the rig's runtime hook (/etc/gpucluster-rig/gpus.json): below sm75 it fails with SGLang's own
  "SGLang only supports sm75 and above."; --tp-size must be --nnodes x the GPUs each host has;
- the model's config.json and weights must be in --model-path;
- more than one node: rank 0 listens on --dist-init-addr's port, the other ranks connect and announce their rank
  (as torch.distributed's store does); rank 0 waits for all --nnodes ranks (timeout: exit 1), any rank exits
  when the connection to a peer drops (the process group is gone);
- rank 0 serves HTTP on --host/--port: /health (503 while "loading", then 200), /v1/models, /v1/completions,
  /v1/chat/completions (deterministic text), /get_model_info, /get_server_info; --api-key needs a Bearer token
  except on /health*, as SGLang's middleware does. Other ranks serve nothing.

Tunables (environment): SGLANG_STANDIN_LOAD_SECONDS (2), SGLANG_STANDIN_JOIN_TIMEOUT (300),
GCRIG_GPUS_FILE (/etc/gpucluster-rig/gpus.json)."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sglang

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = sglang.__version__
GPUS_FILE = os.environ.get("GCRIG_GPUS_FILE", "/etc/gpucluster-rig/gpus.json")
LOAD_SECONDS = float(os.environ.get("SGLANG_STANDIN_LOAD_SECONDS", "2"))
JOIN_TIMEOUT = float(os.environ.get("SGLANG_STANDIN_JOIN_TIMEOUT", "300"))
WORDS = ("the", "rig", "answers", "with", "deterministic", "words", "from", "a", "stand-in", "model", "of",
         "sglang", "across", "hosts", "tensor", "parallel", "ranks", "agree", "on", "this", "text")


def log(msg, rank=None):
    prefix = "[%s%s] " % (time.strftime("%Y-%m-%d %H:%M:%S"), "" if rank is None else " TP%d" % rank)
    sys.stdout.write(prefix + msg + "\n")
    sys.stdout.flush()


def fail(msg, code=1):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()
    os._exit(code)


# ------------------------------------------------------------------ argv: SGLang's own parser
def real_parse(argv):
    fd, out = tempfile.mkstemp(prefix="gcrig-sglang-args-", suffix=".json")
    os.close(fd)
    try:
        r = subprocess.run([sys.executable, os.path.join(HERE, "realparse_sglang.py")] + list(argv),
                           env=dict(os.environ, GCRIG_REALPARSE_OUT=out))
        if r.returncode != 0:
            sys.exit(r.returncode)
        with open(out) as f:
            text = f.read()
        if not text.strip():  # --help
            sys.exit(0)
        return json.loads(text)["args"]
    finally:
        os.unlink(out)


# ------------------------------------------------------------------ GPUs and model
def check_gpus(a):
    try:
        with open(GPUS_FILE) as f:
            g = json.load(f)
    except (OSError, ValueError):
        g = {"count": 0}
    count = int(g.get("count", 0))
    if count < 1:
        fail("RuntimeError: No CUDA GPUs are available")
    major, minor = (int(x) for x in str(g.get("compute_capability", "0.0")).split(".")[:2])
    if major < 8:  # ModelRunner.load_model, SGLang 0.5.15
        log("Compute capability below sm80. Use float16 due to lack of bfloat16 support.")
        if minor < 5:
            fail("RuntimeError: SGLang only supports sm75 and above.")
    tp, nnodes = int(a["tp_size"]), int(a["nnodes"])
    per_node = tp // nnodes
    if per_node > count:
        fail("RuntimeError: CUDA error: invalid device ordinal (tp_size %d over %d node(s) puts %d ranks on this "
             "node; it has %d GPU(s))" % (tp, nnodes, per_node, count))
    if per_node != count:
        fail("stand-in: tp_size %d must be nnodes %d x the %d GPU(s) this host has (gpucluster uses every GPU)"
             % (tp, nnodes, count))
    return g


def load_model(a):
    path = a["model_path"]
    with open(os.path.join(path, "config.json")) as f:  # SGLang's parser already refused a missing one
        cfg = json.load(f)
    names = os.listdir(path)
    if not any(n.endswith((".safetensors", ".bin", ".pt")) for n in names):
        fail("RuntimeError: Cannot find any model weights with `%s`" % path)
    return cfg


# ------------------------------------------------------------------ the process group over TCP
def dist_addr(a):
    addr = a.get("dist_init_addr")
    if not addr:
        fail("stand-in: --nnodes %s needs --dist-init-addr" % a["nnodes"])
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def watch(conn, what, rank):
    """Block until the peer's connection drops, then end this process (the process group is broken)."""
    def run():
        try:
            while conn.recv(1024):
                pass
        except OSError:
            pass
        log("%s disconnected: the distributed process group is gone, exiting" % what, rank)
        os._exit(1)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def form_group(a):
    """Rank 0: accept every other rank; others: join rank 0. Returns when all --nnodes ranks are in."""
    nnodes, rank = int(a["nnodes"]), int(a["node_rank"])
    host, port = dist_addr(a)
    hello = {"rank": rank, "nnodes": nnodes, "tp_size": int(a["tp_size"]), "model_path": a["model_path"]}
    deadline = time.monotonic() + JOIN_TIMEOUT
    if rank == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        srv = socket.create_server(("", port), family=family, reuse_port=False)
        log("rank 0 waiting for %d other node(s) at %s:%d" % (nnodes - 1, host, port), rank)
        peers = {}
        while len(peers) < nnodes - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                fail("torch.distributed.DistStoreError: Timed out after %d seconds waiting for clients. %d/%d "
                     "clients joined." % (JOIN_TIMEOUT, len(peers) + 1, nnodes))
            srv.settimeout(left)
            try:
                conn, peer = srv.accept()
            except socket.timeout:
                continue
            conn.settimeout(10)
            try:
                msg = json.loads(conn.makefile("r").readline() or "{}")
            except (OSError, ValueError):
                conn.close()
                continue
            r = msg.get("rank")
            err = None
            if msg.get("nnodes") != nnodes or msg.get("tp_size") != hello["tp_size"]:
                err = "node %s has nnodes %s tp_size %s, rank 0 has %d and %d" % (
                    r, msg.get("nnodes"), msg.get("tp_size"), nnodes, hello["tp_size"])
            elif not isinstance(r, int) or not 0 < r < nnodes or r in peers:
                err = "node_rank %r is out of range or already taken" % (r,)
            if err:
                conn.sendall((json.dumps({"error": err}) + "\n").encode())
                conn.close()
                fail("RuntimeError: %s" % err)
            conn.settimeout(None)
            peers[r] = conn
            log("node_rank %d joined from %s" % (r, peer[0]), rank)
        for r, conn in sorted(peers.items()):
            conn.sendall(b'{"ready": true}\n')
            watch(conn, "node_rank %d" % r, rank)
        srv.close()
        log("all %d nodes joined: init torch distributed ends (world size %s)" % (nnodes, a["tp_size"]), rank)
        return
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                fail("torch.distributed.DistNetworkError: The client socket has timed out after %ds while trying "
                     "to connect to (%s, %d)." % (JOIN_TIMEOUT, host, port))
            time.sleep(0.5)
    conn.sendall((json.dumps(hello) + "\n").encode())
    conn.settimeout(None)
    line = conn.makefile("r").readline()
    reply = json.loads(line) if line.strip() else {"error": "rank 0 closed the connection"}
    if not reply.get("ready"):
        fail("RuntimeError: rank 0 refused node_rank %d: %s" % (rank, reply.get("error")))
    log("node_rank %d joined rank 0 at %s:%d" % (rank, host, port), rank)
    watch(conn, "rank 0 (%s:%d)" % (host, port), rank).join()


# ------------------------------------------------------------------ HTTP (rank 0)
def generate(prompt, n):
    h = hashlib.sha256(prompt.encode()).digest()
    return " ".join(WORDS[(h[i % len(h)] + i) % len(WORDS)] for i in range(n))


def count_tokens(text):
    return max(1, len(text.split()))


class State:
    def __init__(self, a, cfg):
        self.a, self.cfg = a, cfg
        self.served = a.get("served_model_name") or a["model_path"]
        self.context_len = int(a.get("context_length") or cfg.get("max_position_embeddings") or 4096)
        self.ready_at = time.monotonic() + LOAD_SECONDS
        self.created = int(time.time())

    def loading(self):
        return time.monotonic() < self.ready_at


def handler(st):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            sys.stderr.write('INFO:     %s - "%s %s" %s\n' % (self.client_address[0], self.command, self.path,
                                                              args[1] if len(args) > 1 else ""))

        def send(self, code, body=None):
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(code)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def allowed(self):
            key = st.a.get("api_key")
            if not key or self.path.startswith(("/health", "/metrics")):
                return True
            parts = (self.headers.get("Authorization") or "").split(" ", 1)
            if len(parts) == 2 and parts[0].lower() == "bearer" and parts[1] == key:
                return True
            self.send(401, {"error": "Unauthorized"})
            return False

        def do_GET(self):
            path = self.path.split("?")[0]
            if not self.allowed():
                return
            if path in ("/health", "/health_generate"):
                return self.send(503 if st.loading() else 200)
            if st.loading():
                return self.send(503, {"error": "The server is starting"})
            if path == "/v1/models" or path == "/v1/models/" + st.served:
                card = {"id": st.served, "object": "model", "created": st.created, "owned_by": "sglang",
                        "root": st.served, "parent": None, "max_model_len": st.context_len}
                return self.send(200, card if path != "/v1/models" else {"object": "list", "data": [card]})
            if path in ("/get_model_info", "/model_info"):
                return self.send(200, {"model_path": st.a["model_path"], "tokenizer_path": st.a.get("tokenizer_path"),
                                       "is_generation": True, "preferred_sampling_params": None,
                                       "weight_version": "default", "has_image_understanding": False,
                                       "has_audio_understanding": False, "model_type": st.cfg.get("model_type"),
                                       "architectures": st.cfg.get("architectures")})
            if path == "/get_server_info":
                return self.send(200, dict(st.a, version=VERSION))
            self.send(404, {"detail": "Not Found"})

        def do_POST(self):
            path = self.path.split("?")[0]
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            if not self.allowed():
                return
            if path not in ("/v1/completions", "/v1/chat/completions"):
                return self.send(404, {"detail": "Not Found"})
            if st.loading():
                return self.send(503, {"error": "The server is starting"})
            try:
                req = json.loads(raw or b"{}")
                assert isinstance(req, dict)
            except (ValueError, AssertionError):
                return self.send(400, {"object": "error", "message": "Invalid JSON body", "type": "BadRequest",
                                       "param": None, "code": 400})
            chat = path.endswith("chat/completions")
            if chat:
                msgs = req.get("messages") or []
                prompt = "\n".join("%s: %s" % (m.get("role"), m.get("content")) for m in msgs if isinstance(m, dict))
            else:
                prompt = req.get("prompt", "")
                prompt = " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)
            want = req.get("max_completion_tokens") or req.get("max_tokens") or (64 if chat else 16)
            ptoks = count_tokens(prompt)
            if ptoks + int(want) > st.context_len:
                return self.send(400, {"object": "error", "type": "BadRequest", "param": None, "code": 400,
                                       "message": "Requested token count exceeds the model's maximum context length "
                                                  "of %d tokens. You requested a total of %d tokens: %d tokens from "
                                                  "the input messages and %d tokens for the completion. Please "
                                                  "reduce the number of tokens in the input messages or the "
                                                  "completion to fit within the limit."
                                                  % (st.context_len, ptoks + int(want), ptoks, int(want))})
            toks = min(int(want), 64)
            text = generate(prompt, toks)
            finish = "length"
            usage = {"prompt_tokens": ptoks, "completion_tokens": toks, "total_tokens": ptoks + toks,
                     "prompt_tokens_details": None, "reasoning_tokens": 0}
            model = req.get("model") or st.served
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text, "reasoning_content": None,
                                                  "tool_calls": None}, "logprobs": None, "finish_reason": finish,
                          "matched_stop": None}
                body = {"id": uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
                        "model": model, "choices": [choice], "usage": usage, "metadata": {"weight_version": "default"}}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "matched_stop": None}
                body = {"id": uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
                        "model": model, "choices": [choice], "usage": usage, "metadata": {"weight_version": "default"}}
            self.send(200, body)
    return H


def serve(a, cfg):
    st = State(a, cfg)
    host = a.get("host") or "127.0.0.1"
    ThreadingHTTPServer.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    httpd = ThreadingHTTPServer((host, int(a["port"])), handler(st))
    httpd.daemon_threads = True
    sys.stderr.write("INFO:     Uvicorn running on http://%s:%s (Press CTRL+C to quit)\n" % (host, a["port"]))
    sys.stderr.flush()

    def ready():
        time.sleep(LOAD_SECONDS)
        log("The server is fired up and ready to roll!")
    threading.Thread(target=ready, daemon=True).start()
    httpd.serve_forever()


def main(argv):
    signal.signal(signal.SIGTERM, lambda *x: os._exit(0))  # PID 1 in a container: `docker stop` ends it
    a = real_parse(argv)
    rank, nnodes = int(a["node_rank"]), int(a["nnodes"])
    log("server_args (SGLang %s's own parser, stand-in engine): model_path=%s served_model_name=%s tp_size=%s "
        "nnodes=%s node_rank=%s dist_init_addr=%s host=%s port=%s api_key=%s mem_fraction_static=%s"
        % (VERSION, a["model_path"], a.get("served_model_name"), a["tp_size"], nnodes, rank,
           a.get("dist_init_addr"), a.get("host"), a.get("port"), "set" if a.get("api_key") else "none",
           a.get("mem_fraction_static")))
    g = check_gpus(a)
    cfg = load_model(a)
    log("%d x %s (sm%s), model %s (%s)" % (int(g["count"]), g.get("name"), str(g.get("compute_capability"))
                                           .replace(".", ""), a["model_path"], (cfg.get("architectures") or ["?"])[0]),
        rank)
    if nnodes > 1:
        form_group(a)  # returns on rank 0 only; other ranks exit when rank 0 goes
    log("Load weight end. type=%s, dtype=%s" % ((cfg.get("architectures") or ["?"])[0], a.get("dtype")), rank)
    serve(a, cfg)
    return 0
