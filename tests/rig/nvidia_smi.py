#!/usr/bin/env -S python3 -I # stand-in for nvidia-smi on simulated hosts of gpucluster's test rig (no real GPU exists)
"""Prints what nvidia-smi prints on a host with the GPUs described in a JSON file:
$NVIDIA_SMI_STANDIN_CONFIG, else ../gpus.json next to this script's directory, else
/etc/gpucluster-rig/gpus.json (inside containers). Keys: count, name, memory_mib,
compute_capability, driver, memory_used_mib / memory_reserved_mib (optional), host (for stable UUIDs),
processes (optional: [{"gpu": 0, "pid": 4242, "name": "python3", "used_mib": 9000}], what
--query-compute-apps lists and memory.used counts; a real nvidia-smi lists nothing when no process holds a GPU).
"""
import hashlib
import json
import os
import sys
import time

CUDA_BY_DRIVER = [(580, "13.0"), (575, "12.9"), (570, "12.8"), (565, "12.7"), (560, "12.6"), (555, "12.5"),
                  (550, "12.4"), (545, "12.3"), (535, "12.2"), (530, "12.1"), (525, "12.0"), (520, "11.8"),
                  (515, "11.7"), (510, "11.6"), (495, "11.5"), (470, "11.4"), (465, "11.3"), (460, "11.2"),
                  (455, "11.1"), (450, "11.0"), (0, "10.2")]
BUS_IDS = ["00000000:18:00.0", "00000000:3B:00.0", "00000000:86:00.0", "00000000:AF:00.0",
           "00000000:1A:00.0", "00000000:3D:00.0", "00000000:88:00.0", "00000000:B1:00.0"]


def load():
    here = os.path.dirname(os.path.realpath(__file__))
    for p in (os.environ.get("NVIDIA_SMI_STANDIN_CONFIG"), os.path.join(here, "..", "gpus.json"),
              "/etc/gpucluster-rig/gpus.json"):
        if p and os.path.exists(p):
            with open(p) as f:
                return json.load(f)
    return None


def gpus(cfg):
    out = []
    for i in range(int(cfg.get("count", 0))):
        u = hashlib.sha256(("%s/%d" % (cfg.get("host", "rig"), i)).encode()).hexdigest()
        total = int(cfg.get("memory_mib", 16160))
        held = sum(int(p.get("used_mib", 0)) for p in procs(cfg) if int(p["gpu"]) == i)
        used = int(cfg.get("memory_used_mib", 0)) + held
        reserved = int(cfg.get("memory_reserved_mib", 0))  # real drivers report free = total - used - reserved
        out.append({
            "index": str(i), "name": cfg.get("name", "Tesla V100-PCIE-16GB"),
            "memory.total": total, "memory.used": used, "memory.free": total - used - reserved, "memory.reserved": reserved,
            "compute_cap": str(cfg.get("compute_capability", "7.0")),
            "driver_version": str(cfg.get("driver", "535.104.05")),
            "pci.bus_id": BUS_IDS[i % len(BUS_IDS)],
            "uuid": "GPU-%s-%s-%s-%s-%s" % (u[:8], u[8:12], u[12:16], u[16:20], u[20:32]),
            "count": str(int(cfg.get("count", 0))),
            "utilization.gpu": 0, "utilization.memory": 0, "temperature.gpu": "34",
            "persistence_mode": "Enabled", "pstate": "P0",
        })
    return out


def procs(cfg):
    return [p for p in cfg.get("processes") or [] if 0 <= int(p.get("gpu", -1)) < int(cfg.get("count", 0))]


def query_apps(fields, fmt, devs, cfg):
    """--query-compute-apps: one line per process, as the real one prints it (nothing when there is none)."""
    names = [f.strip() for f in fields.split(",") if f.strip()]
    known = {"gpu_uuid": "uuid", "gpu_name": "name", "gpu_bus_id": "pci.bus_id", "pid": "pid",
             "process_name": "name", "name": "name", "used_memory": "used_mib", "used_gpu_memory": "used_mib"}
    for n in names:
        if n not in known:
            sys.stdout.write('Field "%s" is not a valid field to query.\n\n' % n)
            return 2
    opts = [o.strip() for o in fmt.split(",")]
    nounits = "nounits" in opts
    if "noheader" not in opts:
        sys.stdout.write(", ".join(n + ("" if nounits or known[n] != "used_mib" else " [MiB]") for n in names) + "\n")
    by_index = {int(d["index"]): d for d in devs}
    for p in procs(cfg):
        d = by_index.get(int(p["gpu"]))
        if d is None:
            continue
        vals = []
        for n in names:
            if n.startswith("gpu_"):
                vals.append(str(d[known[n]]))
            elif known[n] == "used_mib":
                vals.append(str(int(p.get("used_mib", 0))) + ("" if nounits else " MiB"))
            else:
                vals.append(str(p.get(known[n], "?")))
        sys.stdout.write(", ".join(vals) + "\n")
    return 0


ALIASES = {"gpu_name": "name", "gpu_uuid": "uuid", "gpu_bus_id": "pci.bus_id", "driver": "driver_version",
           "compute_capability": "compute_cap", "bus_id": "pci.bus_id"}
UNITS = {"memory.total": "MiB", "memory.used": "MiB", "memory.free": "MiB", "memory.reserved": "MiB",
         "utilization.gpu": "%", "utilization.memory": "%"}


def cuda_version(driver):
    major = int(driver.split(".")[0])
    for floor, v in CUDA_BY_DRIVER:
        if major >= floor:
            return v
    return "10.2"


