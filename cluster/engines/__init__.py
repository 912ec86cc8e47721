"""Engine plugins: what one serving engine (and its way of spanning hosts) adds to the common plan.

docs/engines.md says what a new engine must provide; vllm_ray.py is the first implementation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ..checks import Finding, Setup
    from ..config import Inventory, Profile
    from ..knowledge import EngineFacts
    from ..steps import Step
    from ..deployment import Deployment


@dataclass(frozen=True, kw_only=True)
class LogSource:
    host: str
    component: str
    argv: tuple[str, ...]


class Engine(Protocol):
    """The engine protocol. Everything engine-specific lives behind it; plan, executor and ops stay generic."""

    name: str                          # the profile's `engine:` value
    knowledge: str                     # key of its facts in cluster/knowledge (<knowledge>/releases.json + curated.yaml)
    components: tuple[str, ...]        # `logs --component` choices
    # Members with a default (EngineBase, below, which every engine derives from): health_path, served_id,
    # versions, image, memory, capability_quote, adapt, model_steps, image_check_steps.

    def facts(self, version: str) -> "EngineFacts": ...

    def validate(self, inventory: "Inventory", profile: "Profile", sets: dict) -> None:
        """Raise ConfigError (file:line, field, fix) for input this engine cannot take (e.g. flags it manages)."""

    def checks(self) -> tuple[Callable[["Setup"], Iterator["Finding"]], ...]:
        """Engine-specific rules, run after the common ones."""

    def pipeline_parallel(self, facts: "EngineFacts") -> bool: ...

    def containers(self, d: "Deployment") -> dict[str, list]:
        """Host name -> the long-running ContainerSpecs it runs (anything else of the cluster's is removed by `up`)."""

    def node_env(self, d: "Deployment", host) -> dict[str, str]:
        """The environment of the engine's processes on one host (NIC, addresses): `check network` uses it."""

    def steps(self, d: "Deployment", *, join_timeout: float, ready_timeout: float) -> list["Step"]:
        """Per-host container and process steps after the image and model phases, readiness last."""

    def measured(self, d: "Deployment", probed: dict) -> list["Finding"]:
        """Findings only the probed host facts can give (host name -> facts.HostFacts)."""

    def status(self, d: "Deployment", run) -> tuple[dict, list[str], list[str]]:
        """(state, summary lines, problems) of the running deployment; `run(host, argv)` runs a read-only probe."""

    def logs(self, d: "Deployment", *, tail: int, follow: bool) -> list[LogSource]: ...


class EngineBase:
    """The defaults of the members an engine may leave out; plan, checks, alternatives and ops ask every engine."""

    knowledge: str
    health_path = "/health"           # the API's liveness path, asked from this machine (Ollama: /api/version)
    memory = None                     # or a method Setup -> Memory: the engine budgets GPU memory its own way
    capability_quote = None           # or a method facts -> str: the engine's own words refusing a GPU

    def served_id(self, d: "Deployment") -> str:
        """The id the API's model list shows for the served model (Ollama adds ":latest")."""
        return d.served_name

    def versions(self) -> list[str]:
        """Every release with data, oldest first."""
        from .. import knowledge
        return knowledge.known_versions(self.knowledge)

    def image(self, version: str) -> str | None:
        """The official image of a release where it is more than <repo>:v<version> (None: that form)."""
        return None

    def adapt(self, inv: "Inventory", model):
        """(inventory, model facts, the model deployed instead or None) as this engine would serve the request
        (for alternatives), or None where it cannot: an Ollama name or GGUF is for Ollama only."""
        from .. import gguf
        return None if gguf.is_ref(inv.deploy.model) else (inv, model, None)

    def model_steps(self, d: "Deployment") -> list["Step"] | None:
        """The engine's own model phase; None: the common delivery (download once, fan out, verify)."""
        return None

    def image_check_steps(self, d: "Deployment") -> list["Step"] | None:
        """The engine's own in-image check; None: the common one (the image's torch can drive these GPUs)."""
        return None


def get(name: str) -> Engine:
    from . import ollama, sglang, vllm_mp, vllm_ray
    known = {e.name: e for e in (vllm_ray.ENGINE, vllm_mp.ENGINE, sglang.ENGINE, ollama.ENGINE)}
    if name not in known:
        raise ConfigError(f"unknown engine {name!r}", field="profile.engine", fix="use one of: " + ", ".join(known))
    return known[name]
