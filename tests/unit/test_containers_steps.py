"""docker argv, the API launcher, plan steps and the runbook: hostile values stay single argv elements; hashes."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from cluster.errors import ConfigError
import yaml

from cluster import containers as dk
from cluster import ops, render
from cluster.engines import vllm_ray
from cluster.executor import Executor
from cluster.steps import Cmd, Step, decide

HOSTILE = ["x; touch PWNED", "$(touch PWNED)", "`touch PWNED`", "a'b\"c", "line1\nline2; touch PWNED",
           "two words", "--model=/etc/passwd", "*", ""]


def _spec(**kw) -> dk.ContainerSpec:
    base = dict(cluster="lab", role="ray-head", node="head", image="vllm/vllm-openai:v0.3.0", entrypoint="ray",
                command=("start", "--head", "--block"), env=(("A", "1"),), mounts=(("/data/m", "/models/m", "ro"),),
                shm_size="4g")
    base.update(kw)
    return dk.ContainerSpec(**base)


@pytest.mark.parametrize("value", HOSTILE)
def test_run_argv_keeps_env_values_whole(value):
    argv = list(dk.run_argv(_spec(env=(("EVIL", value),))))
    assert f"EVIL={value}" in argv
    assert shlex.split(shlex.join(argv)) == argv


def test_run_argv_shape():
    spec = _spec()
    argv = list(dk.run_argv(spec))
    assert argv[:5] == ["docker", "run", "-d", "--name", "gpucluster-lab-ray-head"]
    assert argv[argv.index("--entrypoint") + 1:] == ["ray", spec.image, "start", "--head", "--block"]
    assert ["-v", "/data/m:/models/m:ro"] == argv[argv.index("-v"):argv.index("-v") + 2]
    labels = [argv[i + 1] for i, a in enumerate(argv) if a == "--label"]
    assert labels == ["gpucluster.cluster=lab", "gpucluster.role=ray-head", "gpucluster.node=head",
                      f"gpucluster.spec={spec.spec_hash}"]


def _launcher_in(tmp: Path) -> str:
    # API_LAUNCHER is built from LOG_DIR/API_STATE/API_LOG at import: swap the paths in its text.
    text = vllm_ray.API_LAUNCHER
    for old in (vllm_ray.API_LOG, vllm_ray.API_STATE, vllm_ray.LOG_DIR):   # longest first: API_LOG holds LOG_DIR
        assert old in text
    text = text.replace(vllm_ray.API_LOG, str(tmp / "log" / "api.log")).replace(vllm_ray.API_STATE, str(tmp / "state"))
    return text.replace(vllm_ray.LOG_DIR, str(tmp / "log"))


def test_launcher_runs_argv_literally(tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    local = ["sh", "-c", _launcher_in(tmp_path), "0123abcd", "printf", "%s\\n", *HOSTILE]
    r = subprocess.run(local, cwd=work, capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    printed = (tmp_path / "log" / "api.log").read_text()
    assert printed == "".join(v + "\n" for v in HOSTILE)
    pid, spec_hash = (tmp_path / "state").read_text().split()
    assert spec_hash == "0123abcd" and pid.isdigit()
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
    i, p = ops.load(str(path))
    return ops.make_plan(i, p)


def _argvs(step: Step) -> list[tuple[str, ...]]:
    return [op.argv for op in step.all_ops() if isinstance(op, Cmd)]


def test_plan_steps_keep_hostile_values_whole(tmp_path):
    name = "x; touch PWNED"
    env = {"EVIL": "$(id) 'q' \"d\"\nnext line"}
    p = _plan(tmp_path, served_model_name=name, env=env)
    api = _argvs(next(s for s in p.steps if s.phase == "api"))[0]
    assert api[api.index("--served-model-name") + 1] == name
    for s in p.steps:
        for argv in _argvs(s) + ([s.check.argv] if s.check else []):
            assert shlex.split(shlex.join(argv)) == list(argv)
    ray = [s for s in p.steps if s.id.endswith(("/ray-head", "/ray-worker"))]
    assert len(ray) == 2
    for s in ray:
        assert f"EVIL={env['EVIL']}" in _argvs(s)[0]
    head, worker = (_argvs(s)[0] for s in ray)
    assert "VLLM_HOST_IP=10.0.0.1" in head and "VLLM_HOST_IP=10.0.0.2" in worker
    assert "NCCL_SOCKET_IFNAME=eth0" in worker and "GLOO_SOCKET_IFNAME=eth0" in worker


def _run_runbook(tmp_path: Path, script: str, answer: str = "") -> Path:
    """Run a `plan --format sh` runbook with docker and curl stubbed out (no traffic), files under tmp_path."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    for tool in ("docker", "curl"):
        (bin_dir / tool).write_text(f"#!/bin/sh\nprintf '%s\\0' {tool} \"$@\" >> {tmp_path}/calls.log\n"
                                    f'[ {tool} = curl ] && cat {tmp_path}/answer\nexit 0\n')
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "answer").write_text(answer)     # what the API "answers" (the runbook checks it)
    (tmp_path / "runbook.sh").write_text(script)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "GPUCLUSTER_TRANSFER_TOKEN": "t"}
    r = subprocess.run(["bash", str(tmp_path / "runbook.sh")], cwd=work, env=env, capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 0, r.stderr[-2000:]
    return work


def test_runbook_with_hostile_served_name_runs_nothing_extra(tmp_path):
    p = _plan(tmp_path, served_model_name="x; touch PWNED $(touch PWNED2)", env={"E": "`touch PWNED3`"})
    root = tmp_path / "root"     # every path the runbook writes, moved under tmp_path
    text = render.runbook(p).replace("/var/lib/gpucluster", f"{root}/var").replace("/Data/models", f"{root}/models")
    text = text.replace("/tmp/gpucluster-", f"{root}/lock-")
    work = _run_runbook(tmp_path, text, answer=json.dumps({"data": [{"id": p.served_name}], "choices": []}))
    assert list(work.iterdir()) == []
    calls = (tmp_path / "calls.log").read_text().split("\0")
    assert "x; touch PWNED $(touch PWNED2)" in calls          # the api step ran, with the name as one argument
    assert "E=`touch PWNED3`" in calls
    assert calls[-2:] == ["http://10.0.0.1:8000/v1/completions", ""]   # it ran to the end
    assert not any(p.name.startswith("PWNED") for p in tmp_path.rglob("*"))


def test_runbook_comments_cannot_be_escaped_by_newlines(tmp_path):
    # a control character in deploy.model is refused at load time...
    with pytest.raises(ConfigError):
        _plan(tmp_path, model="org/m\ntouch PWNED")
    # ...and comment text is flattened to one line whatever reaches the renderer
    assert render.comment("a\nrm -rf /\r\nb") == "a rm -rf / b"


# ---------------------------------------------------------------- hashes, labels, drift
CHANGES = {
    "cluster": "other", "role": "ray-worker", "node": "worker", "image": "vllm/vllm-openai:v0.6.3", "entrypoint": "bash",
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


def test_api_spec_hash_covers_argv_and_the_key_value(tmp_path):
    """A rotated api_key changes the API server's spec (so `up` restarts it); the key itself is never in it."""
    p1 = _plan(tmp_path, api_key="sk-one")
    p2 = _plan(tmp_path, api_key="sk-two")
    p3 = _plan(tmp_path, api_key="sk-one", served_model_name="other")
    hashes = [vllm_ray.ENGINE.api_hash(p.deployment) for p in (p1, p2, p3)]
    assert len(set(hashes)) == 3
    assert vllm_ray.ENGINE.api_hash(_plan(tmp_path, api_key="sk-one").deployment) == hashes[0]
    dumped = str([s.as_dict() for s in p1.steps])
    assert "sk-one" not in dumped and "VLLM_API_KEY" in dumped


def test_container_check_decides_like_docker_would(tmp_path):
    """The check's Go template, filled by docker, gives the decision; here the filled-in outputs docker prints."""
    spec = _spec()
    step = dk.container_step(spec, host="h1", phase="ray-head", reason="r")
    template = step.check.argv[step.check.argv.index("--format") + 1]
    assert spec.spec_hash in template and '"lab"' in template
    assert decide(step, 0, f"skip running, spec {spec.spec_hash}").action == "skip"
    assert decide(step, 0, "start container is exited").variant == "start"
    assert decide(step, 0, "replace spec changed (a -> b)").variant == "replace"
    assert decide(step, 0, "fail a container named x exists and is not gpucluster's").action == "fail"
    missing = decide(step, 1, "")
    assert missing.action == "run" and missing.variant is None
    assert step.variants["replace"][0].argv == ("docker", "rm", "-f", spec.name)


def test_strays_keep_only_what_the_plan_runs_on_that_host(tmp_path):
    """A host that left the deployment keeps nothing, though its old container has the same name as a kept one."""
    p = _plan(tmp_path, tensor_parallel=4, pipeline_parallel=1)
    q = _plan(tmp_path, tensor_parallel=2, pipeline_parallel=1)       # h1 leaves
    keep = [{s.host: s.keep for s in plan.steps if s.phase == "strays"} for plan in (p, q)]
    assert keep[0] == {"h0": ("gpucluster-lab-ray-head",), "h1": ("gpucluster-lab-ray-worker",)}
    assert keep[1] == {"h0": ("gpucluster-lab-ray-head",), "h1": ()}
    strays = next(s for s in q.steps if s.id == "h1/strays")
    assert decide(strays, 0, "gpucluster-lab-ray-worker\n").extra == ("gpucluster-lab-ray-worker",)
    assert decide(next(s for s in p.steps if s.id == "h1/strays"), 0, "gpucluster-lab-ray-worker\n").action == "skip"


def _cpu_plan(tmp_path: Path, **deploy):
    (tmp_path / "cpu.yaml").write_text("engine: vllm-mp\ndevice: cpu\nimage: vllm/vllm-openai-cpu:v0.32.0\n"
                                       "docker: {shm_size: 1g}\n")
    inv = {"cluster": {"name": "lab"},
           "hosts": [{"name": f"h{i}", "address": f"10.0.0.{i + 1}", "interface": "eth0"} for i in range(2)],
           "deploy": {"profile": str(tmp_path / "cpu.yaml"), "model": "Qwen/Qwen2.5-0.5B-Instruct",
                      "tensor_parallel": 2, **deploy}}
    path = tmp_path / "cpu-inv.yaml"
    path.write_text(yaml.safe_dump(inv))
    return ops.make_plan(*ops.load(str(path)))


def test_multi_node_without_ray_on_cpu_hosts(tmp_path):
    p = _cpu_plan(tmp_path, api_key="sk-cpu-secret")
    assert p.verdict != "fail", [f.as_dict() for f in p.findings]
    nodes = [s for s in p.steps if s.phase == "engine"]
    head, node = (_argvs(s)[0] for s in nodes)
    for argv, rank in ((head, "0"), (node, "1")):
        assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--node-rank") + 1] == rank
        assert argv[argv.index("--master-addr") + 1] == "10.0.0.1"
        assert "--gpus" not in argv and "GLOO_SOCKET_IFNAME=eth0" in argv
        assert argv[argv.index("--distributed-executor-backend") + 1] == "mp" and "ray" not in argv
    assert "--headless" in node and "--headless" not in head
    assert "/etc/gpucluster/lab/api.env:/run/gpucluster/api.env:ro" in head      # the key: a mounted 0600 file
    assert "sk-cpu-secret" not in str([s.as_dict() for s in p.steps])
    assert nodes[0].after == ("h1/vllm-node-1",) and nodes[1].after == ("h0/vllm-head",)
    assert not any(f.code in ("compute-capability", "driver-too-old", "bf16-unsupported") for f in p.findings)


def test_ray_on_a_cpu_build_is_refused_with_the_engine_that_works(tmp_path):
    (tmp_path / "ray.yaml").write_text("engine: vllm\ndevice: cpu\nimage: vllm/vllm-openai-cpu:v0.32.0\n")
    p = _cpu_plan(tmp_path, profile=str(tmp_path / "ray.yaml"))
    f = next(f for f in p.findings if f.code == "ray-unsupported")
    assert p.verdict == "fail" and "vllm-mp" in f.fix


class _Canned(Executor):
    """An executor whose checks answer from a table (no host): what evaluate() makes of the answers."""

    def __init__(self, answers):
        super().__init__(None)
        self.answers = answers

    def check(self, step):
        return decide(step, 0, self.answers[step.id])


@pytest.mark.parametrize("copy, expect", [("skip complete", ("skip", "skip", "skip")),
                                          ("run missing files", ("run", "run", "run"))])
def test_dry_run_follows_needed_by_and_after(copy, expect):
    rm = (Cmd(argv=("docker", "rm", "-f", "srv")),)
    serve = Step(id="h1/model-serve", host="h1", phase="a", reason="r", ops=(Cmd(argv=("docker", "run")),),
                 needed_by=("h2/model",))
    model = Step(id="h2/model", host="h2", phase="b", reason="r", ops=(Cmd(argv=("sync",)),))
    stop = Step(id="h1/stop", host="h1", phase="c", reason="r", ops=rm, after=("h1/model-serve",),
                variants={"restart": rm})
    answers = {"h1/model-serve": "run absent", "h2/model": copy, "h1/stop": "skip nothing to remove"}
    got = [o.status.replace("would-", "") for o in _Canned(answers).evaluate([serve, model, stop]).outcomes]
    assert tuple(got) == expect


def test_ctrl_c_names_the_phase_and_the_steps_cut_short(tmp_path):
    """SIGINT while a step runs: one Interrupted line naming the phase and the running step; later phases never ran."""
    import signal
    import threading
    from cluster.errors import Interrupted
    from cluster.steps import CONTROL
    later = tmp_path / "later-ran"
    steps = [Step(id=f"{CONTROL}/quick", host=CONTROL, phase="first", reason="q", ops=(Cmd(argv=("true",)),)),
             Step(id=f"{CONTROL}/slow", host=CONTROL, phase="second", reason="s", ops=(Cmd(argv=("sleep", "20")),)),
             Step(id=f"{CONTROL}/later", host=CONTROL, phase="third", reason="l",
                  ops=(Cmd(argv=("touch", str(later))),))]
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(Interrupted) as e:
            Executor(None).execute(steps)
    finally:
        timer.cancel()
    assert e.value.exit_code == 130
    assert "in phase second; steps cut short: control/slow;" in str(e.value), str(e.value)
    assert not later.exists()
