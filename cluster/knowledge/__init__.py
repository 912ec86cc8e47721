"""Engine and model facts as data, keyed by engine and version: flag tables, image facts, model catalog."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from ..errors import ConfigError
from . import curated, releases

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
    released: str = ""
    torch_arch: tuple[str, ...] = ()           # torch.cuda.get_arch_list() of the image
    kernels_min_cc: str = "7.0"                # lowest cc vLLM's own kernels are built for
    image_confirmed: bool = False              # a run or the image itself showed these facts
    image_note: str = ""                       # what the sources say about a V100 (sm_70)
    pp_architectures: frozenset[str] | None = None   # None: PP is not restricted by architecture

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

    def runs_on(self, cc: tuple[int, int]) -> bool:
        """The image's torch has a kernel image for this compute capability and vLLM's kernels reach it."""
        major, _, minor = self.kernels_min_cc.partition(".")
        if cc < (int(major), int(minor)):
            return False
        return curated.runs_on(list(self.torch_arch), cc) if self.torch_arch else True


def known_versions(name: str) -> list[str]:
    """Every release with data, oldest first."""
    return releases.versions() if name == "vllm" else []


def nearest_versions(known: list[str], version: str, n: int = 4) -> list[str]:
    """The versions of `known` (oldest first) closest to `version` (for an error's fix)."""
    try:
        key = curated.version_key(version)
    except ValueError:
        return known[-n:]
    below = [v for v in known if curated.version_key(v) < key]
    above = [v for v in known if curated.version_key(v) > key]
    return below[-(n // 2):] + above[:n - min(len(below), n // 2)]


def _unknown(name: str, version: str) -> ConfigError:
    known = known_versions(name)
    if not known:
        return ConfigError(f"no engine data for {name}", field="profile.engine", fix="use engine: vllm")
    return ConfigError(f"no engine data for {name} {version} (known: {len(known)} releases {known[0]} .. "
                       f"{known[-1]})", field="profile.version",
                       fix="use one of the nearest: " + ", ".join(nearest_versions(known, version)))


@lru_cache(maxsize=None)
def engine(name: str, version: str) -> EngineFacts:
    """The facts for one engine version: generated (releases.json) + curated image facts and rules."""
    if name != "vllm":
        raise _unknown(name, version)
    try:
        table = releases.table(version)
    except KeyError:
        raise _unknown(name, version) from None
    image, rule = curated.image(version), curated.rules(version)
    if not image:
        raise _unknown(name, version)
    flags = {k: Flag(value=bool(f.get("value")), choices=tuple(f["choices"]) if f.get("choices") else None,
                     bare_ok=f.get("nargs") == "?") for k, f in table["flags"].items()}
    env_vars = frozenset(table.get("env_vars", []))
    pp = table["pipeline_parallel"]
    generation = table["engine_generation"]
    arch = [str(a) for a in image["torch_arch"]]
    floor = max(curated.arch_min_cc(arch), str(image["kernels_min_cc"]), key=lambda c: tuple(map(int, c.split("."))))
    v0 = bool(generation.get("v0"))
    return EngineFacts(
        engine=name,
        version=version,
        entrypoint=tuple(table["entrypoint"]),
        pipeline_parallel=bool(pp.get("supported")),
        # Uneven stages came with VLLM_PP_LAYER_PARTITION (0.5.4); earlier splits had to divide evenly.
        even_layers_required="VLLM_PP_LAYER_PARTITION" not in env_vars,
        executor_args=tuple(table["executor"]["ray_args"]),
        min_compute_capability=floor,
        torch=table["requires"].get("torch", "?").lstrip("=<>~! "),
        cuda=str(image["cuda"]),
        min_driver=curated.min_driver(str(image["cuda"])),
        v1=generation.get("default") == "v1",
        # V0 (and V1 releases that fall back to V0 below cc 8.0): max(max_model_len, 2048);
        # V1 only: the OpenAI server's default, 2048 (8192 on GPUs with >= 70 GiB).
        batched_tokens_default="max-model-len-or-2048" if v0 else "v1-server",
        chunked_prefill_over=rule.get("chunked_prefill_over") if v0 else 0,
        flags=flags,
        aliases=dict(table.get("aliases", {})),
        underscores=bool(table.get("underscores")),
        env_vars=env_vars,
        architectures=frozenset(table.get("architectures", [])),
        requires=dict(table.get("requires", {})),
        released=str(table.get("released") or ""),
        torch_arch=tuple(arch),
        kernels_min_cc=str(image["kernels_min_cc"]),
        image_confirmed=bool(image.get("confirmed")),
        image_note=str(image.get("runs_on_sm70", "")),
        pp_architectures=frozenset(pp["architectures"]) if pp.get("model_restricted") and pp.get("architectures")
        else None,
    )


@lru_cache(maxsize=1)
def catalog() -> dict[str, dict]:
    """Built-in model facts by hub id (models.yaml)."""
    return yaml.load((HERE / "models.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
