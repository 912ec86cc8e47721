# gpucluster test rig: the SGLang stand-in image lmsysorg/sglang:v0.5.15 (built here, pushed to the rig registry storage).
"""Like rigimage.ensure_images for vLLM, on the same base and real-parser deps layer: `pip download
sglang==0.5.15 --no-deps` (the CPython 3.11 x86_64 wheel), keep sglang/**/*.py + dist-info in
CACHE/sglang-src/<v>, and one layer on top with the stand-in (image/sglang, as the `sglang` package, so
`python3 -m sglang.launch_server` runs it), SGLang's source at /opt/gcrig-realparser/src and realparse.py.
A stamp makes a second ensure() a no-op; a change of the stand-in, realparse.py, the deps or the wheel rebuilds."""
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile

import rigimage
from rigutil import CACHE, HERE, log, run, stage

VERSION = "0.5.15"
IMAGE_REPO = "lmsysorg/sglang"
TAG = "v" + VERSION
IMAGE = "%s:%s" % (IMAGE_REPO, TAG)
STAMPS = os.path.join(CACHE, "sglang-image-stamps.json")
RP = rigimage.REALPARSER_DIR


def source_dir(v=VERSION):
    return os.path.join(CACHE, "sglang-src", v)


def ensure_source(v=VERSION):
    """sglang/**/*.py and the dist-info of SGLang v's released wheel (downloaded once, the wheel deleted after).
    Returns (dir, info)."""
    d = source_dir(v)
    stamp = os.path.join(d, "gcrig-wheel.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            return d, json.load(f)
    os.makedirs(os.path.dirname(d), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="gcrig-sglang-wheel-", dir=os.path.dirname(d))
    try:
        t = time.monotonic()
        run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
             "--no-cache-dir", "-d", tmp, "sglang==" + v] + rigimage.PIP_TARGET, quiet=True)
        took = time.monotonic() - t
        whl = [n for n in os.listdir(tmp) if n.endswith(".whl")]
        if len(whl) != 1:
            raise RuntimeError("pip download sglang==%s: expected one wheel, got %r" % (v, whl))
        path = os.path.join(tmp, whl[0])
        with open(path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        out = os.path.join(tmp, "src")
        compiled = []
        with zipfile.ZipFile(path) as z:
            for n in z.namelist():
                top = n.split("/")[0]
                if top == "sglang" and n.endswith(".py") or top.endswith(".dist-info") and n.split("/")[-1] in (
                        "METADATA", "entry_points.txt", "WHEEL", "top_level.txt"):
                    z.extract(n, out)
                elif top == "sglang":
                    # the folders only (SGLang checks at import that jit_kernel/include and csrc exist)
                    os.makedirs(os.path.join(out, n if n.endswith("/") else os.path.dirname(n)), exist_ok=True)
                    if n.endswith(".so"):  # sglang.srt.grpc._core: faked by realparse.py
                        compiled.append(n[:-3].split(".")[0].replace("/", "."))
        with open(os.path.join(out, "gcrig-compiled-modules.txt"), "w") as f:
            f.write("".join(m + "\n" for m in sorted(compiled)))
        info = {"wheel": whl[0], "sha256": sha, "wheel_bytes": os.path.getsize(path), "download_seconds": round(took, 1)}
        with open(os.path.join(out, "gcrig-wheel.json"), "w") as f:
            json.dump(info, f, indent=1)
        shutil.rmtree(d, ignore_errors=True)
        os.rename(out, d)
        log("sglang %s: %s (%.0f MB, %.1fs) -> %s" % (v, whl[0], info["wheel_bytes"] / 1e6, took, d))
        return d, info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# The torch SGLang 0.5.15 pins (its wheel's Requires-Dist: torch==2.11.0), in the CUDA 12.9 build of the plain tag:
# what gpucluster's in-image check reads (the torch stand-in answers version and arch list only).
TORCH = {"torch": "2.11.0", "cuda": "12.9", "arch": ["sm_70"] + rigimage.SM_NEW + ["compute_120"]}


def standin_files():
    return sorted(glob.glob(os.path.join(HERE, "image", "sglang", "**", "*.py"), recursive=True)
                  + glob.glob(os.path.join(HERE, "image", "torch", "*.py"))) + [
        os.path.join(HERE, "image", "realparser", "realparse.py")]


def stamp(info):
    h = hashlib.sha256((rigimage.realparser_key() + json.dumps(TORCH)).encode())
    h.update(info["sha256"].encode())
    for p in standin_files():
        h.update(p.encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def registry_has(tag=TAG):
    return os.path.exists(os.path.join(CACHE, "registry", "docker", "registry", "v2", "repositories",
                                       IMAGE_REPO, "_manifests", "tags", tag, "current", "link"))


def stage_tree(dest, src_dir):
    site = os.path.join(dest, "usr", "local", "lib", "python3.11", "dist-packages")
    shutil.copytree(os.path.join(HERE, "image", "sglang"), os.path.join(site, "sglang"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(HERE, "image", "torch"), os.path.join(site, "torch"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(os.path.join(site, "torch", "standin_build.json"), "w") as f:
        json.dump(TORCH, f)
    rp = os.path.join(dest, RP.lstrip("/"))
    shutil.copytree(src_dir, os.path.join(rp, "src"), ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(HERE, "image", "realparser", "realparse.py"), os.path.join(rp, "realparse.py"))
    os.makedirs(os.path.join(dest, "sgl-workspace"), exist_ok=True)


def selftest_and_commit(b, staged, ref, changes):
    """realparse_sglang.py's self-test in the staged image (network none); that container becomes the image,
    with the bytecode of the modules SGLang's argument handling imports."""
    name = "gcrig-selftest-sglang"
    b.docker("rm", "-f", name, check=False, quiet=True)
    r = b.docker("run", "--name", name, "--network", "none", "--entrypoint", "python3", staged,
                 "/usr/local/lib/python3.11/dist-packages/sglang/realparse_sglang.py", "selftest",
                 check=False, capture=True)
    try:
        out = (r.stdout or b"").decode(errors="replace")
        if r.returncode != 0:
            raise RuntimeError("SGLang %s: the real-parser self-test failed in the image:\n%s\n%s"
                               % (VERSION, out[-6000:], (r.stderr or b"").decode(errors="replace")[-3000:]))
        rep = json.loads(out.strip().splitlines()[-1])
        log("sglang %s real parser: ok in %.2fs (tp_size %s read back, unknown flag refused with status %s)"
            % (VERSION, rep["seconds"], rep["tp_size"], rep["bad_flag_rc"]))
        args = []
        for c in changes:
            args += ["--change", c]
        b.docker("commit", *args, name, ref, quiet=True)
    finally:
        b.docker("rm", "-f", name, check=False, quiet=True)
    return rep


def ensure(force=False):
    """Make sure the rig registry storage holds lmsysorg/sglang:v0.5.15, current with the stand-in."""
    stamps = {}
    if os.path.exists(STAMPS):
        with open(STAMPS) as f:
            stamps = json.load(f)
    with stage("sglang %s wheel source" % VERSION):
        src, info = ensure_source()
    want = stamp(info)
    if not force and stamps.get(TAG) == want and registry_has():
        log("images: %s:%s current in registry storage" % (IMAGE_REPO, TAG))
        return TAG
    base = "gcrig-base:" + rigimage.base_key()
    rpbase = "gcrig-base-rp:" + rigimage.realparser_key()
    ref = "%s/%s:%s" % (rigimage.SETUP_REGISTRY, IMAGE_REPO, TAG)
    with rigimage.Builder() as b:
        if b.docker("image", "inspect", base, check=False, quiet=True).returncode != 0:
            with stage("build base image %s" % base):
                rigimage.build_base(b, base)
        if b.docker("image", "inspect", rpbase, check=False, quiet=True).returncode != 0:
            with stage("real-parser deps layer %s" % rpbase):
                rigimage.build_realparser_base(b, base, rpbase)
        with stage("sglang stand-in layer %s" % TAG):
            tmp = tempfile.mkdtemp(prefix="gcrig-sglang-layer-")
            name, staged = "gcrig-build-sglang", "gcrig-staged-sglang:" + TAG
            try:
                stage_tree(tmp, src)
                b.docker("rm", "-f", name, check=False, quiet=True)
                b.docker("create", "--name", name, rpbase, "/bin/true", quiet=True)
                b.docker("cp", tmp + "/.", name + ":/", quiet=True)
                b.docker("commit", name, staged, quiet=True)
                selftest_and_commit(b, staged, ref, [
                    "ENTRYPOINT []", 'CMD ["/bin/bash"]', "WORKDIR /sgl-workspace",
                    "LABEL org.gpucluster.rig.stamp=" + want])
                b.docker("push", ref, quiet=True)
            finally:
                b.docker("rm", "-f", name, check=False, quiet=True)
                b.docker("rmi", staged, check=False, quiet=True)
                b.docker("rmi", ref, check=False, quiet=True)
                shutil.rmtree(tmp, ignore_errors=True)
        b.docker("image", "prune", "-f", check=False, quiet=True)
    stamps[TAG] = want
    with open(STAMPS, "w") as f:
        json.dump(stamps, f, indent=1)
    return TAG
