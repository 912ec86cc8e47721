# gpucluster test rig: Debian packages, olah venv, and the vLLM stand-in images (built here, pushed to the rig registry storage).
import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from rigutil import CACHE, HERE, REPO, log, run, stage, wait_for

APT_PACKAGES = ["docker.io", "openssh-server", "openssh-client", "iproute2", "debootstrap", "docker-registry",
                "iptables", "rsync", "curl", "git", "ca-certificates", "procps", "util-linux", "python3",
                "python3-venv", "chromium", "chromium-driver"]
OLAH_REQ = "olah==0.5.4"

# Versions the images carry when cluster/knowledge/vllm/*.json does not exist yet.
# The stand-in images built: a release per image generation the tests need (0.19.1: the newest official image
# that still runs on sm_70, which `--profile auto` picks for V100 hosts).
VERSIONS = ["0.3.0", "0.6.3", "0.10.1.1", "0.19.1", "0.33.0"]
BASE_INCLUDE = "python3,python3-pip,python3-venv,iproute2,procps,curl,ca-certificates"
PIP_REQS = ["ray==2.60.0", "huggingface_hub<1.0", "modelscope"]
BASE_REV = "1"  # bump to force a rebuild of the base image
IMAGE_REPO = "vllm/vllm-openai"
SETUP_REGISTRY = "127.0.0.1:5999"

# The stand-in's flag check runs vLLM's own parser (image/realparser/realparse.py) from each release's wheel:
# `rig setup` downloads the wheel (pip download, PyPI), keeps vllm/**/*.py + dist-info in CACHE/vllm-src/<v>,
# and puts them at /opt/gcrig-realparser/src in that version's layer. realparse.py fakes every import except
# the standard library, vllm and these (pinned; each satisfies every pinned release's requirement), which
# sit in one layer shared by all versions at /opt/gcrig-realparser/deps.
REALPARSER_DIR = "/opt/gcrig-realparser"
REALPARSER_DEPS = ["pydantic==2.14.3", "pydantic-core==2.50.4", "annotated-types==0.8.0",
                   "typing-inspection==0.4.5", "typing-extensions==4.16.0", "regex==2026.11.15", "packaging==26.3",
                   "pyyaml==6.0.3"]
# wheels for the image's Python (Debian 12: CPython 3.11, glibc 2.36), whatever Python runs setup
PIP_TARGET = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
              "--abi", "abi3", "--abi", "none", "--platform", "manylinux1_x86_64", "--platform", "manylinux2010_x86_64",
              "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform",
              "manylinux_2_28_x86_64", "--platform", "manylinux_2_31_x86_64", "--platform", "manylinux_2_34_x86_64",
              "--platform", "any"]

BUILDER_RUN = "/run/gcrig-builder"
BUILDER_SOCK = BUILDER_RUN + "/docker.sock"

SM_OLD = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
SM_NEW = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def vkey(v):
    return tuple(int(x) if x.isdigit() else 0 for x in v.split("."))


def version_traits(v):
    """torch/CUDA/arch list and entrypoint per vLLM release: the torch build each release pins, with the arch list
    read from that torch wheel on PyPI (libtorch's fatbin), independent of gpucluster's tables."""
    k = vkey(v)
    if k < (0, 4):
        t = {"torch": "2.1.2", "cuda": "12.1", "arch": SM_OLD}
    elif k < (0, 7):
        t = {"torch": "2.4.0", "cuda": "12.1", "arch": SM_OLD}
    elif k < (0, 10, 2):                       # torch 2.7 cu128 dropped sm_70 (vllm#18818: "minimum ... is 7.5")
        t = {"torch": "2.7.1", "cuda": "12.8", "arch": SM_NEW}
    elif k < (0, 11, 1):                       # torch 2.8 cu128 has sm_70 again (pytorch#157517)
        t = {"torch": "2.8.0", "cuda": "12.8", "arch": ["sm_70"] + SM_NEW}
    elif k < (0, 20):                          # torch 2.9/2.10 cu129: sm_70 .. sm_120 + PTX
        t = {"torch": "2.10.0", "cuda": "12.9", "arch": ["sm_70"] + SM_NEW + ["compute_120"]}
    else:                                      # CUDA 13: sm_75 and up
        t = {"torch": "2.11.0", "cuda": "13.0", "arch": SM_NEW}
    # Upstream images use the module entrypoint through at least 0.8.x; 0.10.x unconfirmed (kept on the module).
    t["serve_entrypoint"] = k >= (0, 11)
    return t


