"""Pure parsers of probe output, on real captures where there are some; contradictions(); measured()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import facts
from cluster.config import GPUs, Host, Inventory, load_inventory

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures" / "nvidia-smi"


def test_parse_gpus_h100_capture():
    (g,) = facts.parse_gpus((FIX / "h100-x1" / "query-gpu.csv").read_text())
    assert g == facts.GPU(index=0, name="NVIDIA H100 80GB HBM3", memory_mib=81559, compute_capability="9.0",
                          driver="580.159.04", bus_id="00000000:00:06.0",
                          uuid="GPU-c7519b0a-6385-4dd8-663e-4d68eb8f6953")


def test_parse_gpus_h200_capture():
    gpus = facts.parse_gpus((FIX / "h200-x2" / "query-gpu.csv").read_text())
    assert [g.index for g in gpus] == [0, 1]
    assert {g.name for g in gpus} == {"NVIDIA H200"}
    assert {g.memory_mib for g in gpus} == {143771}
    assert {(g.compute_capability, g.driver) for g in gpus} == {("9.0", "580.159.04")}
    assert [g.bus_id for g in gpus] == ["00000000:00:06.0", "00000000:00:07.0"]


def test_parse_gpus_with_units():
    """`--format=csv` (units, header dropped) still gives MiB as an int."""
    lines = (FIX / "h100-x1" / "query-gpu-units.csv").read_text().splitlines()[1:]
    (g,) = facts.parse_gpus("\n".join(lines))
    assert g.memory_mib == 81559


def test_parse_gpus_standin_v100(tmp_path):
    cfg = tmp_path / "gpus.json"
    cfg.write_text(json.dumps({"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160,
                               "compute_capability": "7.0", "driver": "535.104.05", "host": "gpu208"}))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "rig" / "nvidia_smi.py"), *facts.GPU_QUERY[1:]],
                       capture_output=True, text=True, env={**os.environ, "NVIDIA_SMI_STANDIN_CONFIG": str(cfg)},
                       timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr
    gpus = facts.parse_gpus(r.stdout)
    assert [(g.index, g.name, g.memory_mib, g.compute_capability, g.driver) for g in gpus] == [
        (0, "Tesla V100-PCIE-16GB", 16160, "7.0", "535.104.05"), (1, "Tesla V100-PCIE-16GB", 16160, "7.0", "535.104.05")]


@pytest.mark.parametrize("name, cc", [("Tesla V100-SXM2-32GB", "7.0"), ("Tesla T4", "7.5"),
                                      ("NVIDIA A100-SXM4-80GB", "8.0"), ("NVIDIA A10", "8.6"),
                                      ("NVIDIA H100 80GB HBM3", "9.0"), ("Tesla P40", "6.1"), ("Mystery GPU", "?")])
def test_parse_gpus_old_driver_falls_back_to_name(name, cc):
    line = f"0, {name}, 16160, 470.82.01, 00000000:18:00.0, GPU-1234"
    (g,) = facts.parse_gpus(line)
    assert (g.name, g.compute_capability, g.driver, g.memory_mib) == (name, cc, "470.82.01", 16160)


@pytest.mark.parametrize("name, cc", [
    # names that contain a shorter key of the table ("A100" holds "A10", "H200" holds "H20", "P100" holds "P10"...)
    ("NVIDIA A100 80GB PCIe", "8.0"), ("NVIDIA A10G", "8.6"), ("NVIDIA H200", "9.0"), ("NVIDIA H20", "9.0"),
    ("Tesla P100-PCIE-16GB", "6.0"), ("Tesla P40", "6.1"), ("NVIDIA L40S", "8.9"), ("NVIDIA GeForce RTX 3090", "8.6"),
])
def test_cc_for_name_with_overlapping_keys(name, cc):
    assert facts.cc_for_name(name) == cc


@pytest.mark.parametrize("text", [
    (FIX / "h100-x1" / "invalid-field.txt").read_text(),
    "0, NVIDIA H100",
    "garbage",
    "x, NVIDIA H100 80GB HBM3, 81559, 9.0, 580.159.04, 00000000:00:06.0, GPU-1",
    "0, NVIDIA H100 80GB HBM3, lots, 9.0, 580.159.04, 00000000:00:06.0, GPU-1",
])
def test_parse_gpus_garbage_raises(text):
    with pytest.raises(ValueError):
        facts.parse_gpus(text)


def test_parse_os_release_real_capture():
    text = (FIX / "h100-x1" / "os.txt").read_text().split("--- /etc/os-release", 1)[1]
    assert facts.parse_os_release(text) == "Ubuntu 24.04.3 LTS"
    assert facts.parse_os_release('NAME="Alpine Linux"\nID=alpine\n') == "Alpine Linux"
    assert facts.parse_os_release("") == "?"


def test_parse_df():
    text = "     Avail Mounted on\n1234567890 /data\n999 /\n"
    assert facts.parse_df(text) == (1234567890, "/data")
    assert facts.parse_df("     Avail Mounted on\n") is None
    assert facts.parse_df("") is None
    assert facts.parse_df("Avail Mounted on\n  42 /mnt/with space\n") == (42, "/mnt/with space")


def test_df_argv_deepest_first():
    assert facts.df_argv("/Data/models/") == ("df", "-B1", "--output=avail,target", "/Data/models", "/Data", "/")


IP_ADDR = json.dumps([
    {"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP"], "mtu": 65536, "operstate": "UNKNOWN",
     "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host", "label": "lo"},
                   {"family": "inet6", "local": "::1", "prefixlen": 128, "scope": "host"}]},
    {"ifindex": 2, "ifname": "eth0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "mtu": 1500,
     "operstate": "UP", "address": "52:54:00:12:34:56",
     "addr_info": [{"family": "inet", "local": "172.18.8.208", "prefixlen": 24, "broadcast": "172.18.8.255",
                    "scope": "global", "label": "eth0"},
                   {"family": "inet6", "local": "fe80::5054:ff:fe12:3456", "prefixlen": 64, "scope": "link"}]},
    {"ifindex": 3, "ifname": "ib0", "flags": ["UP"], "mtu": 2044, "operstate": "UP",
     "addr_info": [{"family": "inet", "local": "10.10.0.8", "prefixlen": 16, "scope": "global", "label": "ib0"}]},
    {"ifindex": 4, "ifname": "docker0", "flags": ["NO-CARRIER", "BROADCAST", "MULTICAST", "UP"],
     "operstate": "DOWN", "addr_info": []},
])


@pytest.mark.parametrize("address, ifname", [("172.18.8.208", "eth0"), ("10.10.0.8", "ib0"), ("127.0.0.1", "lo"),
                                             ("172.18.8.209", None), ("172.18.8.20", None)])
def test_parse_interface(address, ifname):
    assert facts.parse_interface(IP_ADDR, address) == ifname


def test_parse_route_src():
    route = json.dumps([{"dst": "8.8.8.8", "gateway": "172.18.8.1", "dev": "eth0", "prefsrc": "172.18.8.208",
                         "flags": [], "uid": 0, "cache": []}])
    assert facts.parse_route_src(route) == "172.18.8.208"
    assert facts.parse_route_src("") is None
    assert facts.parse_route_src("[]") is None


def test_parse_docker_version():
    text = json.dumps({"Client": {"Version": "27.3.1"}, "Server": {"Version": "27.3.1", "ApiVersion": "1.47"}})
    assert facts.parse_docker_version(text) == "27.3.1"
    assert facts.parse_docker_version(json.dumps({"Client": {"Version": "27.3.1"}, "Server": None})) is None


@pytest.mark.parametrize("info, expected", [
    ({"Runtimes": {"runc": {"path": "runc"}, "nvidia": {"path": "nvidia-container-runtime"}}}, True),
    ({"Runtimes": {"runc": {"path": "runc"}}}, False),
    ({"Runtimes": {"runc": {}}, "CDISpecDirs": ["/etc/cdi"], "DiscoveredDevices": [{"Source": "cdi", "ID": "nvidia.com/gpu=0"}]}, True),
    ({"Runtimes": {"runc": {}}, "CDISpecDirs": ["/etc/cdi"], "DiscoveredDevices": []}, False),
    ({}, False),
])
def test_parse_gpu_runtime(info, expected):
    assert facts.parse_gpu_runtime(json.dumps(info)) is expected


def test_parse_inspect():
    text = json.dumps([
        {"Id": "abc123", "Name": "/gpucluster-lab-ray-head", "Image": "sha256:feed",
         "State": {"Status": "running", "Running": True},
         "Config": {"Labels": {"gpucluster.cluster": "lab", "gpucluster.role": "ray-head", "gpucluster.spec": "0123"}}},
        {"Id": "def456", "Name": "/other", "State": {"Status": "exited", "Running": False}, "Config": {"Labels": None}},
    ])
    head, other = facts.parse_inspect(text)
    assert (head.name, head.id, head.running, head.status, head.image_id) == (
        "gpucluster-lab-ray-head", "abc123", True, "running", "sha256:feed")
    assert head.labels["gpucluster.spec"] == "0123"
    assert (other.name, other.running, other.status, other.labels) == ("other", False, "exited", {})
    assert facts.parse_inspect("[]") == []


def test_parse_meminfo():
    text = "MemTotal:       32778468 kB\nMemFree:         1234 kB\n"
    assert facts.parse_meminfo(text) == 32778468 * 1024
    assert facts.parse_meminfo("MemFree: 1 kB\n") is None


# ---------------------------------------------------------------- GPU memory holders (gpu-busy)
BUSY = FIX / "busy-h200"
H200_UUID = "GPU-8ec74874-af9e-f5bc-e258-9ebf7c3add13"


def _busy_gpus() -> list[facts.GPU]:
    """The busy H200's GPU, from its capture (query-gpu.csv there: index, uuid, name, memory.total, ...)."""
    out = []
    for line in (BUSY / "query-gpu.csv").read_text().splitlines():
        index, uuid, name, total, _used, cc, driver = (c.strip() for c in line.split(","))
        out.append(facts.GPU(index=int(index), name=name, memory_mib=int(total), compute_capability=cc, driver=driver,
                             uuid=uuid))
    return out


