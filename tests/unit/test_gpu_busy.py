"""gpu-busy: GPU memory held by processes that are not this cluster's engine (a leftover run, vLLM #20860).

Ours vs others by the container id in each PID's cgroup; error above the (1 - gpu-memory-utilization) share that
vLLM leaves free, else a warning; a CPU profile is never judged. The probe half runs against a fake host."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cluster import facts, ops
from cluster.checks import ERROR, WARNING

ROOT = Path(__file__).resolve().parents[2]
OURS = "a" * 64          # this cluster's running container
THEIRS = "b" * 64        # some other container (another cluster, a notebook)
V100 = 16160


def _gpus(n: int = 2) -> tuple[facts.GPU, ...]:
    return tuple(facts.GPU(index=i, name="Tesla V100-PCIE-16GB", memory_mib=V100, compute_capability="7.0",
                           driver="535.104.05", uuid=f"GPU-{i}000") for i in range(n))


def _proc(gpu: int = 0, pid: int | None = 4242, mib: int | None = 9000, name: str = "python3",
          containers: tuple[str, ...] | None = ()) -> facts.GPUProcess:
    return facts.GPUProcess(gpu=gpu, gpu_uuid=f"GPU-{gpu}000", pid=pid, name=name, used_mib=mib, containers=containers)


def _host(*procs: facts.GPUProcess, ours: tuple[str, ...] | None = (OURS,)) -> facts.HostFacts:
    return facts.HostFacts(host="h1", gpus=_gpus(), gpu_processes=procs, cluster_containers=ours)


def _busy(f: facts.HostFacts, util: float = 0.9, gpus: str = "all"):
    return facts.gpu_busy("h1", f, utilization=util, gpus=gpus)


# ---------------------------------------------------------------- ours vs others
def test_a_leftover_process_over_the_free_share_is_an_error_naming_host_gpu_pid_and_mib():
    found = _busy(_host(_proc(pid=4242, mib=9000)))
    assert found.code == "gpu-busy" and found.severity == ERROR
    assert found.message.startswith("h1: GPU 0 is held by pid 4242 (python3, 9000 MiB)")
    assert "9000 of 16160 MiB, more than the 10% that gpu-memory-utilization 0.9 leaves free" in found.message
    assert "\n" not in found.message and "\n" not in found.fix                 # one line each
    assert "`kill 4242`" in found.fix and "nvidia-smi --query-compute-apps=pid" in found.fix
    assert "lower gpu-memory-utilization to 0.43" in found.fix               # (16160 - 9000) / 16160 = 0.443


def test_this_clusters_own_engine_is_not_busy():
    ours = _proc(pid=10, mib=14000, containers=(OURS,))
    assert _busy(_host(ours)) is None                                         # a second `up`: our engine holds it
    nested = _proc(pid=11, mib=14000, containers=(THEIRS, OURS))             # cgroup names ours somewhere
    assert _busy(_host(nested)) is None
    other = _proc(pid=12, mib=2000, containers=(THEIRS,))
    found = _busy(_host(ours, other))
    assert "pid 12 " in found.message and "pid 10 " not in found.message and found.severity == ERROR


def test_other_clusters_container_counts_as_others():
    assert _busy(_host(_proc(containers=(THEIRS,)), ours=())).severity == ERROR


@pytest.mark.parametrize("mib, util, severity", [
    (1616, 0.9, WARNING),          # exactly the 10% left free: vLLM still starts, with less KV cache
    (1617, 0.9, ERROR),
    (500, 0.9, WARNING),
    (4000, 0.8, ERROR),            # 20% left free: 3232 MiB
    (3000, 0.8, WARNING),
    (8080, 0.5, WARNING),
    (8081, 0.5, ERROR),
])
def test_threshold_is_the_share_utilization_leaves_free(mib, util, severity):
    found = _busy(_host(_proc(mib=mib)), util=util)
    assert found.severity == severity, found.message
    if severity == WARNING:
        assert "less KV cache" in found.message


def test_memory_is_summed_per_gpu_and_gpus_are_judged_apart():
    f = _host(_proc(gpu=0, pid=1, mib=1000), _proc(gpu=0, pid=2, mib=1000), _proc(gpu=1, pid=3, mib=500))
    found = _busy(f)
    assert found.severity == ERROR                                            # 2000 > 1616 on GPU 0
    assert "GPU 0 is held by pid 1 (python3, 1000 MiB), pid 2 (python3, 1000 MiB): 2000 of 16160 MiB" in found.message
    assert "; GPU 1 is held by pid 3 (python3, 500 MiB): 500 of 16160 MiB, that much less KV cache" in found.message
    assert "`kill 1 2 3`" in found.fix


def test_unread_cgroup_is_others_only_when_no_container_of_ours_runs():
    gone = _proc(pid=4242, containers=None)                # /proc/4242 not readable (or the process just ended)
    assert _busy(_host(gone, ours=())).severity == ERROR   # nothing of ours runs there: it cannot be ours
    maybe = _busy(_host(gone, ours=(OURS,)))
    assert maybe.severity == WARNING and "it may be this cluster's own" in maybe.message
    assert _busy(_host(_proc(pid=None, containers=None), ours=(OURS,))).severity == WARNING   # pid [N/A]
    assert "pid ? (python3, 9000 MiB" in _busy(_host(_proc(pid=None, containers=None), ours=())).message


def test_docker_ps_failed_only_a_host_process_is_surely_others():
    assert _busy(_host(_proc(containers=()), ours=None)).severity == ERROR          # not in any container
    assert _busy(_host(_proc(containers=(THEIRS,)), ours=None)).severity == WARNING  # some container: can't tell


def test_unknown_memory_and_zero_memory():
    found = _busy(_host(_proc(mib=None, name="?")))
    assert found.severity == WARNING and "pid 4242 (?, memory unknown)" in found.message
    assert _busy(_host(_proc(mib=0))) is None


def test_only_the_gpus_docker_gives_the_container():
    f = _host(_proc(gpu=0, mib=9000))
    assert _busy(f, gpus="device=1") is None
    assert _busy(f, gpus='"device=0,1"').severity == ERROR
    assert _busy(f, gpus="1").severity == ERROR                      # --gpus 1: the first GPU
    assert _busy(_host(_proc(gpu=1)), gpus="1") is None


def test_a_process_on_an_unlisted_gpu_is_named_by_its_uuid():
    p = dataclasses.replace(_proc(), gpu=None, gpu_uuid="MIG-1234")
    found = _busy(_host(p))
    assert found.severity == WARNING and "GPU MIG-1234 is held by pid 4242" in found.message


def test_idle_host_has_no_finding():
    assert _busy(facts.HostFacts(host="h1", gpus=_gpus())) is None


# ---------------------------------------------------------------- measured_findings: the deployment's hosts only
def _plan(tmp_path: Path, *, util: float | None = None, profile: str = "vllm-v0.6.3", cpu: bool = False):
    gpus = {"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": V100, "compute_capability": "7.0"}
    deploy = {"profile": profile, "model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel": 2,
              "engine_args": {"max-model-len": 2048, **({"gpu-memory-utilization": util} if util else {})}}
    if cpu:
        (tmp_path / "cpu.yaml").write_text("engine: vllm-mp\ndevice: cpu\nimage: vllm/vllm-openai-cpu:v0.32.0\n")
        deploy["profile"] = str(tmp_path / "cpu.yaml")
    hosts = [{"name": n, "address": f"10.0.0.{i}", "interface": "eth0", **({} if cpu else {"gpus": gpus})}
             for i, n in enumerate(("h1", "h2"), 1)]
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump({"cluster": {"name": "lab", "model_dir": "/Data/models"}, "hosts": hosts,
                                    "deploy": deploy}))
    inv, prof = ops.load(str(path))
    return ops.make_plan(inv, prof, hosts=["h1"])


def _probed(**procs) -> dict[str, facts.HostFacts]:
    return {name: facts.HostFacts(host=name, interface="eth0", gpus=_gpus(), gpu_processes=tuple(ps),
                                  cluster_containers=()) for name, ps in procs.items()}


def test_measured_findings_judge_the_deployments_hosts_with_its_utilization(tmp_path):
    plan = _plan(tmp_path)
    assert plan.topology.nodes == ("h1",)
    busy = [f for f in ops.measured_findings(plan, _probed(h1=[_proc(mib=2000)], h2=[_proc(mib=9000)]))
            if f.code == "gpu-busy"]
    assert len(busy) == 1 and busy[0].message.startswith("h1: ") and busy[0].severity == ERROR   # h2 is not used
    relaxed = _plan(tmp_path, util=0.8)
    (f,) = [f for f in ops.measured_findings(relaxed, _probed(h1=[_proc(mib=2000)])) if f.code == "gpu-busy"]
    assert relaxed.memory.utilization == 0.8
    assert f.severity == WARNING and "less KV cache" in f.message and "lower gpu-memory-utilization" not in f.fix


def test_measured_findings_fail_the_plan(tmp_path):
    plan = _plan(tmp_path)
    found = ops.measured_findings(plan, _probed(h1=[_proc(mib=9000)]))
    failed = dataclasses.replace(plan, findings=plan.findings + tuple(found))
    assert failed.verdict == "fail"
    err = str(ops.PlanFailed(failed, "with the measured host facts"))
    assert "gpu-busy: h1: GPU 0 is held by pid 4242 (python3, 9000 MiB)" in err and "\n" not in err


def test_cpu_profile_skips_gpu_busy(tmp_path):
    plan = _plan(tmp_path, cpu=True)
    assert not [f for f in ops.measured_findings(plan, _probed(h1=[_proc(mib=16000)])) if f.code == "gpu-busy"]


# ---------------------------------------------------------------- probe_host: what it runs, against a fake host
class _Result(SimpleNamespace):
    def last_line(self) -> str:
        lines = (self.stdout + self.stderr).strip().splitlines()
        return lines[-1] if lines else ""


class _FakeHosts:
    """Answers probe_host's commands like a host with one V100 pair; records every argv."""

    def __init__(self, apps: str, cgroups: str = "", ps: str = "", ps_ok: bool = True):
        self.inventory = SimpleNamespace(cluster=SimpleNamespace(name="lab"))
        self.apps, self.cgroups, self.ps, self.ps_ok, self.ran = apps, cgroups, ps, ps_ok, []

    def run(self, host, argv, timeout=None):
        argv = tuple(argv)
        self.ran.append(argv)
        ok = lambda out: _Result(ok=True, rc=0, stdout=out, stderr="")      # noqa: E731
        if argv == facts.CLOCK:
            return ok("1700000000.0\n")
        if argv == facts.GPU_QUERY:
            return ok("".join(f"{g.index}, {g.name}, {g.memory_mib}, 7.0, 535.104.05, 00000000:18:00.0, {g.uuid}\n"
                              for g in _gpus()))
        if argv == facts.COMPUTE_APPS:
            return ok(self.apps)
        if argv[:2] == ("docker", "ps"):
            return ok(self.ps) if self.ps_ok else _Result(ok=False, rc=1, stdout="", stderr="permission denied")
        if argv[:2] == ("sh", "-c") and argv[2] == facts.CGROUP_SCRIPT:
            return ok(self.cgroups)
        return _Result(ok=False, rc=127, stdout="", stderr="not here")


