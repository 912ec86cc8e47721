"""OpenWebUI in front (`ui:` in the inventory, cluster/ui.py): config errors, the plan's ui steps and their env (the
endpoint, no secret anywhere but its 0600 file), the runbook, node aux, the model probe against a fake OpenWebUI,
and `status`'s `ui` section."""

from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from cluster import ops, render, ui
from cluster.config import OPENWEBUI_IMAGE
from cluster.containers import SECRETS_MOUNT, WITH_SECRETS
from cluster.errors import ConfigError
from cluster.executor import Result
from cluster.steps import Cmd, Http, Put, Wait

V100 = {"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160, "compute_capability": "7.0"}
KEY = "sk-owui-never-shown-4242"          # deploy.api_key's value (from $GC_UNIT_OWUI_KEY)
WEBUI_SECRET = "webui-secret-literal-7777"  # ui.env.WEBUI_SECRET_KEY (a secret by its key)


def _write(tmp_path: Path, *, ui_: dict | None = None, deploy: dict | None = None, address="172.18.8.208",
           profile="vllm-v0.3.0", **top) -> Path:
    inv = {"cluster": {"name": "lab", "model_dir": "/Data/models", "registry_mirrors": ["10.77.0.2:5000"]},
           "hosts": [{"name": "gpu208", "address": address, "gpus": V100}],
           "deploy": {"profile": profile, "model": "Qwen/Qwen2.5-7B-Instruct", "served_model_name": "qwen2.5-7b",
                      "tensor_parallel": 2, **(deploy or {})},
           "ui": {"kind": "openwebui", "port": 3000, **(ui_ or {})} if ui_ is not False else None, **top}
    if inv["ui"] is None:
        del inv["ui"]
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def _plan(path: Path, **kw):
    return ops.make_plan(*ops.load(str(path)), **kw)


def _error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        _plan(path)
    return e.value


def _line(path: Path, text: str) -> int:
    return next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if text in ln)


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("ui_, where, says, fix", [
    ({"kind": "open-webui"}, "kind: open-webui", "ui.kind: 'open-webui' is not allowed", "did you mean 'openwebui'?"),
    ({"port": 70000}, "port: 70000", "ui.port: 70000 is out of range", "from 1 to 65535"),
    ({"auth": "no"}, "auth: 'no'", "ui.auth: expected true or false", None),
    ({"prot": 3001}, "prot: 3001", "ui.prot: unknown key", "did you mean 'port'?"),
    ({"env": {"OPENAI_API_BASE_URL": "http://elsewhere/v1"}}, "OPENAI_API_BASE_URL", "gpucluster sets "
     "OPENAI_API_BASE_URL itself", "remove it"),
    ({"env": {"WEBUI_AUTH": "True"}}, "WEBUI_AUTH", "gpucluster sets WEBUI_AUTH itself", "ui.auth"),
    ({"registry_mirrors": ["https://m.daocloud.io"]}, "https://m.daocloud.io", "is not a registry", "m.daocloud.io"),
    ({"data": "vol:/etc"}, "data: vol:/etc", "ui.data: 'vol:/etc' is not valid", None),
    ({"image": "ghcr.io/open-webui/open-webui:v0.6.36 --privileged"}, "image:", "ui.image:", None),
])
def test_config_errors_name_file_line_field_and_fix(tmp_path, ui_, where, says, fix):
    path = _write(tmp_path, ui_=ui_)
    text = str(_error(path))
    assert text.startswith(f"{path}:{_line(path, where)}: ") and says in text, text
    assert fix is None or f"(fix: {fix}" in text or fix in text.split("(fix:")[-1], text


def test_kind_is_required(tmp_path):
    path = tmp_path / "inv.yaml"
    _write(tmp_path, ui_={})
    data = yaml.safe_load(path.read_text())
    data["ui"] = {"port": 3000}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert f"{path}:{_line(path, 'ui:')}: ui: missing required key 'kind'" in str(_error(path))


@pytest.mark.parametrize("port, what", [(8000, "the engine's API port"), (29650, "cluster.transfer_port")])
def test_a_port_the_head_already_uses_is_refused_at_its_line(tmp_path, port, what):
    path = _write(tmp_path, ui_={"port": port})
    text = str(_error(path))
    assert text.startswith(f"{path}:{_line(path, f'port: {port}')}: ui.port: port {port} is {what}"), text
    assert "(fix: choose another ui.port" in text


