"""docker argv, the API launcher and plan steps: hostile values stay single argv elements; hashes and drift."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from cluster.errors import ConfigError
import yaml

from cluster import cli, core, docker as dk

HOSTILE = ["x; touch PWNED", "$(touch PWNED)", "`touch PWNED`", "a'b\"c", "line1\nline2; touch PWNED",
           "two words", "--model=/etc/passwd", "*", ""]


def _spec(**kw) -> dk.ContainerSpec:
    base = dict(cluster="lab", role="ray-head", image="vllm/vllm-openai:v0.3.0", entrypoint="ray",
                command=("start", "--head", "--block"), env=(("A", "1"),), mounts=(("/data/m", "/models/m", "ro"),),
                shm_size="4g")
    base.update(kw)
    return dk.ContainerSpec(**base)


@pytest.mark.parametrize("value", HOSTILE)
def test_run_argv_keeps_env_values_whole(value):
    argv = dk.run_argv(_spec(env=(("EVIL", value),)))
    assert f"EVIL={value}" in argv
    assert shlex.split(shlex.join(argv)) == argv


def test_run_argv_shape():
    spec = _spec()
    argv = dk.run_argv(spec)
    assert argv[:5] == ["docker", "run", "-d", "--name", "gpucluster-lab-ray-head"]
    assert argv[argv.index("--entrypoint") + 1:] == ["ray", spec.image, "start", "--head", "--block"]
    assert ["-v", "/data/m:/models/m:ro"] == argv[argv.index("-v"):argv.index("-v") + 2]
    labels = [argv[i + 1] for i, a in enumerate(argv) if a == "--label"]
    assert labels == ["gpucluster.cluster=lab", "gpucluster.role=ray-head", f"gpucluster.spec={spec.spec_hash}"]


@pytest.mark.parametrize("value", HOSTILE)
def test_exec_argv_keeps_api_argv_whole(value):
    api = dk.ApiSpec(container="gpucluster-lab-ray-head", argv=("python3", "--served-model-name", value))
    argv = api.exec_argv()
    assert argv[-3:] == ["python3", "--served-model-name", value]
    assert argv[argv.index("-c") + 1] == dk.API_LAUNCHER
    assert shlex.split(shlex.join(argv)) == argv


def _launcher_in(tmp: Path) -> str:
    # API_LAUNCHER is built from LOG_DIR/API_STATE/API_LOG at import: swap the paths in its text.
    text = dk.API_LAUNCHER
    for old in (dk.API_LOG, dk.API_STATE, dk.LOG_DIR):   # longest first: API_LOG contains LOG_DIR
        assert old in text
    text = text.replace(dk.API_LOG, str(tmp / "log" / "api.log")).replace(dk.API_STATE, str(tmp / "state"))
    return text.replace(dk.LOG_DIR, str(tmp / "log"))


def test_launcher_runs_argv_literally(tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    api = dk.ApiSpec(container="c", argv=("printf", "%s\\n", *HOSTILE))
    argv = api.exec_argv()
    i = argv.index("sh")
    local = ["sh", "-c", _launcher_in(tmp_path), *argv[i + 3:]]     # spec hash and argv as docker exec gives them
    r = subprocess.run(local, cwd=work, capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    printed = (tmp_path / "log" / "api.log").read_text()
    assert printed == "".join(v + "\n" for v in HOSTILE)
    pid, spec_hash = (tmp_path / "state").read_text().split()
    assert spec_hash == api.spec_hash and pid.isdigit()
    assert list(work.iterdir()) == []
    assert not any(p.name.startswith("PWNED") for p in tmp_path.rglob("*"))


def _plan(tmp_path: Path, **deploy):
    inv = {"cluster": {"name": "lab", "model_dir": "/Data/models"},
           "hosts": [{"name": f"h{i}", "address": f"10.0.0.{i + 1}", "interface": "eth0",
                      "gpus": {"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160,
                               "compute_capability": "7.0"}} for i in range(2)],
           "deploy": {"profile": "vllm-v0.6.3", "model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel": 2,
                      "pipeline_parallel": 2, "engine_args": {"max-model-len": 4096}, **deploy}}
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inv))
    i, p = core.load(str(path))
    return core.make_plan(i, p)


def test_plan_steps_keep_hostile_values_whole(tmp_path):
    name = "x; touch PWNED"
    env = {"EVIL": "$(id) 'q' \"d\"\nnext line"}
    p = _plan(tmp_path, served_model_name=name, env=env)
    api = next(s for s in p.steps if s.phase == "api")
    assert api.argv[api.argv.index("--served-model-name") + 1] == name
    for s in p.steps:
        assert shlex.split(shlex.join(s.argv)) == list(s.argv)
    ray = [s for s in p.steps if s.phase in ("ray-head", "ray-workers")]
    assert len(ray) == 2
    for s in ray:
        assert f"EVIL={env['EVIL']}" in s.argv
    head, worker = (s.argv for s in ray)
    assert "VLLM_HOST_IP=10.0.0.1" in head and "VLLM_HOST_IP=10.0.0.2" in worker
    assert "NCCL_SOCKET_IFNAME=eth0" in worker and "GLOO_SOCKET_IFNAME=eth0" in worker


def _run_runbook(tmp_path: Path, script: str) -> Path:
    """Run a `plan --format sh` runbook with docker, curl, rsync and ssh stubbed out (no traffic)."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    for tool in ("docker", "curl", "rsync", "ssh"):
        (bin_dir / tool).write_text(f"#!/bin/sh\nprintf '%s\\0' {tool} \"$@\" >> {tmp_path}/calls.log\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "runbook.sh").write_text(script)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["bash", str(tmp_path / "runbook.sh")], cwd=work, env=env, capture_output=True, text=True,
                   timeout=20)
    return work


