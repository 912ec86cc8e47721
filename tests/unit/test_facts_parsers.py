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
                          driver="580.159.04", bus_id="00000000:00:06.0")


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