def test_defaults(tmp_path):
    inv, _ = ops.load(str(_write(tmp_path)))
    assert (inv.ui.kind, inv.ui.port, inv.ui.image, inv.ui.auth, inv.ui.data) == (
        "openwebui", 3000, OPENWEBUI_IMAGE, False, None)
    assert OPENWEBUI_IMAGE.startswith("ghcr.io/open-webui/open-webui:v")     # pinned, never :main / :latest
    inv, _ = ops.load(str(_write(tmp_path, ui_=False)))
    assert inv.ui is None


# ---------------------------------------------------------------- the plan
def _by_id(plan):
    return {s.id: s for s in plan.steps}


def _env(step) -> dict[str, str]:
    argv = list(step.ops[-1].argv)
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-e")


def test_no_ui_no_ui_steps(tmp_path):
    plan = _plan(_write(tmp_path, ui_=False))
    assert not [s for s in plan.steps if s.phase.startswith("ui")]


def test_ui_steps_come_after_the_engine_is_ready_and_before_the_record(tmp_path):
    plan = _plan(_write(tmp_path))
    phases = list(dict.fromkeys(s.phase for s in plan.steps))
    assert phases[phases.index("ready") + 1:phases.index("record")] == ["ui", "ui-health", "ui-ready"]
    ids = [s.id for s in plan.steps if s.phase.startswith("ui")]
    assert ids == ["gpu208/ui-image", "gpu208/openwebui", "control/ui-health", "gpu208/ui-models"]
    steps = _by_id(plan)
    assert steps["control/ui-health"].readonly and steps["gpu208/ui-models"].readonly


def test_the_container_points_at_the_endpoint_and_is_node_aux(tmp_path):
    plan = _plan(_write(tmp_path))
    step = _by_id(plan)["gpu208/openwebui"]
    argv = list(step.ops[-1].argv)
    assert argv[:5] == ["docker", "run", "-d", "--name", "gpucluster-lab-openwebui"]
    assert "gpucluster.node=aux" in argv and "gpucluster.role=openwebui" in argv and "--network=host" in argv
    assert "--gpus" not in argv and not any(a.startswith("--ipc") for a in argv)
    assert _env(step) == {"OPENAI_API_BASE_URL": plan.endpoint, "ENABLE_OPENAI_API": "True",
                          "ENABLE_OLLAMA_API": "False", "PORT": "3000", "WEBUI_AUTH": "False",
                          "ENABLE_PERSISTENT_CONFIG": "False", "OFFLINE_MODE": "True"}
    assert plan.endpoint == "http://172.18.8.208:8000/v1"
    assert ["-v", "gpucluster-lab-openwebui:/app/backend/data:rw"] == argv[argv.index("-v"):argv.index("-v") + 2]
    assert argv[argv.index("--entrypoint") + 1:] == ["bash", OPENWEBUI_IMAGE, "start.sh"]   # the image's own CMD
    assert not [op for op in step.all_ops() if isinstance(op, Put)]                        # no key: no file
    # `down` removes aux containers after the heads; `up`'s stray check leaves it
    down = [s for s in ops.down_steps(plan.inventory) if s.host == "gpu208" and s.phase.startswith("remove-")]
    assert [s.phase for s in down] == ["remove-worker", "remove-head", "remove-aux"]
    assert "label=gpucluster.node=aux" in down[-1].check.argv
    assert "gpucluster-lab-openwebui" in _by_id(plan)["gpu208/strays"].keep


def test_the_image_comes_through_the_cluster_and_ui_mirrors_not_the_profiles(tmp_path):
    plan = _plan(_write(tmp_path, ui_={"registry_mirrors": ["m.daocloud.io"]}))
    step = _by_id(plan)["gpu208/ui-image"]
    pulls = [op.argv[-1] for alt in (step.ops, *step.otherwise) for op in alt if op.argv[1] == "pull"]
    assert pulls == [f"10.77.0.2:5000/{OPENWEBUI_IMAGE}", f"m.daocloud.io/{OPENWEBUI_IMAGE}", OPENWEBUI_IMAGE]
    assert step.otherwise[0][1].argv == ("docker", "tag", f"m.daocloud.io/{OPENWEBUI_IMAGE}", OPENWEBUI_IMAGE)
    assert step.check.argv[-1] == OPENWEBUI_IMAGE and step.host == "gpu208"
    assert not any("hub.rat.dev" in p or "docker.m.daocloud.io" in p for p in pulls)   # Docker Hub mirrors