def query(fields, fmt, devs):
    opts = [o.strip() for o in fmt.split(",")]
    if "csv" not in opts:
        sys.stdout.write('"%s" is not a valid format.\n' % fmt)
        return 2
    names = [f.strip() for f in fields.split(",") if f.strip()]
    canon = []
    for n in names:
        c = ALIASES.get(n, n)
        if not devs and c != "count":
            pass
        known = c in ("index", "name", "memory.total", "memory.used", "memory.free", "memory.reserved",
                      "compute_cap", "driver_version", "pci.bus_id", "uuid", "count", "utilization.gpu",
                      "utilization.memory", "temperature.gpu", "persistence_mode", "pstate")
        if not known:
            sys.stdout.write('Field "%s" is not a valid field to query.\n\n' % n)
            return 2
        canon.append(c)
    nounits = "nounits" in opts
    if "noheader" not in opts:
        sys.stdout.write(", ".join(c + ("" if nounits or c not in UNITS else " [%s]" % UNITS[c])
                                   for c in canon) + "\n")
    for d in devs:
        vals = []
        for c in canon:
            v = d[c]
            vals.append(str(v) if nounits or c not in UNITS else "%s %s" % (v, UNITS[c]))
        sys.stdout.write(", ".join(vals) + "\n")
    return 0


def table(devs, cfg):
    drv = str(cfg.get("driver", "535.104.05"))
    w = sys.stdout.write
    w(time.strftime("%a %b %d %H:%M:%S %Y") + "       \n")
    w("+---------------------------------------------------------------------------------------+\n")
    w("| NVIDIA-SMI %-18s Driver Version: %-14s CUDA Version: %-9s|\n" % (drv, drv, cuda_version(drv)))
    w("|-----------------------------------------+----------------------+----------------------+\n")
    w("| GPU  Name                 Persistence-M | Bus-Id        Disp.A | Volatile Uncorr. ECC |\n")
    w("| Fan  Temp   Perf          Pwr:Usage/Cap |         Memory-Usage | GPU-Util  Compute M. |\n")
    w("|                                         |                      |               MIG M. |\n")
    w("|=========================================+======================+======================|\n")
    for d in devs:
        w("| %3s  %-20.20s          On  | %-16s Off |                    0 |\n" % (d["index"], d["name"], d["pci.bus_id"]))
        mem = "%dMiB / %dMiB" % (d["memory.used"], d["memory.total"])
        w("| N/A   %sC    P0              25W / 250W | %20s |      0%%      Default |\n" % (d["temperature.gpu"], mem))
        w("|                                         |                      |                  N/A |\n")
        w("+-----------------------------------------+----------------------+----------------------+\n")
    w("\n+---------------------------------------------------------------------------------------+\n")
    w("| Processes:                                                                            |\n")
    w("|  GPU   GI   CI        PID   Type   Process name                            GPU Memory |\n")
    w("|        ID   ID                                                             Usage      |\n")
    w("|=======================================================================================|\n")
    for p in procs(cfg):
        w("|  %3d   N/A  N/A  %9d      C   %-38.38s %7dMiB |\n" % (int(p["gpu"]), int(p.get("pid", 0)),
                                                                 p.get("name", "?"), int(p.get("used_mib", 0))))
    if not procs(cfg):
        w("|  No running processes found                                                           |\n")
    w("+---------------------------------------------------------------------------------------+\n")
    return 0


def main(argv):
    cfg = load()
    if cfg is None or int(cfg.get("count", 0)) == 0:
        sys.stdout.write("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
                         "Make sure that the latest NVIDIA driver is installed and running.\n\n")
        return 9
    devs = gpus(cfg)
    fields = fmt = apps = None
    ids = None
    i = 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if a in ("--version",):
            drv = str(cfg.get("driver", "535.104.05"))
            sys.stdout.write("NVIDIA-SMI version  : %s\nNVML version        : %s\nDRIVER version      : %s\n"
                             "CUDA Version        : %s\n" % (drv, ".".join(drv.split(".")[:2]), drv,
                                                            cuda_version(drv)))
            return 0
        if a in ("-L", "--list-gpus"):
            for d in devs:
                sys.stdout.write("GPU %s: %s (UUID: %s)\n" % (d["index"], d["name"], d["uuid"]))
            return 0
        if a.startswith("--query-compute-apps="):
            apps = a.split("=", 1)[1]
        elif a == "--query-compute-apps":
            apps, i = nxt, i + 1
        elif a.startswith("--query-gpu="):
            fields = a.split("=", 1)[1]
        elif a in ("--query-gpu", "-q-gpu"):
            fields, i = nxt, i + 1
        elif a.startswith("--format="):
            fmt = a.split("=", 1)[1]
        elif a == "--format":
            fmt, i = nxt, i + 1
        elif a.startswith("--id="):
            ids = a.split("=", 1)[1]
        elif a in ("-i", "--id"):
            ids, i = nxt, i + 1
        elif a in ("topo",):
            sys.stdout.write("\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\nGPU0\t X \tSYS\t0-15\t0\nGPU1\tSYS\t X \t16-31\t1\n")
            return 0
        else:
            sys.stdout.write("Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.\n\n")
            return 2
        i += 1
    if ids is not None:
        want = set(x.strip() for x in ids.split(","))
        devs = [d for d in devs if d["index"] in want or d["uuid"] in want or d["pci.bus_id"] in want]
        if not devs:
            sys.stdout.write("No devices were found\n")
            return 6
    if apps is not None:
        if fmt is None:
            sys.stdout.write('Missing "--format" argument.\n\n')
            return 2
        return query_apps(apps, fmt, devs, cfg)
    if fields is not None:
        if fmt is None:
            sys.stdout.write('Missing "--format" argument.\n\n')
            return 2
        return query(fields, fmt, devs)
    return table(devs, cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
