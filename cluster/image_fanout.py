"""PURE: the engine image on every host, pulled through the registry mirrors once and carried over the LAN.

The head pulls (or already has) the image; the other hosts form a chain head -> h2 -> h3 ...: each receives the
`docker save` stream of the layers some host of the chain lacks, tees it into its own `docker load` and into the
next host (cluster/image_fanout_agent.py, run by the host's python3). A host that already holds the image is
skipped, unless a host after it needs the image: then it only forwards. A host the chain cannot reach (no
python3, the LAN port blocked) pulls through the mirrors itself, and says so."""

from __future__ import annotations

import json
from pathlib import Path

from .config import Host, Secret
from .deployment import Deployment
from .steps import Check, Cmd, Put, Step

AGENT = Path(__file__).resolve().parent / "image_fanout_agent.py"
TOKEN_KEY = "GPUCLUSTER_TRANSFER_TOKEN"       # the same name as the model copy's token (one export in a runbook)
STATE_DIR = "/var/lib/gpucluster"


def present_check(image: str) -> Check:
    return Check(argv=("docker", "image", "inspect", "--format", "skip present {{.Id}}", image))


def pull_ops(image: str, refs: list[str]) -> list[tuple[Cmd, ...]]:
    """Each way to pull: one mirror (retagged to the canonical name), in order, then the canonical name itself."""
    return [(Cmd(argv=("docker", "pull", r), timeout=3600),) + ((Cmd(argv=("docker", "tag", r, image)),)
                                                                  if r != image else ()) for r in refs]


def pull_step(host: str, image: str, refs: list[str], *, id: str, phase: str) -> Step:
    """Pull through the registry mirrors in order (retagging a mirror's copy to the canonical name); skip if present."""
    tries = pull_ops(image, refs)
    return Step(id=id, host=host, phase=phase, ops=tries[0], otherwise=tuple(tries[1:]), check=present_check(image),
                reason=f"pull {image} through the mirrors in order: {', '.join(refs)}")


def use_lan(d: Deployment) -> bool:
    return d.inventory.cluster.image_fanout == "lan" and len(d.hosts) > 1


def _jobdir(d: Deployment, host: Host) -> str:
    return f"{STATE_DIR}/{d.cluster}/{host.name}/image"


def _agent_ops(d: Deployment, host: Host, role: str, doc: dict, token: Secret) -> tuple:
    """The agent, its job (0600) and the token (0600, read by the agent, removed after), then the agent's run."""
    jd = _jobdir(d, host)
    return (Put(path=f"{jd}/image_fanout_agent.py", text=AGENT.read_text()),
            Put(path=f"{jd}/{role}.json", mode=0o600, text=json.dumps(
                {**doc, "token_file": f"{jd}/{role}.secret", "spool": jd}, sort_keys=True)),
            Put(path=f"{jd}/{role}.secret", mode=0o600, secrets=((TOKEN_KEY, token),)),
            Cmd(argv=("python3", "-u", f"{jd}/image_fanout_agent.py", role, f"{jd}/{role}.json"), timeout=None,
                stream=True),
            _forget(d, host, role))


def _forget(d: Deployment, host: Host, role: str) -> Cmd:
    return Cmd(argv=("rm", "-f", f"{_jobdir(d, host)}/{role}.secret"))


def lan_steps(d: Deployment, refs: list[str], token: Secret) -> list[Step]:
    """Head: pull through the mirrors (phase image); then head -> h2 -> h3 ... over the LAN (phase image-fanout)."""
    image, port = d.profile.image, d.inventory.cluster.transfer_port
    head, others = d.hosts[0], list(d.hosts[1:])
    chain = [head, *others]
    ids = [f"{h.name}/image" for h in others]
    relays = []
    for i, h in enumerate(others):
        up, down = chain[i], (others[i + 1] if i + 1 < len(others) else None)
        doc = {"image": image, "host": h.name, "bind": h.address, "port": port, "upstream": up.address,
               "upstream_name": up.name, **({"downstream": down.name} if down else {})}
        ops = _agent_ops(d, h, "relay", doc, token)
        relays.append(Step(
            id=f"{h.name}/image", host=h.name, phase="image-fanout", check=present_check(image),
            # a host that holds the image still forwards it when a host after it in the chain needs it
            after=tuple(x for x in ids if x != f"{h.name}/image"), variants={"restart": ops},
            reason=f"receive {image} from {up.name} over the LAN ({up.address}:{port}), load the layers this host "
                   f"lacks{f' and forward the stream to {down.name}' if down else ''}; if the LAN path fails, pull "
                   "through the mirrors",
            ops=ops, otherwise=tuple((_forget(d, h, "relay"), *alt) for alt in pull_ops(image, refs))))
    send = Step(id=f"{head.name}/image-send", host=head.name, phase="image-fanout", needed_by=tuple(ids),
                reason=f"send {image} once from {head.name} ({head.address}:{port}) down the chain "
                       f"{' -> '.join(h.name for h in chain)}: only the layers some host lacks (runs together with "
                       "their steps; a host that gets nothing pulls through the mirrors)",
                ops=_agent_ops(d, head, "send", {"image": image, "host": head.name, "bind": head.address,
                                                 "port": port}, token))
    return [pull_step(head.name, image, refs, id=f"{head.name}/image", phase="image"), send, *relays]