def test_readiness_health_from_here_then_the_model_listed_by_openwebui(tmp_path):
    plan = _plan(_write(tmp_path))
    health = _by_id(plan)["control/ui-health"].ops[0]
    assert isinstance(health, Http) and health.url == "http://172.18.8.208:3000/health" and health.until
    assert health.expect == '"status":true'
    assert health.abort[1] == ("docker", "exec", "gpucluster-lab-openwebui", "true")
    wait = _by_id(plan)["gpu208/ui-models"].ops[0]
    assert isinstance(wait, Wait) and wait.argv[:5] == ("docker", "exec", "gpucluster-lab-openwebui", "python3", "-c")
    assert wait.argv[5] == ui.PROBE and wait.argv[6:] == ("3000", "qwen2.5-7b", "off")


def test_the_api_key_and_ui_secrets_reach_only_the_ui_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GC_UNIT_OWUI_KEY", KEY)
    path = _write(tmp_path, deploy={"api_key": {"env": "GC_UNIT_OWUI_KEY"}},
                  ui_={"auth": True, "env": {"WEBUI_SECRET_KEY": WEBUI_SECRET, "ENABLE_SIGNUP": "false"}})
    plan = _plan(path)
    step = _by_id(plan)["gpu208/openwebui"]
    put = step.ops[0]
    assert isinstance(put, Put) and put.path == "/etc/gpucluster/lab/ui.env" and put.mode == 0o600
    assert put.content() == f"OPENAI_API_KEY={KEY}\nWEBUI_SECRET_KEY={WEBUI_SECRET}\n"
    assert all(ops_[0] == put for name, ops_ in step.variants.items())          # written before every (re)start
    argv = list(step.ops[-1].argv)
    assert ["-v", f"/etc/gpucluster/lab/ui.env:{SECRETS_MOUNT}:ro"] in [argv[i:i + 2] for i in range(len(argv))]
    assert argv[argv.index("--entrypoint") + 1:] == ["sh", OPENWEBUI_IMAGE, "-c", WITH_SECRETS, SECRETS_MOUNT,
                                                     "bash", "start.sh"]
    assert _env(step)["ENABLE_SIGNUP"] == "false" and "OPENAI_API_KEY" not in _env(step)
    argvs = [s.check.argv for s in plan.steps if s.check] + [
        a for s in plan.steps for op in s.all_ops() if isinstance(op, (Cmd, Wait))
        for a in ((op.argv,) if isinstance(op, Cmd) else (op.argv, op.abort, op.log)) if a]
    views = {"argv": json.dumps(argvs), "json": json.dumps(plan.as_dict()), "table": render.table(plan),
             "runbook": render.runbook(plan), "reasons": " ".join(s.reason for s in plan.steps)}
    for where, text in views.items():
        for value in (KEY, WEBUI_SECRET):
            assert value not in text, f"{value} leaked into the {where}"
    assert "OPENAI_API_KEY=***" in render.table(plan)
    runbook = render.runbook(plan)
    assert "# Export first: " in runbook and "#   OPENAI_API_KEY: deploy.api_key" in runbook
    # with login on, the model check asks the backend OpenWebUI is configured with (no account to sign in)
    assert _by_id(plan)["gpu208/ui-models"].ops[0].argv[-1] == "on"
    assert not [f for f in plan.findings if f.code == "ui-open"]
    # a rotated key or secret recreates the UI's container
    before = ui.container(plan.deployment).spec_hash
    monkeypatch.setenv("GC_UNIT_OWUI_KEY", KEY + "-rotated")
    assert ui.container(_plan(path).deployment).spec_hash != before


def test_an_open_ui_in_front_of_a_keyed_endpoint_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("GC_UNIT_OWUI_KEY", KEY)
    plan = _plan(_write(tmp_path, deploy={"api_key": {"env": "GC_UNIT_OWUI_KEY"}}))
    f, = [f for f in plan.findings if f.code == "ui-open"]
    assert f.severity == "warning" and "http://172.18.8.208:3000" in f.message and "ui.auth: true" in f.fix
    monkeypatch.delenv("GC_UNIT_OWUI_KEY")
    plan = _plan(_write(tmp_path, ui_={"auth": True, "env": {"WEBUI_SECRET_KEY": {"env": "GC_UNIT_OWUI_UNSET"}}}))
    unset = [f.message.split(" is ")[0] for f in plan.findings if f.code == "secret-unset"]
    assert unset == ["ui.env.WEBUI_SECRET_KEY"]


