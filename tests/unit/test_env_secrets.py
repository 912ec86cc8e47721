"""Secrets in deploy.env / hosts[].env ({env: NAME}, {file: PATH}, or a literal under a key that names a secret):
never in the plan's table, JSON or runbook, never in an argv or a container's config; only in a 0600 Put."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster import config, netcheck, ops, render
from cluster.config import Secret, secret_key
from cluster.containers import WITH_SECRETS
from cluster.errors import ConfigError
from cluster.steps import Cmd, Http, Put, Wait

REPO = Path(__file__).resolve().parents[2]
FROM_ENV = "hf_FROMENV_0123456789abcdef"          # the value of $GC_UNIT_HF_TOKEN
LITERAL = "s3cr3t-literal-4242"                   # MY_API_KEY's literal value in the inventory
FROM_FILE = "file-secret-7777"                    # DB_PASSWORD from a file
HOST_ONLY = "host-only-secret-5555"               # hosts[1].env.SERVICE_TOKEN
VALUES = (FROM_ENV, LITERAL, FROM_FILE, HOST_ONLY)
V100 = {"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160, "compute_capability": "7.0"}


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("GC_UNIT_HF_TOKEN", FROM_ENV)


def _write_inv(tmp_path: Path, *, deploy: dict | None = None, hosts: list | None = None, **extra) -> Path:
    (tmp_path / "db.pw").write_text(FROM_FILE + "\n")
    env = {"HF_TOKEN": {"env": "GC_UNIT_HF_TOKEN"}, "MY_API_KEY": LITERAL,
           "DB_PASSWORD": {"file": str(tmp_path / "db.pw")}, "TOKENIZERS_PARALLELISM": "false"}
    inv = {"cluster": {"name": "lab", "model_dir": "/Data/models"},
           "hosts": hosts or [{"name": f"h{i}", "address": f"10.0.0.{i + 1}", "interface": "eth0", "gpus": V100,
                               **({"env": {"SERVICE_TOKEN": HOST_ONLY}} if i == 1 else {})} for i in range(2)],
           "deploy": {"profile": "vllm-v0.6.3", "model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel": 2,
                      "pipeline_parallel": 2, "env": env, **(deploy or {})}, **extra}
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def _plan(path: Path, **kw):
    return ops.make_plan(*ops.load(str(path)), **kw)


def _all_argvs(plan) -> list[tuple[str, ...]]:
    """Every argv of every step: ops, variants, fallbacks, checks, waits and their probes."""
    out = []
    for s in plan.steps:
        if s.check:
            out.append(s.check.argv)
        for op in s.all_ops():
            if isinstance(op, Cmd):
                out.append(op.argv)
            elif isinstance(op, Wait):
                out += [a for a in (op.argv, op.abort, op.log) if a]
            elif isinstance(op, Http):
                out += [a[1] for a in (op.abort, op.log) if a]
    return out


def _puts(plan) -> list[Put]:
    return [op for s in plan.steps for op in s.all_ops() if isinstance(op, Put)]


def _assert_nowhere_but_puts(plan, values=VALUES):
    views = {"table": render.table(plan), "json": json.dumps(plan.as_dict()), "runbook": render.runbook(plan),
             "argv": json.dumps(_all_argvs(plan)), "reasons": " ".join(s.reason for s in plan.steps),
             "puts": json.dumps([p.as_dict() for p in _puts(plan)]),
             "findings": json.dumps([f.as_dict() for f in plan.findings])}
    for where, text in views.items():
        for v in values:
            assert v not in text, f"{v!r} leaked into the {where}"


# ---------------------------------------------------------------- config
def test_forms_are_read_as_secrets(tmp_path, secret_env):
    inv = config.load_inventory(_write_inv(tmp_path))
    env = inv.deploy.env
    assert env["HF_TOKEN"] == Secret(env="GC_UNIT_HF_TOKEN") and env["HF_TOKEN"].reveal() == FROM_ENV
    assert isinstance(env["DB_PASSWORD"], Secret) and env["DB_PASSWORD"].reveal() == FROM_FILE
    assert isinstance(env["MY_API_KEY"], Secret) and env["MY_API_KEY"].reveal() == LITERAL     # by its key's name
    assert env["TOKENIZERS_PARALLELISM"] == "false"                                           # not a secret
    assert isinstance(inv.hosts[1].env["SERVICE_TOKEN"], Secret) and inv.hosts[0].env == {}
    assert LITERAL not in repr(inv) and FROM_FILE not in repr(inv)


@pytest.mark.parametrize("key", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "hf_token", "AWS_SECRET_ACCESS_KEY",
                                 "AWS_ACCESS_KEY_ID", "DB_PASSWORD", "MYSQL_PASSWD", "OPENAI_API_KEY", "APIKEY",
                                 "GOOGLE_APPLICATION_CREDENTIALS", "Credential", "SECRET", "TOKEN", "my_secret_value"])
def test_secret_keys(key):
    assert secret_key(key)


@pytest.mark.parametrize("key", ["TOKENIZERS_PARALLELISM", "MAX_NUM_BATCHED_TOKENS", "VLLM_HOST_IP",
                                 "NCCL_SOCKET_IFNAME", "PYTORCH_CUDA_ALLOC_CONF", "KEYBOARD", "SECRETARY",
                                 "RAY_memory_usage_threshold", "PASSWORDLESS"])
def test_plain_keys(key):
    assert not secret_key(key)


def _load_error(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load_inventory(path)
    return e.value


BASE = ("cluster: {name: lab}\nhosts:\n  - {name: h0, address: 10.0.0.1, gpus: {count: 1, memory_mib: 16160, "
        "compute_capability: '7.0'}}\ndeploy:\n  model: Qwen/Qwen2.5-7B-Instruct\n  env:\n")


@pytest.mark.parametrize("entry,line", [
    ("    A: ok\n    HF_TOKEN: {envv: X}\n", 8),              # unknown form
    ("    HF_TOKEN: {env: ''}\n", 7),                          # empty name
    ("    HF_TOKEN: {env: X, file: /y}\n", 7),                 # two forms
    ("    HF_TOKEN: [top-secret-in-a-list]\n", 7),            # not a string: the value is not echoed
    ("    ANY_NAME: {file: [a]}\n", 7),
])
def test_bad_forms_name_file_and_line(tmp_path, entry, line):
    e = _load_error(tmp_path, BASE + entry)
    assert e.file.endswith("bad.yaml") and e.line == line and e.field.startswith("deploy.env.")
    assert "{env: NAME} or {file: PATH}" in str(e)
    assert "top-secret-in-a-list" not in str(e)


def test_secret_key_must_be_a_variable_name(tmp_path):
    e = _load_error(tmp_path, BASE + "    HF-TOKEN: {env: X}\n")
    assert e.line == 7 and "variable name" in str(e)


def test_host_env_secret_error_names_the_host(tmp_path):
    text = BASE.replace("compute_capability: '7.0'}}", "compute_capability: '7.0'},\n      env: {TOKEN: {x: y}}}")
    e = _load_error(tmp_path, text + "    A: b\n")
    assert e.field == "hosts[0].env.TOKEN" and e.line == 4


def test_a_profile_env_holds_no_secret(tmp_path):
    prof = tmp_path / "p.yaml"
    prof.write_text("image: vllm/vllm-openai:v0.6.3\nenv:\n  A: b\n  HF_TOKEN: hf_abc\n")
    with pytest.raises(ConfigError) as e:
        config.load_profile(str(prof))
    assert e.value.file == str(prof) and e.value.line == 4 and "deploy.env" in e.value.fix
    assert "hf_abc" not in str(e.value)
    prof.write_text("image: vllm/vllm-openai:v0.6.3\nenv:\n  X: {env: Y}\n")
    with pytest.raises(ConfigError) as e:
        config.load_profile(str(prof))
    assert e.value.line == 3


# ---------------------------------------------------------------- resolved before any host is touched
def test_unset_env_secret_stops_before_hosts(tmp_path, monkeypatch):
    monkeypatch.delenv("GC_UNIT_HF_TOKEN", raising=False)
    path = _write_inv(tmp_path)
    inv = config.load_inventory(path)
    with pytest.raises(ConfigError) as e:
        ops._secrets_resolve(inv)
    assert e.value.field == "deploy.env.HF_TOKEN" and e.value.file == str(path) and e.value.line
    assert "GC_UNIT_HF_TOKEN" in str(e.value)
    p = _plan(path)      # the plan warns
    assert any(f.code == "secret-unset" and "deploy.env.HF_TOKEN" in f.message for f in p.findings)


def test_unreadable_host_secret_file_names_the_host_field(tmp_path, secret_env):
    path = _write_inv(tmp_path, hosts=[{"name": "h0", "address": "10.0.0.1", "gpus": V100,
                                        "env": {"X_TOKEN": {"file": str(tmp_path / "missing")}}}],
                      deploy={"pipeline_parallel": 1})
    with pytest.raises(ConfigError) as e:
        ops._secrets_resolve(config.load_inventory(path))
    assert e.value.field == "hosts[0].env.X_TOKEN" and "missing" in str(e.value)


def test_a_line_break_in_a_secret_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GC_UNIT_HF_TOKEN", "abc\nVLLM_HOST_IP=6.6.6.6")
    with pytest.raises(ConfigError) as e:
        ops._secrets_resolve(config.load_inventory(_write_inv(tmp_path)))
    assert e.value.field == "deploy.env.HF_TOKEN" and "6.6.6.6" not in str(e.value)


# ---------------------------------------------------------------- the plan's views (Ray engine)
def test_ray_plan_never_shows_a_secret(tmp_path, secret_env):
    p = _plan(_write_inv(tmp_path, deploy={"api_key": "sk-api-key-9999"}))
    assert p.verdict != "fail", [f.as_dict() for f in p.findings]
    _assert_nowhere_but_puts(p, (*VALUES, "sk-api-key-9999"))
    argvs = _all_argvs(p)
    assert any("TOKENIZERS_PARALLELISM=false" in a for a in argvs)          # a plain value still goes to -e
    assert not any(x.startswith(("HF_TOKEN=", "MY_API_KEY=", "DB_PASSWORD=", "SERVICE_TOKEN=")) for a in argvs
                   for x in a)
    assert not any(x == "--env-file" for a in argvs if a[:2] == ("docker", "run") for x in a)


def test_ray_secrets_are_only_in_0600_puts(tmp_path, secret_env):
    p = _plan(_write_inv(tmp_path, deploy={"api_key": "sk-api-key-9999"}))
    by_path: dict[str, set[str]] = {}
    for s in p.steps:
        for op in s.all_ops():
            if isinstance(op, Put) and op.path.startswith("/etc/gpucluster/"):
                assert op.mode == 0o600 and op.path.startswith("/etc/gpucluster/lab/") and not op.text
                by_path.setdefault(f"{s.host}:{op.path}", set()).add(op.content())
            elif isinstance(op, Put):       # the model agents' files, the record: no env secret
                assert not any(v in op.content() for v in VALUES), op.path
    contents = {k: v.pop() for k, v in by_path.items() if len(v) == 1}
    assert len(contents) == len(by_path)
    head_env = f"HF_TOKEN={FROM_ENV}\nDB_PASSWORD={FROM_FILE}\nMY_API_KEY={LITERAL}\n"
    assert sorted(contents["h0:/etc/gpucluster/lab/env.env"].splitlines()) == sorted(head_env.splitlines())
    worker = contents["h1:/etc/gpucluster/lab/env.env"]
    assert f"SERVICE_TOKEN={HOST_ONLY}\n" in worker and f"HF_TOKEN={FROM_ENV}\n" in worker
    api = contents["h0:/etc/gpucluster/lab/api.env"]     # the API server (docker exec --env-file) gets them too
    assert "VLLM_API_KEY=sk-api-key-9999\n" in api and f"HF_TOKEN={FROM_ENV}\n" in api and HOST_ONLY not in api


def test_ray_containers_read_the_mounted_file(tmp_path, secret_env):
    p = _plan(_write_inv(tmp_path))
    for sid in ("h0/ray-head", "h1/ray-worker"):
        step = next(s for s in p.steps if s.id == sid)
        run = next(op.argv for op in step.ops if isinstance(op, Cmd))
        assert "/etc/gpucluster/lab/env.env:/run/gpucluster/env:ro" in run
        tail = run[run.index("--entrypoint") + 1:]
        assert tail[0] == "sh" and tail[2:5] == ("-c", WITH_SECRETS, "/run/gpucluster/env")
        assert tail[5:7] == ("ray", "start")
        # the file is (re)written before every way the container (re)starts
        for ops_ in (step.ops, *step.variants.values()):
            assert isinstance(ops_[0], Put) and ops_[0].path == "/etc/gpucluster/lab/env.env"
    api = next(s for s in p.steps if s.phase == "api")
    exec_ = next(op.argv for op in api.ops if isinstance(op, Cmd))
    assert exec_[:5] == ("docker", "exec", "-d", "--env-file", "/etc/gpucluster/lab/api.env")


def test_no_secret_no_change(tmp_path):
    """Without env secrets the containers are what they were: no wrapper, no mount, no extra file."""
    inv = yaml.safe_load(_write_inv(tmp_path).read_text())
    inv["deploy"]["env"] = {"TOKENIZERS_PARALLELISM": "false"}
    for h in inv["hosts"]:
        h.pop("env", None)
    (tmp_path / "inv.yaml").write_text(yaml.safe_dump(inv))
    p = _plan(tmp_path / "inv.yaml")
    assert not _puts(p) or all(not op.path.startswith("/etc/gpucluster") for op in _puts(p))
    head = p.deployment.engine.container(p.deployment, p.deployment.head)
    assert head.entrypoint == "ray" and head.extra_hash == ""


def test_runbook_reads_exported_variables(tmp_path, secret_env):
    p = _plan(_write_inv(tmp_path))
    text = render.runbook(p)
    header = text.split("set -euo pipefail")[0]
    for key in ("HF_TOKEN", "MY_API_KEY", "DB_PASSWORD", "SERVICE_TOKEN"):
        assert key in header.split("# Export first:")[1].splitlines()[0]
    assert "#   HF_TOKEN: deploy.env.HF_TOKEN" in header
    assert "#   SERVICE_TOKEN: hosts[h1].env.SERVICE_TOKEN" in header
    assert '"$HF_TOKEN"' in text and '"$MY_API_KEY"' in text


def test_runbook_put_writes_the_exported_value(tmp_path, secret_env):
    """The runbook's secrets file, run by hand: the value comes from the variable, literally."""
    p = _plan(_write_inv(tmp_path))
    put = next(op for s in p.steps if s.id == "h1/ray-worker" for op in s.ops if isinstance(op, Put))
    target = tmp_path / "out" / "env.env"
    script = render._op_sh(put).replace(put.path, str(target)).replace("/etc/gpucluster/lab", str(tmp_path / "out"))
    hostile = "$(touch PWNED) `x` 'q' \"d\" %s \\n"
    env = {**os.environ, "HF_TOKEN": hostile, "MY_API_KEY": "b", "DB_PASSWORD": "c", "SERVICE_TOKEN": "d"}
    r = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    assert f"HF_TOKEN={hostile}\n" in target.read_text() and oct(target.stat().st_mode & 0o777) == "0o600"
    assert not list(tmp_path.rglob("PWNED"))


