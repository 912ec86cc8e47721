"""PURE: the model phases as steps: download once (head or this machine), then pass it down a chain of hosts.

The chain: host k pulls from host k-1 while k-1 is still receiving it (serve.py, relay mode), so every host's
uplink carries one copy instead of the head's carrying N-1 (a star). Every host's copy is checked by the delivery
agent (sizes, sha256 / git blob ids); a stamp of the verified listing (paths, sizes, mtimes) lets the next run skip
a complete host with one read-only `find`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import models
from ..config import Host, Inventory, Secret
from ..containers import LABEL, digest
from ..steps import CONTROL, Check, Cmd, Copy, Put, Step
from .manifest import INCOMING, STAMP

HERE = Path(__file__).resolve().parent
MODELS_MOUNT = "/models"
STATE_DIR = "/var/lib/gpucluster"
DEFAULT_ENDPOINTS = {"hf-mirror": "https://hf-mirror.com", "huggingface": "https://huggingface.co",
                     "modelscope": "https://www.modelscope.cn"}
DEFAULT_REVISION = {"hf-mirror": "main", "huggingface": "main", "modelscope": "master"}
TOKEN_KEYS = {"source": "GPUCLUSTER_SOURCE_TOKEN", "transfer": "GPUCLUSTER_TRANSFER_TOKEN"}
STALL = 60       # seconds a relay waits for its own copy to move before it refuses (HTTP 409); pullers wait longer
IDLE = 300       # seconds without a request before a server stops by itself

# Read-only check (`check`) or record (`write`) of a folder's verified listing. Fixed text: the folder and
# the spec digest arrive as "$1" and "$2", never inside the script.
_STAMP_SUM = (
    'sum=$( { printf "%s\\n" "$2"; cd "$1" 2>/dev/null && find . -type f ! -path "./.gpucluster*" '
    '! -path "./.cache/huggingface/*" ! -name "*.gpucluster-part" -printf "%P\\t%s\\t%T@\\n" | LC_ALL=C sort; } '
    f'| sha256sum | cut -c1-64); f="$1/{STAMP}"; ')
STAMP_SCRIPT = _STAMP_SUM + (
    'if [ "$0" = write ]; then printf "%s\\n" "$sum" > "$f"; '
    'elif [ "$(cat "$f" 2>/dev/null)" = "$sum" ]; then echo "skip complete: verified files unchanged since"; '
    'else echo "run not complete or changed since verified"; fi')
# A relay's server: the same stamp says whether its own copy will run (serve what arrives) or not (serve it whole);
# a server left running is replaced. The container name arrives as "$0".
SERVE_CHECK = (
    'if docker inspect --type container "$0" >/dev/null 2>&1; then r=replace-; else r=; fi; ' + _STAMP_SUM +
    'if [ "$(cat "$f" 2>/dev/null)" = "$sum" ]; then echo "${r}complete its copy is verified: served whole"; '
    'else echo "${r}relay its own copy runs: served as it arrives"; fi')


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
    fanout: str = "chain"            # "star": every host pulls from the head (bench/model_fanout.py compares)

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


def _agent_files(job: ModelJob, host: Host, name: str, doc: dict, secret: tuple[str, Secret] | None, *,
                 serves: bool = False) -> list:
    d = job.jobdir(host)
    mods = ("agent.py", "manifest.py", *(("serve.py",) if serves else ()))
    puts = [*(Put(path=f"{d}/{m}", text=(HERE / m).read_text()) for m in mods),
            Put(path=f"{d}/{name}.json", mode=0o600, text=json.dumps(
                {**doc, **({"token_file": f"/job/{name}.secret"} if secret else {})}, sort_keys=True))]
    if secret:
        puts.append(Put(path=f"{d}/{name}.secret", mode=0o600, secrets=(secret,)))
    return puts


def _agent(job: ModelJob, host: Host, name: str, cmd: str, *, ro: bool, detach: bool = False) -> Cmd:
    # name: the container's and the job file's; cmd: what the agent does (sync, serve, relay, index)
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


@dataclass(frozen=True)
class Hub:
    """One place to download from: the source, or one of its fallbacks (tried in order when it fails)."""

    name: str                        # the agent's job and container name: sync, sync-fallback-1, ...
    kind: str
    endpoint: str
    revision: str
    token: tuple[str, Secret] | None


def hubs(job: ModelJob) -> list[Hub]:
    out = []
    for i, s in enumerate((job.src, *job.src.fallbacks)):
        out.append(Hub(name="sync" if i == 0 else f"sync-fallback-{i}", kind=s.kind,
                       endpoint=(s.endpoint or DEFAULT_ENDPOINTS[s.kind]).rstrip("/"),
                       revision=s.revision or DEFAULT_REVISION[s.kind],
                       token=(TOKEN_KEYS["source"] + (f"_{i}" if i else ""), s.token) if s.token is not None
                       else None))
    return out


def _source_doc(job: ModelJob, hub: Hub, target: str = "/target") -> dict:
    return {"kind": hub.kind, "endpoint": hub.endpoint, "repo": job.inventory.deploy.model,
            "revision": hub.revision, "include": list(job.src.include), "exclude": list(job.src.exclude),
            "verify": job.verify, "spec": job.spec, "target": target}


def head_steps(job: ModelJob) -> list[Step]:
    head = job.hosts[0]
    path = job.path(head)
    if job.local:
        doc = {"spec": job.spec, "verify": job.verify, "host_path": path, "include": list(job.src.include),
               "exclude": list(job.src.exclude)}
        return [Step(id=f"{head.name}/model", host=head.name, phase="model", check=_check(job, head),
                     reason=f"local model: hash {path} on {head.name} (the reference copy) and record it",
                     ops=(*_agent_files(job, head, "index", doc, None), _agent(job, head, "index", "index", ro=False),
                          Cmd(argv=job.stamp(head, "write"))))]
    where = " (then " + ", ".join(h.endpoint for h in hubs(job)[1:]) + ", each in turn if the one before fails)" \
        if job.src.fallbacks else ""
    if job.src.download_on == "control":
        cache = control_cache(job.inventory.deploy.model)

        def fetch(hub: Hub) -> tuple:
            jobfile, secret = f"{cache}.job/{hub.name}.json", f"{cache}.job/{hub.name}.secret"
            doc = {**_source_doc(job, hub, cache), **({"token_file": secret} if hub.token else {})}
            return (Put(path=jobfile, mode=0o600, text=json.dumps(doc, sort_keys=True)),
                    *((Put(path=secret, mode=0o600, secrets=(hub.token,)),) if hub.token else ()),
                    Cmd(argv=("python3", str(HERE / "agent.py"), "sync", jobfile), timeout=None, stream=True),
                    *((Cmd(argv=("rm", "-f", secret)),) if hub.token else ()))
        first, *rest = [fetch(h) for h in hubs(job)]
        return [
            Step(id=f"{CONTROL}/model", host=CONTROL, phase="model-download", needed_by=(f"{head.name}/model",),
                 reason=f"download {job.inventory.deploy.model} once on this machine from {job.endpoint}{where} "
                        f"into {cache} (resumes, verifies sha256)", ops=first, otherwise=tuple(rest)),
            Step(id=f"{head.name}/model", host=head.name, phase="model", check=_check(job, head),
                 reason=f"copy the model from this machine to {head.name}:{path} over SSH, checked by sha256",
                 ops=(Copy(src_host=CONTROL, src=cache, dst=path), Cmd(argv=job.stamp(head, "write"))))]

    def download(hub: Hub) -> tuple:
        return (Cmd(argv=("mkdir", "-p", path)), *_agent_files(job, head, hub.name, _source_doc(job, hub), hub.token),
                _agent(job, head, hub.name, "sync", ro=False), *(_forget(job, head, hub.name) if hub.token else ()),
                Cmd(argv=job.stamp(head, "write")))
    first, *rest = [download(h) for h in hubs(job)]
    return [Step(id=f"{head.name}/model", host=head.name, phase="model", check=_check(job, head),
                 reason=f"download {job.inventory.deploy.model}@{job.spec['revision']} once, on {head.name}, from "
                        f"{job.endpoint}{where} (resumes, verifies sizes and sha256)", ops=first, otherwise=tuple(rest))]


def upstreams(job: ModelJob) -> list[tuple[Host, Host]]:
    """(host, the host it pulls from) for every host but the head: the one before it (chain), or the head (star)."""
    hosts = job.hosts
    return [(h, hosts[0] if job.fanout == "star" else hosts[k]) for k, h in enumerate(hosts[1:])]


def fanout_steps(job: ModelJob) -> list[Step]:
    """Every host that another pulls from serves its folder (started first, detached); every other host pulls what
    it lacks from its upstream, all at once (or, when it cannot reach it, gets it from the head through this
    machine); then the servers stop. A complete host is skipped and serves its verified copy whole."""
    if job.inventory.cluster.shared_model_dir or len(job.hosts) < 2:
        return []
    pairs = upstreams(job)
    pullers: dict[str, list[Host]] = {}
    for h, up in pairs:
        pullers.setdefault(up.name, []).append(h)
    servers = [h for h in job.hosts if h.name in pullers]
    return [*(s for h in servers for s in _serve_steps(job, h, pullers[h.name])),
            *(_copy_step(job, h, up, relay=h.name in pullers) for h, up in pairs),
            *(_stop_step(job, h) for h in servers)]


def _serve_steps(job: ModelJob, h: Host, pullers: list[Host]) -> list[Step]:
    """The agent's files, then its server: `serve` (a complete copy, whole) or `relay` (a copy still arriving)."""
    port = job.inventory.cluster.transfer_port
    name = job.container("serve")
    doc = {"bind": h.address, "port": port, "idle": IDLE, "host_path": job.path(h), "name": h.name, "stall": STALL}
    needed_by = tuple(f"{p.name}/model" for p in pullers)
    to = ", ".join(p.name for p in pullers)
    files = Step(id=f"{h.name}/model-serve-files", host=h.name, phase="model-serve", needed_by=needed_by,
                 reason=f"the delivery agent and its server's job on {h.name} (token in a 0600 file)",
                 ops=tuple(_agent_files(job, h, "serve", doc, (TOKEN_KEYS["transfer"], job.transfer_token),
                                        serves=True)))
    # The agent reads its token file at start; the pullers retry while its server comes up.
    whole = _agent(job, h, "serve", "serve", ro=True, detach=True)
    rm = Cmd(argv=("docker", "rm", "-f", name))
    inspect = Check(argv=("docker", "inspect", "--type", "container", "--format", "replace {{.State.Status}}", name))
    common = dict(id=f"{h.name}/model-serve", host=h.name, phase="model-serve", needed_by=needed_by)
    if h is job.hosts[0]:
        return [files, Step(**common, check=inspect, variants={"replace": (rm, whole)}, ops=(whole,),
                            reason=f"serve {job.path(h)} read-only on {h.address}:{port} to {to} (stopped below, "
                                   f"or by itself when idle for {IDLE} s)")]
    # a relay: its own copy (model-copy) fills the folder while it serves; a note left by an earlier copy goes first
    relay = (Cmd(argv=("mkdir", "-p", job.path(h))), Cmd(argv=("rm", "-f", f"{job.path(h)}/{INCOMING}")),
             _agent(job, h, "serve", "relay", ro=True, detach=True))
    reason = (f"serve {job.path(h)} read-only on {h.address}:{port} to {to}: what {h.name} holds whole, a file "
              f"still arriving as its bytes land; nothing new for {STALL} s ends a wait with one line (stopped below)")
    if job.verify:      # its own copy always runs
        return [files, Step(**common, check=inspect, variants={"replace": (rm, *relay)}, ops=relay, reason=reason)]
    return [files, Step(**common, check=Check(argv=("sh", "-c", SERVE_CHECK, name, job.path(h), digest(job.spec))),
                        variants={"complete": (whole,), "replace-complete": (rm, whole),
                                  "replace-relay": (rm, *relay)},
                        ops=relay, reason=reason)]


