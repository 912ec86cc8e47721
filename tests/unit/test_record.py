"""The deployment record `up` leaves on its nodes: what it holds, how status reads it back (untrusted text)."""

from __future__ import annotations

import json
from pathlib import Path

from cluster import record
from cluster.ops import load, make_plan

INV = Path(__file__).resolve().parents[2] / "inventories" / "v100-3node.yaml"


def _plan(**kw):
    inv, prof = load(str(INV), profile=kw.pop("profile", None))
    return inv, make_plan(inv, prof, **kw)


def _written(plan) -> dict[str, str]:
    return {s.host: next(op.text for op in s.ops if hasattr(op, "text")) for s in plan.steps
            if s.phase == "record" and any(hasattr(op, "text") for op in s.ops)}


def test_every_node_records_the_same_inputs_and_other_hosts_drop_theirs():
    inv, p = _plan(tp=2, pp=1, hosts=["gpu209"], sets={"max-model-len": 2048})
    written = _written(p)
    assert set(written) == {"gpu209"}
    rec = record.parse(written["gpu209"])
    assert rec["nodes"] == ["gpu209"] and rec["tensor_parallel"] == 2 and rec["sets"] == {"max-model-len": 2048}
    assert rec["profile"]["image"] == p.deployment.profile.image
    removals = [s for s in p.steps if s.phase == "record" and s.host != "gpu209"]
    assert {s.host for s in removals} == {h.name for h in inv.hosts} - {"gpu209"}
    assert all(s.ops[0].argv[:2] == ("rm", "-f") for s in removals)


def test_the_record_replans_to_the_same_deployment():
    inv, p = _plan(profile="vllm-v0.6.3", tp=2, pp=3)
    rec = record.parse(_written(p)["gpu208"])
    again = make_plan(inv, record.profile(rec, inv), tp=rec["tensor_parallel"], pp=rec["pipeline_parallel"],
                      hosts=rec["nodes"], sets=rec["sets"])
    assert again.topology == p.topology
    assert [s.as_dict() for s in again.steps if s.phase == "api"] == [s.as_dict() for s in p.steps if s.phase == "api"]


def test_hostile_or_partial_records_are_ignored():
    good = json.loads(_written(_plan()[1])["gpu208"])
    assert record.parse(json.dumps(good)) is not None
    for bad in ("", "not json", "[]", json.dumps({**good, "nodes": "h1"}), json.dumps({**good, "tensor_parallel": 0}),
                json.dumps({**good, "tensor_parallel": True}), json.dumps({k: v for k, v in good.items() if k != "digest"})):
        assert record.parse(bad) is None, bad


def test_most_hosts_win_when_records_disagree():
    a = json.loads(_written(_plan(tp=2, pp=3)[1])["gpu208"])
    b = json.loads(_written(_plan(tp=2, pp=1)[1])["gpu208"])
    chosen = record.choose({"h1": json.dumps(a), "h2": json.dumps(a), "h3": json.dumps(b), "h4": "garbage"})
    assert chosen["pipeline_parallel"] == 3
    assert record.choose({"h1": "garbage"}) is None


def test_differences_name_what_changed():
    a = record.content(_plan(tp=2, pp=3)[1].deployment, {})
    b = record.content(_plan(profile="vllm-v0.6.3", tp=2, pp=1)[1].deployment, {})
    diff = record.differences(a, b)
    assert any(x.startswith("PP: running 3") for x in diff) and any(x.startswith("image: running") for x in diff)
    assert record.differences(a, a) == []
