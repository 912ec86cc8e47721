"""Data-driven plan tests: one YAML file per scenario (inventory + expected verdict and codes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster import ops

CASES = sorted((Path(__file__).parent.parent / "cases").rglob("*.yaml"))


def _plan(case: dict, tmp_path: Path):
    inv_file = tmp_path / "inventory.yaml"
    inv_file.write_text(yaml.safe_dump(case["inventory"]))
    inv, prof = ops.load(str(inv_file))
    return ops.make_plan(inv, prof, sets=case.get("set"))


@pytest.mark.parametrize("path", CASES, ids=[str(p.relative_to(p.parent.parent)) for p in CASES])
def test_case(path: Path, tmp_path: Path):
    case = yaml.safe_load(path.read_text())
    plan = _plan(case, tmp_path)
    expect = case["expect"]
    codes = {f.code for f in plan.findings}
    errors = {f.code for f in plan.findings if f.severity == "error"}
    detail = "\n".join(f"{f.severity} {f.code}: {f.message}" for f in plan.findings)
    if "verdict" in expect:
        assert plan.verdict == expect["verdict"], detail
    if expect.get("deploys") is True:
        assert plan.verdict in ("ok", "warn"), detail
    for code in expect.get("codes", []):
        assert code in codes, f"expected {code}; got:\n{detail}"
    for code in expect.get("absent", []):
        assert code not in codes, detail
    if plan.verdict == "fail" and expect.get("codes"):
        assert errors & set(expect["codes"]), detail
    if "topology" in expect:
        assert [plan.topology.tp, plan.topology.pp] == expect["topology"], plan.topology.why
