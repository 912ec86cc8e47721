"""Model delivery: make sure the model is complete on every host that needs it."""

from __future__ import annotations

from typing import Callable

from . import models
from .config import Host
from .plan import Plan, Step
from .remote import Hosts


def _present(hosts: Hosts, host: Host, path: str) -> bool:
    return hosts.run(host, ["test", "-f", f"{path}/config.json"]).ok


def deliver(hosts: Hosts, plan: Plan, *, progress: Callable[[str], None] = lambda s: None) -> dict[str, str]:
    """Per host: 'present' when the model is already there, else run the plan's model step."""
    from .plan import model_paths
    steps: dict[str, Step] = {s.host: s for s in plan.steps if s.phase == "model"}

    def one(host: Host) -> str:
        path, _ = model_paths(plan.inventory, host)
        if _present(hosts, host, path):
            return "present"
        if plan.inventory.deploy.source.kind == "local" or models.is_local(plan.inventory.deploy.model):
            raise RuntimeError(f"local model {path} is not on the host (config.json missing)")
        hosts.check(host, ["mkdir", "-p", path])
        progress(f"{host.name}: fetching {plan.inventory.deploy.model} into {path}")
        hosts.check(host, steps[host.name].argv)
        if not _present(hosts, host, path):
            raise RuntimeError(f"download finished but {path}/config.json is missing")
        return "fetched"

    return hosts.phase("model", plan.setup.hosts, one)
