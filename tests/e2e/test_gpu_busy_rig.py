"""gpu-busy on the rig: a leftover process holding GPU memory (vLLM #20860) stops `doctor` and `up` before any
container starts, in one line naming the host, the PID and its MiB; this cluster's own engine never counts.

The rig's nvidia-smi stand-in lists the processes written in the host's gpus.json ("processes") the way a real
one does. The leftover is a real process (a `sleep` this test starts), so the probe reads a real /proc/PID/cgroup;
for "ours" the entry names the PID of this cluster's running head container."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from test_lifecycle import gc, inventory, labelled

pytestmark = pytest.mark.rig
CLUSTER = "e2e-leftover"      # a name without "gpu-busy" in it: lines are matched on that code


def _hold(gpus: Path, original: str, *processes: dict) -> None:
    cfg = json.loads(original)
    cfg["processes"] = list(processes)
    gpus.write_text(json.dumps(cfg))


def _busy_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "gpu-busy" in ln]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def test_leftover_process_stops_doctor_and_up_then_up_succeeds(rig, tmp_path):
    inv = inventory(rig, tmp_path, name=CLUSTER, hosts=1, tensor_parallel=2, pipeline_parallel=1)
    gpus = Path(rig.host("h1")["gpus_file"])
    original = gpus.read_text()
    held = int(json.loads(original)["memory_mib"] * 0.6)   # more than the 10% gpu-memory-utilization 0.9 leaves free
    leftover = subprocess.Popen(["sleep", "900"])        # a process of no container: its cgroup is this test's
    try:
        _hold(gpus, original, {"gpu": 0, "pid": leftover.pid, "name": "python3", "used_mib": held})

        doc = gc("doctor", str(inv))
        assert doc.returncode == 1, doc.stdout[-3000:] + doc.stderr[-2000:]
        line = _busy_line(doc.stdout)
        assert line.startswith("ERROR") and "h1: GPU 0" in line, line
        assert f"pid {leftover.pid} (python3, {held} MiB)" in line, line
        doc_json = json.loads(gc("doctor", str(inv), "--json").stdout)
        (found,) = [f for f in doc_json["findings"] if f["code"] == "gpu-busy"]
        assert found["severity"] == "error" and f"kill {leftover.pid}" in found["fix"]
        (proc,) = doc_json["hosts"]["h1"]["gpu_processes"]
        assert (proc["gpu"], proc["pid"], proc["used_mib"]) == (0, leftover.pid, held)

        up = gc("up", str(inv), "--yes")
        assert up.returncode == 1, up.stderr[-3000:]
        line = _busy_line(up.stderr)
        assert "nothing was started" in line and "h1: GPU 0" in line and \
            f"pid {leftover.pid} (python3, {held} MiB)" in line, line
        assert labelled(rig, CLUSTER) == {}, "gpu-busy stops up before any container is started"

        gpus.write_text(original)                          # the leftover is gone
        ok = gc("up", str(inv), "--yes", "--json")
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert len(labelled(rig, CLUSTER)) == 1

        # this cluster's own engine holding the GPUs (a second up, doctor on a running cluster) is not gpu-busy
        pid = rig.docker("h1", "inspect", "--format", "{{.State.Pid}}", f"gpucluster-{CLUSTER}-ray-head").stdout.strip()
        _hold(gpus, original, {"gpu": 0, "pid": int(pid), "name": "ray::RayWorkerWrapper", "used_mib": held},
              {"gpu": 1, "pid": int(pid), "name": "ray::RayWorkerWrapper", "used_mib": held})
        ours = json.loads(gc("doctor", str(inv), "--json").stdout)
        cgroup = Path(f"/proc/{pid}/cgroup").read_text() if Path(f"/proc/{pid}/cgroup").exists() else "(gone)"
        assert not [f for f in ours["findings"] if f["code"] == "gpu-busy"], (ours["findings"], cgroup)
        assert len(ours["hosts"]["h1"]["gpu_processes"]) == 2
        again = gc("up", str(inv), "--yes", "--json")
        assert again.returncode == 0 and not json.loads(again.stdout)["changed"], again.stderr[-3000:]
    finally:
        gpus.write_text(original)
        leftover.kill()
        leftover.wait()
        assert gc("down", str(inv), "--yes").returncode == 0
    assert labelled(rig, CLUSTER) == {}
