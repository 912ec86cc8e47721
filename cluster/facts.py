"""Probes: each a command (argv) plus a pure parser of its machine-readable output."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

from .checks import ERROR, WARNING, Finding
from .config import GPUs, Host, Inventory
from .containers import LABEL

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
# Who holds GPU memory: host PIDs (run on the host). The cluster's container ids and the PIDs' cgroups are read
# only when some process is listed (own_containers_argv, cgroups_argv), so an idle host costs one command.
COMPUTE_APPS = ("nvidia-smi", "--query-compute-apps=gpu_uuid,pid,process_name,used_memory",
                "--format=csv,noheader,nounits")
MAX_APPS = 256                 # processes read from one host (what a host runs is far fewer)
MAX_TEXT = 1 << 17             # bytes of probe output parsed (the rest is not read)
PID_MAX = 1 << 22              # Linux's PID_MAX_LIMIT
# `pid line` for each line of /proc/PID/cgroup; PIDs come as arguments, checked again here (never in the script)
CGROUP_SCRIPT = ('for p; do case $p in ""|*[!0-9]*) continue;; esac; '
                 'while IFS= read -r l; do printf "%s %s\\n" "$p" "$l"; done < "/proc/$p/cgroup"; '
                 'done 2>/dev/null; true')


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
    uuid: str = ""


@dataclass(frozen=True)
class GPUProcess:
    """A process holding memory on a GPU (`nvidia-smi --query-compute-apps`); None where nvidia-smi could not say."""

    gpu: int | None                # the GPU's index (None: a uuid the GPU query did not list, e.g. a MIG device)
    gpu_uuid: str
    pid: int | None                # a host PID ("[N/A]" in containers without access to the host's PIDs)
    name: str
    used_mib: int | None
    containers: tuple[str, ...] | None = None   # container ids its cgroup names; None: its cgroup was not read


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
    gpu_processes: tuple[GPUProcess, ...] = ()       # per GPU: GPUProcess.gpu is its index
    # this cluster's running container ids, read only when some process holds a GPU (None: not read)
    cluster_containers: tuple[str, ...] | None = None
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
            index, name, mem, cc, driver, bus, uuid = cells
        elif len(cells) == len(GPU_FIELDS) - 1:
            index, name, mem, driver, bus, uuid = cells
            cc = cc_for_name(name)
        else:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        gpus.append(GPU(index=int(index), name=name, memory_mib=int(float(mem.split()[0])),
                        compute_capability=cc, driver=driver, bus_id=bus, uuid=uuid))
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


_GPU_UUID = re.compile(r"(GPU|MIG)-[0-9A-Za-z-]{1,80}")
_CONTAINER_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")


def _number(value: str, limit: int) -> int | None:
    """A plain decimal (nounits) within limit, else None ("[N/A]", "[Insufficient Permissions]", garbage)."""
    return int(value) if re.fullmatch(r"[0-9]{1,10}", value) and int(value) <= limit else None


def _text(value: str) -> str:
    """A name from the host, for one line of output: printable, short; "?" where nvidia-smi withheld it."""
    value = "".join(c if c.isprintable() else "?" for c in value)[:120]
    return "?" if not value or (value.startswith("[") and value.endswith("]")) else value


def parse_compute_apps(text: str, gpus: list[GPU] | tuple[GPU, ...]) -> list[GPUProcess]:
    """COMPUTE_APPS output; each process's GPU index from its uuid (parse_gpus). Lines that are not a process
    (a message, garbage) are skipped: this is a host's text, read bounded."""
    index = {g.uuid: g.index for g in gpus if g.uuid}
    out = []
    for line in text[:MAX_TEXT].splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 4 or not _GPU_UUID.fullmatch(cells[0]):
            continue
        out.append(GPUProcess(gpu=index.get(cells[0]), gpu_uuid=cells[0], pid=_number(cells[1], PID_MAX),
                              name=_text(", ".join(cells[2:-1])), used_mib=_number(cells[-1], 1 << 31)))
        if len(out) == MAX_APPS:
            break
    return out


def own_containers_argv(cluster: str) -> tuple[str, ...]:
    """The full ids of this cluster's running containers on a host."""
    return ("docker", "ps", "-q", "--no-trunc", "--filter", f"label={LABEL}.cluster={cluster}")


def parse_container_ids(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_CONTAINER_ID.findall(text[:MAX_TEXT])))


def cgroups_argv(pids) -> tuple[str, ...]:
    """Prints `PID LINE` for each line of /proc/PID/cgroup of the given PIDs (digits only, as arguments)."""
    ok = sorted({p for p in pids if type(p) is int and 0 < p <= PID_MAX})[:MAX_APPS]
    return ("sh", "-c", CGROUP_SCRIPT, "-", *map(str, ok))


