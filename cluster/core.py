"""Use cases: plan, probe, up, down, status, logs, doctor. The CLI is a thin layer over these."""

from __future__ import annotations

import dataclasses
from typing import Any

from . import config, models
from . import plan as planner
from .config import Inventory, Profile


def load(inventory_path: str, *, profile: str | None = None, model: str | None = None,
         hosts: list[str] | None = None) -> tuple[Inventory, Profile]:
    """Read the inventory and its profile, with command-line overrides applied."""
    inv = config.load_inventory(inventory_path)
    if model:
        inv = dataclasses.replace(inv, deploy=dataclasses.replace(inv.deploy, model=model))
    if hosts:
        keep = [h for h in inv.hosts if h.name in hosts]
        if len(keep) != len(set(hosts)):
            missing = sorted(set(hosts) - {h.name for h in inv.hosts})
            raise config.ConfigError(f"--hosts: no host named {', '.join(missing)}", file=inv.path,
                                     fix="known hosts: " + ", ".join(h.name for h in inv.hosts))
        inv = dataclasses.replace(inv, hosts=keep)
    return inv, config.load_profile(profile or inv.deploy.profile, inventory=inv)


def make_plan(inv: Inventory, prof: Profile, *, tp: int | None = None, pp: int | None = None,
              sets: dict[str, Any] | None = None, extra_findings: tuple = ()) -> planner.Plan:
    facts = models.load(inv.deploy.model, file=inv.path)
    return planner.build(inv, prof, model=facts, tp=tp, pp=pp, sets=sets, extra_findings=extra_findings)
