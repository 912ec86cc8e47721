"""Curated per-version facts (vllm/curated.yaml): image CUDA/torch/arch and engine rules, by version range."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import yaml

PATH = Path(__file__).resolve().parent / "vllm" / "curated.yaml"
VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:\.(\d+))?(?:\.?post(\d+))?$")


def version_key(version: str) -> tuple[int, ...]:
    """PEP 440 order for the release versions vLLM uses: 0.9.0 < 0.9.0.1 < 0.9.0.post1 < 0.9.1."""
    m = VERSION.match(str(version))
    if not m:
        raise ValueError(f"not a release version: {version!r}")
    major, minor, micro, fourth, post = m.groups()
    return int(major), int(minor), int(micro), int(fourth or 0), int(post) if post else -1


@lru_cache(maxsize=1)
def data() -> dict:
    return yaml.safe_load(PATH.read_text())


def in_range(ranges: list[dict], version: str) -> dict:
    """The entry of `ranges` whose `from` is the last at or below `version` ({} below the first)."""
    key = version_key(version)
    chosen: dict = {}
    for entry in sorted(ranges, key=lambda e: version_key(str(e["from"]))):
        if version_key(str(entry["from"])) <= key:
            chosen = entry
    return dict(chosen)


def image(version: str) -> dict:
    """The official image's facts for `version` ({} below the first range)."""
    return in_range(data()["images"], version)


def rules(version: str) -> dict:
    return in_range(data()["rules"], version)


def min_driver(cuda: str) -> str:
    return str(data()["min_driver"][str(cuda).split(".")[0]])


def arch_min_cc(arch: list[str]) -> str:
    """The lowest compute capability with a kernel image in an arch list (sm_70 -> "7.0")."""
    nums = [int(a.split("_")[1]) for a in arch if a.startswith("sm_")]
    low = min(nums)
    return f"{low // 10}.{low % 10}"


def runs_on(arch: list[str], cc: tuple[int, int]) -> bool:
    """torch's rule: a cubin of the same major with a minor <= the GPU's, or PTX at or below it."""
    for a in arch:
        kind, _, num = a.partition("_")
        n = int(num.rstrip("a"))
        major, minor = n // 10, n % 10
        if kind == "sm" and major == cc[0] and minor <= cc[1]:
            return True
        if kind == "compute" and (major, minor) <= cc:
            return True
    return False