def parse_cgroups(text: str) -> dict[int, tuple[str, ...]]:
    """PID -> the container ids its cgroup lines name (docker's `/docker/<id>` and `docker-<id>.scope` both hold
    the 64-hex id); a PID with no line is absent (gone, or its /proc entry not readable)."""
    out: dict[int, dict[str, None]] = {}
    for line in text[:MAX_TEXT].splitlines():
        pid, _, rest = line.partition(" ")
        n = _number(pid, PID_MAX)
        if n is not None:
            out.setdefault(n, {}).update(dict.fromkeys(_CONTAINER_ID.findall(rest)))
    return {p: tuple(ids) for p, ids in out.items()}


def with_cgroups(processes, cgroups: dict[int, tuple[str, ...]]) -> tuple[GPUProcess, ...]:
    return tuple(dataclasses.replace(p, containers=cgroups[p.pid]) if p.pid in cgroups else p for p in processes)


# ---------------------------------------------------------------- GPU memory held by others
def _devices(spec: str) -> set[int] | None:
    """The GPU indexes `docker run --gpus SPEC` gives a container (None: all of them)."""
    spec = spec.strip().strip("'\"")
    if spec.isdigit():
        return set(range(int(spec)))
    m = re.fullmatch(r"device=([0-9,\s]+)", spec)
    return {int(x) for x in m.group(1).split(",") if x.strip()} if m else None


def _owner(p: GPUProcess, ours: tuple[str, ...] | None) -> str:
    """ours | other | unknown: ours when its cgroup names one of this cluster's running containers."""
    if p.containers is not None:
        if ours is not None and set(p.containers) & set(ours):
            return "ours"
        return "other" if ours is not None or not p.containers else "unknown"
    return "other" if ours == () else "unknown"   # no cgroup read: only with no container of ours can it be other


def gpu_busy(host: str, f: HostFacts, *, utilization: float, gpus: str = "all") -> Finding | None:
    """gpu-busy: processes that are not this cluster's hold memory on the host's GPUs (a leftover run, vLLM #20860).
    An error when they hold more than the (1 - utilization) share vLLM leaves free (it refuses to start when free
    memory is below total x utilization); else a warning (less KV cache)."""
    used = _devices(gpus)
    total = {g.index: g.memory_mib for g in f.gpus}
    held: dict[int | None, list[tuple[GPUProcess, str]]] = {}
    for p in f.gpu_processes:
        owner = _owner(p, f.cluster_containers)
        if owner != "ours" and p.used_mib != 0 and (used is None or p.gpu is None or p.gpu in used):
            held.setdefault(p.gpu, []).append((p, owner))
    if not held:
        return None
    parts, severity, pids, fits = [], WARNING, [], 1.0
    for gpu, procs in sorted(held.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
        pids += [str(p.pid) for p, _ in procs if p.pid is not None]
        who = ", ".join(_holder(p, owner) for p, owner in procs)
        text = f"GPU {gpu if gpu is not None else procs[0][0].gpu_uuid} is held by {who}"
        others, size = sum(p.used_mib or 0 for p, owner in procs if owner == "other"), total.get(gpu)
        if size and others:
            fits = min(fits, (size - others) / size)
            if others > round(size * (1 - utilization), 3):      # rounded: 16160 x (1 - 0.9) is 1616
                severity = ERROR
                text += (f": {others} of {size} MiB, more than the {1 - utilization:.0%} that gpu-memory-utilization "
                         f"{utilization:g} leaves free, so the engine would refuse to start")
            else:
                text += f": {others} of {size} MiB, that much less KV cache"
        parts.append(text)
    fix = (f"stop those processes on {host} (`kill {' '.join(dict.fromkeys(pids)) or 'PID'}`; `nvidia-smi "
           "--query-compute-apps=pid,process_name,used_memory --format=csv` lists what holds the GPUs)")
    if 0.1 <= fits < utilization:
        fix += f", or lower gpu-memory-utilization to {int(fits * 100 - 1) / 100:.2f}"
    return Finding(code="gpu-busy", severity=severity, message=f"{host}: " + "; ".join(parts), fix=fix)


def _holder(p: GPUProcess, owner: str) -> str:
    mib = f"{p.used_mib} MiB" if p.used_mib is not None else "memory unknown"
    maybe = "; whose it is could not be read: it may be this cluster's own" if owner == "unknown" else ""
    return f"pid {p.pid if p.pid is not None else '?'} ({p.name}, {mib}{maybe})"


def probe_argvs(model_dir: str) -> list[tuple[str, ...]]:
    """Every read-only command `probe` (and so `up`, before any step) runs on a host; when some process holds a GPU,
    also own_containers_argv and cgroups_argv (who holds it)."""
    return [CLOCK, GPU_QUERY, GPU_QUERY_OLD, COMPUTE_APPS, DOCKER_INFO, ROUTE_TO_INTERNET, tuple(df_argv(model_dir)),
            OS_RELEASE, UNAME, DOCKER_VERSION, IP_ADDR, MEMINFO]


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
