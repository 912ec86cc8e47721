"""PURE: the model phases as steps: download once (head or this machine), serve from the head, copy to the others.

Every host's copy is checked by the delivery agent (sizes, sha256 / git blob ids); a stamp of the verified
listing (paths, sizes, mtimes) lets the next run skip a complete host with one read-only `find`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import models
from ..config import Host, Inventory, Secret
from ..containers import LABEL, digest
from ..steps import CONTROL, Check, Cmd, Copy, Put, Step
from .manifest import STAMP

HERE = Path(__file__).resolve().parent
MODELS_MOUNT = "/models"
STATE_DIR = "/var/lib/gpucluster"
DEFAULT_ENDPOINTS = {"hf-mirror": "https://hf-mirror.com", "huggingface": "https://huggingface.co",
                     "modelscope": "https://www.modelscope.cn"}
DEFAULT_REVISION = {"hf-mirror": "main", "huggingface": "main", "modelscope": "master"}
TOKEN_KEYS = {"source": "GPUCLUSTER_SOURCE_TOKEN", "transfer": "GPUCLUSTER_TRANSFER_TOKEN"}

# Read-only check (`check`) or record (`write`) of a folder's verified listing. Fixed text: the folder and
# the spec digest arrive as "$1" and "$2", never inside the script.
STAMP_SCRIPT = (
    'sum=$( { printf "%s\\n" "$2"; cd "$1" 2>/dev/null && find . -type f ! -path "./.gpucluster*" '
    '! -path "./.cache/huggingface/*" ! -name "*.gpucluster-part" -printf "%P\\t%s\\t%T@\\n" | LC_ALL=C sort; } '
    f'| sha256sum | cut -c1-64); f="$1/{STAMP}"; '
    'if [ "$0" = write ]; then printf "%s\\n" "$sum" > "$f"; '
    'elif [ "$(cat "$f" 2>/dev/null)" = "$sum" ]; then echo "skip complete: verified files unchanged since"; '
    'else echo "run not complete or changed since verified"; fi')


def model_paths(inventory: Inventory, host: Host) -> tuple[str, str]:
    """(path on the host, path inside containers) of the deployment's model."""
    model = inventory.deploy.model
    if inventory.deploy.source.kind == "local" or models.is_local(model):
        path = model.rstrip("/")
        return path, f"{MODELS_MOUNT}/{path.rsplit('/', 1)[-1]}"
    name = models.host_dir_name(model)
    return f"{inventory.model_dir_for(host).rstrip('/')}/{name}", f"{MODELS_MOUNT}/{name}"


def control_cache(model: str) -> str:
    base = os.environ.get("GPUCLUSTER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpucluster")
    return os.path.join(base, "models", models.host_dir_name(model))


@dataclass(frozen=True, kw_only=True)
class ModelJob:
    """What the model phases need to know."""

    inventory: Inventory
    hosts: tuple[Host, ...]          # head first
    image: str                       # the agent runs in a throwaway container of it
    transfer_token: Secret
    verify: bool = False             # re-list the source and hash every file, whatever the stamps say

    @property
    def src(self):
        return self.inventory.deploy.source

    @property
    def local(self) -> bool:
        return self.src.kind == "local" or models.is_local(self.inventory.deploy.model)

    @property
    def endpoint(self) -> str:
        return (self.src.endpoint or DEFAULT_ENDPOINTS[self.src.kind]).rstrip("/")

    @property
    def spec(self) -> dict:
        return {"model": self.inventory.deploy.model,
                "revision": None if self.local else (self.src.revision or DEFAULT_REVISION[self.src.kind]),
                "include": sorted(self.src.include), "exclude": sorted(self.src.exclude)}

    def path(self, host: Host) -> str:
        return model_paths(self.inventory, host)[0]

    def jobdir(self, host: Host) -> str:
        return f"{STATE_DIR}/{self.inventory.cluster.name}/{host.name}"

    def container(self, what: str) -> str:
        return f"{LABEL}-{self.inventory.cluster.name}-model-{what}"

    def stamp(self, host: Host, how: str) -> tuple[str, ...]:
        return ("sh", "-c", STAMP_SCRIPT, how, self.path(host), digest(self.spec))


