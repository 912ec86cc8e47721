"""Faults during `up` and in what it depends on, each injected on the rig with real tools: SIGINT to `up` in a
phase, a host's veth link down, the HF mirror answering 503 or stalling, a registry mirror answering 503, the model
disk filled by another writer. Each ends in one clear line naming host and cause (no traceback), leaves nothing
`down` cannot remove, and a second `up` once the fault is gone repairs the deployment (FAULT lines: see
test_faults_rig.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_faults_rig import MODEL, last_line, report, serving, status, up_json
from test_lifecycle import REPO, chat, gc, inventory, labelled, ran

pytestmark = pytest.mark.rig


def start_up(inv: Path, *extra: str) -> subprocess.Popen:
    """`up` as a user starts it in a terminal: its own process group (Ctrl-C reaches it and its ssh children)."""
    return subprocess.Popen([sys.executable, "-m", "cluster", "up", str(inv), "--yes", *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def wait_for_phase(p: subprocess.Popen, phase: str) -> list[str]:
    seen = []
    for line in p.stderr:
        seen.append(line)
        if line.strip() == f"gpucluster: == {phase}":
            return seen
    pytest.fail(f"up ended before phase {phase}: {''.join(seen[-20:])}")


def finish(p: subprocess.Popen, seen: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, "".join(seen) + err)


def cold(rig, hosts: list[str], image: str = "vllm/vllm-openai:v0.3.0") -> None:
    """No image on these hosts, so that the image phase has work (a pull through the mirror)."""
    reg = rig.facts["registry"]["address"]
    for h in hosts:
        rig.docker(h, "rmi", "-f", image, f"{reg}/{image}", check=False)


@pytest.mark.parametrize("phase", ["image", "model", "ray-workers", "ready"])
def test_sigint_in_a_phase_of_up(rig, tmp_path, phase):
    name = f"e2e-sigint-{phase}"
    inv = inventory(rig, tmp_path, name=name, hosts=2, tensor_parallel=4)
    if phase == "image":
        cold(rig, ["h1", "h2"])
    if phase == "model":
        for h in ("h1", "h2"):
            rig.ssh(h, f"rm -rf {rig.host(h)['model_dir']}/gpucluster--tiny-qwen2")
    try:
        p = start_up(inv)
        seen = wait_for_phase(p, phase)
        time.sleep(0.5)
        os.killpg(p.pid, signal.SIGINT)            # Ctrl-C in the terminal: the whole foreground group
        r = finish(p, seen)
        assert r.returncode == 130, r.stderr[-3000:]
        line = last_line(r)
        assert "interrupted (Ctrl-C) in phase " in line and "steps cut short:" in line, line
        assert not Path(f"/var/lib/gpucluster/{name}.lease").exists(), "the lease outlived the interrupted up"
        again = up_json(inv)
        assert again["changed"] or phase == "ready"
        code, st = status(inv)
        assert code == 0 and st["healthy"], st["problems"]
        assert MODEL in chat(again["endpoint"], MODEL)
        report(f"SIGINT to up in phase {phase}", line.removeprefix("gpucluster: error: "),
               f"ran {sorted(ran(again))}; healthy")
    finally:
        dn = gc("down", str(inv), "--yes")
        assert dn.returncode == 0, dn.stderr
        assert labelled(rig, name) == {}


def test_sigint_then_down_removes_what_was_started(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-sigint-down", hosts=2, tensor_parallel=4)
    p = start_up(inv)
    seen = wait_for_phase(p, "api")           # the head and the worker run, the API server is being started
    os.killpg(p.pid, signal.SIGINT)
    r = finish(p, seen)
    assert r.returncode == 130, r.stderr[-3000:]
    last_line(r)
    assert labelled(rig, "e2e-sigint-down"), "nothing was started before the interruption"
    dn = gc("down", str(inv), "--yes")
    assert dn.returncode == 0, dn.stderr
    assert labelled(rig, "e2e-sigint-down") == {}


def link(rig, host: str, state: str) -> None:
    subprocess.run(["ip", "link", "set", rig.host(host)["netns"], state], check=True)


def test_host_lost_mid_up(rig, tmp_path):
    name = "e2e-lost"
    inv = inventory(rig, tmp_path, name=name, hosts=2, tensor_parallel=4)
    try:
        p = start_up(inv, "--join-timeout", "60")
        seen = wait_for_phase(p, "ray-head")
        link(rig, "h2", "down")                   # h2's cable pulled while the head starts
        r = finish(p, seen)
        assert r.returncode != 0
        line = last_line(r)
        assert "h2" in line, line
        dn = gc("down", str(inv), "--yes")       # h2 still gone: h1 is cleaned, h2 is named
        assert dn.returncode == 3 and "h2" in last_line(dn), dn.stderr
        assert not any(k.startswith("h1/") for k in labelled(rig, name))
        link(rig, "h2", "up")
        again = up_json(inv)
        serving(inv, again["endpoint"])
        report("h2's link down in phase ray-head (ip link set down)", line.removeprefix("gpucluster: error: "),
               "down while lost: h1 cleaned, h2 named (exit 3); after the link came back: healthy")
    finally:
        link(rig, "h2", "up")
        gc("down", str(inv), "--yes")
    assert labelled(rig, name) == {}


# ---------------------------------------------------------------- the mirrors and the model disk
def hf_fault(rig, what: str | None) -> None:
    path = Path(rig.dir) / "services" / "hf-fault"
    if what is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(what + "\n")


def fresh_model(rig, hosts=("h1",)) -> None:
    for h in hosts:
        rig.ssh(h, f"rm -rf {rig.host(h)['model_dir']}/gpucluster--tiny-qwen2")


def test_hf_mirror_503_is_retried_under_the_listing_policy(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-hf503", hosts=1)
    fresh_model(rig)
    hf_fault(rig, "503 2")                          # the next two requests fail, then the mirror recovers
    try:
        r = gc("model", "pull", str(inv))
        assert r.returncode == 0, r.stderr[-3000:]
        notes = [ln for ln in r.stderr.splitlines() if "HTTP 503" in ln and "try 2 of 4" in ln]
        assert notes, r.stderr[-3000:]
        report("HF mirror answers 503 twice", notes[0].strip(), "(same run) retried, model verified")
    finally:
        hf_fault(rig, None)
        gc("down", str(inv), "--yes")


def test_hf_mirror_stalling_is_cut_by_the_read_timeout(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-hfstall", hosts=1)
    fresh_model(rig)
    hf_fault(rig, "stall 1")                        # one request gets no answer at all
    try:
        r = gc("model", "pull", str(inv))
        assert r.returncode == 0, r.stderr[-3000:]
        notes = [ln for ln in r.stderr.splitlines() if "timed out" in ln and "try 2 of" in ln]
        assert notes, r.stderr[-3000:]
        report("HF mirror stalls one request", notes[0].strip(), "(same run) retried after the read timeout")
    finally:
        hf_fault(rig, None)
        gc("down", str(inv), "--yes")


def test_hf_mirror_down_is_one_line_and_the_next_up_repairs(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-hfdown", hosts=1)
    fresh_model(rig)
    hf_fault(rig, "503")
    try:
        r = gc("up", str(inv), "--yes")
        assert r.returncode == 1, r.stderr[-3000:]
        line = last_line(r)
        assert "h1" in line and "HTTP 503" in line and "listing policy" in line, line
        hf_fault(rig, None)
        again = up_json(inv)
        serving(inv, again["endpoint"])
        report("HF mirror answers 503 to everything", line.removeprefix("gpucluster: error: "),
               "model downloaded, healthy")
    finally:
        hf_fault(rig, None)
        gc("down", str(inv), "--yes")


def test_hf_mirror_down_falls_back_to_the_next_hub_in_the_same_up(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-hffallback", hosts=1)
    data = yaml.safe_load(inv.read_text())
    data["deploy"]["source"]["fallbacks"] = [{"kind": "modelscope", "endpoint": rig.facts["modelscope"]["endpoint"]}]
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    fresh_model(rig)
    hf_fault(rig, "503")
    try:
        r = gc("up", str(inv), "--yes")
        assert r.returncode == 0, r.stderr[-3000:]
        fell = [ln for ln in r.stderr.splitlines() if "h1: model: fallback 1 worked after:" in ln]
        assert fell and "HTTP 503" in fell[0] and "listing policy" in fell[0], r.stderr[-3000:]
        again = up_json(inv)              # --json says the same per step; here nothing is left to download
        assert "h1/model" not in ran(again), again["steps"]
        serving(inv, again["endpoint"])
        report("HF mirror answers 503 to everything, a ModelScope fallback configured",
               fell[0].strip()[:200] + " ...", "(same run) downloaded from ModelScope; healthy")
    finally:
        hf_fault(rig, None)
        gc("down", str(inv), "--yes")


def test_registry_mirror_503_falls_through_to_the_next_mirror(rig, tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    hits = []

    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_HEAD = do_GET

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer((rig.facts["control_address"], 0), Unavailable)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    bad = f"{rig.facts['control_address']}:{srv.server_address[1]}"
    inv = inventory(rig, tmp_path, name="e2e-reg503", hosts=1)
    data = yaml.safe_load(inv.read_text())
    data["cluster"]["registry_mirrors"] = [bad, *data["cluster"]["registry_mirrors"]]
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    cold(rig, ["h1"])
    try:
        r = gc("up", str(inv), "--yes")
        assert r.returncode == 0, r.stderr[-3000:]
        assert hits, "the first mirror was never asked"
        fell = [ln for ln in r.stderr.splitlines() if "h1: image: fallback 1 worked after:" in ln]
        assert fell and "503" in fell[0], r.stderr[-3000:]
        report("first registry mirror answers 503", fell[0].strip(), "(same run) pulled from the next mirror")
    finally:
        srv.shutdown()
        gc("down", str(inv), "--yes")


def test_model_disk_fills_up_mid_download(rig, tmp_path):
    disk = tmp_path / "model-disk"               # a small loop-mounted ext4 as h1's model_dir
    disk.mkdir()
    img = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "48M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(disk)], check=True)
    inv = inventory(rig, tmp_path, name="e2e-diskfull", hosts=1)
    data = yaml.safe_load(inv.read_text())
    data["hosts"][0]["model_dir"] = str(disk)
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    filler = disk / "someone-elses-file"
    try:
        p = start_up(inv)                        # the probe sees room for the 21 MB model ...
        seen = wait_for_phase(p, "model")
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(filler, "wb") as f:            # ... then another writer takes all but 4 MB of it
            f.write(b"\0" * (free - (4 << 20)))
        r = finish(p, seen)
        assert r.returncode == 1, r.stderr[-3000:]
        line = last_line(r)
        assert "h1" in line and "no space left on the model disk" in line and "model_dir" in line, line
        filler.unlink()                          # the space is back
        again = up_json(inv)
        serving(inv, again["endpoint"])
        report("model disk filled by another writer during the model phase (48 MB loop-mounted ext4)",
               line.removeprefix("gpucluster: error: "), "resumed the download; healthy")
    finally:
        gc("down", str(inv), "--yes")
        subprocess.run(["umount", str(disk)], capture_output=True)
    assert labelled(rig, "e2e-diskfull") == {}
