# gpucluster test rig: the OpenWebUI image (the REAL open-webui from PyPI, not a stand-in) in the rig registry.
"""10.77.0.2:5000/ghcr.io/open-webui/open-webui:v0.6.36: the name cluster/ui.py pulls (its default image,
ghcr.io/open-webui/open-webui:v0.6.36, behind a registry mirror prefix), built here because the rig cannot reach
ghcr.io. Contents: a debootstrap bookworm rootfs (the stand-in base's package set; Debian's python3 3.11), open-webui
0.6.36 and its whole pinned dependency set (image/openwebui/requirements.txt; torch is the on-disk CPU wheel
2.13.0+cpu, nothing of CUDA) installed offline with --no-deps from a wheel cache filled once (CACHE/wheels-openwebui),
and image/openwebui/start.sh as /app/backend/start.sh. Like the official image: WORKDIR /app/backend,
CMD ["bash", "start.sh"] (uvicorn open_webui.main:app on $PORT, default 8080), DATA_DIR /app/backend/data, and the
official image's ENV (telemetry off, caches under the data folder). Unlike it: no embedding/whisper model or
tiktoken file baked in (the rig has no huggingface.co); cluster/ui.py's OFFLINE_MODE=True keeps OpenWebUI from
looking for them (without it a start on a network that drops outside traffic waits ~4.5 min for huggingface.co).

`ensure()` is stamp-cached (CACHE/openwebui-stamps.json: requirements, rootfs packages, start.sh, ENV, REV): a
second call with the image in the registry storage does nothing. Every build ends with a smoke start in the builder
(`--network none`): /health answers and the no-login sign-in returns a token. Run: `python3 tests/rig/webuiimage.py
[--force]` (root; builds wait their turn on rigimage.Builder's lock)."""
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

VERSION = "0.6.36"
REPO_NAME = "ghcr.io/open-webui/open-webui"     # == cluster/config.py OPENWEBUI_IMAGE (not read: rig standards)
TAG = "v" + VERSION
IMAGE = "%s:%s" % (REPO_NAME, TAG)
REQS = os.path.join(HERE, "image", "openwebui", "requirements.txt")
START = os.path.join(HERE, "image", "openwebui", "start.sh")
INCLUDE = rigimage.BASE_INCLUDE
REV = "1"                                       # bump to force a rebuild
SITE = "usr/local/lib/python3.11/dist-packages"
APP = "/app/backend"
DATA = APP + "/data"
PORT = 8080
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
              "LANG": "C.UTF-8"}
# The official image's ENV (its Dockerfile), plus what `open-webui serve` (the PyPI package's own start) sets:
# FROM_INIT_PY=true, so that the version comes from the package's metadata (upstream: /app/package.json) and the
# frontend from the package (upstream: /app/build); DATA_DIR spelled out, so nothing is moved. No OFFLINE_MODE: the
# official image does not set it either (cluster/ui.py does).
IMAGE_ENV = {
    "ENV": "prod", "PORT": str(PORT), "DATA_DIR": DATA, "FROM_INIT_PY": "true",
    "OLLAMA_BASE_URL": "/ollama", "OPENAI_API_BASE_URL": "", "OPENAI_API_KEY": "", "WEBUI_SECRET_KEY": "",
    "SCARF_NO_ANALYTICS": "true", "DO_NOT_TRACK": "true", "ANONYMIZED_TELEMETRY": "false",
    "WHISPER_MODEL": "base", "WHISPER_MODEL_DIR": DATA + "/cache/whisper/models",
    "RAG_EMBEDDING_MODEL": "sentence-transformers/all-MiniLM-L6-v2", "RAG_RERANKING_MODEL": "",
    "SENTENCE_TRANSFORMERS_HOME": DATA + "/cache/embedding/models", "HF_HOME": DATA + "/cache/embedding/models",
    "TIKTOKEN_ENCODING_NAME": "cl100k_base", "TIKTOKEN_CACHE_DIR": DATA + "/cache/tiktoken",
    "HOME": "/root",
}


def _read(p):
    with open(p, "rb") as f:
        return f.read()


def requirements():
    return [ln.strip() for ln in _read(REQS).decode().splitlines() if ln.strip() and not ln.startswith("#")]


def image_stamp():
    return hashlib.sha256(json.dumps([INCLUDE, REV, IMAGE_ENV, requirements(), _read(START).decode()],
                                     sort_keys=True).encode()).hexdigest()[:16]


def registry_has_image():
    return os.path.exists(os.path.join(CACHE, "registry", "docker", "registry", "v2", "repositories", REPO_NAME,
                                       "_manifests", "tags", TAG, "current", "link"))


