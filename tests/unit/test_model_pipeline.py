"""Model fan-out as a chain: the steps' shape, and the delivery agent passing a model down a chain of three hosts
over real loopback sockets (separate agent processes, the shipped files run as scripts) while the middle host is
still receiving it; byte-identical copies, a stalled upstream ending in one line, the relay's listing untrusted."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster import ops
from cluster.delivery import agent as d
from cluster.delivery import model_steps as ms
from cluster.delivery.manifest import INCOMING, MANIFEST, PARTIAL_DIR
from cluster.executor import Executor
from cluster.steps import Cmd, Copy, Put, decide

DELIVERY = Path(d.__file__).resolve().parent
SPEC = {"model": "org/model", "revision": "main", "include": [], "exclude": []}


# ---------------------------------------------------------------- the steps
def _plan(tmp_path: Path, hosts: int = 4, **kw):
    inv = {"cluster": {"name": "lab", "model_dir": "/Data/models"},
           "hosts": [{"name": f"h{i}", "address": f"10.0.0.{i + 1}", "interface": "eth0",
                      "gpus": {"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160,
                               "compute_capability": "7.0"}} for i in range(hosts)],
           "deploy": {"profile": "vllm-v0.6.3", "model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel": 2,
                      "pipeline_parallel": hosts, "engine_args": {"max-model-len": 4096}}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inv))
    return ops.make_plan(*ops.load(str(path)), **kw)


def _doc(step, name: str) -> dict:
    return json.loads(next(op.text for op in step.ops if isinstance(op, Put) and op.path.endswith(f"/{name}.json")))


def _model_steps(plan):
    return {s.id: s for s in plan.steps if s.phase.startswith("model-")}


def test_chain_step_shape(tmp_path):
    plan = _plan(tmp_path)
    steps = _model_steps(plan)
    phases = [s.phase for s in plan.steps if s.phase.startswith("model-")]
    assert phases == sorted(phases, key=["model-serve", "model-copy", "model-done"].index), "servers first"
    # every host that another pulls from serves (h0..h2); the last one only pulls
    assert [i for i, s in steps.items() if s.phase == "model-serve"] == [
        f"h{k}/{w}" for k in range(3) for w in ("model-serve-files", "model-serve")]
    assert [i for i, s in steps.items() if s.phase == "model-done"] == [f"h{k}/model-serve-stop" for k in range(3)]
    for k in range(1, 4):
        copy = steps[f"h{k}/model"]
        doc = _doc(copy, "sync")
        assert doc["endpoint"] == f"http://10.0.0.{k}:29650" and doc["peer_name"] == f"h{k - 1}", "pulls from k-1"
        assert doc.get("relay", False) is (k < 3), "tells its own server what arrives when someone pulls from it"
        assert doc["read_timeout"] > ms.STALL, "waits longer than its upstream waits for its own copy"
        assert "token_file" in doc and not any("SECRET" in a or "=" in a for op in copy.ops if isinstance(op, Cmd)
                                               for a in op.argv if a.startswith("GPUCLUSTER"))
        fallback = [op for op in copy.otherwise[0] if isinstance(op, Copy)]
        assert [(c.src_host, c.src) for c in fallback] == [("h0", "/Data/models/Qwen--Qwen2.5-7B-Instruct")]
        assert steps[f"h{k - 1}/model-serve"].needed_by == (f"h{k}/model",)
        assert steps[f"h{k - 1}/model-serve-files"].needed_by == (f"h{k}/model",)
        assert steps[f"h{k - 1}/model-serve-stop"].after == (f"h{k - 1}/model-serve",)
        shipped = {op.path.rsplit("/", 1)[-1] for op in copy.ops if isinstance(op, Put)}
        assert ("serve.py" in shipped) is (k < 3)
    head, relay = steps["h0/model-serve"], steps["h1/model-serve"]
    assert head.ops[-1].argv[-2:] == ("serve", "/job/serve.json") and set(head.variants) == {"replace"}
    assert relay.ops[-1].argv[-2:] == ("relay", "/job/serve.json")
    assert relay.ops[1].argv == ("rm", "-f", f"/Data/models/Qwen--Qwen2.5-7B-Instruct/{INCOMING}")
    assert set(relay.variants) == {"complete", "replace-complete", "replace-relay"}
    assert relay.variants["complete"][-1].argv[-2:] == ("serve", "/job/serve.json")
    serve_doc = _doc(steps["h1/model-serve-files"], "serve")
    assert serve_doc["stall"] == ms.STALL and serve_doc["name"] == "h1" and "token" not in json.dumps(
        serve_doc).replace("token_file", "")
    secret = next(op for op in steps["h1/model-serve-files"].ops if isinstance(op, Put) and op.secrets)
    assert secret.mode == 0o600 and secret.as_dict()["env"] == {"GPUCLUSTER_TRANSFER_TOKEN": "***"}


def test_verify_and_star_shapes(tmp_path):
    plan = _plan(tmp_path, hosts=3, verify=True)
    relay = _model_steps(plan)["h1/model-serve"]
    assert relay.check.argv[:3] == ("docker", "inspect", "--type") and set(relay.variants) == {"replace"}
    job = ms.ModelJob(inventory=plan.inventory, hosts=plan.deployment.setup.hosts, image="img",
                      transfer_token=plan.inventory.deploy.api_key or ms.Secret(literal="t"), fanout="star")
    star = {s.id: s for s in ms.fanout_steps(job)}
    assert [i for i in star if i.endswith("/model-serve")] == ["h0/model-serve"]
    assert star["h0/model-serve"].needed_by == ("h1/model", "h2/model")
    assert {_doc(star[f"h{k}/model"], "sync")["peer_name"] for k in (1, 2)} == {"h0"}


def test_plan_views_show_the_chain(tmp_path):
    from cluster import render
    plan = _plan(tmp_path, hosts=3)
    sh = render.runbook(plan)
    assert sh.count("# ==== phase model-serve on host") == 2 and "relay /job/serve.json" in sh
    assert "  complete*) " in sh and "  replace-relay*) " in sh
    table = render.table(plan)
    assert "h2/model: pull what h2 lacks from h1:29650" in table and "while h1 receives it" in table


class _Canned(Executor):
    """Checks answered from a table (what the hosts would print); steps without a check run."""

    def __init__(self, answers: dict):
        super().__init__(None)
        self.answers = answers

    def check(self, step):
        return super().check(step) if step.check is None else decide(step, 0, self.answers.get(step.id, ""))


def test_dry_run_a_complete_host_serves_whole_and_its_idle_upstream_is_not_started(tmp_path):
    steps = [s for s in _plan(tmp_path).steps if s.phase in ("model-serve", "model-copy", "model-done")]
    answers = {"h0/model-serve": "", "h1/model-serve": "relay its own copy runs",
               "h2/model-serve": "complete its copy is verified", "h1/model": "run not complete",
               "h2/model": "skip complete: verified files unchanged since", "h3/model": "run not complete"}
    got = {o.step.id: (o.status.replace("would-", ""), o.variant) for o in _Canned(answers).evaluate(steps).outcomes}
    assert got == {
        "h0/model-serve-files": ("run", None), "h0/model-serve": ("run", None),
        "h1/model-serve-files": ("skip", None), "h1/model-serve": ("skip", None),     # h2 needs nothing from h1
        "h2/model-serve-files": ("run", None), "h2/model-serve": ("run", "complete"),  # h3 pulls h2's copy whole
        "h1/model": ("run", None), "h2/model": ("skip", None), "h3/model": ("run", None),
        "h0/model-serve-stop": ("run", "restart"), "h1/model-serve-stop": ("skip", None),
        "h2/model-serve-stop": ("run", "restart")}


STUB_DOCKER = "#!/bin/sh\n# stand-in for docker inspect: a container exists when its name is in $DOCKER_HAS\n" \
              '[ "$1" = inspect ] && [ "$4" = "$DOCKER_HAS" ]\n'


@pytest.mark.parametrize("stamped, running, variant", [(True, False, "complete"), (True, True, "replace-complete"),
                                                       (False, False, None), (False, True, "replace-relay")])
def test_relay_server_check_follows_the_stamp(tmp_path, stamped, running, variant):
    plan = _plan(tmp_path / "p", hosts=3)
    relay = _model_steps(plan)["h1/model-serve"]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(STUB_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "DOCKER_HAS": relay.check.argv[3] if running else "none"}
    argv = [*relay.check.argv[:4], str(folder), relay.check.argv[5]]
    if stamped:
        write = ["sh", "-c", ms.STAMP_SCRIPT, "write", str(folder), relay.check.argv[5]]
        subprocess.run(write, check=True, env=env)
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
    got = decide(relay, r.returncode, r.stdout)
    assert got.action == "run" and got.variant == variant, r.stdout


# ---------------------------------------------------------------- agents in separate processes, over loopback
BOOT = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])          # the shipped files, run as scripts (as on a host)
import agent, serve
gate, at = os.environ.get("GATE_FILE"), int(os.environ.get("GATE_AT", "0"))
if gate:                                 # the test holds this server's uplink after `at` bytes until `gate` exists
    sent, plain = [0], serve._send_chunk
    def held(wfile, data):
        if sent[0] + len(data) > at and not os.path.exists(gate):
            first = data[:max(at - sent[0], 0)]
            plain(wfile, first)
            sent[0] += len(first)
            data = data[len(first):]
            while not os.path.exists(gate):
                time.sleep(0.02)
        plain(wfile, data)
        sent[0] += len(data)
    serve._send_chunk = held
sys.exit(agent.agent_main(sys.argv[2:]))
"""


