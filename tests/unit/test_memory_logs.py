"""Real vLLM startup logs (tests/cases/memory/*.yml) against cluster.memory.estimate.

Each file holds one log: its source, the verbatim lines, the inputs and the KV capacity it reported. The
estimate must land within the file's tolerance (10 %) of that figure, or find no blocks where the log had
none. Run with -s to see the table of errors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from cluster import knowledge, memory, models

GIB = 1024 ** 3
CASE_DIR = Path(__file__).resolve().parents[1] / "cases" / "memory"
CASES = sorted(CASE_DIR.glob("*.yml"))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _ids(paths):
    return [p.stem for p in paths]


def _model(case: dict) -> models.ModelFacts:
    m = case["model"]
    if isinstance(m, str):
        facts = models.load(m)
        assert facts is not None, f"{m} is not in the catalog"
        return facts
    return models.from_config(m["id"], m["config"], m["weight_bytes"])


def _estimate(case: dict, **args) -> memory.Memory:
    eng = case["engine"]
    return memory.estimate(model=_model(case), tp=case["tp"], pp=case["pp"], gpu_mib=case["gpu"]["memory_mib"],
                           args={**case["args"], **args}, batched_rule=eng["profile_rule"],
                           generation=eng["generation"], version=str(eng["version"]),
                           chunked_prefill_over=eng["chunked_prefill_over"])


def _reported_tokens(case: dict) -> int:
    r = case["reported"]
    if "kv_tokens" in r:
        return r["kv_tokens"]
    return r["kv_blocks"] and r["kv_blocks"] * r["block_size"]


def _error(case: dict, m: memory.Memory) -> float:
    want = _reported_tokens(case)
    return (m.token_capacity - want) / want


def _with_kv(paths, asserted=True):
    out = []
    for p in paths:
        c = _load(p)
        if c["asserted"] is asserted and _reported_tokens(c) > 0:
            out.append(p)
    return out


MATCHED = _with_kv(CASES)
MISSED = _with_kv(CASES, asserted=False)
EMPTY = [p for p in CASES if _load(p)["asserted"] and _reported_tokens(_load(p)) == 0]


def test_there_are_enough_logs_of_both_generations():
    gens = [_load(p)["engine"]["generation"] for p in MATCHED + EMPTY]
    assert len(gens) >= 6 and gens.count("v0") >= 2 and gens.count("v1") >= 2


@pytest.mark.parametrize("path", CASES, ids=_ids(CASES))
def test_case_file_is_complete(path: Path):
    c = _load(path)
    assert c["id"] == path.stem
    assert c["source"]["url"].strip() and c["source"]["quote"].strip()
    assert c["engine"]["generation"] in ("v0", "v1") and c["engine_why"].strip()
    assert c["gpu"]["memory_mib"] > 0 and c["gpu"]["memory_mib_source"].strip()
    assert c["tolerance"] == 0.10
    assert isinstance(c["assumed"], dict)
    assert "kv_tokens" in c["reported"] or "kv_blocks" in c["reported"]
    if not c["asserted"]:
        assert c["why_not"].strip()
    if not isinstance(c["model"], str):
        assert c["model"]["sources"].strip()


@pytest.mark.parametrize("path", MATCHED, ids=_ids(MATCHED))
def test_estimate_within_tolerance_of_the_log(path: Path):
    c = _load(path)
    m = _estimate(c)
    err = _error(c, m)
    print(f"\n{c['id']}: log {_reported_tokens(c)} tokens, estimate {m.token_capacity} tokens ({err:+.1%}); "
          f"weights {m.weights / GIB:.2f} GiB, profile peak {m.activations / GIB:.2f} GiB "
          f"({m.batched_tokens} tokens, {m.max_num_seqs} seqs), context {m.context / GIB:.2f} GiB, "
          f"KV {m.kv_cache / GIB:.2f} GiB")
    assert abs(err) <= c["tolerance"], f"{c['id']}: {err:+.1%}"


@pytest.mark.parametrize("path", EMPTY, ids=_ids(EMPTY))
def test_no_blocks_where_the_log_had_none(path: Path):
    c = _load(path)
    m = _estimate(c)
    print(f"\n{c['id']}: log 0 blocks ({c['reported']['error']}), estimate {m.blocks} blocks; budget "
          f"{m.budget / GIB:.2f} GiB, weights {m.weights / GIB:.2f} GiB, profile peak {m.activations / GIB:.2f} GiB")
    assert m.blocks == 0 and m.token_capacity == 0
    # The log's own weights (the run offloaded part of them) leave no block either.
    logged = int(c["reported"]["weights_gib"] * GIB)
    assert m.budget - logged - m.activations - m.context - m.cuda_graphs < m.block_bytes


@pytest.mark.parametrize("path", MISSED, ids=_ids(MISSED))
def test_logs_kept_on_record_are_still_missed(path: Path):
    """A log the model does not reproduce stays documented; once it does, mark it asserted."""
    c = _load(path)
    err = _error(c, _estimate(c))
    print(f"\n{c['id']} (not asserted): log {_reported_tokens(c)} tokens, estimate {err:+.1%}")
    assert abs(err) > c["tolerance"]


WEIGHTS = [p for p in CASES if "weights_gib" in _load(p)["reported"] and not _load(p)["args"].get("quantization")]


@pytest.mark.parametrize("path", WEIGHTS, ids=_ids(WEIGHTS))
def test_weights_match_what_the_log_says_it_loaded(path: Path):
    c = _load(path)
    m = _estimate(c)
    assert m.weights == pytest.approx(c["reported"]["weights_gib"] * GIB, rel=0.03)


SWAP = [p for p in CASES if "cpu_blocks" in _load(p)["reported"]]


@pytest.mark.parametrize("path", SWAP, ids=_ids(SWAP))
def test_cpu_blocks_give_the_block_size_and_v0_swap(path: Path):
    # V0 logs "# CPU blocks": the 4 GiB default swap space over the block's bytes
    c = _load(path)
    m = _estimate(c)
    assert m.generation == "v0" and m.cpu_swap == 4 * GIB
    assert m.cpu_swap // m.block_bytes == c["reported"]["cpu_blocks"]


@pytest.mark.parametrize("path", CASES, ids=_ids(CASES))
def test_engine_facts_agree_with_the_knowledge(path: Path):
    eng = _load(path)["engine"]
    if str(eng["version"]) not in knowledge.known_versions("vllm"):
        pytest.skip(f"{eng['version']}: not a release with data here")
    f = knowledge.engine("vllm", str(eng["version"]))
    assert (f.batched_tokens_default, f.chunked_prefill_over) == (eng["profile_rule"], eng["chunked_prefill_over"])
    assert f.v1 == (eng["generation"] == "v1")


def test_a_wrong_input_moves_the_estimate_out_of_tolerance():
    # The comparison can fail: the 0.8.5 log at utilization 0.6 instead of 0.5, or counted as V0
    # (max(max_model_len, 2048) batch, graphs outside the budget), misses the log by more than 10 %.
    c = _load(CASE_DIR / "fieldnote-qwen3-8b-tp2-rtx3080-util050.yml")
    assert abs(_error(c, _estimate(c))) <= 0.10
    assert abs(_error(c, _estimate(c, **{"gpu-memory-utilization": 0.6}))) > 0.10
    slow = _load(CASE_DIR / "vllm10517-llama31-8b-rtx3090-len20000.yml")
    assert abs(_error(slow, _estimate(slow, **{"max-model-len": 29000}))) > 0.10
    without_sampler = dataclasses.replace(_model(c), vocab=1000)
    m = memory.estimate(model=without_sampler, tp=2, pp=1, gpu_mib=20480, args=c["args"],
                        batched_rule=c["engine"]["profile_rule"], generation="v1", version="0.8.5.post1")
    assert m.token_capacity > _reported_tokens(c) * 1.1
