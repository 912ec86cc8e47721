"""gpucluster up / status / logs / down on the rig: real sshd, Docker daemons, registry, HF mirror, Ray.

The engine inside the images is the rig's vLLM stand-in (tests/rig/image): everything else is real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.rig
REPO = Path(__file__).resolve().parents[2]


def gc(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI as a user would."""
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def inventory(rig, tmp_path: Path, *, name: str, hosts: int, **deploy) -> Path:
    data = yaml.safe_load(Path(rig.inventory).read_text())
    data["cluster"]["name"] = name
    data["hosts"] = data["hosts"][:hosts]
    data["deploy"].update(deploy)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def host_docker(rig, name: str):
    import docker
    return docker.DockerClient(base_url=f"unix://{rig.docker_socket(name)}")


def labelled(rig, cluster: str) -> dict[str, dict[str, str]]:
    """Container name -> id of this cluster's labelled containers on every rig host (read directly)."""
    out = {}
    for host in rig.host_names():
        for c in host_docker(rig, host).containers.list(all=True, filters={"label": f"gpucluster.cluster={cluster}"}):
            out[f"{host}/{c.name}"] = {"id": c.id, "status": c.status}
    return out


def chat(endpoint: str, model: str, *, key: str | None = None, stream: bool = False) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello from the test"}], "stream": stream}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"{endpoint}/chat/completions", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read().decode()


def ran(report: dict) -> dict[str, str]:
    """Steps that changed something in an `up --json` report: id -> variant (run when none)."""
    return {o["id"]: o.get("variant", "run") for o in report["steps"]
            if o["status"] == "ran"
            and not o["id"].endswith(("/lock", "/unlock", "-joined", "/image-check", "/record"))
            and not o["id"].startswith("control/")}


