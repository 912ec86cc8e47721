"""`check network`: the steps (argv with hostile values, rank layout, env), the agent's preflight and result,
the control's parser (hostile text too), and the output captured on two real NVIDIA GPUs (tests/fixtures/netcheck)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cluster import netcheck as nc
from cluster import netcheck_agent as agent
from cluster import ops
from cluster.executor import Outcome, Report
from cluster.steps import Cmd, Put, decide

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "netcheck" / "h200x2"
HOSTILE = ["x; touch PWNED", "$(touch PWNED)", "`touch PWNED`", "a'b\"c", "line1\nline2; touch PWNED",
           "two words", "--gpus=none", "*", ""]
GPUS = {"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160, "compute_capability": "7.0"}


def _inventory(tmp_path: Path, hosts: list[dict], **deploy) -> str:
    inv = {"cluster": {"name": "lab", "model_dir": "/Data/models"}, "hosts": hosts,
           "deploy": {"profile": "vllm-v0.6.3", "model": "Qwen/Qwen2.5-7B-Instruct", **deploy}}
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inv))
    return str(path)


def _job(path: str, **kw) -> nc.NetJob:
    inv, prof = ops.load(path)
    d = ops.make_plan(inv, prof).deployment
    return nc.make_job(d, inv.hosts, **kw)


def _gpu_hosts(n: int = 3, **first) -> list[dict]:
    hosts = [{"name": f"h{i}", "address": f"10.0.0.{i}", "interface": "eth0", "gpus": GPUS} for i in range(1, n + 1)]
    hosts[0].update(first)
    return hosts


def _cmds(step) -> list[tuple[str, ...]]:
    return [op.argv for op in step.all_ops() if isinstance(op, Cmd)]


# ---------------------------------------------------------------- steps
def test_gpu_job_layout_env_and_argv(tmp_path):
    hosts = _gpu_hosts(3)
    hosts[2]["role"] = "head"                     # the head comes first whatever the inventory's order
    job = _job(_inventory(tmp_path, hosts), timeout=30, port=29777)
    assert [nh.host.name for nh in job.hosts] == ["h3", "h1", "h2"]
    assert [(nh.first_rank, nh.local) for nh in job.hosts] == [(0, 2), (2, 2), (4, 2)]
    assert job.device == "cuda" and job.world == 6
    steps = nc.steps(job)
    assert [s.id for s in steps] == ["h3/netcheck", "h1/netcheck", "h2/netcheck"]
    assert {s.phase for s in steps} == {"netcheck"} and all(s.readonly for s in steps)
    run = _cmds(steps[1])[0]
    assert run[:3] == ("docker", "run", "--rm")
    assert run[run.index("--gpus") + 1] == "all" and run[run.index("--network") + 1] == "host"
    assert {"VLLM_HOST_IP=10.0.0.1", "GLOO_SOCKET_IFNAME=eth0", "NCCL_SOCKET_IFNAME=eth0"} <= set(run)
    assert run[run.index("--entrypoint"):] == ("--entrypoint", "python3", job.image, "-u", "/job/netcheck_agent.py",
                                               "/job/netcheck.json")
    puts = [op for op in steps[1].ops if isinstance(op, Put)]
    assert puts[0].text == nc.AGENT.read_text()
    doc = json.loads(puts[1].text)
    assert doc == {"host": "h1", "master_addr": "10.0.0.3", "master_port": 29777, "world": 6, "first_rank": 2,
                   "local": 2, "device": "cuda", "timeout": 30,
                   "hosts": [{"name": "h3", "first_rank": 0, "local": 2}, {"name": "h1", "first_rank": 2, "local": 2},
                             {"name": "h2", "first_rank": 4, "local": 2}]}
    assert steps[1].ops[-1].timeout == 30 + nc.START_GRACE      # ends by itself first; the SSH bound is a backstop
    assert steps[1].check.argv == ("sh", "-c", nc.LEFTOVER, "gpucluster-lab-netcheck")
    assert "replace" in steps[1].variants and _cmds(steps[1])[1] == ("docker", "rm", "-f", "gpucluster-lab-netcheck")


def test_leftover_probe_words(tmp_path):
    """The probe's first word decides (steps.decide): run when docker knows no such container, replace otherwise."""
    job = _job(_inventory(tmp_path, _gpu_hosts(1)))
    step = nc.steps(job)[0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    for exists, word in ((False, "run"), (True, "replace")):
        docker.write_text("#!/bin/sh\n" + ('echo "replace a check container is left over (exited)"\n' if exists
                                           else "echo 'Error: No such container' >&2; exit 1\n"))
        docker.chmod(0o755)
        r = subprocess.run(list(step.check.argv), capture_output=True, text=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
        d = decide(step, r.returncode, r.stdout)
        assert (d.variant or d.action) == word, (r.stdout, d)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_env_values_stay_single_argv_elements(tmp_path, value):
    job = _job(_inventory(tmp_path, _gpu_hosts(2), env={"EVIL": value}))
    for step in nc.steps(job):
        for argv in _cmds(step) + [step.check.argv]:
            assert shlex.split(shlex.join(argv)) == list(argv)
        run = _cmds(step)[0]
        env = dict(next(nh.env for nh in job.hosts if nh.host.name == step.host))
        assert f"EVIL={value}" in run and env["EVIL"] == value
        assert run.count("-e") == len(env) and "VLLM_HOST_IP" in env   # the engine's node env, nothing else
        # the job file the agent reads holds no env at all (values reach it only through docker -e)
        assert "EVIL" not in next(op.text for op in step.ops if isinstance(op, Put) and op.path.endswith(".json"))


def test_device_follows_profile_and_hosts():
    gpu_host = SimpleNamespace(gpus=SimpleNamespace(count=2))
    assert nc.device_of(SimpleNamespace(device="gpu"), [gpu_host]) == "cuda"
    assert nc.device_of(SimpleNamespace(device="cpu"), [gpu_host]) == "cpu"
    assert nc.device_of(SimpleNamespace(device="gpu"), [gpu_host, SimpleNamespace(gpus=None)]) == "cpu"


def test_cpu_profile_one_rank_per_host_no_gpus(tmp_path):
    profile = tmp_path / "cpu.yaml"
    profile.write_text(yaml.safe_dump({"name": "cpu-test", "engine": "vllm-mp", "device": "cpu", "version": "0.32.0",
                                       "image": "vllm/vllm-openai-cpu:v0.32.0"}))
    hosts = [{"name": f"c{i}", "address": f"10.1.0.{i}", "interface": "ens3"} for i in (1, 2)]
    job = _job(_inventory(tmp_path, hosts, profile=str(profile)))
    assert job.device == "cpu" and job.world == 2 and [nh.local for nh in job.hosts] == [1, 1]
    run = _cmds(nc.steps(job)[1])[0]
    assert "--gpus" not in run and "GLOO_SOCKET_IFNAME=ens3" in run and "VLLM_HOST_IP=10.1.0.2" in run


# ---------------------------------------------------------------- the agent's own pure parts
def test_agent_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import cluster.netcheck_agent as a; print(a.VERSION)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(nc.__file__).parents[1])
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr


def _pre(env, master="10.0.0.1", have=("eth0", "lo"), addrs=None, hostname="10.0.0.2"):
    addrs = addrs or {"eth0": "10.0.0.2", "lo": "127.0.0.1"}
    return agent.preflight(env, master, "h2", have=list(have), addr_of=addrs.get, hostname_addr=lambda: hostname)


def test_preflight_names_a_missing_gloo_nic():
    ok, msg, _ = _pre({"GLOO_SOCKET_IFNAME": "eth9", "NCCL_SOCKET_IFNAME": "eth9"})
    assert not ok and msg.startswith("GLOO_SOCKET_IFNAME=eth9: no interface eth9 on h2 (it has eth0, lo)")


def test_preflight_refuses_loopback_only_across_hosts():
    ok, msg, _ = _pre({"GLOO_SOCKET_IFNAME": "lo"})
    assert not ok and "loopback" in msg and "GLOO_SOCKET_IFNAME=lo" in msg
    assert _pre({"GLOO_SOCKET_IFNAME": "lo"}, master="127.0.0.1")[0]          # all ranks on one machine: fine
    ok, msg, _ = _pre({}, hostname="127.0.1.1")                                # the field notes' hang, caught
    assert not ok and "GLOO_SOCKET_IFNAME is unset" in msg and "127.0.1.1" in msg
    assert _pre({}, hostname="10.0.0.2")[0]


def test_preflight_nccl_prefixes_and_notes():
    ok, msg, notes = _pre({"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth", "VLLM_HOST_IP": "10.0.0.9"})
    assert ok and "GLOO_SOCKET_IFNAME=eth0 (10.0.0.2)" in msg and notes == ["eth0 has 10.0.0.2, VLLM_HOST_IP is 10.0.0.9"]
    assert not _pre({"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "=eth"})[0]     # "=" means exactly
    assert _pre({"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "^docker,lo"})[0]   # exclusions only
    ok, msg, _ = _pre({"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "ib"})
    assert not ok and msg.startswith("NCCL_SOCKET_IFNAME=ib: no interface matches ib")


def _log(rank: int, *recs) -> agent.RankLog:
    lg = agent.RankLog(rank)
    for r in recs:
        lg.feed(r)
    lg.code = 0
    return lg


JOB = {"host": "h1", "first_rank": 0, "local": 2, "world": 4, "device": "cuda", "timeout": 60}


def test_summarize_blames_the_first_own_failure_and_skips_the_rest():
    ok_pre = {"step": "preflight", "ok": True, "s": 0}
    ok_torch = {"step": "torch", "ok": True, "s": 2, "info": {"torch": "2.5.1", "nccl": "2.21.5"}}
    stopped = {"step": "init", "ok": False, "peer": True, "msg": "stopped: h2 (rank 2) failed preflight: x"}
    own = {"step": "init", "ok": False, "msg": "cannot reach the rendezvous"}
    ok, doc = agent.summarize(JOB, [_log(0, ok_pre, ok_torch, stopped), _log(1, ok_pre, ok_torch, own)], False, 3.0)
    assert not ok
    assert [c[:2] for c in doc["checks"]] == [["preflight", "ok"], ["torch", "ok"], ["init", "fail"], ["nccl", "-"],
                                              ["gloo", "-"]]
    assert doc["checks"][2][3] == "cannot reach the rendezvous" and doc["torch"] == "2.5.1"
    ok, doc = agent.summarize(JOB, [_log(0, ok_pre, ok_torch, stopped), _log(1, ok_pre, ok_torch, stopped)], False, 3)
    assert doc["checks"][2][1] == "stopped"
    crashed = _log(1, ok_pre, ok_torch, {"step": "init", "start": True})
    crashed.code = -11
    ok, doc = agent.summarize(JOB, [_log(0, ok_pre, ok_torch, stopped), crashed], False, 3)
    assert doc["checks"][2][1] == "stopped"              # a peer's stop is not this host's crash...
    ok, doc = agent.summarize(JOB, [_log(0, ok_pre, ok_torch), crashed], False, 3)
    assert doc["checks"][2][:2] == ["init", "fail"] and "code -11" in doc["checks"][2][3]   # ...but this one is


def test_compact_result_fits_the_event_line():
    long = "GLOO_SOCKET_IFNAME=eth9: " + "x" * 5000
    doc = {"netcheck": 1, "host": "h" * 60, "ranks": [0, 7], "world": 512, "device": "cuda", "torch": "2.5.1",
           "nccl": "2.21.5", "gpu": "NVIDIA " + "G" * 200, "checks": [[s, "fail", 1.0, long] for s in agent.STEPS],
           "notes": [long, long, long], "s": 1.0}
    text = agent.compact(doc)
    assert len(text) <= agent.MAX_RESULT
    r = nc.parse_result("h" * 60, text)
    assert r.status == "fail" and r.step == "preflight" and r.message.startswith("GLOO_SOCKET_IFNAME=eth9")


# ---------------------------------------------------------------- the control's parser (untrusted text)
def _result(host="h2", checks=None, **kw) -> str:
    doc = {"netcheck": 1, "host": host, "ranks": [2, 3], "world": 4, "device": "cuda", "torch": "2.5.1+cu124",
           "nccl": "2.21.5", "gpu": "Tesla V100", "s": 4.2, "notes": [],
           "checks": checks or [["preflight", "ok", 0, "GLOO_SOCKET_IFNAME=eth0 (10.0.0.2)"], ["torch", "ok", 2, ""],
                                ["init", "ok", 0.3, "4 ranks met"], ["nccl", "ok", 1.1, "sum"], ["gloo", "ok", 0.1, "s"]]}
    doc.update(kw)
    return json.dumps(doc)


def test_parse_ok_result_and_line():
    r = nc.parse_result("h2", _result())
    assert r.ok and r.ranks == (2, 3) and r.world == 4 and r.torch == "2.5.1+cu124"
    assert nc.line(r) == ("h2: ok (ranks 2-3 of 4, cuda, torch 2.5.1+cu124, nccl 2.21.5, Tesla V100): init 0.3s, "
                          "nccl 1.1s, gloo 0.1s")


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", "{}", json.dumps({"netcheck": 2, "host": "h2"}),
                                  _result(checks=[["init", "weird", 0, ""]]), _result(checks=[["init", "ok", "1", ""]]),
                                  _result(host="h9"), _result(checks=[[1, 2, 3]])])
def test_parse_garbage_is_a_failure_never_a_pass(text):
    r = nc.parse_result("h2", text)
    assert not r.ok and r.status == "error" and nc.line(r).startswith("h2: FAIL could not run")


def test_parse_strips_control_characters_and_bounds_length():
    evil = "\x1b[2J\x1b]0;pwned\x07 GLOO\r\nfake line\n" + "y" * 2000
    r = nc.parse_result("h2", _result(checks=[["preflight", "fail", 0, evil]], torch="\x1b[31mred" * 50))
    assert r.status == "fail" and "\x1b" not in nc.line(r) and "\n" not in nc.line(r) and "\r" not in nc.line(r)
    assert len(r.message) <= 400 and len(r.torch) <= 80
    assert nc.parse_result("h2", "ssh: connect to host 10.0.0.2 port 22: No route\x1b[0m").message == \
        "ssh: connect to host 10.0.0.2 port 22: No route [0m"


def test_verdict_names_the_cause_and_who_waited():
    bad = nc.parse_result("h2", _result(checks=[["preflight", "fail", 0, "GLOO_SOCKET_IFNAME=eth9: no interface eth9 on "
                                                 "h2 (it has eth0, lo)"], ["torch", "-", 0, ""]]))
    waited = nc.parse_result("h1", _result(host="h1", checks=[
        ["preflight", "ok", 0, ""], ["init", "stopped", 0, "stopped: h2 (rank 2) failed preflight: ..."]]))
    timed = nc.parse_result("h3", _result(host="h3", checks=[["init", "timeout", 0, "timeout: init did not finish within "
                                                              "60s; waiting for h2 (never joined)"]]))
    results = {"h1": waited, "h2": bad, "h3": timed}
    out = nc.lines(results)
    assert out[1] == "h2: FAIL at preflight: GLOO_SOCKET_IFNAME=eth9: no interface eth9 on h2 (it has eth0, lo)"
    assert out[0].startswith("h1: FAIL at init: stopped: h2")
    assert out[-1] == "verdict: FAIL: h2 failed; h1, h3 stopped or timed out because of it"
    assert nc.verdict({"h3": timed})[1].startswith("FAIL: timed out on h3")
    assert nc.verdict({"h1": nc.parse_result("h1", _result(host="h1"))})[0]


def test_collect_from_a_report(tmp_path):
    job = _job(_inventory(tmp_path, _gpu_hosts(3)))
    by = {s.id: s for s in nc.steps(job)}
    image_failed = Outcome(SimpleNamespace(id="h3/image", host="h3", phase="image"), "failed", "pull: no such image")
    report = Report(outcomes=[Outcome(by["h1/netcheck"], "ran", detail=_result(host="h1")),
                              Outcome(by["h2/netcheck"], "failed", _result(checks=[["init", "timeout", 0, "t"]])),
                              image_failed])
    r = nc.collect(job, report)
    assert r["h1"].ok and r["h2"].status == "timeout"
    assert r["h3"].status == "error" and nc.line(r["h3"]) == "h3: FAIL could not run (image): pull: no such image"
    r = nc.collect(job, Report(outcomes=[image_failed]))
    assert r["h1"].status == "not run" and "h3 image" in nc.line(r["h1"])


# ---------------------------------------------------------------- captured on 2 x NVIDIA H200 (see the README)
def _fixture(name: str) -> nc.HostResult:
    host = json.loads((FIXTURES / f"{name}.json").read_text())["host"]
    return nc.result_from_output(host, (FIXTURES / f"{name}.out").read_text().splitlines())


def test_fixture_one_host_two_gpus_nccl_and_gloo_pass():
    r = _fixture("s1")
    assert r.ok and r.device == "cuda" and r.ranks == (0, 1) and r.world == 2
    assert r.torch == "2.11.0+cu130" and r.nccl == "2.28.9" and r.gpu == "NVIDIA H200"
    assert [(c, s) for c, s, _, _ in r.checks] == [("preflight", "ok"), ("torch", "ok"), ("init", "ok"),
                                                   ("nccl", "ok"), ("gloo", "ok")]
    assert dict((c, m) for c, _, _, m in r.checks)["nccl"] == "sum 3 == expected over 2 ranks"


def test_fixture_two_hosts_one_gpu_each_pass():
    results = {r.host: r for r in (_fixture("s2-a"), _fixture("s2-b"))}
    assert nc.verdict(results) == (True, "PASS: 2 host(s), 2 ranks: rendezvous and NCCL and GLOO all-reduce checked "
                                         "on every host")
    assert results["node-b"].ranks == (1, 1)
    assert "NCCL INFO Channel" in (FIXTURES / "s2-a.err").read_text()    # NCCL_DEBUG=INFO really went through NCCL


def test_fixture_wrong_gloo_nic_fails_fast_with_its_name():
    results = {r.host: r for r in (_fixture("s3-a"), _fixture("s3-b"))}
    bad = nc.line(results["node-b"])
    assert bad.startswith("node-b: FAIL at preflight: GLOO_SOCKET_IFNAME=eth9: no interface eth9 on node-b")
    assert results["node-a"].status == "stopped" and "node-b (rank 1) failed preflight" in results["node-a"].message
    assert nc.verdict(results) == (False, "FAIL: node-b failed; node-a stopped or timed out because of it")
    runs = (FIXTURES / "runs.txt").read_text()
    assert "s3-a: exit 1 in" in runs and int(runs.split("s3-a: exit 1 in ")[1].split()[0]) < 30   # not a hang


# ---------------------------------------------------------------- the command, end to end without hosts
def test_cli_with_unreachable_hosts_says_so_per_host(tmp_path):
    """Nothing listens on the SSH port: one line per host, a verdict, exit 1, no traceback; --json the same."""
    key = tmp_path / "key"
    r = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("ssh-keygen is not available")
    (tmp_path / "known_hosts").write_text("")
    hosts = _gpu_hosts(2)
    for i, h in enumerate(hosts, 1):
        h["address"] = f"127.0.0.{i}"
    path = Path(_inventory(tmp_path, hosts))
    data = yaml.safe_load(path.read_text())
    data["cluster"]["ssh"] = {"user": "root", "port": 1, "identity_file": str(key),
                              "known_hosts": str(tmp_path / "known_hosts"), "connect_timeout": 2}
    path.write_text(yaml.safe_dump(data))
    cli = [sys.executable, "-m", "cluster", "check", "network", str(path)]
    root = Path(nc.__file__).parents[1]
    r = subprocess.run(cli, capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    # the image reaches h2 from h1 over the LAN (image_fanout: lan): h2's step waits on h1's, which failed
    assert r.stdout.splitlines() == ["h1: FAIL could not run (image): cannot connect: Connection refused",
                                     "h2: FAIL not run (h1 image failed first)",
                                     "verdict: FAIL: h1 failed; h2 stopped or timed out because of it"]
    r = subprocess.run([*cli, "--json"], capture_output=True, text=True, cwd=root, timeout=120)
    out = json.loads(r.stdout)
    assert r.returncode == 1 and r.stderr == "" and out["verdict"] == "fail" and out["world"] == 4
    assert [s["id"] for s in out["plan"]] == ["h1/image", "h1/image-send", "h2/image", "h1/netcheck", "h2/netcheck"]