def _agent_files(job: ModelJob, host: Host, name: str, doc: dict, secret: tuple[str, Secret] | None) -> list:
    d = job.jobdir(host)
    puts = [Put(path=f"{d}/agent.py", text=(HERE / "agent.py").read_text()),
            Put(path=f"{d}/manifest.py", text=(HERE / "manifest.py").read_text()),
            Put(path=f"{d}/{name}.json", mode=0o600, text=json.dumps(
                {**doc, **({"token_file": f"/job/{name}.secret"} if secret else {})}, sort_keys=True))]
    if secret:
        puts.append(Put(path=f"{d}/{name}.secret", mode=0o600, secrets=(secret,)))
    return puts


def _agent(job: ModelJob, host: Host, name: str, cmd: str, *, ro: bool, detach: bool = False) -> Cmd:
    """The agent in a throwaway, labelled container of the image: model folder at /target, job folder at /job."""
    argv = ["docker", "run", "--rm", *(["-d"] if detach else []), "--name", job.container(name),
            "--label", f"{LABEL}.cluster={job.inventory.cluster.name}", "--label", f"{LABEL}.node=aux",
            "--label", f"{LABEL}.role=model-{name}", "--network", "host",
            "-v", f"{job.path(host)}:/target" + (":ro" if ro else ""), "-v", f"{job.jobdir(host)}:/job:ro",
            "--entrypoint", "python3", job.image, "-u", "/job/agent.py", cmd, f"/job/{name}.json"]
    return Cmd(argv=tuple(argv), timeout=None if not detach else 120, stream=not detach)


def _forget(job: ModelJob, host: Host, name: str) -> tuple[Cmd, ...]:
    """Remove a job's secret file once the agent has read it."""
    return (Cmd(argv=("rm", "-f", f"{job.jobdir(host)}/{name}.secret")),)


def _check(job: ModelJob, host: Host) -> Check | None:
    return None if job.verify else Check(argv=job.stamp(host, "check"))


def _source_doc(job: ModelJob, target: str = "/target") -> dict:
    return {"kind": job.src.kind, "endpoint": job.endpoint, "repo": job.inventory.deploy.model,
            "revision": job.spec["revision"], "include": list(job.src.include), "exclude": list(job.src.exclude),
            "verify": job.verify, "spec": job.spec, "target": target}


def head_steps(job: ModelJob) -> list[Step]:
    head = job.hosts[0]
    path = job.path(head)
    token = (TOKEN_KEYS["source"], job.src.token) if job.src.token is not None else None
    if job.local:
        doc = {"spec": job.spec, "verify": job.verify, "host_path": path, "include": list(job.src.include),
               "exclude": list(job.src.exclude)}
        return [Step(id=f"{head.name}/model", host=head.name, phase="model", check=_check(job, head),
                     reason=f"local model: hash {path} on {head.name} (the reference copy) and record it",
                     ops=(*_agent_files(job, head, "index", doc, None), _agent(job, head, "index", "index", ro=False),
                          Cmd(argv=job.stamp(head, "write"))))]
    if job.src.download_on == "control":
        cache = control_cache(job.inventory.deploy.model)
        jobfile = f"{cache}.job/sync.json"
        secret = [Put(path=f"{cache}.job/sync.secret", mode=0o600, secrets=(token,))] if token else []
        forget = [Cmd(argv=("rm", "-f", f"{cache}.job/sync.secret"))] if token else []
        doc = {**_source_doc(job, cache), **({"token_file": f"{cache}.job/sync.secret"} if token else {})}
        return [
            Step(id=f"{CONTROL}/model", host=CONTROL, phase="model-download", needed_by=(f"{head.name}/model",),
                 reason=f"download {job.inventory.deploy.model} once on this machine from {job.endpoint} into "
                        f"{cache} (resumes, verifies sha256)",
                 ops=(Put(path=jobfile, mode=0o600, text=json.dumps(doc, sort_keys=True)), *secret,
                      Cmd(argv=("python3", str(HERE / "agent.py"), "sync", jobfile), timeout=None, stream=True),
                      *forget)),
            Step(id=f"{head.name}/model", host=head.name, phase="model", check=_check(job, head),
                 reason=f"copy the model from this machine to {head.name}:{path} over SSH, checked by sha256",
                 ops=(Copy(src_host=CONTROL, src=cache, dst=path), Cmd(argv=job.stamp(head, "write"))))]
    return [Step(id=f"{head.name}/model", host=head.name, phase="model", check=_check(job, head),
                 reason=f"download {job.inventory.deploy.model}@{job.spec['revision']} once, on {head.name}, from "
                        f"{job.endpoint} (resumes, verifies sizes and sha256)",
                 ops=(Cmd(argv=("mkdir", "-p", path)), *_agent_files(job, head, "sync", _source_doc(job), token),
                      _agent(job, head, "sync", "sync", ro=False), *(_forget(job, head, "sync") if token else ()),
                      Cmd(argv=job.stamp(head, "write"))))]


