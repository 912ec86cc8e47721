"""PURE: one decided deployment (hosts, topology, args, names): what engine plugins build their steps from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .checks import Setup
from .config import Host, Inventory, Profile, Secret
from .delivery.model_steps import model_paths
from .knowledge import EngineFacts

if TYPE_CHECKING:  # pragma: no cover
    from .engines import Engine

SECRETS_DIR = "/etc/gpucluster"


@dataclass(frozen=True, kw_only=True)
class Topology:
    tp: int
    pp: int
    head: str
    nodes: tuple[str, ...]
    why: str

    def as_dict(self) -> dict:
        return {"tensor_parallel": self.tp, "pipeline_parallel": self.pp, "head": self.head,
                "nodes": list(self.nodes), "why": self.why}


@dataclass(frozen=True, kw_only=True)
class Deployment:
    inventory: Inventory
    profile: Profile
    engine: "Engine"
    facts: EngineFacts
    setup: Setup
    topology: Topology
    served_name: str
    port: int

    @property
    def hosts(self) -> tuple[Host, ...]:
        return self.setup.hosts

    @property
    def head(self) -> Host:
        return self.setup.hosts[0]

    @property
    def cluster(self) -> str:
        return self.inventory.cluster.name

    @property
    def api_key(self) -> Secret | None:
        return self.inventory.deploy.api_key

    @property
    def base_url(self) -> str:
        return f"http://{self.head.address}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"{self.base_url}/v1"

    def model_path(self, host: Host) -> tuple[str, str]:
        """(path on the host, path inside containers)."""
        return model_paths(self.inventory, host)

    def secrets_file(self, what: str) -> str:
        return f"{SECRETS_DIR}/{self.cluster}/{what}.env"
