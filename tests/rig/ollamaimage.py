# gpucluster test rig: builds the Ollama stand-in image ollama/ollama:0.32.15 (image/ollama) and pushes it to the rig registry storage.
"""ensure(force=False): the rig's debootstrap base (rigimage.build_base, shared with the vLLM images) plus one layer:
the stand-in at /usr/lib/ollama/standin, /bin/ollama linked to it, ENTRYPOINT ["/bin/ollama"] CMD ["serve"] and
OLLAMA_HOST=0.0.0.0:11434 as the official image sets them. A stamp (base key + the stand-in's files) in
CACHE/ollama-image-stamps.json makes a second call a no-op. Pulled on the rig as 10.77.0.2:5000/ollama/ollama:0.32.15."""
import glob
import hashlib
import json
import os
import shutil
import tempfile

import rigimage
from rigutil import CACHE, HERE, log, stage

REPO_NAME = "ollama/ollama"
VERSION = "0.32.15"
IMAGE = "%s:%s" % (REPO_NAME, VERSION)
SRC = os.path.join(HERE, "image", "ollama")
DEST = "/usr/lib/ollama/standin"
STAMPS = os.path.join(CACHE, "ollama-image-stamps.json")
# the official image's config (Dockerfile at v0.32.15: ENV OLLAMA_HOST 0.0.0.0:11434, EXPOSE 11434,
# ENTRYPOINT ["/bin/ollama"], CMD ["serve"], NVIDIA_DRIVER_CAPABILITIES/NVIDIA_VISIBLE_DEVICES for the toolkit)
CHANGES = ["ENV OLLAMA_HOST=0.0.0.0:11434", "ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility",
           "ENV NVIDIA_VISIBLE_DEVICES=all", "EXPOSE 11434", 'ENTRYPOINT ["/bin/ollama"]', 'CMD ["serve"]']


def files():
    return sorted(p for p in glob.glob(os.path.join(SRC, "*")) if os.path.isfile(p) and not p.endswith(".pyc"))


def stamp():
    h = hashlib.sha256(json.dumps([rigimage.base_key(), VERSION, CHANGES]).encode())
    for p in files():
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def registry_has():
    return os.path.exists(os.path.join(CACHE, "registry", "docker", "registry", "v2", "repositories", REPO_NAME,
                                       "_manifests", "tags", VERSION, "current", "link"))


def _stamps():
    try:
        with open(STAMPS) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def ensure(force=False):
    """Make sure the rig registry storage holds ollama/ollama:VERSION built from the current stand-in."""
    want = stamp()
    if not force and _stamps().get(VERSION) == want and registry_has():
        log("ollama image: %s:%s current in registry storage" % (REPO_NAME, VERSION))
        return "%s:%s" % (REPO_NAME, VERSION)
    base = "gcrig-base:" + rigimage.base_key()
    ref = "%s/%s:%s" % (rigimage.SETUP_REGISTRY, REPO_NAME, VERSION)
    with rigimage.Builder() as b:
        if b.docker("image", "inspect", base, check=False, quiet=True).returncode != 0:
            with stage("build base image %s" % base):
                rigimage.build_base(b, base)
        with stage("ollama stand-in layer %s" % VERSION):
            tmp = tempfile.mkdtemp(prefix="gcrig-ollama-")
            name = "gcrig-build-ollama"
            try:
                dest = os.path.join(tmp, DEST.lstrip("/"))
                os.makedirs(dest)
                for p in files():
                    shutil.copy(p, dest)
                os.chmod(os.path.join(dest, "ollama"), 0o755)
                os.makedirs(os.path.join(tmp, "bin"))
                os.symlink(DEST + "/ollama", os.path.join(tmp, "bin", "ollama.link"))
                b.docker("rm", "-f", name, check=False, quiet=True)
                b.docker("create", "--name", name, base, "/bin/true", quiet=True)
                b.docker("cp", os.path.join(tmp, "usr") + "/.", name + ":/usr/", quiet=True)
                b.docker("cp", os.path.join(tmp, "bin", "ollama.link"), name + ":/usr/bin/ollama", quiet=True)
                args = []
                for c in CHANGES + ["LABEL org.gpucluster.rig.stamp=" + want]:
                    args += ["--change", c]
                b.docker("commit", *args, name, ref, quiet=True)
                b.docker("push", ref, quiet=True)
            finally:
                b.docker("rm", "-f", name, check=False, quiet=True)
                b.docker("rmi", ref, check=False, quiet=True)
                shutil.rmtree(tmp, ignore_errors=True)
    st = _stamps()
    st[VERSION] = want
    with open(STAMPS, "w") as f:
        json.dump(st, f, indent=1)
    return "%s:%s" % (REPO_NAME, VERSION)


if __name__ == "__main__":
    print(ensure(force=os.environ.get("GCRIG_FORCE") == "1"))
