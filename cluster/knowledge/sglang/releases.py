"""Every SGLang release's facts, from the compact cluster/knowledge/sglang/releases.json.

The file is generated from the released wheels by `python3 scripts/gen_sglang_tables.py`. It holds pools of
distinct flag definitions, aliases and architectures, and per release the ids into those pools (as "a-b,c"
ranges) plus the traits: released, wheel, entrypoint, dist_init_flag, min_cc, mem_fraction, requires,
null_reasons (why a trait is null).

    versions()        -> ["0.2.0", ..., newest]  (PEP 440 order)
    table(version)    -> one release, expanded: flags {"--x": {value, choices, type, nargs}}, aliases, ...
    skipped()         -> releases on PyPI without a usable wheel (yanked), with why

Stdlib only (json); the compact form's decoding is shared with vLLM's (cluster/knowledge/releases.py).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ..releases import decode_common, load

PATH = Path(__file__).resolve().parent / "releases.json"


@lru_cache(maxsize=1)
def _data() -> dict:
    return load(PATH)


def decode(data: dict, rec: dict) -> dict:
    """One release record of the compact form, expanded (fresh objects every call)."""
    return decode_common(data, rec, engine="sglang", generated_by="scripts/gen_sglang_tables.py")


def versions() -> list[str]:
    return [r["version"] for r in _data()["releases"]]


def table(version: str) -> dict:
    """Facts of one release; KeyError if the release is not covered."""
    data = _data()
    rec = data["_by_version"].get(str(version))
    if rec is None:
        raise KeyError(str(version))
    return decode(data, rec)


def skipped() -> list[dict]:
    return [dict(s) for s in _data()["skipped"]]