class Proc:
    """One agent process; its JSON events collected as they come."""

    def __init__(self, shipped: Path, cmd: str, job: dict, jobfile: Path, env: dict | None = None):
        jobfile.write_text(json.dumps(job))
        self.events: list[dict] = []
        self.p = subprocess.Popen([sys.executable, "-c", BOOT, str(shipped), cmd, str(jobfile)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, **(env or {})})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.p.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def wait_for(self, pred, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((e for e in list(self.events) if pred(e)), None)
            if hit is not None:
                return hit
            if self.p.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no such event; got {self.events[-5:]}, stderr {self.stderr()}")

    def finish(self, timeout: float = 120.0) -> int:
        rc = self.p.wait(timeout)
        self.reader.join(5)
        return rc

    def stderr(self) -> str:
        return self.p.stderr.read() if self.p.poll() is not None else ""

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


@pytest.fixture
def chain(tmp_path):
    """A head folder with a verified manifest, the agent's files shipped to a folder, and a process list."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for m in ("agent.py", "manifest.py", "serve.py"):
        shutil.copy(DELIVERY / m, shipped / m)
    head = tmp_path / "h1"
    head.mkdir()
    data = {"config.json": b'{"model_type": "qwen2"}\n', "model-00001-of-00002.safetensors": os.urandom(3 << 20),
            "model-00002-of-00002.safetensors": os.urandom(2 << 20)}
    for p, b in data.items():
        (head / p).write_bytes(b)
    d.agent_index({"spec": SPEC}, str(head), lambda e: None)      # the head's verified copy (sha256 by the head)
    (tmp_path / "token").write_text(f"{d.TRANSFER_ENV}=tok\n")
    procs: list[Proc] = []

    class Chain:
        def __init__(self):
            self.tmp, self.data, self.head = tmp_path, data, head

        def start(self, name: str, cmd: str, job: dict, env: dict | None = None) -> Proc:
            p = Proc(shipped, cmd, {**job, "token_file": str(tmp_path / "token")}, tmp_path / f"{name}.json", env)
            procs.append(p)
            return p

        def serve(self, name: str, folder: Path, cmd: str = "serve", env: dict | None = None, **kw) -> tuple:
            p = self.start(f"{name}-serve", cmd, {"bind": "127.0.0.1", "port": 0, "idle": 60, "name": name,
                                                  "target": str(folder), **kw}, env)
            return p, p.wait_for(lambda e: e["ev"] == "listening")["port"]

        def sync(self, name: str, folder: Path, port: int, upstream: str, **kw) -> Proc:
            job = {"kind": "peer", "endpoint": f"http://127.0.0.1:{port}", "peer_name": upstream,
                   "repo": "org/model", "revision": "main", "include": [], "exclude": [], "verify": False,
                   "spec": SPEC, "target": str(folder), **kw}
            return self.start(f"{name}-sync", "sync", job)

    yield Chain()
    for p in procs:
        p.stop()


def test_a_file_still_arriving_is_passed_on_and_every_copy_is_byte_identical(chain):
    gate = chain.tmp / "gate"
    _, p1 = chain.serve("h1", chain.head, env={"GATE_FILE": str(gate), "GATE_AT": str((3 << 20) // 2)})
    h2, h3 = chain.tmp / "h2", chain.tmp / "h3"
    h2.mkdir()
    relay, p2 = chain.serve("h2", h2, cmd="relay", stall=60)
    with pytest.raises(urllib.error.HTTPError) as refused:      # the token check stays
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{p2}/manifest",
                                                      headers={"Authorization": "Bearer nope"}), timeout=10)
    assert refused.value.code == 401
    s2 = chain.sync("h2", h2, p1, "h1", relay=True)
    s3 = chain.sync("h3", h3, p2, "h2")
    # h1 holds its uplink at half the first shard: h3 can only be getting it from h2's growing part file
    sent = relay.wait_for(lambda e: e["ev"] == "send" and e["file"].startswith("model-00001") and e["from"] == "part")
    assert sent["start"] == 0
    assert (h2 / PARTIAL_DIR / "model-00001-of-00002.safetensors").exists()
    assert not (h2 / "model-00001-of-00002.safetensors").exists()
    gate.touch()
    assert s2.finish() == 0, s2.stderr()
    assert s3.finish() == 0, s3.stderr()
    for folder in (h2, h3):
        for p, b in chain.data.items():
            assert hashlib.sha256((folder / p).read_bytes()).digest() == hashlib.sha256(b).digest(), (folder, p)
    done3 = next(e for e in s3.events if e["ev"] == "done")
    assert done3["summary"].startswith("copied 3 file(s)") and "from h2;" in done3["summary"]
    assert done3["summary"].endswith("verified: 0 by the source's hash, 3 by the head's")
    assert not (h2 / INCOMING).exists(), "the note to the server is gone once the copy is complete"
    m2 = json.loads((h2 / MANIFEST).read_text())
    assert {f["path"]: f["sha256"] for f in m2["files"]} == {
        p: hashlib.sha256(b).hexdigest() for p, b in chain.data.items()}
    # the relay now serves its complete copy: a second puller gets every file whole and moves nothing again
    again = chain.sync("h3", h3, p2, "h2")
    assert again.finish() == 0 and next(e for e in again.events if e["ev"] == "done")["summary"] == "present"


def test_a_stalled_upstream_ends_in_one_clear_line(chain):
    gate = chain.tmp / "never"
    _, p1 = chain.serve("h1", chain.head, env={"GATE_FILE": str(gate), "GATE_AT": str((3 << 20) // 2)})
    h2, h3 = chain.tmp / "h2", chain.tmp / "h3"
    h2.mkdir()
    relay, p2 = chain.serve("h2", h2, cmd="relay", stall=1)
    chain.sync("h2", h2, p1, "h1", relay=True, read_timeout=300)       # stuck behind h1, for the whole test
    part = h2 / PARTIAL_DIR / "model-00001-of-00002.safetensors"
    deadline = time.monotonic() + 60
    held = (3 << 20) // 2 - len(chain.data["config.json"])              # what h1 sends before it stalls
    while not (part.exists() and part.stat().st_size == held and (h2 / "config.json").exists()):
        assert time.monotonic() < deadline, "h2 never got what h1 sent before it stalled"
        time.sleep(0.05)
    s3 = chain.sync("h3", h3, p2, "h2", read_timeout=30)
    assert s3.finish() == 1
    err = s3.events[-1]
    assert err["ev"] == "error" and "\n" not in err["msg"], s3.events
    assert "h2 stopped receiving the model: nothing arrived for 1 s while model-00001-of-00002.safetensors" in \
        err["msg"] and "[HTTP 409 GET http://127.0.0.1:" in err["msg"], err["msg"]
    assert "Traceback" not in s3.stderr()
    assert (h3 / "config.json").read_bytes() == chain.data["config.json"], "what had arrived whole was passed on"
    assert not (h3 / "model-00001-of-00002.safetensors").exists()


# ---------------------------------------------------------------- the relay server in-process
def _serving(folder: Path, **kw):
    events: list = []
    job = {"bind": "127.0.0.1", "port": 0, "idle": 5, "name": "h2", "stall": 0.5, "mode": "relay", **kw}
    threading.Thread(target=d.agent_serve, daemon=True, args=(job, str(folder), events.append, "tok")).start()
    while not any(e["ev"] == "listening" for e in events):
        time.sleep(0.02)
    return next(e["port"] for e in events if e["ev"] == "listening"), events


def _get(port: int, path: str) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": "Bearer tok"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _incoming(folder: Path, files: list, **extra):
    (folder / INCOMING).write_text(json.dumps({"version": 1, **SPEC, "commit": "c", "state": "receiving",
                                               "files": files, **extra}))


def test_relay_listing_is_untrusted(tmp_path):
    (tmp_path / "ok.bin").write_bytes(b"ok")
    (tmp_path.parent / "outside.bin").write_bytes(b"secret")
    _incoming(tmp_path, [{"path": "ok.bin", "size": 2}, {"path": "../outside.bin", "size": 6},
                         {"path": "/etc/passwd", "size": 1}, {"path": "ok2.bin", "size": "2"}])
    port, _ = _serving(tmp_path)
    code, body = _get(port, "/manifest")
    assert code == 200 and [f["path"] for f in json.loads(body)["files"]][0] == "ok.bin"
    assert _get(port, "/files/ok.bin") == (200, b"ok")
    for hostile in ("/files/../outside.bin", "/files/%2E%2E/outside.bin", "/files//etc/passwd", "/files/ok2.bin"):
        assert _get(port, hostile)[0] == 404, hostile


def test_relay_without_a_listing_refuses_after_the_stall_time(tmp_path):
    code, body = _get(_serving(tmp_path)[0], "/manifest")
    assert code == 409 and body.decode() == ("h2 has no listing of the model to pass on after 0.5 s (its own copy "
                                             "has not begun)")


def test_relay_refuses_at_once_when_its_own_copy_failed(tmp_path):
    (tmp_path / INCOMING).write_text(json.dumps({"state": "failed", "msg": "h1: connection refused"}))
    code, body = _get(_serving(tmp_path, stall=60)[0], "/manifest")
    assert code == 409 and body.decode() == "h2 could not receive the model itself: h1: connection refused"


def test_relay_serves_a_growing_file_up_to_its_listed_size_and_whole_files_waits(tmp_path):
    data = os.urandom(300_000)
    part = tmp_path / PARTIAL_DIR / "w.bin"
    part.parent.mkdir()
    part.write_bytes(data[:1000])
    _incoming(tmp_path, [{"path": "w.bin", "size": len(data)}])
    whole_port, _ = _serving(tmp_path, whole_files=True)
    code, body = _get(whole_port, "/files/w.bin")          # only a complete file: none arrives, a clear refusal
    assert code == 409 and b"nothing arrived for 0.5 s while w.bin had not arrived" in body
    port, events = _serving(tmp_path, stall=30)
    got: list = []
    reader = threading.Thread(target=lambda: got.append(_get(port, "/files/w.bin")))
    reader.start()
    while not any(e["ev"] == "send" for e in events):
        time.sleep(0.02)
    assert [e["from"] for e in events if e["ev"] == "send"] == ["part"], "served from the part file, growing"
    with open(part, "ab") as f:                             # the host's own copy goes on arriving
        for i in range(1000, len(data), 50_000):
            f.write(data[i:i + 50_000])
            f.flush()
            time.sleep(0.05)
    part.rename(tmp_path / "w.bin")
    reader.join(30)
    assert got == [(200, data)]
    code, body = _get(port, "/files/w.bin")
    assert code == 200 and body == data
    status, tail = 0, b""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/files/w.bin",
                                 headers={"Authorization": "Bearer tok", "Range": "bytes=299000-"})
    with urllib.request.urlopen(req, timeout=20) as r:     # ranges keep working
        status, tail = r.status, r.read()
    assert status == 206 and tail == data[299000:]


def test_sync_relay_tells_its_server_and_removes_unverified_files(tmp_path):
    """The receiving side: a file it must fetch again is removed first (what exists is verified), the listing is
    published, and a failure is recorded for the server."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 100)
    (src / "config.json").write_text("{}")
    d.agent_index({"spec": SPEC}, str(src), lambda e: None)
    port = _serving_complete(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "a.bin").write_bytes(b"b" * 100)                # same size, other bytes: not verified
    seen: list = []
    real = d.download_file

    def spy(job, commit, e, target, token, tick):
        seen.append((e["path"], os.path.exists(os.path.join(target, e["path"])),
                     json.loads((dst / INCOMING).read_text())))
        return real(job, commit, e, target, token, tick)
    job = {"kind": "peer", "endpoint": f"http://127.0.0.1:{port}", "peer_name": "h1", "repo": "org/model",
           "revision": "main", "include": [], "exclude": [], "verify": False, "spec": SPEC, "relay": True}
    try:
        d.download_file = spy
        d.agent_sync(job, str(dst), lambda e: None, token="tok")
    finally:
        d.download_file = real
    (path, present, note), _ = seen
    assert path == "a.bin" and not present, "fetched again: removed before the server could pass it on"
    assert note["state"] == "receiving" and [f["path"] for f in note["files"]] == ["a.bin", "config.json"]
    assert (dst / "a.bin").read_bytes() == b"a" * 100 and not (dst / INCOMING).exists()
    with pytest.raises(d.AgentError):
        d.agent_sync({**job, "endpoint": "http://127.0.0.1:9", "connect_wait": 0}, str(dst), lambda e: None,
                     token="tok")
    failed = json.loads((dst / INCOMING).read_text())
    assert failed["state"] == "failed" and "cannot reach" in failed["msg"]


def _serving_complete(folder: Path) -> int:
    events: list = []
    job = {"bind": "127.0.0.1", "port": 0, "idle": 5, "name": "h1", "mode": "complete"}
    threading.Thread(target=d.agent_serve, daemon=True, args=(job, str(folder), events.append, "tok")).start()
    while not any(e["ev"] == "listening" for e in events):
        time.sleep(0.02)
    return next(e["port"] for e in events if e["ev"] == "listening")


def test_model_job_default_is_a_chain():
    assert {f.name: f.default for f in dataclasses.fields(ms.ModelJob)}["fanout"] == "chain"