def versions():
    """The releases to build (the stand-in takes flags and architectures from each release's wheel)."""
    return sorted(VERSIONS, key=vkey)


# ---------------------------------------------------------------- packages
def ensure_packages():
    missing = []
    for p in APT_PACKAGES:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
        if "install ok installed" not in r.stdout:
            missing.append(p)
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-q"], env=env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
         "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"] + missing, env=env)
    # Debian may start the packaged services: the rig runs its own daemons only.
    for svc in ("docker", "ssh", "docker-registry"):
        subprocess.run(["service", svc, "stop"], capture_output=True)


def olah_venv():
    return os.path.join(CACHE, "olah-venv")


def ensure_olah():
    venv = olah_venv()
    cli = os.path.join(venv, "bin", "olah-cli")
    if os.path.exists(cli):
        return cli
    run([sys.executable, "-m", "venv", venv])
    run([os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check",
         "--cache-dir", os.path.join(CACHE, "pip-cache"), OLAH_REQ], quiet=True)
    return cli


# ---------------------------------------------------------------- builder daemon + setup registry
class Builder:
    """A throwaway dockerd in the root namespace (no networking of its own) plus a loopback registry
    on the rig registry's storage; used only while images are built."""

    def __init__(self):
        self.procs = []
        self.lock = None

    def __enter__(self):
        os.makedirs(BUILDER_RUN, exist_ok=True)
        # one builder at a time: image builds from concurrent `rig setup` runs wait here in turn
        self.lock = open(os.path.join(CACHE, "builder.lock"), "w")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self._kill_stale()
        data = os.path.join(CACHE, "builder-docker")
        os.makedirs(data, exist_ok=True)
        logf = open(os.path.join(CACHE, "builder-dockerd.log"), "ab")
        self.procs.append(subprocess.Popen(
            ["dockerd", "--data-root", data, "--exec-root", BUILDER_RUN + "/exec", "--pidfile",
             BUILDER_RUN + "/docker.pid", "-H", "unix://" + BUILDER_SOCK, "--bridge=none", "--iptables=false",
             "--ip-forward=false", "--ip-masq=false", "--ip6tables=false"],
            stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True))
        conf = os.path.join(BUILDER_RUN, "registry.yml")
        write_registry_config(conf, SETUP_REGISTRY)
        rlog = open(os.path.join(CACHE, "setup-registry.log"), "ab")
        self.procs.append(subprocess.Popen(["docker-registry", "serve", conf], stdout=rlog, stderr=rlog,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        with open(BUILDER_RUN + "/pids", "w") as f:
            f.write(" ".join(str(p.pid) for p in self.procs))
        wait_for(lambda: self.docker("version", check=False, quiet=True).returncode == 0, 60, "builder dockerd")
        wait_for(lambda: subprocess.run(["curl", "-sf", "http://%s/v2/" % SETUP_REGISTRY],
                                        capture_output=True).returncode == 0, 30, "setup registry")
        return self

    def _kill_stale(self):
        p = BUILDER_RUN + "/pids"
        if os.path.exists(p):
            for pid in open(p).read().split():
                try:
                    os.kill(int(pid), 15)
                except (ProcessLookupError, ValueError):
                    pass
            time.sleep(2)

    def __exit__(self, *a):
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        try:
            os.unlink(BUILDER_RUN + "/pids")
        except FileNotFoundError:
            pass
        self.lock.close()

    def docker(self, *args, check=True, quiet=False, **kw):
        return run(["docker", "-H", "unix://" + BUILDER_SOCK] + list(args), check=check, quiet=quiet, **kw)


def write_registry_config(path, addr):
    storage = os.path.join(CACHE, "registry")
    os.makedirs(storage, exist_ok=True)
    with open(path, "w") as f:
        f.write("version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
                "storage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\n"
                "http:\n  addr: %s\n" % (storage, addr))


def registry_has(tag):
    return os.path.exists(os.path.join(CACHE, "registry", "docker", "registry", "v2", "repositories",
                                       IMAGE_REPO, "_manifests", "tags", tag, "current", "link"))


# ---------------------------------------------------------------- base image
def base_key():
    return hashlib.sha256(json.dumps([BASE_INCLUDE, PIP_REQS, BASE_REV]).encode()).hexdigest()[:12]


def ensure_wheels():
    wheels = os.path.join(CACHE, "wheels")
    stamp = os.path.join(wheels, ".complete-" + hashlib.sha256(json.dumps(PIP_REQS).encode()).hexdigest()[:12])
    if os.path.exists(stamp):
        return wheels
    os.makedirs(wheels, exist_ok=True)
    if sys.version_info[:2] != (3, 11):  # the image's python is Debian 12's 3.11: wheels must be cp311
        raise SystemExit("rig setup: run it with Python 3.11 (wheels for the bookworm image), not %s"
                         % sys.version.split()[0])
    run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", wheels,
         "--cache-dir", os.path.join(CACHE, "pip-cache")] + PIP_REQS, quiet=True)
    open(stamp, "w").close()
    return wheels