HOST = SimpleNamespace(name="h1", address="10.0.0.1")


def test_probe_host_idle_gpus_cost_one_command():
    hosts = _FakeHosts(apps="")
    f = ops.probe_host(hosts, HOST, "/Data/models")
    assert f.gpu_processes == () and f.cluster_containers is None
    assert facts.COMPUTE_APPS in hosts.ran
    assert not [a for a in hosts.ran if a[:2] in (("docker", "ps"), ("sh", "-c"))]


def test_probe_host_reads_owners_of_busy_gpus():
    apps = "GPU-0000, 4242, python3, 9000\nGPU-1000, 77, python3, 14000\nGPU-1000, [N/A], ?, 10\n"
    cgroups = f"4242 0::/user.slice/session-3.scope\n77 0::/system.slice/docker-{OURS}.scope\n"
    hosts = _FakeHosts(apps=apps, cgroups=cgroups, ps=f"{OURS}\n")
    f = ops.probe_host(hosts, HOST, "/Data/models")
    assert ("docker", "ps", "-q", "--no-trunc", "--filter", "label=gpucluster.cluster=lab") in hosts.ran
    assert ("sh", "-c", facts.CGROUP_SCRIPT, "-", "77", "4242") in hosts.ran     # PIDs as arguments only
    assert f.cluster_containers == (OURS,)
    assert [(p.gpu, p.pid, p.containers) for p in f.gpu_processes] == [(0, 4242, ()), (1, 77, (OURS,)), (1, None, None)]
    found = facts.gpu_busy("h1", f, utilization=0.9)
    assert found.severity == ERROR and "pid 4242 " in found.message and "pid 77 " not in found.message
    assert "pid ? (?, 10 MiB; whose it is could not be read" in found.message


def test_probe_host_docker_ps_failing_leaves_owners_unknown():
    hosts = _FakeHosts(apps="GPU-0000, 4242, python3, 9000\n", cgroups=f"4242 0::/docker/{THEIRS}\n", ps_ok=False)
    f = ops.probe_host(hosts, HOST, "/Data/models")
    assert f.cluster_containers is None
    assert facts.gpu_busy("h1", f, utilization=0.9).severity == WARNING