def test_parse_compute_apps_real_h200_capture():
    procs = facts.parse_compute_apps((BUSY / "compute-apps.csv").read_text(), _busy_gpus())
    holder = int((BUSY / "holder.txt").read_text().strip().split("=")[1])
    assert procs == [facts.GPUProcess(gpu=0, gpu_uuid=H200_UUID, pid=holder, name="python3", used_mib=3590)]
    assert procs[0].containers is None                                     # not read yet


def test_parse_gpus_keeps_uuid_for_the_mapping():
    gpus = facts.parse_gpus((FIX / "h200-x2" / "query-gpu.csv").read_text())
    assert all(g.uuid.startswith("GPU-") for g in gpus) and len({g.uuid for g in gpus}) == 2
    line = f"{gpus[1].uuid}, 77, python3, 100"
    assert [p.gpu for p in facts.parse_compute_apps(line, gpus)] == [1]
    assert [p.gpu for p in facts.parse_compute_apps(line, [])] == [None]  # GPUs unknown: still listed


@pytest.mark.parametrize("line, pid, name, mib", [
    (f"{H200_UUID}, [N/A], python3, [N/A]", None, "python3", None),
    (f"{H200_UUID}, 471, [Insufficient Permissions], 3590", 471, "?", 3590),
    (f"{H200_UUID}, " + ", ".join(["[Insufficient Permissions]"] * 3), None, "?", None),
    (f"{H200_UUID}, 471, /opt/my, app/bin/python3, 12", 471, "/opt/my, app/bin/python3", 12),  # a comma in the name
    (f"{H200_UUID}, 99999999, python3, 12", None, "python3", 12),          # above Linux's PID limit
    (f"{H200_UUID}, -5, python3, 1e9", None, "python3", None),
    (f"{H200_UUID}, \u0664\u0662, python3, \u00b2", None, "python3", None),   # non-ASCII digits
    (f"{H200_UUID}, 12, evil\x1b[31mred\x07, 5", 12, "evil?[31mred?", 5),     # control characters
    (f"{H200_UUID}, 12, {'x' * 5000}, 5", 12, "x" * 120, 5),
])
def test_parse_compute_apps_unknown_and_hostile_values(line, pid, name, mib):
    (p,) = facts.parse_compute_apps(line, _busy_gpus())
    assert (p.gpu, p.pid, p.name, p.used_mib) == (0, pid, name, mib)