def ensure_debootstrap_tarball(include=BASE_INCLUDE):
    tb = os.path.join(CACHE, "debootstrap-bookworm-minbase-%s.tgz"
                      % hashlib.sha256(include.encode()).hexdigest()[:8])
    if os.path.exists(tb):
        return tb
    work = tempfile.mkdtemp(prefix="gcrig-dbs-", dir=CACHE)
    try:
        run(["debootstrap", "--variant=minbase", "--include=" + include, "--make-tarball=" + tb + ".part",
             "bookworm", work, "http://deb.debian.org/debian"])
        os.rename(tb + ".part", tb)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tb


def build_base(b, tag):
    tb = ensure_debootstrap_tarball()
    wheels = ensure_wheels()
    root = tempfile.mkdtemp(prefix="gcrig-rootfs-", dir=CACHE)
    try:
        with stage("debootstrap (from cached tarball)"):
            run(["debootstrap", "--variant=minbase", "--include=" + BASE_INCLUDE, "--unpack-tarball=" + tb,
                 "bookworm", root, "http://deb.debian.org/debian"])
        with stage("pip install into rootfs (offline)"):
            shutil.copytree(wheels, os.path.join(root, "tmp", "wheels"))
            with open(os.path.join(root, "etc", "resolv.conf"), "w") as f:
                f.write("")
            run(["chroot", root, "python3", "-m", "pip", "install", "-q", "--break-system-packages",
                 "--no-index", "--find-links", "/tmp/wheels", "--disable-pip-version-check",
                 "--no-cache-dir"] + PIP_REQS, quiet=True,
                env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                     "LANG": "C.UTF-8"})
            shutil.rmtree(os.path.join(root, "tmp", "wheels"))
            for d in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                      "usr/share/info", "usr/share/locale", "root/.cache"):
                p = os.path.join(root, d)
                if os.path.isdir(p):
                    for e in os.listdir(p):
                        if e not in ("partial", "lock"):
                            ep = os.path.join(p, e)
                            shutil.rmtree(ep) if os.path.isdir(ep) and not os.path.islink(ep) else os.unlink(ep)
            with open(os.path.join(root, "etc", "hostname"), "w") as f:
                f.write("vllm\n")
        with stage("docker import base"):
            tar = subprocess.Popen(["tar", "-C", root, "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
            b.docker("import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                     "--change", "ENV LANG=C.UTF-8", "-", tag, stdin=tar.stdout)
            tar.stdout.close()
            if tar.wait() != 0:
                raise RuntimeError("tar of rootfs failed")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- vLLM's own parser: wheel source + deps
def vllm_source_dir(v):
    return os.path.join(CACHE, "vllm-src", v)


def ensure_vllm_source(v):
    """vllm/**/*.py and the dist-info of the released wheel of vLLM v (downloaded once; the wheel, 40-420 MB,
    is deleted once the slim copy is made). Returns (dir, info)."""
    d = vllm_source_dir(v)
    stamp = os.path.join(d, "gcrig-wheel.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            return d, json.load(f)
    import zipfile
    os.makedirs(os.path.dirname(d), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="gcrig-wheel-", dir=os.path.dirname(d))
    try:
        t = time.monotonic()
        run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
             "--no-cache-dir", "-d", tmp, "vllm==" + v] + PIP_TARGET, quiet=True)
        took = time.monotonic() - t
        whl = [n for n in os.listdir(tmp) if n.endswith(".whl")]
        if len(whl) != 1:
            raise RuntimeError("pip download vllm==%s: expected one wheel, got %r" % (v, whl))
        path = os.path.join(tmp, whl[0])
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out = os.path.join(tmp, "src")
        compiled = []
        with zipfile.ZipFile(path) as z:
            for n in z.namelist():
                top = n.split("/")[0]
                if top == "vllm" and n.endswith(".py") or top.endswith(".dist-info") and n.split("/")[-1] in (
                        "METADATA", "entry_points.txt", "WHEEL", "top_level.txt"):
                    z.extract(n, out)
                elif top == "vllm" and n.endswith(".so"):  # vllm._C etc.: faked by realparse.py
                    mod = n[:-3].split(".")[0]
                    compiled.append(mod.replace("/", "."))
        with open(os.path.join(out, "gcrig-compiled-modules.txt"), "w") as f:
            f.write("".join(m + "\n" for m in sorted(compiled)))
        info = {"wheel": whl[0], "sha256": h.hexdigest(), "wheel_bytes": os.path.getsize(path),
                "download_seconds": round(took, 1), "console_script": console_script(out)}
        with open(os.path.join(out, "gcrig-wheel.json"), "w") as f:
            json.dump(info, f, indent=1)
        shutil.rmtree(d, ignore_errors=True)
        os.rename(out, d)
        log("vllm %s: %s (%.0f MB, %.1fs) -> %s" % (v, whl[0], info["wheel_bytes"] / 1e6, took, d))
        return d, info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def console_script(src):
    """The release's `vllm` console script (module:function) from its entry_points.txt, or None."""
    for di in glob.glob(os.path.join(src, "vllm-*.dist-info", "entry_points.txt")):
        section = None
        for line in open(di):
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == "[console_scripts]" and line.split("=")[0].strip() == "vllm":
                return line.split("=", 1)[1].strip()
    return None


def realparser_key():
    return hashlib.sha256(json.dumps([base_key(), REALPARSER_DEPS]).encode()).hexdigest()[:12]


def ensure_realparser_deps():
    d = os.path.join(CACHE, "realparser-deps-" + realparser_key())
    if os.path.exists(os.path.join(d, ".complete")):
        return d
    tmp = d + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--target", tmp,
         "--cache-dir", os.path.join(CACHE, "pip-cache")] + PIP_TARGET + REALPARSER_DEPS, quiet=True)
    for p in glob.glob(os.path.join(tmp, "**", "__pycache__"), recursive=True) + [os.path.join(tmp, "bin")]:
        shutil.rmtree(p, ignore_errors=True)
    open(os.path.join(tmp, ".complete"), "w").close()
    shutil.rmtree(d, ignore_errors=True)
    os.rename(tmp, d)
    return d