def test_wrapper_exports_values_literally(tmp_path):
    """WITH_SECRETS: each KEY=value line becomes the variable, nothing in it expanded, then the command runs."""
    hostile = "$(touch PWNED) `touch PWNED2` 'q' \"d\" ; a=b *"
    (tmp_path / "env").write_text(f"HF_TOKEN={hostile}\nMY_API_KEY=x=y\n")
    r = subprocess.run(["sh", "-c", WITH_SECRETS, str(tmp_path / "env"), "sh", "-c",
                        'printf "%s|%s" "$HF_TOKEN" "$MY_API_KEY"'], cwd=tmp_path, capture_output=True, text=True,
                       timeout=10)
    assert r.returncode == 0 and r.stdout == f"{hostile}|x=y", r.stderr
    assert not list(tmp_path.rglob("PWNED*"))


# ---------------------------------------------------------------- hashes: rotating a secret recreates its users
def test_rotating_a_secret_changes_the_spec_hash(tmp_path, monkeypatch):
    path = _write_inv(tmp_path, deploy={"api_key": "k"})

    def hashes():
        p = _plan(path)
        d = p.deployment
        return ({h.name: d.engine.container(d, h).spec_hash for h in d.hosts}, d.engine.api_hash(d))
    monkeypatch.setenv("GC_UNIT_HF_TOKEN", "one")
    first, api1 = hashes()
    assert hashes() == (first, api1)                        # stable
    monkeypatch.setenv("GC_UNIT_HF_TOKEN", "two")
    second, api2 = hashes()
    assert all(first[h] != second[h] for h in first) and api1 != api2
    (tmp_path / "db.pw").write_text("rotated\n")            # _write_inv wrote it; rotate only the file now
    third = _plan(path)
    d = third.deployment
    assert {h.name: d.engine.container(d, h).spec_hash for h in d.hosts} != second


