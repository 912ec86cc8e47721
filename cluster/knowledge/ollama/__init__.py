"""Ollama's facts per release, all curated (curated.yaml): Ollama ships no wheel whose flags could be read.

    versions()         every release with data, oldest first
    released(v)        the date of its tag
    image(v)           the image's GPU runners, CUDA, arch list, compute capability and driver floor ({} before 0.5.13)
    rules(v)           the server's defaults that decide memory (context, parallel requests, flash attention)
    image_ref(v)       ollama/ollama:<version> (Docker Hub tags carry no "v")
    facts(v)           an EngineFacts (cluster/knowledge); KeyError for a release without data
    memory()           the parameters of the memory estimate
    env()              managed variables, defaults, strict booleans
    models()           the curated GGUF models (Ollama library names and hub GGUFs)
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

from ..curated import in_range, version_key

HERE = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def curated() -> dict:
    return yaml.safe_load((HERE / "curated.yaml").read_text())


def versions() -> list[str]:
    return sorted(curated()["releases"], key=version_key)


def released(version: str) -> str:
    return str(curated()["releases"].get(version, ""))


def _merged(entries: list[dict], version: str) -> dict:
    """The ranges up to `version`, later ones overriding earlier keys (rules accumulate)."""
    key, out = version_key(version), {}
    for entry in sorted(entries, key=lambda e: version_key(str(e["from"]))):
        if version_key(str(entry["from"])) <= key:
            out.update(entry)
    return out


def image(version: str) -> dict:
    return in_range(curated()["images"], version)


def rules(version: str) -> dict:
    return _merged(curated()["rules"], version)


def image_ref(version: str) -> str:
    return f"{curated()['repo']}:{version}"


def memory() -> dict:
    return dict(curated()["memory"])


def env() -> dict:
    return dict(curated()["env"])


def models() -> list[dict]:
    return [dict(m) for m in curated()["models"]]


@lru_cache(maxsize=None)
def facts(version: str):
    """The EngineFacts of one release (KeyError when there is no data for it)."""
    from .. import EngineFacts
    if version not in curated()["releases"]:
        raise KeyError(version)
    img = image(version)
    arch = tuple(str(a) for a in img["arch"])
    return EngineFacts(
        engine="ollama",
        version=version,
        entrypoint=("/bin/ollama", "serve"),
        pipeline_parallel=False,          # one host; the layers are spread over its GPUs, not pipelined over hosts
        even_layers_required=False,
        executor_args=(),
        min_compute_capability=str(img["min_cc"]),
        torch="none (llama.cpp)",
        cuda=str(img["cuda"]),
        min_driver=str(img["min_driver"]),
        v1=False,
        batched_tokens_default=str(memory()["batch"]),
        chunked_prefill_over=None,
        flags={},
        aliases={},
        underscores=False,
        env_vars=frozenset(("OLLAMA_HOST", "OLLAMA_MODELS", "OLLAMA_SCHED_SPREAD", "OLLAMA_KEEP_ALIVE",
                            "OLLAMA_CONTEXT_LENGTH", "OLLAMA_NUM_PARALLEL", "OLLAMA_FLASH_ATTENTION",
                            "OLLAMA_KV_CACHE_TYPE")),
        architectures=frozenset(),        # llama.cpp's: not listed; a GGUF Ollama cannot load fails at load
        requires={},
        released=released(version),
        torch_arch=arch,                  # the CUDA runners' architectures (runs_on reads them like torch's)
        kernels_min_cc=str(img["min_cc"]),
        image_confirmed=bool(img.get("confirmed")),
        image_note=str(img.get("runs_on_sm70", "")),
    )
