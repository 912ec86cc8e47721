"""`gpucluster check network` on the rig, for real: torch.distributed with GLOO across every rig host, in the
real-engine image (vLLM's CPU build 0.32.0 and its torch 2.13.0+cpu) with the env gpucluster gives the engine;
and one host's GLOO interface wrong in three ways (missing, loopback, present but unroutable): the check ends
within its timeout with a line naming that host and GLOO_SOCKET_IFNAME. NCCL needs real GPUs: see
tests/fixtures/netcheck (captured on two NVIDIA H200s) and tests/unit/test_netcheck.py."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from test_lifecycle import gc, labelled

pytestmark = pytest.mark.rig

IMAGE = "vllm/vllm-openai-cpu:v0.32.0"
PROFILE = {"engine": "vllm-mp", "device": "cpu", "version": "0.32.0", "image": IMAGE,
           "docker": {"shm_size": "1g", "ipc": "host", "network": "host"}}
BAD_HOST = "h2"


@pytest.fixture(scope="module")
def cpu_rig(rig):
    if IMAGE not in str((rig.facts.get("real_engine") or {}).get("image", "")):
        pytest.skip(f"the rig has no real-engine image ({IMAGE}): run `tests/rig/rig setup --real-engine`, "
                    "then `rig up`")
    if len(rig.host_names()) < 3:
        pytest.skip("needs a rig of 3 hosts (the wrong host is told apart by the other two)")
    return rig


def cpu_inventory(rig, folder: Path, name: str, **interfaces: str) -> Path:
    """The rig's hosts as CPU hosts (no gpus), the real-engine image as a CPU profile; interfaces per host."""
    data = yaml.safe_load(Path(rig.inventory).read_text())
    data["cluster"]["name"] = name
    for h in data["hosts"]:
        h.pop("gpus", None)
        h["interface"] = interfaces.get(h["name"], h["interface"])
    profile = folder / "cpu-netcheck.yaml"
    profile.write_text(yaml.safe_dump({"name": "cpu-netcheck", **PROFILE}))
    data["deploy"]["profile"] = str(profile)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def passed(cpu_rig, tmp_path_factory):
    """One passing check (it also pulls the image onto every host): its dry run, its JSON, its seconds."""
    inv = cpu_inventory(cpu_rig, tmp_path_factory.mktemp("netcheck"), "nc-pass")
    dry = gc("check", "network", str(inv), "--dry-run", "--json", timeout=300)
    t0 = time.time()
    r = gc("check", "network", str(inv), "--json", "--timeout", "120", timeout=1200)
    yield {"inv": inv, "dry": dry, "run": r, "seconds": time.time() - t0}
    gc("down", str(inv), "--yes", timeout=300)        # the job folders the check left on the hosts


def test_gloo_all_reduce_passes_on_every_host(cpu_rig, passed):
    dry, r = passed["dry"], passed["run"]
    assert dry.returncode == 0, dry.stderr[-3000:]
    planned = {s["id"]: s for s in json.loads(dry.stdout)["plan"]}
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out = json.loads(r.stdout)
    hosts = cpu_rig.host_names()
    assert out["verdict"] == "pass" and out["device"] == "cpu" and out["world"] == len(hosts)
    assert out["rendezvous"] == f"{cpu_rig.address(hosts[0])}:29555"
    for i, name in enumerate(hosts):
        res = out["hosts"][name]
        assert res["ok"] and res["ranks"] == [i, i] and res["torch"].startswith("2.13.0"), res
        assert [(c["check"], c["status"]) for c in res["checks"]] == [
            ("preflight", "ok"), ("torch", "ok"), ("init", "ok"), ("gloo", "ok")]
        assert res["checks"][3]["message"] == f"sum {len(hosts) * (len(hosts) + 1) // 2} == expected over " \
                                              f"{len(hosts)} ranks"
        # it ran exactly what the dry run listed, with the engine's env for that host
        run = next(op["argv"] for op in planned[f"{name}/netcheck"]["ops"] if "argv" in op)
        assert f"GLOO_SOCKET_IFNAME={cpu_rig.host(name)['interface']}" in run
        assert f"VLLM_HOST_IP={cpu_rig.address(name)}" in run and "--gpus" not in run
    assert {s["id"]: s for s in out["plan"]} == planned
    assert {o["id"]: o["status"] for o in out["steps"] if o["phase"] == "netcheck"} == {
        f"{h}/netcheck": "ran" for h in hosts}
    assert labelled(cpu_rig, "nc-pass") == {}          # the check containers removed themselves
    print(f"\nNETCHECK pass on {len(hosts)} hosts in {passed['seconds']:.1f} s (image pull included)")


def test_text_output_one_line_per_host_and_a_verdict(cpu_rig, passed):
    t0 = time.time()
    r = gc("check", "network", str(passed["inv"]), "--timeout", "60", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines[:-1]] == cpu_rig.host_names()
    assert all(": ok (" in ln and "gloo" in ln for ln in lines[:-1]), lines
    assert lines[-1].startswith("verdict: PASS: 3 host(s), 3 ranks")
    print(f"\nNETCHECK pass, image present: {time.time() - t0:.1f} s")


@pytest.fixture
def unroutable_nic(cpu_rig):
    """A NIC on the bad host whose address no other host can reach (a veth pair inside its namespace)."""
    ns = cpu_rig.host(BAD_HOST)["netns"]
    for argv in (["link", "add", "ncbad0", "type", "veth", "peer", "name", "ncbad1"],
                 ["addr", "add", "192.168.77.2/24", "dev", "ncbad0"], ["link", "set", "ncbad0", "up"],
                 ["link", "set", "ncbad1", "up"]):
        subprocess.run(["ip", "-n", ns, *argv], check=True, capture_output=True, timeout=30)
    try:
        yield "ncbad0"
    finally:
        subprocess.run(["ip", "-n", ns, "link", "del", "ncbad0"], capture_output=True, timeout=30)


@pytest.mark.parametrize("kind", ["missing", "loopback", "unroutable"])
def test_wrong_gloo_nic_on_one_host_ends_in_time_naming_it(cpu_rig, passed, tmp_path, request, kind):
    nic = {"missing": "eth7", "loopback": "lo"}.get(kind) or request.getfixturevalue("unroutable_nic")
    inv = cpu_inventory(cpu_rig, tmp_path, f"nc-{kind}", **{BAD_HOST: nic})
    timeout = 60
    t0 = time.time()
    try:
        r = gc("check", "network", str(inv), "--timeout", str(timeout), timeout=600)
    finally:
        took = time.time() - t0
        gc("down", str(inv), "--yes", timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stdout.splitlines()
    bad = next(ln for ln in lines if ln.startswith(f"{BAD_HOST}: "))
    assert bad.startswith(f"{BAD_HOST}: FAIL at ") and f"GLOO_SOCKET_IFNAME={nic}" in bad, lines
    assert lines[-1].startswith(f"verdict: FAIL: {BAD_HOST} failed;"), lines
    for other in set(cpu_rig.host_names()) - {BAD_HOST}:
        line = next(ln for ln in lines if ln.startswith(f"{other}: "))
        assert line.startswith(f"{other}: FAIL at ") and f"stopped: {BAD_HOST}" in line, lines
    assert took < timeout, f"{took:.1f} s: not within the {timeout} s timeout"
    assert labelled(cpu_rig, f"nc-{kind}") == {}
    print(f"\nNETCHECK wrong NIC ({kind}) reported in {took:.1f} s: {bad}")