def build_realparser_base(b, base, tag):
    """base + /opt/gcrig-realparser/deps: one layer shared by every version's image."""
    deps = ensure_realparser_deps()
    name = "gcrig-build-rpdeps"
    tmp = tempfile.mkdtemp(prefix="gcrig-rpdeps-")
    try:
        shutil.copytree(deps, os.path.join(tmp, REALPARSER_DIR.lstrip("/"), "deps"),
                        ignore=shutil.ignore_patterns(".complete"))
        b.docker("rm", "-f", name, check=False, quiet=True)
        b.docker("create", "--name", name, base, "/bin/true", quiet=True)
        b.docker("cp", tmp + "/.", name + ":/", quiet=True)
        b.docker("commit", name, tag, quiet=True)
    finally:
        b.docker("rm", "-f", name, check=False, quiet=True)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- stand-in layer per version
def standin_files():
    out = []
    for base in ("vllm", "torch", "realparser"):
        for p in sorted(glob.glob(os.path.join(HERE, "image", base, "**", "*.py"), recursive=True)):
            out.append(p)
    out.append(os.path.join(HERE, "nvidia_smi.py"))
    return out


def tag_stamp(v, src_info):
    h = hashlib.sha256(realparser_key().encode())
    h.update(json.dumps(version_traits(v), sort_keys=True).encode())
    h.update(src_info["sha256"].encode())
    for p in standin_files():
        h.update(p.encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def stage_tree(v, dest, src_dir, src_info):
    site = os.path.join(dest, "usr", "local", "lib", "python3.11", "dist-packages")
    for pkg in ("vllm", "torch"):
        shutil.copytree(os.path.join(HERE, "image", pkg), os.path.join(site, pkg),
                        ignore=shutil.ignore_patterns("__pycache__"))
    rp = os.path.join(dest, REALPARSER_DIR.lstrip("/"))
    shutil.copytree(src_dir, os.path.join(rp, "src"), ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(HERE, "image", "realparser", "realparse.py"), os.path.join(rp, "realparse.py"))
    tr = version_traits(v)
    with open(os.path.join(site, "vllm", "standin_build.json"), "w") as f:
        json.dump({"version": v, "traits": tr, "realparse": REALPARSER_DIR + "/realparse.py",
                   "wheel": src_info["wheel"], "wheel_sha256": src_info["sha256"],
                   "console_script": src_info["console_script"]}, f, indent=1)
    with open(os.path.join(site, "torch", "standin_build.json"), "w") as f:
        json.dump({"torch": tr["torch"], "cuda": tr["cuda"], "arch": tr["arch"]}, f)
    bindir = os.path.join(dest, "usr", "local", "bin")
    os.makedirs(bindir, exist_ok=True)
    if src_info["console_script"]:  # the release has a `vllm` command: the stand-in's runs the real CLI parser
        with open(os.path.join(bindir, "vllm"), "w") as f:
            f.write("#!/usr/bin/python3\n# stand-in for vLLM's console script (gpucluster test rig)\n"
                    "import sys\nfrom vllm.scripts import main\nsys.exit(main())\n")
        os.chmod(os.path.join(bindir, "vllm"), 0o755)
    # nvidia-smi inside --gpus containers comes from the rig's runtime hook, not the image


def selftest_and_commit(b, v, staged, ref, changes, src_info):
    """Run realparse.py's self-test in the staged image (network none) and commit that container, so that the
    image keeps the bytecode of the modules vLLM's parser imports (about half the parse time)."""
    modes = ["api_server"] + (["cli"] if src_info["console_script"] else [])
    name = "gcrig-selftest-" + v.replace(".", "-")
    b.docker("rm", "-f", name, check=False, quiet=True)
    r = b.docker("run", "--name", name, "--network", "none", "--entrypoint", "python3", staged,
                 REALPARSER_DIR + "/realparse.py", "selftest", *modes, check=False, capture=True)
    try:
        out = (r.stdout or b"").decode(errors="replace")
        if r.returncode != 0:
            raise RuntimeError("vLLM %s: the real-parser self-test failed in the image:\n%s\n%s"
                               % (v, out[-6000:], (r.stderr or b"").decode(errors="replace")[-3000:]))
        rep = json.loads(out.strip().splitlines()[-1])
        log("vllm %s real parser: %s" % (v, ", ".join(
            "%s ok in %.2fs (%d architectures, unknown flag refused)" % (m, x["seconds"], x["architectures"])
            for m, x in rep.items())))
        args = []
        for c in changes:
            args += ["--change", c]
        b.docker("commit", *args, name, ref, quiet=True)
    finally:
        b.docker("rm", "-f", name, check=False, quiet=True)
    return rep


def ensure_images(force=False):
    """Make sure the rig registry storage holds every vllm/vllm-openai:vX tag, current with the stand-in."""
    stamps_path = os.path.join(CACHE, "image-stamps.json")
    stamps = {}
    if os.path.exists(stamps_path):
        with open(stamps_path) as f:
            stamps = json.load(f)
    vs = versions()
    srcs = {}
    for v in vs:
        with stage("vllm %s wheel source" % v):
            srcs[v] = ensure_vllm_source(v)
    want = {v: tag_stamp(v, srcs[v][1]) for v in vs}
    todo = [v for v in vs if force or stamps.get("v" + v) != want[v] or not registry_has("v" + v)]
    if not todo:
        log("images: all %d tags current in registry storage (%s)" % (len(vs), ", ".join("v" + v for v in vs)))
        return vs
    base = "gcrig-base:" + base_key()
    rpbase = "gcrig-base-rp:" + realparser_key()
    with Builder() as b:
        if b.docker("image", "inspect", base, check=False, quiet=True).returncode != 0:
            with stage("build base image %s" % base):
                build_base(b, base)
        if b.docker("image", "inspect", rpbase, check=False, quiet=True).returncode != 0:
            with stage("real-parser deps layer %s" % rpbase):
                build_realparser_base(b, base, rpbase)
        for v in todo:
            with stage("stand-in layer v%s" % v):
                tmp = tempfile.mkdtemp(prefix="gcrig-layer-")
                name = "gcrig-build-" + v.replace(".", "-")
                staged = "gcrig-staged:" + v
                try:
                    stage_tree(v, tmp, *srcs[v])
                    b.docker("rm", "-f", name, check=False, quiet=True)
                    b.docker("create", "--name", name, rpbase, "/bin/true", quiet=True)
                    b.docker("cp", tmp + "/.", name + ":/", quiet=True)
                    b.docker("commit", name, staged, quiet=True)
                    tr = version_traits(v)
                    ep = '["vllm","serve"]' if tr["serve_entrypoint"] else \
                        '["python3","-m","vllm.entrypoints.openai.api_server"]'
                    ref = "%s/%s:v%s" % (SETUP_REGISTRY, IMAGE_REPO, v)
                    selftest_and_commit(b, v, staged, ref, [
                        "ENV VLLM_STANDIN_VERSION=" + v, "ENTRYPOINT " + ep, "CMD []", "WORKDIR /vllm-workspace",
                        "LABEL org.gpucluster.rig.stamp=" + want[v]], srcs[v][1])
                    b.docker("push", ref, quiet=True)
                finally:
                    b.docker("rm", "-f", name, check=False, quiet=True)
                    b.docker("rmi", staged, check=False, quiet=True)
                    shutil.rmtree(tmp, ignore_errors=True)
            stamps["v" + v] = want[v]
            with open(stamps_path, "w") as f:
                json.dump(stamps, f, indent=1)
        # the layer images are in the registry now; keep only the base in the builder
        for v in todo:
            b.docker("rmi", "%s/%s:v%s" % (SETUP_REGISTRY, IMAGE_REPO, v), check=False, quiet=True)
        b.docker("image", "prune", "-f", check=False, quiet=True)
    return vs


def image_size():
    """Uncompressed size of the base image (bytes) per the builder's metadata, if known."""
    p = os.path.join(CACHE, "image-size.json")
    return json.load(open(p)) if os.path.exists(p) else None


def setup(force_images=False, real_engine=False, openwebui=False):
    os.makedirs(CACHE, exist_ok=True)
    with stage("apt packages"):
        ensure_packages()
    with stage("olah venv"):
        ensure_olah()
    with stage("images"):
        ensure_images(force=force_images)
        import ollamaimage
        import sglangimage
        sglangimage.ensure(force=force_images)
        ollamaimage.ensure(force=force_images)
    if real_engine:  # opt-in: vLLM's CPU build + a real tiny model (realengine.py)
        import realengine
        with stage("real engine"):
            realengine.ensure(force=force_images)
    if openwebui:    # opt-in: the real OpenWebUI from PyPI (3.3 GB; webuiimage.py)
        import webuiimage
        with stage("openwebui"):
            webuiimage.ensure(force=force_images)