def test_a_host_secret_only_changes_that_host(tmp_path, secret_env):
    def specs(value):
        hosts = [{"name": f"h{i}", "address": f"10.0.0.{i + 1}", "gpus": V100,
                  **({"env": {"SERVICE_TOKEN": value}} if i == 1 else {})} for i in range(2)]
        p = _plan(_write_inv(tmp_path, hosts=hosts))
        d = p.deployment
        return {h.name: d.engine.container(d, h).spec_hash for h in d.hosts}
    a, b = specs("one"), specs("two")
    assert a["h0"] == b["h0"] and a["h1"] != b["h1"]


# ---------------------------------------------------------------- the other engines
def _cpu_inv(tmp_path: Path, **deploy) -> Path:
    (tmp_path / "cpu.yaml").write_text("engine: vllm-mp\ndevice: cpu\nimage: vllm/vllm-openai-cpu:v0.32.0\n"
                                       "docker: {shm_size: 1g}\n")
    hosts = [{"name": f"h{i}", "address": f"10.0.0.{i + 1}", "interface": "eth0",
              **({"env": {"SERVICE_TOKEN": HOST_ONLY}} if i == 1 else {})} for i in range(2)]
    return _write_inv(tmp_path, hosts=hosts, deploy={"profile": str(tmp_path / "cpu.yaml"),
                                                     "model": "Qwen/Qwen2.5-0.5B-Instruct", "pipeline_parallel": 1,
                                                     **deploy})


