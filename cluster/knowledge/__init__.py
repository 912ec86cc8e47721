"""Engine and model facts as data, keyed by engine and version: flag tables, image facts, model catalog."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from ..errors import ConfigError

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True, kw_only=True)
class Flag:
    value: bool                 # takes a value (False: a bare switch)
    choices: tuple | None = None
    bare_ok: bool = False       # nargs="?": may also stand alone


@dataclass(frozen=True, kw_only=True)
class EngineFacts:
    """What gpucluster must know about one pinned engine version and its official image."""

    engine: str
    version: str
    entrypoint: tuple[str, ...]
    pipeline_parallel: bool
    even_layers_required: bool
    executor_args: tuple[str, ...]
    min_compute_capability: str
    torch: str
    cuda: str
    min_driver: str
    v1: bool
    batched_tokens_default: str
    chunked_prefill_over: int | None   # max-model-len above which chunked prefill is on by default
    flags: dict[str, Flag]
    aliases: dict[str, str]
    underscores: bool
    env_vars: frozenset[str]
    architectures: frozenset[str]
    requires: dict[str, str]

    @property
    def honours_host_ip(self) -> bool:
        return "VLLM_HOST_IP" in self.env_vars

    @property
    def reads_api_key_env(self) -> bool:
        return "VLLM_API_KEY" in self.env_vars

    def flag(self, name: str) -> Flag | None:
        """Look up `name` (no dashes) the way this version's parser would."""
        dashed = "--" + name
        if dashed in self.flags:
            return self.flags[dashed]
        if dashed in self.aliases:
            return self.flags.get(self.aliases[dashed])
        return None


def known_versions(name: str) -> list[str]:
    return sorted(_traits().get(name, {}), key=lambda v: tuple(int(p) for p in v.split(".")))


@lru_cache(maxsize=1)
def _traits() -> dict:
    return yaml.safe_load((HERE / "engines.yaml").read_text())


@lru_cache(maxsize=None)
def engine(name: str, version: str) -> EngineFacts:
    """The facts for one engine version; a version without data is a config error."""
    traits = _traits().get(name, {}).get(version)
    table_path = HERE / name / f"{version}.json"
    if traits is None or not table_path.exists():
        raise ConfigError(f"no engine data for {name} {version}", field="profile.version",
                          fix="use one of: " + ", ".join(known_versions(name)))
    table = json.loads(table_path.read_text())
    flags = {name: Flag(value=bool(f.get("value")), choices=tuple(f["choices"]) if f.get("choices") else None,
                        bare_ok=f.get("nargs") == "?") for name, f in table["flags"].items()}
    return EngineFacts(
        engine=name,
        version=version,
        entrypoint=tuple(traits["entrypoint"]),
        pipeline_parallel=traits["pipeline_parallel"],
        even_layers_required=traits["even_layers_required"],
        executor_args=tuple(traits["executor_args"]),
        min_compute_capability=str(traits["min_compute_capability"]),
        torch=str(traits["torch"]),
        cuda=str(traits["cuda"]),
        min_driver=str(traits["min_driver"]),
        v1=traits["engine"] == "v1",
        batched_tokens_default=str(traits["batched_tokens_default"]),
        chunked_prefill_over=traits.get("chunked_prefill_over"),
        flags=flags,
        aliases=dict(table.get("aliases", {})),
        underscores=bool(table.get("underscores")),
        env_vars=frozenset(table.get("env_vars", [])),
        architectures=frozenset(table.get("architectures", [])),
        requires=dict(table.get("requires", {})),
    )


@lru_cache(maxsize=1)
def catalog() -> dict[str, dict]:
    """Built-in model facts by hub id (models.yaml)."""
    return yaml.load((HERE / "models.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