def test_ollama_is_fronted_through_its_own_api(tmp_path):
    path = _write(tmp_path, profile="ollama-0.32.15", deploy={"model": "qwen3:32b", "served_model_name": "qwen3-32b",
                                                               "tensor_parallel": None})
    data = yaml.safe_load(path.read_text())
    del data["deploy"]["tensor_parallel"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    plan = _plan(path)
    env = _env(_by_id(plan)["gpu208/openwebui"])
    assert env["OLLAMA_BASE_URL"] == "http://172.18.8.208:11434" and env["ENABLE_OLLAMA_API"] == "True"
    assert env["ENABLE_OPENAI_API"] == "False" and "OPENAI_API_BASE_URL" not in env
    assert _by_id(plan)["gpu208/ui-models"].ops[0].argv[7] == "qwen3-32b:latest"   # as Ollama lists it


def test_the_runbook_holds_the_ui_steps_and_parses(tmp_path):
    plan = _plan(_write(tmp_path))
    text = render.runbook(plan)
    for want in ("# ==== phase ui on host gpu208", "# --- gpu208/openwebui:", "docker run -d --name "
                 "gpucluster-lab-openwebui", "# ==== phase ui-health on this machine",
                 "http://172.18.8.208:3000/health", "# ==== phase ui-ready on host gpu208",
                 "until docker exec gpucluster-lab-openwebui python3 -c",
                 "OPENAI_API_BASE_URL=http://172.18.8.208:8000/v1"):
        assert want in text, want
    assert text.index("phase ui on") < text.index("phase ui-health") < text.index("phase ui-ready") < \
        text.index("phase record")
    r = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- a fake OpenWebUI (and engine) on this machine
class _Fake(BaseHTTPRequestHandler):
    """OpenWebUI's surface the probe and status use (main.py, routers/auths.py), or an engine's /v1/models."""

    def log_message(self, *a):
        pass

    def _send(self, code: int, doc) -> None:
        body = json.dumps(doc, separators=(",", ":")).encode()      # as Starlette's JSONResponse renders it
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        s = self.server
        s.seen.append(("GET", self.path, self.headers.get("Authorization")))
        if self.path == "/health":
            return self._send(200, {"status": True})
        if self.path.startswith("/api/models"):
            if self.headers.get("Authorization") != "Bearer tok-1":
                return self._send(403, {"detail": "Not authenticated"})
            return self._send(200, {"data": [{"id": m, "name": m, "owned_by": "openai"} for m in s.models]})
        if self.path == "/v1/models":
            if s.key and self.headers.get("Authorization") != f"Bearer {s.key}":
                return self._send(401, {"error": "Unauthorized"})
            return self._send(200, {"object": "list", "data": [{"id": m} for m in s.models]})
        return self._send(404, {"detail": "Not Found"})

    def do_POST(self):  # noqa: N802
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
        s.seen.append(("POST", self.path, body))
        if self.path == "/api/v1/auths/signin":
            if s.accounts:
                return self._send(400, {"detail": "Open WebUI already has users"})
            return self._send(200, {"token": "tok-1", "token_type": "Bearer", "email": "admin@localhost"})
        return self._send(404, {"detail": "Not Found"})


@pytest.fixture
def fake():
    servers = []

    def start(models=("qwen2.5-7b",), key=None, accounts=False):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
        srv.models, srv.key, srv.accounts, srv.seen = list(models), key, accounts, []
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv
    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _probe(port: int, want: str, auth: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os
    return subprocess.run(["python3", "-c", ui.PROBE, str(port), want, auth], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_probe_signs_in_and_reads_openwebuis_own_model_list(fake):
    srv = fake()
    r = _probe(srv.server_address[1], "qwen2.5-7b", "off")
    first, last = r.stdout.strip().splitlines()
    assert r.returncode == 0 and json.loads(first) == {"via": "openwebui", "models": ["qwen2.5-7b"]}
    assert last == "ok: qwen2.5-7b is listed (openwebui)"
    assert [x[:2] for x in srv.seen] == [("POST", "/api/v1/auths/signin"), ("GET", "/api/models?refresh=true")]
    assert srv.seen[1][2] == "Bearer tok-1"
    r = _probe(srv.server_address[1], "other-model", "off")
    assert r.returncode == 1 and r.stdout.strip().splitlines()[-1] == \
        "other-model is not listed (openwebui: qwen2.5-7b)"


def test_probe_says_why_openwebui_refuses_to_run_without_login(fake):
    srv = fake(accounts=True)
    r = _probe(srv.server_address[1], "qwen2.5-7b", "off")
    assert r.returncode == 1 and "HTTP 400" in r.stdout and "set ui.auth: true, or give it a new ui.data" in r.stdout


def test_probe_with_login_on_asks_the_configured_backend(fake):
    srv = fake(models=("qwen2.5-7b", "other"))
    r = _probe(0, "qwen2.5-7b", "on", env={"OPENAI_API_BASE_URL": f"http://127.0.0.1:{srv.server_address[1]}/v1",
                                           "ENABLE_OLLAMA_API": "False"})
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[0]) == {"via": "backend",
                                                                         "models": ["qwen2.5-7b", "other"]}
    r = _probe(0, "qwen2.5-7b", "on", env={"OPENAI_API_BASE_URL": "http://127.0.0.1:9/v1"})
    assert r.returncode == 1 and r.stdout.splitlines()[-1].startswith("no answer yet: ")


# ---------------------------------------------------------------- status
class _Hosts:
    """remote.Hosts' surface `status` uses: nothing recorded, no containers; `docker exec <ui> python3 ...` runs
    the probe here (the fake OpenWebUI is on this machine)."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def host(self, name):
        return name

    def each(self, items, fn, *, key=lambda h: h.name, workers=16):
        return {key(i): fn(i) for i in items}

    def check(self, host, argv, timeout=None):
        return Result(1, "", "")

    def run(self, host, argv, *, timeout=None):
        self.calls.append((host, tuple(argv)))
        if tuple(argv[:2]) == ("docker", "exec") and argv[3] == "python3":
            r = subprocess.run(list(argv[3:]), capture_output=True, text=True, timeout=60)
            return Result(r.returncode, r.stdout, r.stderr)
        return Result(1, "", "no such container")


def _status(tmp_path, monkeypatch, path):
    hosts = _Hosts()

    class Remote:
        Hosts = staticmethod(lambda inv, accept_new_host_keys=False: hosts)
        describe = staticmethod(str)
    monkeypatch.setattr(ops, "_remote", lambda: Remote)
    inv, _ = ops.load(str(path))
    return ops.status(inv, lambda: ops.load(str(path)))[1], hosts


def test_status_reports_the_ui_and_its_models(tmp_path, monkeypatch, fake):
    engine, front = fake(), fake()
    path = _write(tmp_path, address="127.0.0.1", deploy={"port": engine.server_address[1]},
                  ui_={"port": front.server_address[1]})
    out, hosts = _status(tmp_path, monkeypatch, path)
    assert out["ui"] == {"url": f"http://127.0.0.1:{front.server_address[1]}", "health": True, "healthy": True,
                         "models": ["qwen2.5-7b"], "via": "openwebui"}
    assert not [p for p in out["problems"] if p.startswith("ui:")]
    assert out["api"] == {"health": True, "models": ["qwen2.5-7b"]}
    assert [c for c in hosts.calls if c[1][:3] == ("docker", "exec", "gpucluster-lab-openwebui")]


def test_status_problems_when_the_ui_is_down_or_lacks_the_model(tmp_path, monkeypatch, fake):
    engine, front = fake(), fake(models=("something-else",))
    path = _write(tmp_path, address="127.0.0.1", deploy={"port": engine.server_address[1]},
                  ui_={"port": front.server_address[1]})
    out, _ = _status(tmp_path, monkeypatch, path)
    assert out["ui"]["health"] and not out["ui"]["healthy"] and out["ui"]["models"] == ["something-else"]
    assert "ui: qwen2.5-7b is not listed (openwebui: something-else)" in out["problems"] and not out["healthy"]
    port = front.server_address[1]
    front.shutdown()
    front.server_close()
    out, _ = _status(tmp_path, monkeypatch, path)
    assert out["ui"] == {"url": f"http://127.0.0.1:{port}", "health": False, "healthy": False, "models": [],
                         "via": None}
    assert f"ui: OpenWebUI at http://127.0.0.1:{port} does not answer /health (no answer)" in out["problems"]


def test_status_without_ui_has_no_ui_section(tmp_path, monkeypatch, fake):
    engine = fake()
    path = _write(tmp_path, ui_=False, address="127.0.0.1", deploy={"port": engine.server_address[1]})
    out, _ = _status(tmp_path, monkeypatch, path)
    assert "ui" not in out


def test_ui_status_survives_a_probe_that_cannot_run(tmp_path):
    plan = _plan(_write(tmp_path))

    def run(host, argv):
        raise OSError("connection reset")
    out, problems = ui.status(plan.deployment, run, lambda url: (200, '{"status":true}'))
    assert out["health"] and not out["healthy"]
    assert problems == ["ui: cannot ask OpenWebUI for its models on gpu208: connection reset"]