def _stamps_path():
    return os.path.join(CACHE, "openwebui-stamps.json")


def _stamps():
    p = _stamps_path()
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return {}


def available():
    """Facts for rig.json / tests: {image, version, stamp, size} when the image is current in the registry."""
    st = _stamps()
    if not registry_has_image() or st.get("image") != image_stamp():
        return None
    return {"image": IMAGE, "version": VERSION, "stamp": st["image"], "size": st.get("size")}


# ---------------------------------------------------------------- wheels
def ensure_wheels():
    """Every wheel of requirements.txt in CACHE/wheels-openwebui, fetched once (`pip wheel`: three packages are
    sdist-only and get built here; torch 2.13.0+cpu comes from pip's find-links, never a CUDA build)."""
    wheels = os.path.join(CACHE, "wheels-openwebui")
    stamp = os.path.join(wheels, ".complete-" + hashlib.sha256(_read(REQS)).hexdigest()[:12])
    if os.path.exists(stamp):
        return wheels
    if sys.version_info[:2] != (3, 11):
        raise SystemExit("webuiimage: run it with Python 3.11 (cp311 wheels for bookworm), not %s"
                         % sys.version.split()[0])
    os.makedirs(wheels, exist_ok=True)
    with stage("fetch OpenWebUI wheels (once)"):
        run(["nice", "-n", "19", sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
             "--disable-pip-version-check", "-w", wheels, "--cache-dir", os.path.join(CACHE, "pip-cache"),
             "-r", REQS], quiet=True)
    bad = [n for n in os.listdir(wheels) if n.startswith(("nvidia_", "triton-")) or
           n.startswith("torch-") and "+cpu" not in n]
    if bad:
        raise RuntimeError("webuiimage: CUDA wheels in %s: %s" % (wheels, ", ".join(sorted(bad))))
    open(stamp, "w").close()
    return wheels


# ---------------------------------------------------------------- rootfs
def _trim(root):
    for d in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info",
              "usr/share/locale", "root/.cache", "var/cache/debconf"):
        p = os.path.join(root, d)
        if os.path.isdir(p):
            for e in os.listdir(p):
                if e not in ("partial", "lock", "config.dat", "templates.dat"):
                    ep = os.path.join(p, e)
                    shutil.rmtree(ep) if os.path.isdir(ep) and not os.path.islink(ep) else os.unlink(ep)


def build_rootfs(root, wheels):
    with stage("debootstrap tarball (cached after the first run)"):
        tb = rigimage.ensure_debootstrap_tarball(INCLUDE)
    with stage("debootstrap (from cached tarball)"):
        run(["debootstrap", "--variant=minbase", "--include=" + INCLUDE, "--unpack-tarball=" + tb,
             "bookworm", root, "http://deb.debian.org/debian"], quiet=True)
    with stage("pip install open-webui %s into rootfs (offline, --no-deps)" % VERSION):
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
    with stage("start.sh, data folder, trim"):
        app = os.path.join(root, APP.lstrip("/"))
        os.makedirs(os.path.join(app, "data"), exist_ok=True)
        shutil.copyfile(START, os.path.join(app, "start.sh"))
        os.chmod(os.path.join(app, "start.sh"), 0o755)
        _trim(root)
        with open(os.path.join(root, "etc", "hostname"), "w") as f:
            f.write("open-webui\n")


