"""SGLang's facts per release: generated (releases.json, from the wheels) + curated (curated.yaml, the images).

    versions()        every release with data, oldest first
    facts(version)    an EngineFacts (cluster/knowledge): flags, entrypoint, image CUDA / torch, compute
                      capability floor, architectures, ...; KeyError for a release without data
    table(version)    the generated record (traits: dist_init_flag, min_cc, mem_fraction, requires, ...)
    image(version)    the curated image facts of that release ({} below the first range)
    image_ref(v)      lmsysorg/sglang:v<version><tag suffix>
    rules(version)    curated rules of that release: max_port (its --port + 10000 must be a port)
    reserved_mem()    the curated parameters of SGLang's reserved-memory estimate
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import yaml

from ..curated import in_range
from . import releases

HERE = Path(__file__).resolve().parent
REPO = "lmsysorg/sglang"


@lru_cache(maxsize=1)
def curated() -> dict:
    return yaml.safe_load((HERE / "curated.yaml").read_text())


def versions() -> list[str]:
    return releases.versions()


def table(version: str) -> dict:
    return releases.table(version)


def image(version: str) -> dict:
    return in_range(curated()["images"], version)


def image_ref(version: str) -> str:
    return f"{REPO}:v{version}{image(version).get('tag', '')}"


def rules(version: str) -> dict:
    """The curated engine rules of that release (api_key_env, max_port)."""
    return in_range(curated()["rules"], version)


def reserved_mem() -> dict:
    return dict(curated()["reserved_mem"])


def _pin(spec: str | None) -> str | None:
    m = re.search(r"(\d+(?:\.\d+)+(?:\.post\d+)?)", spec or "")
    return m.group(1) if m else None


def torch_of(t: dict) -> str:
    """The torch the release runs with: its own pin, else the pin of the vLLM it requires (before 0.4.3)."""
    own = _pin(t["requires"].get("torch"))
    if own:
        return own
    vllm = _pin(t["requires"].get("vllm"))
    if vllm:
        from .. import releases as vllm_releases
        try:
            return _pin(vllm_releases.table(vllm)["requires"].get("torch")) or "?"
        except KeyError:
            return "?"
    return "?"


@lru_cache(maxsize=None)
def facts(version: str):
    """The EngineFacts of one release (KeyError when there is no data for it)."""
    from .. import EngineFacts, Flag, curated as vllm_curated
    t = releases.table(version)
    img = image(version)
    if not img:
        raise KeyError(version)
    flags = {k: Flag(value=bool(f.get("value")), choices=tuple(f["choices"]) if f.get("choices") else None,
                     bare_ok=f.get("nargs") == "?") for k, f in t["flags"].items()}
    own = (t.get("min_cc") or {}).get("cc")
    floor = own or str(img["kernels_min_cc"])
    arch = [str(a) for a in img.get("torch_arch", [])]
    if arch:
        floor = max(floor, vllm_curated.arch_min_cc(arch), key=lambda c: tuple(map(int, c.split("."))))
    cuda = str(img["cuda"])
    return EngineFacts(
        engine="sglang",
        version=version,
        entrypoint=tuple(t["entrypoint"] or ("python3", "-m", "sglang.launch_server")),
        pipeline_parallel=False,          # one process group over all GPUs of all hosts: --tp spans the hosts
        even_layers_required=True,
        executor_args=(),
        min_compute_capability=floor,
        torch=torch_of(t),
        cuda=cuda,
        min_driver=vllm_curated.min_driver(cuda),
        v1=False,
        batched_tokens_default="2048",
        chunked_prefill_over=None,
        flags=flags,
        aliases=dict(t["aliases"]),
        underscores=False,
        env_vars=frozenset(),
        architectures=frozenset(t["architectures"]),
        requires=dict(t["requires"]),
        released=str(t.get("released") or ""),
        torch_arch=tuple(arch),
        kernels_min_cc=floor,
        image_confirmed=bool(img.get("confirmed")),
        image_note=str(img.get("runs_on_sm70", "")),
    )
