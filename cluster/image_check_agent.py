"""Runs INSIDE the deployment's image (stdlib + the image's own torch): does its torch have a kernel image for
every GPU it sees? Shipped as `python3 -c <this file> IMAGE`; prints one JSON event line
({"ev": "done", "summary"} or {"ev": "error", "msg"}) and exits 1 when a GPU is not covered.

`verdict()` is pure: the unit tests feed it the output captured on real NVIDIA GPUs (tests/fixtures/torch-arch)."""

import json
import sys


def collect():
    """What the image's torch says: version, CUDA build, arch list, and the devices it sees."""
    import torch
    info = {"torch": str(torch.__version__), "cuda": str(torch.version.cuda), "arch": [], "devices": []}
    if torch.cuda.is_available():
        info["arch"] = [str(a) for a in torch.cuda.get_arch_list()]
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            info["devices"].append({"index": i, "name": str(torch.cuda.get_device_name(i)), "cc": [major, minor]})
    return info


def covers(arch, cc):
    """torch runs on a GPU of capability cc when it has sm_XY of the same major and a minor <= the GPU's (binary
    compatible), or PTX (compute_XY) of a capability <= the GPU's (JIT-compiled)."""
    major, minor = cc
    for a in arch:
        kind, _, num = a.partition("_")
        if not num.isdigit() or len(num) < 2:
            continue
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def verdict(info, image):
    """(ok, one line) for what collect() returned."""
    build = "torch %s (CUDA %s)" % (info.get("torch"), info.get("cuda"))
    devices = info.get("devices") or []
    if not devices:
        return False, ("no-gpu: the image's %s sees no GPU (docker run --gpus all); check the NVIDIA container "
                       "runtime and driver on this host" % build)
    arch = info.get("arch") or []
    bad = [d for d in devices if not covers(arch, tuple(d["cc"]))]
    if bad:
        d = bad[0]
        return False, ("compute-capability: GPU %d %s (sm_%d%d) is not supported by %s: its %s was built for "
                       "%s; use an image whose torch lists sm_%d%d (gpucluster plan --profile auto names one)"
                       % (d["index"], d["name"], d["cc"][0], d["cc"][1], image, build,
                          " ".join(arch) or "no GPU architecture", d["cc"][0], d["cc"][1]))
    ccs = sorted({"sm_%d%d" % tuple(d["cc"]) for d in devices})
    return True, "%s: %s covers %d GPU(s) (%s)" % (image, build, len(devices), " ".join(ccs))


def main(argv):
    image = argv[0]
    try:
        info = collect()
    except Exception as e:  # noqa: BLE001 - one line for any failure of the image's torch
        print(json.dumps({"ev": "error", "msg": "the image's torch failed: %s: %s"
                          % (type(e).__name__, " ".join(str(e).split())[:300])}))
        return 1
    ok, line = verdict(info, image)
    print(json.dumps({"ev": "info", "info": info}))
    print(json.dumps({"ev": "done", "summary": line} if ok else {"ev": "error", "msg": line}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