@pytest.mark.parametrize("text", [
    "", "\n\n", "No running processes found", "garbage", "GPU-x, 1, 2",                  # too few fields
    "not-a-uuid, 471, python3, 3590", "GPU-$(reboot), 471, python3, 3590", "GPU-" + "a" * 200 + ", 1, p, 1",
    (FIX / "h100-x1" / "invalid-field.txt").read_text(),
])
def test_parse_compute_apps_skips_what_is_not_a_process(text):
    assert facts.parse_compute_apps(text, _busy_gpus()) == []


def test_parse_compute_apps_is_bounded():
    many = "\n".join(f"{H200_UUID}, {i + 1}, python3, 10" for i in range(facts.MAX_APPS * 4))
    assert len(facts.parse_compute_apps(many, _busy_gpus())) == facts.MAX_APPS
    huge = "x" * (facts.MAX_TEXT * 4) + f"\n{H200_UUID}, 1, python3, 10"
    assert facts.parse_compute_apps(huge, _busy_gpus()) == []          # only the first MAX_TEXT bytes are read


def test_compute_apps_standin_answers_like_the_real_one(tmp_path):
    cfg = tmp_path / "gpus.json"
    base = {"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160, "compute_capability": "7.0",
            "driver": "535.104.05", "host": "h1"}

    def smi(*argv):
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "rig" / "nvidia_smi.py"), *argv], capture_output=True,
                           text=True, env={**os.environ, "NVIDIA_SMI_STANDIN_CONFIG": str(cfg)}, timeout=20)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout
    cfg.write_text(json.dumps(base))
    assert smi(*facts.COMPUTE_APPS[1:]) == ""                          # nothing holds a GPU: nothing printed
    cfg.write_text(json.dumps({**base, "processes": [{"gpu": 1, "pid": 4242, "name": "python3", "used_mib": 9000}]}))
    gpus = facts.parse_gpus(smi(*facts.GPU_QUERY[1:]))
    out = smi(*facts.COMPUTE_APPS[1:])
    real = (BUSY / "compute-apps.csv").read_text()
    assert out.count(", ") == real.count(", ") and out.endswith("\n") == real.endswith("\n")   # the same shape
    assert facts.parse_compute_apps(out, gpus) == [facts.GPUProcess(gpu=1, gpu_uuid=gpus[1].uuid, pid=4242,
                                                                    name="python3", used_mib=9000)]
    mem = smi("--query-gpu=index,memory.used", "--format=csv,noheader,nounits")
    assert mem.splitlines() == ["0, 0", "1, 9000"]                    # memory.used counts it, as a real one does


