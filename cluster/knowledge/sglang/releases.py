"""Every SGLang release's facts, from the compact cluster/knowledge/sglang/releases.json.

The file is generated from the released wheels by `python3 scripts/gen_sglang_tables.py`. It holds pools of
distinct flag definitions, aliases and architectures, and per release the ids into those pools (as "a-b,c"
ranges) plus the traits: released, wheel, entrypoint, dist_init_flag, min_cc, mem_fraction, requires,
null_reasons (why a trait is null).

    versions()        -> ["0.2.0", ..., newest]  (PEP 440 order)
    table(version)    -> one release, expanded: flags {"--x": {value, choices, type, nargs}}, aliases, ...
    skipped()         -> releases on PyPI without a usable wheel (yanked), with why

Stdlib only (json).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

PATH = Path(__file__).resolve().parent / "releases.json"
FLAG_FIELDS = ("value", "choices", "type", "nargs")


@lru_cache(maxsize=1)
def _data() -> dict:
    data = json.loads(PATH.read_text())
    data["_by_version"] = {r["version"]: r for r in data["releases"]}
    return data


def _ids(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(",") if spec else ():
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def decode(data: dict, rec: dict) -> dict:
    """One release record of the compact form, expanded (fresh objects every call)."""
    pools = data["pools"]
    out = {"engine": "sglang"}
    for k, v in rec.items():
        out[k] = json.loads(json.dumps(v)) if isinstance(v, (dict, list)) else v
    flags = [pools["flags"][i] for i in _ids(rec["flags"])]
    out["flags"] = {f[0]: dict(zip(FLAG_FIELDS, json.loads(json.dumps(f[1:])))) for f in sorted(flags)}
    out["aliases"] = dict(sorted(pools["aliases"][i] for i in _ids(rec["aliases"])))
    out["architectures"] = sorted(pools["architectures"][i] for i in _ids(rec["architectures"]))
    out["generated_by"] = "scripts/gen_sglang_tables.py"
    return out


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