def _copy_step(job: ModelJob, h: Host, up: Host, *, relay: bool) -> Step:
    port = job.inventory.cluster.transfer_port
    head = job.hosts[0]
    doc = {"kind": "peer", "endpoint": f"http://{up.address}:{port}", "peer_name": up.name,
           "repo": job.inventory.deploy.model, "revision": job.spec["revision"], "include": [], "exclude": [],
           "verify": job.verify, "spec": job.spec, "target": "/target", "read_timeout": STALL + 30,
           **({"relay": True} if relay else {})}
    how = "" if up is head else f" while {up.name} receives it (its bytes passed on as they land)"
    return Step(
        id=f"{h.name}/model", host=h.name, phase="model-copy", check=_check(job, h),
        reason=f"pull what {h.name} lacks from {up.name}:{port} over the LAN{how}, verified by sha256"
               + (" (and tell its own server what arrives)" if relay else ""),
        ops=(Cmd(argv=("mkdir", "-p", job.path(h))),
             *_agent_files(job, h, "sync", doc, (TOKEN_KEYS["transfer"], job.transfer_token), serves=relay),
             _agent(job, h, "sync", "sync", ro=False), *_forget(job, h, "sync"), Cmd(argv=job.stamp(h, "write"))),
        # the head's copy is complete: a host that cannot reach its upstream gets it from there via this machine
        otherwise=((*_forget(job, h, "sync"), Copy(src_host=head.name, src=job.path(head), dst=job.path(h)),
                    Cmd(argv=job.stamp(h, "write"))),))


def _stop_step(job: ModelJob, h: Host) -> Step:
    name = job.container("serve")
    # `after`: a dry run, made before the server exists, must still list its removal when the server will run
    return Step(id=f"{h.name}/model-serve-stop", host=h.name, phase="model-done", use_output=True,
                check=Check(argv=("docker", "ps", "-a", "--filter", f"name=^{name}$", "--format", "{{.Names}}")),
                after=(f"{h.name}/model-serve",),
                variants={"restart": (Cmd(argv=("docker", "rm", "-f", name)), *_forget(job, h, "serve"))},
                reason="stop the model server", ops=(Cmd(argv=("docker", "rm", "-f")), *_forget(job, h, "serve")))