def test_cgroups_argv_passes_only_pids_as_arguments():
    argv = facts.cgroups_argv([471, 12, 12, "1; reboot", -3, 0, True, 1 << 30, None, 4194304])
    assert argv == ("sh", "-c", facts.CGROUP_SCRIPT, "-", "12", "471", "4194304")
    assert "$p" in facts.CGROUP_SCRIPT and "471" not in facts.CGROUP_SCRIPT
    assert facts.own_containers_argv("lab; x") == ("docker", "ps", "-q", "--no-trunc", "--filter",
                                                  "label=gpucluster.cluster=lab; x")


def test_cgroup_script_runs_in_sh_and_skips_what_is_not_a_pid():
    """The script itself, here: this process's own cgroup lines, tagged with its PID; a non-PID is skipped."""
    r = subprocess.run(["sh", "-c", facts.CGROUP_SCRIPT, "-", str(os.getpid()), "../../etc/passwd", "999999999"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines and all(ln.startswith(f"{os.getpid()} ") for ln in lines)
    assert list(facts.parse_cgroups(r.stdout)) == [os.getpid()]


CID = "4f1d9a1c" * 8
CID2 = "0123abcd" * 8


@pytest.mark.parametrize("text, expected", [
    (f"471 0::/system.slice/docker-{CID}.scope\n", {471: (CID,)}),                     # cgroup v2, systemd driver
    (f"471 0::/docker/{CID}\n", {471: (CID,)}),                                         # cgroup v2, cgroupfs driver
    (f"471 12:memory:/docker/{CID}\n471 11:pids:/docker/{CID}\n471 1:name=systemd:/docker/{CID}\n",
     {471: (CID,)}),                                                                     # cgroup v1
    (f"9 0::/docker/{CID}/nested/docker/{CID2}\n", {9: (CID, CID2)}),                   # docker in docker
    ("471 0::/user.slice/user-1000.slice/session-3.scope\n", {471: ()}),                # a login session
    (f"471 0::/docker/{CID}a\n472 0::/docker/{CID[:63]}\n", {471: (), 472: ()}),       # 65 and 63 hex digits
    (f"x 0::/docker/{CID}\n99999999 0::/docker/{CID}\n 0::/\n", {}),                  # not a PID
    ("", {}),
])
def test_parse_cgroups(text, expected):
    assert facts.parse_cgroups(text) == expected


def test_parse_container_ids_and_with_cgroups():
    assert facts.parse_container_ids(f"{CID}\n{CID2}\n{CID}\nshort\n") == (CID, CID2)
    assert facts.parse_container_ids("") == ()
    procs = facts.parse_compute_apps(f"{H200_UUID}, 471, python3, 10\n{H200_UUID}, 472, python3, 10\n"
                                     f"{H200_UUID}, [N/A], python3, 10", _busy_gpus())
    got = facts.with_cgroups(procs, {471: (CID,)})
    assert [p.containers for p in got] == [(CID,), None, None]


def test_probe_argvs_list_the_compute_apps_query():
    assert facts.COMPUTE_APPS in facts.probe_argvs("/Data/models")


# ---------------------------------------------------------------- contradictions / measured
def _host(**gpus) -> Host:
    g = dict(count=2, name="Tesla V100-PCIE-16GB", memory_mib=16160, compute_capability="7.0", driver="535.104.05")
    g.update(gpus)
    return Host(name="gpu208", address="172.18.8.208", interface="eth0", gpus=GPUs(**g))


def _facts(n=2, name="Tesla V100-PCIE-16GB", mem=16160, cc="7.0", driver="535.104.05", **kw) -> facts.HostFacts:
    base = dict(host="gpu208", docker_version="27.3.1", interface="eth0",
                gpus=tuple(facts.GPU(index=i, name=name, memory_mib=mem, compute_capability=cc, driver=driver)
                           for i in range(n)))
    base.update(kw)
    return facts.HostFacts(**base)


def test_contradictions_none_when_matching():
    assert facts.contradictions(_host(), _facts()) == []
    assert facts.contradictions(_host(memory_mib=16384), _facts()) == []   # within 3 %


@pytest.mark.parametrize("kw, needle", [
    (dict(n=1), "gpus.count: declared 2, found 1"),
    (dict(name="Tesla V100-SXM2-32GB", mem=32510), "gpus.name"),
    (dict(mem=15000), "gpus.memory_mib: declared 16160, found 15000"),
    (dict(cc="7.5"), "gpus.compute_capability: declared 7.0, found 7.5"),
    (dict(driver="470.82.01"), "gpus.driver: declared 535.104.05, found 470.82.01"),
    (dict(interface=None), "address 172.18.8.208 is not on any interface"),
    (dict(interface="ib0"), "interface: declared eth0, but 172.18.8.208 is on ib0"),
    (dict(docker_version=None), "docker: no server answered"),
    (dict(n=0), "no GPU found by nvidia-smi"),
    (dict(reachable=False, error="connection timed out"), "connection timed out"),
])
def test_contradictions_found(kw, needle):
    found = facts.contradictions(_host(), _facts(**kw))
    assert any(needle in c for c in found), found


def test_measured_replaces_declared_gpus():
    inv = load_inventory(ROOT / "inventories" / "v100-3node.yaml")
    probed = {"gpu208": _facts(n=4, name="Tesla V100-SXM2-32GB", mem=32510, driver="550.54.15", interface="eth1"),
              "gpu209": facts.HostFacts(host="gpu209", reachable=False, error="timeout")}
    out = facts.measured(inv, probed)
    assert isinstance(out, Inventory)
    g208, g209, g210 = out.hosts
    assert g208.gpus == GPUs(count=4, name="Tesla V100-SXM2-32GB", memory_mib=32510, compute_capability="7.0",
                             driver="550.54.15")
    assert g208.interface == "eth0"                                 # the declared NIC is kept
    assert g209 == inv.hosts[1] and g210 == inv.hosts[2]            # unreachable / unprobed: unchanged
    assert inv.hosts[0].gpus.count == 2                             # the input is not mutated


def test_measured_takes_smallest_memory():
    inv = load_inventory(ROOT / "inventories" / "v100-3node.yaml")
    f = _facts()
    f = facts.HostFacts(**{**f.as_dict(), "gpus": (facts.GPU(0, "Tesla V100-PCIE-16GB", 16160, "7.0", "535"),
                                                   facts.GPU(1, "Tesla V100-PCIE-16GB", 15000, "7.0", "535"))})
    assert facts.measured(inv, {"gpu208": f}).hosts[0].gpus.memory_mib == 15000