@pytest.mark.parametrize("api_key", [None, "sk-cpu-secret-31"])
def test_mp_nodes_read_one_mounted_file(tmp_path, secret_env, api_key):
    p = _plan(_cpu_inv(tmp_path, **({"api_key": api_key} if api_key else {})))
    assert p.verdict != "fail", [f.as_dict() for f in p.findings]
    _assert_nowhere_but_puts(p, (*VALUES, *([api_key] if api_key else [])))
    head, node = (s for s in p.steps if s.phase == "engine")
    head_file = "api" if api_key else "env"
    for step, file, mount in ((head, head_file, f"/run/gpucluster/{'api.env' if api_key else 'env'}"),
                              (node, "env", "/run/gpucluster/env")):
        run = next(op.argv for op in step.ops if isinstance(op, Cmd))
        assert f"/etc/gpucluster/lab/{file}.env:{mount}:ro" in run
        assert run[run.index("--entrypoint") + 1:][2:5] == ("-c", WITH_SECRETS, mount)
        put = step.ops[0]
        assert isinstance(put, Put) and put.path == f"/etc/gpucluster/lab/{file}.env" and put.mode == 0o600
        assert f"HF_TOKEN={FROM_ENV}\n" in put.content()
    assert ("VLLM_API_KEY=" in head.ops[0].content()) == bool(api_key)
    assert "VLLM_API_KEY=" not in node.ops[0].content() and f"SERVICE_TOKEN={HOST_ONLY}" in node.ops[0].content()