def test_runbook_with_hostile_served_name_runs_nothing_extra(tmp_path):
    p = _plan(tmp_path, served_model_name="x; touch PWNED $(touch PWNED2)", env={"E": "`touch PWNED3`"})
    work = _run_runbook(tmp_path, cli.render_sh(p))
    assert list(work.iterdir()) == []
    calls = (tmp_path / "calls.log").read_text().split("\0")
    assert "x; touch PWNED $(touch PWNED2)" in calls          # the api step ran, with the name as one argument
    assert "E=`touch PWNED3`" in calls
    assert calls[-4:] == ["curl", "-fsS", "http://10.0.0.1:8000/health", ""]   # it ran to the end


def test_runbook_comments_cannot_be_escaped_by_newlines(tmp_path):
    # a control character in deploy.model is refused at load time...
    with pytest.raises(ConfigError):
        _plan(tmp_path, model="org/m\ntouch PWNED")
    # ...and comment text is flattened to one line whatever reaches the renderer
    assert cli._comment("a\nrm -rf /\r\nb") == "a rm -rf / b"


# ---------------------------------------------------------------- hashes, labels, drift
CHANGES = {
    "cluster": "other", "role": "ray-worker", "image": "vllm/vllm-openai:v0.6.3", "entrypoint": "bash",
    "command": ("start",), "env": (("A", "2"),), "env_file": "/etc/x.env", "mounts": (("/a", "/b", "rw"),),
    "network": "bridge", "ipc": None, "shm_size": "8g", "gpus": None, "privileged": True, "extra_hash": "abc",
}


def test_every_container_field_is_covered():
    assert set(CHANGES) == {f.name for f in dataclasses.fields(dk.ContainerSpec)}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_container_hash_changes_with_each_field(field):
    a = _spec()
    b = dataclasses.replace(a, **{field: CHANGES[field]})
    assert a.spec_hash != b.spec_hash
    assert _spec().spec_hash == a.spec_hash                         # stable for equal specs
    assert len(a.spec_hash) == 16 and int(a.spec_hash, 16) >= 0


@pytest.mark.parametrize("field, value", [("container", "other"), ("argv", ("python3", "-V")),
                                          ("env_file", "/etc/k.env"), ("extra_hash", "secret-digest")])
def test_api_hash_changes_with_each_field(field, value):
    a = dk.ApiSpec(container="c", argv=("python3",))
    assert a.spec_hash == dk.ApiSpec(container="c", argv=("python3",)).spec_hash
    assert dataclasses.replace(a, **{field: value}).spec_hash != a.spec_hash
    assert {f.name for f in dataclasses.fields(dk.ApiSpec)} == {"container", "argv", "env_file", "extra_hash"}


def _seen(spec, *, running=True, status="running", **labels):
    base = dict(spec.labels())
    base.update(labels)
    return dk.Observed(name=spec.name, id="abc", running=running, status=status, labels=base)


def test_drift():
    spec = _spec()
    assert dk.drift(spec, None).startswith("create:")
    foreign = dk.Observed(name=spec.name, id="x", running=True, status="running", labels={})
    assert dk.drift(spec, foreign).startswith("replace:") and "not labelled for cluster lab" in dk.drift(spec, foreign)
    other_cluster = _seen(spec, **{"gpucluster.cluster": "else"})
    assert "not labelled for cluster lab" in dk.drift(spec, other_cluster)
    changed = _seen(spec, **{"gpucluster.spec": "0000000000000000"})
    assert dk.drift(spec, changed) == f"replace: spec changed (0000000000000000 -> {spec.spec_hash})"
    assert dk.drift(spec, _seen(spec, running=False, status="exited")) == "start: container is exited"
    assert dk.drift(spec, _seen(spec)) is None
