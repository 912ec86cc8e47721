"""Probes: each a command (argv) plus a pure parser of its machine-readable output."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .config import GPUs, Host, Inventory

GPU_FIELDS = ("index", "name", "memory.total", "compute_cap", "driver_version", "pci.bus_id", "uuid")
GPU_QUERY = ("nvidia-smi", f"--query-gpu={','.join(GPU_FIELDS)}", "--format=csv,noheader,nounits")
# Drivers older than 510 do not know compute_cap; then the name decides (table below).
GPU_QUERY_OLD = ("nvidia-smi", "--query-gpu=index,name,memory.total,driver_version,pci.bus_id,uuid",
                 "--format=csv,noheader,nounits")
CC_BY_NAME = {"V100": "7.0", "T4": "7.5", "RTX 2080": "7.5", "A100": "8.0", "A800": "8.0", "A30": "8.0",
              "A10": "8.6", "A40": "8.6", "RTX 3080": "8.6", "RTX 3090": "8.6", "A6000": "8.6",
              "L4": "8.9", "L40": "8.9", "RTX 4090": "8.9", "H100": "9.0", "H800": "9.0", "H200": "9.0",
              "H20": "9.0", "P100": "6.0", "P40": "6.1", "P4": "6.1"}

OS_RELEASE = ("cat", "/etc/os-release")
UNAME = ("uname", "-sr")
DOCKER_VERSION = ("docker", "version", "--format", "{{json .}}")
DOCKER_INFO = ("docker", "info", "--format", "{{json .}}")
IP_ADDR = ("ip", "-j", "addr", "show")
ROUTE_TO_INTERNET = ("ip", "-j", "route", "get", "8.8.8.8")   # a route lookup; sends nothing
CLOCK = ("date", "+%s.%N")
MEMINFO = ("cat", "/proc/meminfo")


@dataclass(frozen=True)
class Observed:
    """What `docker inspect` says about a container (parse_inspect)."""

    name: str
    id: str
    running: bool
    status: str
    labels: dict[str, str] = field(default_factory=dict)
    image_id: str = ""


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_mib: int
    compute_capability: str
    driver: str
    bus_id: str = ""


@dataclass(frozen=True, kw_only=True)
class HostFacts:
    host: str
    reachable: bool = True
    error: str | None = None
    os: str = ""
    kernel: str = ""
    docker_version: str | None = None
    gpu_runtime: bool = False
    gpus: tuple[GPU, ...] = ()
    disk_free: int | None = None
    disk_path: str = ""
    interface: str | None = None      # the NIC holding the inventory address
    route_src: str | None = None      # source address of the route to the internet (what vLLM 0.3.0 uses)
    clock_offset: float | None = None
    mem_total: int | None = None
    problems: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- parsers (pure)
def parse_os_release(text: str) -> str:
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return values.get("PRETTY_NAME", values.get("NAME", "?")).strip('"')


def parse_gpus(text: str) -> list[GPU]:
    """`nvidia-smi --query-gpu=<GPU_FIELDS or GPU_QUERY_OLD fields> --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == len(GPU_FIELDS):
            index, name, mem, cc, driver, bus, _ = cells
        elif len(cells) == len(GPU_FIELDS) - 1:
            index, name, mem, driver, bus, _ = cells
            cc = cc_for_name(name)
        else:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        gpus.append(GPU(index=int(index), name=name, memory_mib=int(float(mem.split()[0])),
                        compute_capability=cc, driver=driver, bus_id=bus))
    return gpus


def cc_for_name(name: str) -> str:
    for key, cc in CC_BY_NAME.items():
        if key in name:
            return cc
    return "?"


def parse_docker_version(text: str) -> str | None:
    data = json.loads(text)
    server = data.get("Server") or {}
    return server.get("Version")


def parse_gpu_runtime(info_text: str) -> bool:
    """Whether the daemon can run GPU containers: an nvidia runtime or CDI devices configured."""
    info = json.loads(info_text)
    runtimes = info.get("Runtimes") or {}
    return "nvidia" in runtimes or bool(info.get("CDISpecDirs") and info.get("DiscoveredDevices"))


def parse_df(text: str) -> tuple[int, str] | None:
    """`df -B1 --output=avail,target P...`: the first path that exists (deepest first)."""
    for line in text.splitlines()[1:]:
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].isdigit():
            return int(parts[0]), parts[1].strip()
    return None


def parse_interface(ip_addr_json: str, address: str) -> str | None:
    for link in json.loads(ip_addr_json):
        for a in link.get("addr_info", []):
            if a.get("local") == address:
                return link.get("ifname")
    return None


def parse_route_src(ip_route_json: str) -> str | None:
    routes = json.loads(ip_route_json) if ip_route_json.strip() else []
    return routes[0].get("prefsrc") if routes else None


def parse_meminfo(text: str) -> int | None:
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def parse_inspect(text: str) -> list[Observed]:
    """`docker inspect` JSON (a list) -> what we need of each container."""
    out = []
    for c in json.loads(text):
        state = c.get("State") or {}
        out.append(Observed(name=c.get("Name", "").lstrip("/"), id=c.get("Id", ""),
                            running=bool(state.get("Running")), status=state.get("Status", "?"),
                            labels=(c.get("Config") or {}).get("Labels") or {}, image_id=c.get("Image", "")))
    return out


def probe_argvs(model_dir: str) -> list[tuple[str, ...]]:
    """Every read-only command `probe` (and so `up`, before any step) runs on a host."""
    return [CLOCK, GPU_QUERY, GPU_QUERY_OLD, DOCKER_INFO, ROUTE_TO_INTERNET, tuple(df_argv(model_dir)), OS_RELEASE,
            UNAME, DOCKER_VERSION, IP_ADDR, MEMINFO]


def df_argv(path: str) -> tuple[str, ...]:
    parts = path.rstrip("/").split("/")
    candidates = ["/".join(parts[:i]) or "/" for i in range(len(parts), 0, -1)]
    return ("df", "-B1", "--output=avail,target", *candidates)


# ---------------------------------------------------------------- inventory vs measured
def contradictions(host: Host, f: HostFacts) -> list[str]:
    """Where the host contradicts what the inventory declares (empty: it agrees)."""
    if not f.reachable:
        return [f.error or "unreachable"]
    out = list(f.problems)
    if f.docker_version is None:
        out.append("docker: no server answered (is the daemon running, and may this user use it?)")
    if host.gpus is None:         # a CPU host: its GPUs (if any) are not part of the deployment
        return out
    if not f.gpus:
        return out + ["no GPU found by nvidia-smi"]
    g = host.gpus
    if len(f.gpus) != g.count:
        out.append(f"gpus.count: declared {g.count}, found {len(f.gpus)}")
    names = {x.name for x in f.gpus}
    if g.name and names != {g.name}:
        out.append(f"gpus.name: declared {g.name!r}, found {', '.join(sorted(names))}")
    mem = min(x.memory_mib for x in f.gpus)
    if abs(mem - g.memory_mib) > 0.03 * g.memory_mib:
        out.append(f"gpus.memory_mib: declared {g.memory_mib}, found {mem}")
    ccs = {x.compute_capability for x in f.gpus}
    if ccs != {g.compute_capability}:
        out.append(f"gpus.compute_capability: declared {g.compute_capability}, found {', '.join(sorted(ccs))}")
    drivers = {x.driver for x in f.gpus}
    if g.driver and drivers != {g.driver}:
        out.append(f"gpus.driver: declared {g.driver}, found {', '.join(sorted(drivers))}")
    if f.interface is None:
        out.append(f"address {host.address} is not on any interface of the host")
    elif host.interface and host.interface != f.interface:
        out.append(f"interface: declared {host.interface}, but {host.address} is on {f.interface}")
    return out


def measured(inv: Inventory, facts: dict[str, HostFacts]) -> Inventory:
    """The inventory with each probed host's GPUs and interface replaced by what was measured."""
    hosts = []
    for h in inv.hosts:
        f = facts.get(h.name)
        if f and f.reachable and f.gpus and h.gpus is not None:
            gpus = GPUs(count=len(f.gpus), name=f.gpus[0].name, memory_mib=min(x.memory_mib for x in f.gpus),
                        compute_capability=min(x.compute_capability for x in f.gpus), driver=f.gpus[0].driver)
            h = dataclasses.replace(h, gpus=gpus, interface=h.interface or f.interface)
        hosts.append(h)
    return dataclasses.replace(inv, hosts=hosts)