def _du(path):
    r = subprocess.run(["du", "-sb", path], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 else None


SMOKE = r'''
import json, sys, time, urllib.request
def get(path, body=None):
    req = urllib.request.Request("http://127.0.0.1:%s" % sys.argv[1] + path, headers={"Content-Type": "application/json"},
                                 data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())
end = time.monotonic() + float(sys.argv[2])
while True:
    try:
        health = get("/health")
        break
    except OSError:
        if time.monotonic() > end:
            sys.exit("no /health within %ss" % sys.argv[2])
        time.sleep(2)
token = get("/api/v1/auths/signin", {"email": "", "password": ""})["token"]
version = get("/api/version")["version"]
if version != sys.argv[3]:
    sys.exit("OpenWebUI reports version %r, not %s" % (version, sys.argv[3]))
print(json.dumps({"health": health, "version": version, "token": bool(token)}))
'''


def smoke(b, ref):
    """Start the image as cluster/ui.py does (bash start.sh, no login, no network) and wait for /health and the
    no-login sign-in; returns (seconds to /health, report)."""
    name = "gcrig-openwebui-smoke"
    b.docker("rm", "-f", name, check=False, quiet=True)
    t = time.monotonic()
    b.docker("run", "-d", "--name", name, "--network", "none", "-e", "WEBUI_AUTH=False", "-e", "OFFLINE_MODE=True",
             "-e", "ENABLE_PERSISTENT_CONFIG=False", "-e", "ENABLE_OLLAMA_API=False", ref, quiet=True)
    try:
        r = b.docker("exec", name, "python3", "-c", SMOKE, str(PORT), "600", VERSION, check=False, capture=True)
        if r.returncode != 0:
            logs = b.docker("logs", "--tail", "60", name, check=False, capture=True)
            raise RuntimeError("OpenWebUI smoke start failed: %s\n%s%s" % (
                (r.stdout + r.stderr).decode(errors="replace")[-2000:],
                (logs.stdout or b"").decode(errors="replace")[-4000:],
                (logs.stderr or b"").decode(errors="replace")[-4000:]))
        return round(time.monotonic() - t, 1), json.loads(r.stdout.decode().strip().splitlines()[-1])
    finally:
        b.docker("rm", "-f", name, check=False, quiet=True)


def build_image(b, ref, stamp):
    wheels = ensure_wheels()
    root = tempfile.mkdtemp(prefix="gcrig-owui-rootfs-", dir=CACHE)
    try:
        build_rootfs(root, wheels)
        size = {"rootfs_bytes": _du(root), "site_packages_bytes": _du(os.path.join(root, SITE))}
        with stage("docker import %s" % IMAGE):
            tar = subprocess.Popen(["nice", "-n", "19", "tar", "-C", root, "--numeric-owner", "-c", "."],
                                   stdout=subprocess.PIPE)
            changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8"]
            changes += ['ENV %s="%s"' % kv for kv in sorted(IMAGE_ENV.items())]
            changes += ["WORKDIR " + APP, 'CMD ["bash","start.sh"]', "EXPOSE %d" % PORT,
                        "LABEL org.gpucluster.rig.stamp=" + stamp,
                        "LABEL org.gpucluster.rig.openwebui=" + VERSION]
            args = ["import"]
            for c in changes:
                args += ["--change", c]
            b.docker(*args, "-", ref, stdin=tar.stdout, quiet=True)
            tar.stdout.close()
            if tar.wait() != 0:
                raise RuntimeError("tar of rootfs failed")
    finally:
        subprocess.run(["umount", os.path.join(root, "tmp", "wheels")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    with stage("smoke: bash start.sh, /health, no-login sign-in (network none)"):
        size["smoke_health_seconds"], rep = smoke(b, ref)
        log("smoke: %s" % json.dumps(rep))
    with stage("push to the rig registry storage"):
        b.docker("push", ref, quiet=True)
    insp = json.loads(b.docker("image", "inspect", ref, capture=True).stdout)
    size["image_bytes"] = insp[0]["Size"]
    import realengine
    size["compressed_bytes"], _m = realengine.registry_size(REPO_NAME, TAG, rigimage.SETUP_REGISTRY)
    return size


# ---------------------------------------------------------------- entry point
def ensure(force=False):
    """Make sure the rig registry storage holds IMAGE, current with this recipe; returns available()."""
    st = _stamps()
    want = image_stamp()
    if not force and st.get("image") == want and registry_has_image():
        log("openwebui: %s current in registry storage (%s)" % (IMAGE, _fmt_size(st.get("size"))))
        return available()
    ref = "%s/%s" % (rigimage.SETUP_REGISTRY, IMAGE)
    with rigimage.Builder() as b:
        t = time.monotonic()
        with stage("build OpenWebUI image %s" % IMAGE):
            size = build_image(b, ref, want)
        size["build_seconds"] = round(time.monotonic() - t, 1)
        st.update(image=want, size=size)
        with open(_stamps_path() + ".tmp", "w") as f:
            json.dump(st, f, indent=1)
        os.replace(_stamps_path() + ".tmp", _stamps_path())
        log("openwebui: %s built in %.1fs: %s" % (IMAGE, size["build_seconds"], _fmt_size(size)))
        b.docker("rmi", ref, check=False, quiet=True)
        b.docker("image", "prune", "-f", check=False, quiet=True)
    return available()


def _fmt_size(s):
    if not s:
        return "size unknown"
    mb = lambda n: "%.0f MB" % (n / 1e6) if n else "?"  # noqa: E731
    return "image %s, compressed %s, site-packages %s" % (mb(s.get("image_bytes")), mb(s.get("compressed_bytes")),
                                                          mb(s.get("site_packages_bytes")))


if __name__ == "__main__":
    print(json.dumps(ensure(force="--force" in sys.argv[1:]), indent=1))
