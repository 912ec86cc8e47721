"""Secrets in deploy.env on the rig: `up` with HF_TOKEN from the environment and a literal MY_API_KEY; neither value
is in the CLI's output, in `docker inspect` of any container on any host, or in any argv on the hosts (`ps`), and
both are in the environment of the API server and of the Ray processes. Rotating one recreates what uses it."""

from __future__ import annotations

import json

import pytest

from test_lifecycle import gc, inventory, labelled, ran

pytestmark = pytest.mark.rig

TOKEN = "hf_rigEnvSecret_e2e_8c1f2d"
ROTATED = "hf_rigEnvSecret_rotated_55aa"
LITERAL = "s3cr3t-literal-e2e-4242"
CLUSTER = "e2e-envsec"
HEAD = f"gpucluster-{CLUSTER}-ray-head"
WORKER = f"gpucluster-{CLUSTER}-ray-worker"
API_ENV = 'tr "\\0" "\\n" < "/proc/$(cut -d" " -f1 /run/gpucluster-api)/environ"'   # the API server's env


def _no_leak(rig, values: tuple[str, ...], *outputs: str) -> None:
    for text in outputs:
        for v in values:
            assert v not in text, f"{v!r} in the CLI's output"
    for host in rig.host_names():
        ids = rig.docker(host, "ps", "-aq").stdout.split()
        if ids:
            inspect = rig.docker(host, "inspect", *ids).stdout
            for v in values:
                assert v not in inspect, f"{v!r} in docker inspect on {host}"
            assert "HF_TOKEN=" not in inspect and "MY_API_KEY=" not in inspect
        ps = rig.ssh(host, "ps -eo args").stdout
        for v in values:
            assert v not in ps, f"{v!r} on a command line on {host}"


def _env_of(rig, host: str, container: str, script: str) -> dict[str, str]:
    out = rig.docker(host, "exec", container, "sh", "-c", script).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_env_secrets_reach_the_processes_and_nothing_else(rig, tmp_path):
    inv = inventory(rig, tmp_path, name=CLUSTER, hosts=2, tensor_parallel=4, pipeline_parallel=1,
                    env={"HF_TOKEN": {"env": "GC_TEST_HF_TOKEN"}, "MY_API_KEY": LITERAL, "PLAIN_VALUE": "visible"})
    env = {"GC_TEST_HF_TOKEN": TOKEN}
    head, worker = rig.host_names()[:2]
    try:
        views = [gc("plan", str(inv), "--json", env=env), gc("plan", str(inv), "--format", "sh", env=env),
                 gc("up", str(inv), "--dry-run", "--json", env=env)]
        assert all(r.returncode == 0 for r in views), [r.stderr[-2000:] for r in views]
        assert "HF_TOKEN" in views[1].stdout and '"$HF_TOKEN"' in views[1].stdout     # the runbook names it
        up = gc("up", str(inv), "--yes", "--json", env=env)
        assert up.returncode == 0, up.stderr[-3000:]
        more = [gc("status", str(inv), "--json", env=env), gc("logs", str(inv), "--tail", "200", env=env)]
        _no_leak(rig, (TOKEN, LITERAL), *(r.stdout + r.stderr for r in (*views, up, *more)))

        # where they must be: the API server (docker exec --env-file) and Ray on every node (the mounted file)
        api = _env_of(rig, head, HEAD, API_ENV)
        assert api.get("HF_TOKEN") == TOKEN and api.get("MY_API_KEY") == LITERAL and api.get("PLAIN_VALUE") == "visible"
        for host, name in ((head, HEAD), (worker, WORKER)):
            ray = _env_of(rig, host, name, 'tr "\\0" "\\n" < /proc/1/environ')
            assert ray.get("HF_TOKEN") == TOKEN and ray.get("MY_API_KEY") == LITERAL
            mode = rig.ssh(host, f"stat -c %a /etc/gpucluster/{CLUSTER}/env.env").stdout.strip()
            assert mode == "600"
        plain = rig.docker(head, "inspect", "--format", "{{json .Config.Env}}", HEAD).stdout
        assert "PLAIN_VALUE=visible" in plain                        # a plain value still goes to -e

        # a second up changes nothing; a rotated secret recreates what uses it
        before = labelled(rig, CLUSTER)
        again = gc("up", str(inv), "--yes", "--json", env=env)
        assert again.returncode == 0 and json.loads(again.stdout)["changed"] is False, again.stdout[-3000:]
        assert labelled(rig, CLUSTER) == before
        rotated = gc("up", str(inv), "--yes", "--json", env={"GC_TEST_HF_TOKEN": ROTATED})
        assert rotated.returncode == 0, rotated.stderr[-3000:]
        changed = ran(json.loads(rotated.stdout))
        assert changed.get(f"{head}/ray-head") == "replace" and f"{head}/api" in changed, changed
        _no_leak(rig, (TOKEN, ROTATED, LITERAL), rotated.stdout + rotated.stderr)
        assert _env_of(rig, head, HEAD, API_ENV).get("HF_TOKEN") == ROTATED
        assert _env_of(rig, worker, WORKER, 'tr "\\0" "\\n" < /proc/1/environ').get("HF_TOKEN") == ROTATED
    finally:
        dn = gc("down", str(inv), "--yes", env={"GC_TEST_HF_TOKEN": ROTATED})
        assert dn.returncode == 0, dn.stderr
    assert labelled(rig, CLUSTER) == {}
    for host in (head, worker):
        assert rig.ssh(host, f"test -e /etc/gpucluster/{CLUSTER}", check=False).returncode != 0
