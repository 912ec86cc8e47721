# Stand-in for torch inside the rig's vLLM stand-in images (no real GPU exists); answers version/arch questions only.
"""GPUs come from /etc/gpucluster-rig/gpus.json, which the rig's runtime hook writes into --gpus containers."""
import json
import os

from torch import _BUILD

_GPUS = "/etc/gpucluster-rig/gpus.json"


def _cfg():
    try:
        with open(_GPUS) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def get_arch_list():
    return list(_BUILD["arch"]) if is_available() else []


def is_available():
    return device_count() > 0


def device_count():
    n = int(_cfg().get("count", 0))
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        n = min(n, len([x for x in vis.split(",") if x.strip()]))
    return n


def _check(i):
    if not is_available():
        raise RuntimeError("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU "
                           "and installed a driver from http://www.nvidia.com/Download/index.aspx")
    if i >= device_count():
        raise RuntimeError("CUDA error: invalid device ordinal")


def get_device_capability(i=0):
    _check(i)
    a, b = str(_cfg().get("compute_capability", "7.0")).split(".")
    return (int(a), int(b))


def get_device_name(i=0):
    _check(i)
    return _cfg().get("name", "Tesla V100-PCIE-16GB")


def mem_get_info(i=0):
    _check(i)
    c = _cfg()
    total = int(c.get("memory_mib", 16160)) << 20
    return (total - (int(c.get("memory_used_mib", 0)) << 20), total)