def test_sglang_ranks_read_the_mounted_file(tmp_path, secret_env):
    inv = yaml.safe_load((REPO / "inventories" / "sglang-3node.yaml").read_text())
    inv["deploy"]["env"] = {"HF_TOKEN": {"env": "GC_UNIT_HF_TOKEN"}, "MY_API_KEY": LITERAL}
    (tmp_path / "sg.yaml").write_text(yaml.safe_dump(inv))
    p = _plan(tmp_path / "sg.yaml")
    assert p.verdict != "fail", [f.as_dict() for f in p.findings]
    _assert_nowhere_but_puts(p, (FROM_ENV, LITERAL))
    ranks = [s for s in p.steps if s.phase == "engine"]
    assert ranks
    for step in ranks:
        run = next(op.argv for op in step.ops if isinstance(op, Cmd))
        assert "/etc/gpucluster/a10-lab/env.env:/run/gpucluster/env:ro" in run
        assert "sglang.launch_server" in run and run[run.index("--entrypoint") + 1] == "sh"
        assert f"MY_API_KEY={LITERAL}\n" in step.ops[0].content()


def test_netcheck_agent_gets_no_secret(tmp_path, secret_env):
    p = _plan(_write_inv(tmp_path))
    job = netcheck.make_job(p.deployment, p.deployment.hosts)
    keys = {k for nh in job.hosts for k, _ in nh.env}
    assert "TOKENIZERS_PARALLELISM" in keys and not keys & {"HF_TOKEN", "MY_API_KEY", "DB_PASSWORD", "SERVICE_TOKEN"}
    text = json.dumps([s.as_dict() for s in netcheck.steps(job)])
    for v in VALUES:
        assert v not in text