def _up(inv: Path, *extra: str) -> dict:
    r = gc("up", str(inv), "--yes", "--json", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def _cycle(rig, inv: Path, cluster: str, *, key: str | None = None, env: dict | None = None) -> dict:
    """up, answer, status, second up unchanged, logs, down: the whole runbook on one inventory."""
    t0 = time.time()
    first = _up(inv)
    t_up = time.time() - t0
    served = first["served_model_name"]
    assert served in chat(first["endpoint"], served, key=key)
    assert "data: [DONE]" in chat(first["endpoint"], served, key=key, stream=True)

    st = gc("status", str(inv), "--json")
    assert st.returncode == 0, st.stdout + st.stderr
    status = json.loads(st.stdout)
    assert status["healthy"] and served in status["api"]["models"]
    assert len(status["engine"]["ray"]["nodes"]) == len(first["topology"]["nodes"])

    before = labelled(rig, cluster)
    assert len(before) == len(first["topology"]["nodes"])
    t1 = time.time()
    second = _up(inv)
    t_again = time.time() - t1
    assert second["changed"] is False, second["steps"]
    assert labelled(rig, cluster) == before, "a second up must not recreate containers"

    logs = gc("logs", str(inv), "--component", "api", "--tail", "50")
    assert logs.returncode == 0 and "Uvicorn running" in logs.stdout, logs.stdout[-2000:] + logs.stderr

    t2 = time.time()
    dn = gc("down", str(inv), "--yes")
    t_down = time.time() - t2
    assert dn.returncode == 0, dn.stderr
    assert labelled(rig, cluster) == {}
    st = gc("status", str(inv), "--json")
    assert st.returncode == 1 and not json.loads(st.stdout)["healthy"]
    timings = {"up": round(t_up, 1), "up_again": round(t_again, 1), "down": round(t_down, 1),
               "phases": first["phases"], "phases_again": second["phases"]}
    print(f"\nTIMINGS {cluster}: {json.dumps(timings)}")
    return first


def test_single_host_tp2(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-one", hosts=1, tensor_parallel=2, pipeline_parallel=1)
    first = _cycle(rig, inv, "e2e-one")
    assert first["topology"]["nodes"] == ["h1"] and first["topology"]["tensor_parallel"] == 2


def test_three_hosts_v030_tp_across_nodes(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-tp6", hosts=3, profile="vllm-v0.3.0", tensor_parallel=6,
                    pipeline_parallel=1)
    first = _cycle(rig, inv, "e2e-tp6")
    assert first["topology"]["nodes"] == ["h1", "h2", "h3"]


def test_three_hosts_v063_pp_across_nodes(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-pp3", hosts=3, profile="vllm-v0.6.3", tensor_parallel=2,
                    pipeline_parallel=3)
    first = _cycle(rig, inv, "e2e-pp3")
    assert first["topology"]["pipeline_parallel"] == 3


def test_api_key_end_to_end_and_never_printed(rig, tmp_path):
    key = "sk-rig-secret-4242"
    inv = inventory(rig, tmp_path, name="e2e-key", hosts=1, api_key={"env": "RIG_TEST_KEY"})
    env = {"RIG_TEST_KEY": key}
    r = gc("up", str(inv), "--yes", env=env)
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        assert key not in r.stdout + r.stderr
        endpoint = f"http://{rig.address('h1')}:8000/v1"
        with pytest.raises(urllib.error.HTTPError) as denied:
            chat(endpoint, "gpucluster/tiny-qwen2")
        assert denied.value.code == 401
        assert "gpucluster/tiny-qwen2" in chat(endpoint, "gpucluster/tiny-qwen2", key=key)
        # not on any command line on the host: look at every process's argv in the host's containers
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert key not in ps
        for cmd in (["status", str(inv)], ["logs", str(inv), "--tail", "200"], ["plan", str(inv), "--json"]):
            out = gc(*cmd, env=env)
            assert key not in out.stdout + out.stderr
    finally:
        assert gc("down", str(inv), "--yes", env=env).returncode == 0


def test_change_recreates_only_what_changed_and_dead_container_restarts(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-drift", hosts=2, tensor_parallel=4, pipeline_parallel=1)
    try:
        _up(inv)
        before = labelled(rig, "e2e-drift")
        # an engine arg change restarts only the API server: no container is recreated
        changed = _up(inv, "--set", "max-model-len=2048")
        assert ran(changed) == {"h1/api": "replace"}, changed["steps"]
        assert labelled(rig, "e2e-drift") == before
        # a worker that died is started again, the same container; the API server restarts with the engine's
        # Ray workers (those on the dead node are gone)
        worker = next(k for k in before if "worker" in k)
        host, name = worker.split("/")
        host_docker(rig, host).containers.get(name).kill()
        again = _up(inv, "--set", "max-model-len=2048")
        assert ran(again) == {f"{host}/ray-worker": "start", "h1/api": "restart"}, again["steps"]
        assert labelled(rig, "e2e-drift")[worker]["id"] == before[worker]["id"]
    finally:
        assert gc("down", str(inv), "--yes").returncode == 0


def test_second_concurrent_up_refuses(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-lock", hosts=1)
    lease = Path("/var/lib/gpucluster/e2e-lock.lease")   # the lease lives on the head; rig hosts share its files
    lease.unlink(missing_ok=True)                         # one an interrupted earlier run left
    first = subprocess.Popen([sys.executable, "-m", "cluster", "up", str(inv), "--yes", "--quiet"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not lease.is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert lease.is_file(), "the first up never took the lease"
        second = gc("up", str(inv), "--yes")
        assert second.returncode == 4, second.stderr
        line = second.stderr.strip().splitlines()[-1]
        assert "held by " in line and f" pid {first.pid} (gpucluster up), started " in line, line
        assert "--break-lock" in line and "Traceback" not in second.stderr
    finally:
        first.communicate(timeout=900)
        assert first.returncode == 0
        assert not lease.exists(), "the first up did not release its lease"
        assert gc("down", str(inv), "--yes").returncode == 0


def test_hostile_values_never_execute(rig, tmp_path):
    marker = Path("/tmp/gpucluster-pwned")
    marker.unlink(missing_ok=True)
    hostile = f"x'; touch {marker}; echo '$(touch {marker})`touch {marker}`"
    inv = inventory(rig, tmp_path, name="e2e-hostile", hosts=1, served_model_name=hostile,
                    env={"HOSTILE": f"$(touch {marker}); touch {marker}"})
    try:
        first = _up(inv)
        assert first["served_model_name"] == hostile
        assert not marker.exists(), "a value from YAML was executed by a shell"
        st = json.loads(gc("status", str(inv), "--json").stdout)
        assert hostile in st["api"]["models"]
    finally:
        assert gc("down", str(inv), "--yes").returncode == 0
        assert not marker.exists()


def test_down_reports_unreachable_hosts_and_cleans_the_rest(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-down", hosts=1)
    try:
        _up(inv)
        data = yaml.safe_load(inv.read_text())
        data["hosts"].append({**data["hosts"][0], "name": "ghost", "address": rig.unused_address(),
                              "role": "worker"})
        data["hosts"][0]["role"] = "head"
        inv.write_text(yaml.safe_dump(data, sort_keys=False))
        dn = gc("down", str(inv), "--yes")
        assert dn.returncode == 3, dn.stderr
        assert "ghost" in dn.stderr and "Traceback" not in dn.stderr
        assert labelled(rig, "e2e-down") == {}
    finally:
        gc("down", str(inv), "--yes")


def test_probe_reports_facts_and_mismatches(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-probe", hosts=3)
    r = gc("probe", str(inv), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    facts = json.loads(r.stdout)["hosts"]
    for name in ("h1", "h2", "h3"):
        f = facts[name]
        assert f["reachable"] and f["docker_version"] and len(f["gpus"]) == 2
        assert f["gpus"][0]["name"] == "Tesla V100-PCIE-16GB" and f["gpus"][0]["compute_capability"] == "7.0"
        assert f["interface"] == "eth0" and f["disk_free"] > 0 and abs(f["clock_offset"]) < 5
    data = yaml.safe_load(inv.read_text())
    data["hosts"][1]["gpus"]["count"] = 4
    data["hosts"].append({**data["hosts"][0], "name": "ghost", "address": rig.unused_address()})
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    r = gc("probe", str(inv))
    assert r.returncode == 3
    assert "gpus.count: declared 4, found 2" in r.stdout and "UNREACHABLE" in r.stdout


def test_unknown_host_key_is_refused_unless_accepted(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-keys", hosts=1)
    data = yaml.safe_load(inv.read_text())
    data["cluster"]["ssh"]["known_hosts"] = str(tmp_path / "empty_known_hosts")
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    r = gc("probe", str(inv))
    assert r.returncode == 3 and "not in" in r.stdout and "known_hosts" in r.stdout
    r = gc("probe", str(inv), "--accept-new-host-keys")
    assert r.returncode == 0, r.stdout
    found = subprocess.run(["ssh-keygen", "-F", rig.address("h1"), "-f", str(tmp_path / "empty_known_hosts")],
                           capture_output=True)       # the line may be hashed (Debian: HashKnownHosts yes)
    assert found.returncode == 0


def test_worker_that_never_joins_is_named(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-nojoin", hosts=2, tensor_parallel=4, pipeline_parallel=1)
    block = ["ip", "netns", "exec", rig.host("h2")["netns"], "iptables", "-I", "OUTPUT", "-p", "tcp", "--dport",
             "6379", "-j", "REJECT"]
    subprocess.run(block, check=True)
    try:
        r = gc("up", str(inv), "--yes", "--ray-timeout", "20")
        assert r.returncode == 1, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert "never joined: h2" in last and "Traceback" not in r.stderr
    finally:
        subprocess.run([*block[:5], "-D", *block[6:]], check=True)
        assert gc("down", str(inv), "--yes").returncode == 0


def test_doctor_and_logs_follow(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-doc", hosts=2, tensor_parallel=4, pipeline_parallel=1)
    r = gc("doctor", str(inv), "--json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    out = json.loads(r.stdout)
    assert out["verdict"] in ("ok", "warn") and set(out["hosts"]) == {"h1", "h2"}
    assert all(not c for c in out["contradictions"].values())
    try:
        _up(inv)
        follow = subprocess.Popen([sys.executable, "-m", "cluster", "logs", str(inv), "--component", "api",
                                   "--follow", "--tail", "1"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                                  stdin=subprocess.DEVNULL)
        try:
            first = follow.stdout.readline()
            assert first.startswith("[h1 api] ")
            chat(f"http://{rig.address('h1')}:8000/v1", "gpucluster/tiny-qwen2")
            deadline = time.time() + 30
            line = ""
            while "chat/completions" not in line and time.time() < deadline:
                line = follow.stdout.readline()
            assert "chat/completions" in line, "a new request did not show up in --follow"
        finally:
            follow.terminate()
            follow.wait(timeout=10)
    finally:
        assert gc("down", str(inv), "--yes").returncode == 0
