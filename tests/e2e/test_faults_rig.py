"""Faults after bring-up, on one running deployment (2 hosts), each injected on the rig with real tools: a worker or
the head container killed, the API server process killed in its container, a worker's dockerd restarted (a reboot).
`status` names host and cause (unhealthy even where /health answers 200), and a second `up` repairs the deployment.
Every fault test prints a FAULT line: fault | what the user saw | what the second up did (test_faults_during_up_rig.py
has the faults during `up`)."""

from __future__ import annotations

import json
import subprocess
import urllib.error
from pathlib import Path

import pytest

from test_lifecycle import REPO, chat, gc, inventory, labelled, ran

pytestmark = pytest.mark.rig
RIG = REPO / "tests" / "rig" / "rig"
MODEL = "gpucluster/tiny-qwen2"


def last_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("gpucluster: error:")]
    assert lines, r.stderr[-3000:]
    return lines[-1]


def up_json(inv: Path, *extra: str) -> dict:
    r = gc("up", str(inv), "--yes", "--json", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def status(inv: Path) -> tuple[int, dict]:
    r = gc("status", str(inv), "--json")
    return r.returncode, json.loads(r.stdout)


def serving(inv: Path, endpoint: str) -> None:
    code, st = status(inv)
    assert code == 0 and st["healthy"], st["problems"]
    assert MODEL in chat(endpoint, MODEL)


def report(fault: str, saw: str, repair: str) -> None:
    print(f"\nFAULT {fault} | saw: {saw} | second up: {repair}")


# ---------------------------------------------------------------- faults after bring-up (one deployment, 2 hosts)
@pytest.fixture(scope="module")
def deployed(rig, tmp_path_factory):
    inv = inventory(rig, tmp_path_factory.mktemp("faults"), name="e2e-faults", hosts=2, tensor_parallel=4)
    first = up_json(inv)
    yield inv, first["endpoint"]
    dn = gc("down", str(inv), "--yes")
    assert dn.returncode == 0, dn.stderr
    assert labelled(rig, "e2e-faults") == {}


def test_worker_container_killed(rig, deployed):
    inv, endpoint = deployed
    rig.docker("h2", "kill", "gpucluster-e2e-faults-ray-worker")
    code, st = status(inv)
    assert code == 1 and "h2: the worker container is not running" in st["problems"], st["problems"]
    with pytest.raises(urllib.error.HTTPError) as dead:     # the engine's workers on h2 are gone with it
        chat(endpoint, MODEL)
    assert dead.value.code == 500
    again = up_json(inv)
    assert ran(again) == {"h2/ray-worker": "start", "h1/api": "restart"}, again["steps"]
    serving(inv, endpoint)
    report("worker container killed (docker kill)", "status: h2: the worker container is not running; "
           "completions HTTP 500", "started h2's worker, restarted the API server; healthy")


def test_api_server_process_crashed(rig, deployed):
    inv, endpoint = deployed
    rig.docker("h1", "exec", "gpucluster-e2e-faults-ray-head", "pkill", "-9", "-f", "vllm.entrypoints.openai")
    code, st = status(inv)
    assert code == 1 and "h1: the API server process is not running" in st["problems"], st["problems"]
    again = up_json(inv)
    assert ran(again) == {"h1/api": "run"}, again["steps"]
    serving(inv, endpoint)
    report("API server process killed (kill -9 in the head container)",
           "status: h1: the API server process is not running", "started the API server; healthy")


def test_head_container_killed(rig, deployed):
    inv, endpoint = deployed
    before = labelled(rig, "e2e-faults")
    rig.docker("h1", "kill", "gpucluster-e2e-faults-ray-head")
    code, st = status(inv)
    assert code == 1 and "h1: the head container is not running" in st["problems"], st["problems"]
    again = up_json(inv)
    # the worker joined the old head's Ray cluster: it is restarted against the new one, then the API server
    # (the worker may have exited by itself when its head died: then it is started, else restarted)
    assert ran(again) in ({"h1/ray-head": "start", "h2/ray-worker": v, "h1/api": "run"} for v in ("start", "restart")), \
        again["steps"]
    assert labelled(rig, "e2e-faults") == {k: {**v, "status": "running"} for k, v in before.items()}
    serving(inv, endpoint)
    assert len(status(inv)[1]["engine"]["ray"]["nodes"]) == 2
    report("head container killed (docker kill)", "status: h1: the head container is not running",
           f"started the head, {ran(again)['h2/ray-worker']}ed h2's worker against it, started the API server; healthy")


def test_dockerd_restarted_on_a_worker(rig, deployed):
    inv, endpoint = deployed
    r = subprocess.run([str(RIG), "restart-docker", "--dir", rig.dir, "h2"], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    code, st = status(inv)
    assert code == 1 and "h2: the worker container is not running" in st["problems"], st["problems"]
    again = up_json(inv)
    assert ran(again) == {"h2/ray-worker": "start", "h1/api": "restart"}, again["steps"]
    serving(inv, endpoint)
    report("dockerd restarted on h2 (a reboot: its containers exited)",
           "status: h2: the worker container is not running", "started h2's worker, restarted the API server; healthy")