def fanout_steps(job: ModelJob) -> list[Step]:
    """The head serves its verified copy; every other host pulls what it lacks from it (or, when it cannot
    reach the head, gets it through this machine); then the server stops."""
    head, others = job.hosts[0], job.hosts[1:]
    if job.inventory.cluster.shared_model_dir or not others:
        return []
    port = job.inventory.cluster.transfer_port
    secret = (TOKEN_KEYS["transfer"], job.transfer_token)
    serve = job.container("serve")
    copies = []
    for h in others:
        doc = {"kind": "peer", "endpoint": f"http://{head.address}:{port}", "peer_name": head.name,
               "repo": job.inventory.deploy.model, "revision": job.spec["revision"], "include": [], "exclude": [],
               "verify": job.verify, "spec": job.spec, "target": "/target"}
        copies.append(Step(
            id=f"{h.name}/model", host=h.name, phase="model-copy", check=_check(job, h),
            reason=f"pull what {h.name} lacks from {head.name}:{port} over the LAN, verified by sha256",
            ops=(Cmd(argv=("mkdir", "-p", job.path(h))), *_agent_files(job, h, "sync", doc, secret),
                 _agent(job, h, "sync", "sync", ro=False), *_forget(job, h, "sync"), Cmd(argv=job.stamp(h, "write"))),
            otherwise=((*_forget(job, h, "sync"), Copy(src_host=head.name, src=job.path(head), dst=job.path(h)),
                        Cmd(argv=job.stamp(h, "write"))),)))
    doc = {"bind": head.address, "port": port, "idle": 300, "host_path": job.path(head)}
    # The agent reads its token file at start; the other hosts retry while its server comes up.
    start = (*_agent_files(job, head, "serve", doc, secret), _agent(job, head, "serve", "serve", ro=True, detach=True))
    return [
        Step(id=f"{head.name}/model-serve", host=head.name, phase="model-serve",
             needed_by=tuple(s.id for s in copies),
             check=Check(argv=("docker", "inspect", "--type", "container", "--format", "replace {{.State.Status}}",
                               serve)),
             variants={"replace": (Cmd(argv=("docker", "rm", "-f", serve)), *start)},
             reason=f"serve {job.path(head)} read-only on {head.address}:{port} to the other hosts (token "
                    "in a 0600 file; stopped below, or by itself when idle for 300 s)",
             ops=start),
        *copies,
        # `after`: a dry run, made before the server exists, must still list its removal when the server will run
        Step(id=f"{head.name}/model-serve-stop", host=head.name, phase="model-done", use_output=True,
             check=Check(argv=("docker", "ps", "-a", "--filter", f"name=^{serve}$", "--format", "{{.Names}}")),
             after=(f"{head.name}/model-serve",),
             variants={"restart": (Cmd(argv=("docker", "rm", "-f", serve)), *_forget(job, head, "serve"))},
             reason="stop the model server", ops=(Cmd(argv=("docker", "rm", "-f")), *_forget(job, head, "serve"))),
    ]
