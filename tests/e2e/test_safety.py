"""Safe on the only GPU servers a lab has: rotated keys take effect, teardown needs only the inventory, a
shrunk deployment leaves no stray worker, a wedged nvidia-smi cannot hang a command."""

from __future__ import annotations

import json
import re
import time
import urllib.error
from pathlib import Path

import pytest
import yaml

from test_lifecycle import chat, gc, inventory, labelled

pytestmark = pytest.mark.rig


def test_rotated_api_key_restarts_the_server_and_the_old_key_is_refused(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-rotate", hosts=1, api_key={"env": "RIG_ROTATE_KEY"})
    endpoint = f"http://{rig.address('h1')}:8000/v1"
    try:
        r = gc("up", str(inv), "--yes", "--json", env={"RIG_ROTATE_KEY": "sk-old-1111"})
        assert r.returncode == 0, r.stderr[-3000:]
        assert "gpucluster/tiny-qwen2" in chat(endpoint, "gpucluster/tiny-qwen2", key="sk-old-1111")
        r = gc("up", str(inv), "--yes", "--json", env={"RIG_ROTATE_KEY": "sk-new-2222"})
        assert r.returncode == 0, r.stderr[-3000:]
        api = next(o for o in json.loads(r.stdout)["steps"] if o["id"] == "h1/api")
        assert api["status"] == "ran" and api["variant"] == "replace", api
        with pytest.raises(urllib.error.HTTPError) as old:
            chat(endpoint, "gpucluster/tiny-qwen2", key="sk-old-1111")
        assert old.value.code == 401
        assert "gpucluster/tiny-qwen2" in chat(endpoint, "gpucluster/tiny-qwen2", key="sk-new-2222")
        assert "sk-new-2222" not in r.stdout + r.stderr and "sk-old-1111" not in r.stdout + r.stderr
    finally:
        gc("down", str(inv), "--yes")


def test_up_refuses_an_unset_secret_before_touching_a_host(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-unset", hosts=1, api_key={"env": "RIG_NOT_SET_ANYWHERE"})
    r = gc("up", str(inv), "--yes")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "RIG_NOT_SET_ANYWHERE" in line and "deploy.api_key" in line and "Traceback" not in r.stderr
    assert labelled(rig, "e2e-unset") == {}


def test_down_needs_only_the_inventory(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-renamed", hosts=1)
    r = gc("up", str(inv), "--yes", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    data = yaml.safe_load(inv.read_text())
    data["deploy"]["profile"] = "a-profile-renamed-since"          # and a model path that no longer exists
    data["deploy"]["model"] = "/nowhere/model"
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    assert gc("plan", str(inv)).returncode == 2                      # planning is refused ...
    dn = gc("down", str(inv), "--yes")                               # ... teardown is not
    assert dn.returncode == 0, dn.stderr[-2000:]
    assert labelled(rig, "e2e-renamed") == {}


def test_shrinking_the_deployment_removes_the_host_that_left(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-shrink", hosts=3, tensor_parallel=6, pipeline_parallel=1)
    try:
        r = gc("up", str(inv), "--yes", "--quiet")
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(labelled(rig, "e2e-shrink")) == 3
        data = yaml.safe_load(inv.read_text())
        data["deploy"]["tensor_parallel"] = 4                          # two hosts now
        inv.write_text(yaml.safe_dump(data, sort_keys=False))
        r = gc("up", str(inv), "--yes", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        strays = next(o for o in json.loads(r.stdout)["steps"] if o["id"] == "h3/strays")
        assert strays["status"] == "ran" and strays["names"] == ["gpucluster-e2e-shrink-ray-worker"], strays
        assert sorted(labelled(rig, "e2e-shrink")) == ["h1/gpucluster-e2e-shrink-ray-head",
                                                       "h2/gpucluster-e2e-shrink-ray-worker"]
        st = gc("status", str(inv), "--json")
        ray = json.loads(st.stdout)["engine"]["ray"]
        assert len(ray["nodes"]) == 2 and ray["gpus"] == 4, ray
    finally:
        gc("down", str(inv), "--yes")


def test_a_wedged_nvidia_smi_does_not_hang_probe(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-wedged", hosts=2)
    smi = Path(rig.host("h2")["bin_dir"]) / "nvidia-smi"
    original = smi.read_bytes()
    smi.write_text("#!/bin/sh\nexec sleep 3600\n")      # a driver in D state: nvidia-smi never returns
    try:
        r = gc("probe", str(inv), timeout=200)
    finally:
        smi.write_bytes(original)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "nvidia-smi" in ln)
    assert "still running after 30 s" in line, r.stdout


def test_an_ssh_config_alias_reaches_the_host_and_the_address_stays_an_ip(rig, tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(f"Host rig-first-host\n    HostName {rig.address('h1')}\n")
    inv = inventory(rig, tmp_path, name="e2e-alias", hosts=1)
    data = yaml.safe_load(inv.read_text())
    data["hosts"][0]["ssh"] = {"host": "rig-first-host"}     # no IP anywhere in SSH's view of it
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    r = gc("probe", str(inv), "--json", env={"HOME": str(home)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads(r.stdout)["hosts"]["h1"]["reachable"]
    data["hosts"][0]["address"] = "rig-first-host"           # a name as the address is refused at load
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    r = gc("probe", str(inv), env={"HOME": str(home)})
    assert r.returncode == 2 and "hosts[0].address" in r.stderr and "Traceback" not in r.stderr


LEASES = Path("/var/lib/gpucluster")     # the lease lives on the head; rig hosts share this machine's files and clock


def _lease_by_hand(cluster: str, *, owner: str, pid: int, command: str, renewed_ago: int, expires_in: int) -> Path:
    """A lease another control machine left: started and last renewed `renewed_ago` seconds ago."""
    now = int(time.time())
    path = LEASES / f"{cluster}.lease"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(f"token=0123456789abcdef\nowner={owner}\npid={pid}\ncommand={command}\nstart={now - renewed_ago}\n"
                    f"renewed={now - renewed_ago}\nexpires={now + expires_in}\n")
    return path


def test_a_stale_lease_is_taken_over_and_a_live_one_stops_down_unless_break_lock(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-lease", hosts=1)
    lease = LEASES / "e2e-lease.lease"
    try:
        # a killed `up` on a laptop: its lease stopped being renewed 10 minutes ago
        _lease_by_hand("e2e-lease", owner="gone@laptop", pid=4242, command="up", renewed_ago=600, expires_in=-510)
        r = gc("up", str(inv), "--yes", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        assert re.search(r"warning: h1: take over the stale lease of gone@laptop pid 4242 \(gpucluster up\), "
                         r"started \S+ \(6\d\ds ago\), last renewed 6\d\ds ago", r.stderr), r.stderr[-2000:]
        took = next(o for o in json.loads(r.stdout)["steps"] if o["id"] == "h1/lock")
        assert took["status"] == "ran" and took["why"].startswith("take over the stale lease"), took
        assert not lease.exists(), "up did not release its lease"
        assert len(labelled(rig, "e2e-lease")) == 1

        # another operation is running (renewed 5 s ago): down refuses, changes nothing, and names it
        _lease_by_hand("e2e-lease", owner="busy@desk", pid=777, command="model pull", renewed_ago=5, expires_in=85)
        before = lease.read_text()
        dry = gc("down", str(inv), "--dry-run")
        assert dry.returncode == 0 and "fail  [lock] lock: held by busy@desk" in dry.stdout, dry.stdout
        dn = gc("down", str(inv), "--yes")
        assert dn.returncode == 4, dn.stderr
        line = dn.stderr.strip().splitlines()[-1]
        assert "held by busy@desk pid 777 (gpucluster model pull), started " in line and "--break-lock" in line, line
        assert "Traceback" not in dn.stderr
        assert len(labelled(rig, "e2e-lease")) == 1 and lease.read_text() == before   # nothing touched, not taken

        # --break-lock takes it, saying whose it was, and releases it at the end
        dn = gc("down", str(inv), "--yes", "--break-lock")
        assert dn.returncode == 0, dn.stderr
        assert "warning: h1: break the live lease of busy@desk pid 777 (gpucluster model pull)" in dn.stderr
        assert labelled(rig, "e2e-lease") == {} and not lease.exists()

        # a stale lease left by a killed `down`: the next down takes it over
        _lease_by_hand("e2e-lease", owner="gone@laptop", pid=4343, command="down", renewed_ago=300, expires_in=-210)
        dn = gc("down", str(inv), "--yes")
        assert dn.returncode == 0, dn.stderr
        assert "take over the stale lease of gone@laptop pid 4343 (gpucluster down)" in dn.stderr
        assert re.search(r"last renewed 3\d\ds ago", dn.stderr) and not lease.exists()
    finally:
        lease.unlink(missing_ok=True)
        gc("down", str(inv), "--yes")
