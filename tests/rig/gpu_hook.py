#!/usr/bin/python3 -I
# gpucluster test rig: no-op `nvidia-container-runtime-hook` for simulated hosts (their dockerd finds it on PATH, so `--gpus` works).
"""As an OCI prestart hook it reads the container state from stdin and, like NVIDIA's toolkit puts the driver's
files into the container, writes the host's simulated GPU description (/etc/gpucluster-rig/gpus.json) and the
nvidia-smi stand-in (/usr/bin/nvidia-smi) into the container's root filesystem. It never fails a container."""
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.realpath(__file__))


def main():
    try:
        state = json.loads(sys.stdin.read() or "{}")
        bundle = state.get("bundle")
        if not bundle or "prestart" not in sys.argv[1:]:
            return
        with open(os.path.join(bundle, "config.json")) as f:
            spec = json.load(f)
        root = spec.get("root", {}).get("path", "rootfs")
        root = root if os.path.isabs(root) else os.path.join(bundle, root)
        host_dir = os.path.dirname(HERE)
        os.makedirs(os.path.join(root, "etc", "gpucluster-rig"), exist_ok=True)
        shutil.copyfile(os.path.join(host_dir, "gpus.json"), os.path.join(root, "etc", "gpucluster-rig", "gpus.json"))
        dst = os.path.join(root, "usr", "bin", "nvidia-smi")
        if os.path.isdir(os.path.dirname(dst)) and not os.path.exists(dst):
            shutil.copyfile(os.path.join(host_dir, "bin", "nvidia-smi"), dst)
            os.chmod(dst, 0o755)
    except Exception as e:  # a hook failure would fail the container; a stand-in must not
        sys.stderr.write("gpucluster rig gpu hook: %s\n" % e)


if __name__ == "__main__":
    main()
    sys.exit(0)
