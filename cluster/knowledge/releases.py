"""Every vLLM release's facts, from the compact cluster/knowledge/vllm/releases.json.

The file is generated from the released wheels by `python3 scripts/gen_engine_tables.py --all`.
It holds pools of distinct flag definitions, aliases, env var names and architectures, and per
release the ids into those pools (as "a-b,c" ranges) plus the per-release traits.

    versions()        -> ["0.3.0", ..., newest]  (PEP 440 order; post releases after their base)
    table(version)    -> the dict shape of cluster/knowledge/vllm/<version>.json, plus the traits:
                         released, entrypoint, api_server_deprecated, pipeline_parallel, executor,
                         multi_node, engine_generation, v1_below_cc80, null_reasons
    skipped()         -> releases on PyPI that have no usable wheel (yanked, sdist only), with why

A fact that could not be derived from the wheel is null, and null_reasons says why.
Stdlib only (json).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

PATH = Path(__file__).resolve().parent / "vllm" / "releases.json"
FLAG_FIELDS = ("value", "choices", "type", "nargs")


def load(path: Path) -> dict:
    """A compact releases file, with its records indexed by version."""
    data = json.loads(path.read_text())
    data["_by_version"] = {r["version"]: r for r in data["releases"]}
    return data


@lru_cache(maxsize=1)
def _data() -> dict:
    return load(PATH)


def _ids(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(",") if spec else ():
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def decode_common(data: dict, rec: dict, *, engine: str, generated_by: str) -> dict:
    """The part of a release record every engine's compact form shares (traits, flags, aliases, architectures),
    expanded into fresh objects."""
    pools = data["pools"]
    out = {"engine": engine}
    for k, v in rec.items():
        out[k] = json.loads(json.dumps(v)) if isinstance(v, (dict, list)) else v
    flags = [pools["flags"][i] for i in _ids(rec["flags"])]
    out["flags"] = {f[0]: dict(zip(FLAG_FIELDS, json.loads(json.dumps(f[1:])))) for f in sorted(flags)}
    out["aliases"] = dict(sorted(pools["aliases"][i] for i in _ids(rec["aliases"])))
    out["architectures"] = sorted(pools["architectures"][i] for i in _ids(rec["architectures"]))
    out["generated_by"] = generated_by
    return out


def decode(data: dict, rec: dict) -> dict:
    """One vLLM release record of the compact form, expanded (fresh objects every call)."""
    pools = data["pools"]
    out = decode_common(data, rec, engine="vllm", generated_by="scripts/gen_engine_tables.py")
    out["env_vars"] = sorted(pools["env_vars"][i] for i in _ids(rec["env_vars"]))
    pp = out["pipeline_parallel"]
    if isinstance(pp.get("architectures"), str):
        pp["architectures"] = sorted(pools["architectures"][i] for i in _ids(pp["architectures"]))
    return out


def versions() -> list[str]:
    return [r["version"] for r in _data()["releases"]]


def table(version: str) -> dict:
    """Facts of one release; KeyError (naming the known range) if the release is not covered."""
    data = _data()
    rec = data["_by_version"].get(str(version))
    if rec is None:
        known = versions()
        raise KeyError(f"no data for vLLM {version} (known: {known[0]} .. {known[-1]}, "
                       f"{len(known)} releases)")
    return decode(data, rec)


def skipped() -> list[dict]:
    return [dict(s) for s in _data()["skipped"]]
