"""The memory estimate against the formula in shared/notes/vllm-facts.md, computed here independently."""

from __future__ import annotations

import dataclasses

import pytest

from cluster import memory, models

MIB, GIB = 1024 ** 2, 1024 ** 3
QWEN7 = models.load("Qwen/Qwen2.5-7B-Instruct")


def est(model=QWEN7, tp=2, pp=1, gpu_mib=16160, rule="max-model-len-or-2048", **args):
    return memory.estimate(model=model, tp=tp, pp=pp, gpu_mib=gpu_mib, args=args, batched_rule=rule)


def test_kv_formula_qwen25_7b_tp2():
    # config.json: 28 layers, 28 heads, 4 KV heads, hidden 3584 -> head_dim 128; fp16 on V100.
    m = est(**{"dtype": "half", "max-model-len": 4096, "enforce-eager": True})
    per_token = 2 * 28 * (4 // 2) * (3584 // 28) * 2                  # K and V, layers, kv heads/GPU, head_dim, bytes
    assert per_token == 28672
    assert m.block_size == 16
    assert m.block_bytes == per_token * 16
    free = int(16160 * MIB * 0.9) - m.weights - m.activations - m.context - m.cuda_graphs
    assert m.kv_cache == free
    assert m.blocks == free // (per_token * 16)
    assert m.token_capacity == m.blocks * 16
    # weights: half of (15231233024 bytes) for TP 2, within 1 %
    assert m.weights == pytest.approx(15231233024 / 2, rel=0.01)
    assert m.budget == int(16160 * MIB * 0.9)
    assert m.dtype == "float16"


def test_kv_heads_fewer_than_tp_are_replicated():
    # TP 8 > 4 KV heads: each GPU keeps max(1, 4 // 8) = 1 KV head
    m = est(tp=8, gpu_mib=81920, **{"max-model-len": 4096})
    assert m.block_bytes == 2 * 28 * 1 * 128 * 2 * 16


def test_pp_stage_holds_its_layers():
    m = est(tp=2, pp=3, **{"max-model-len": 4096})                    # 28 layers: 9/9/10, the last stage counts
    assert m.block_bytes == 2 * 10 * 2 * 128 * 2 * 16


@pytest.mark.parametrize("tps", [(1, 2, 4)])
def test_more_gpus_fewer_weights_per_gpu(tps):
    w = [est(tp=t, gpu_mib=81920, **{"max-model-len": 4096}).weights for t in tps]
    assert w[0] > w[1] > w[2]
    assert w[1] == pytest.approx(w[0] / 2, rel=0.01)
    pw = [est(tp=1, pp=p, gpu_mib=81920, **{"max-model-len": 4096}).weights for p in (1, 2, 4)]
    assert pw[0] > pw[1] > pw[2]


def test_higher_max_model_len_larger_profile_peak_v0():
    peaks = [est(**{"max-model-len": n}).activations for n in (2048, 4096, 16384, 32768)]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)
    assert est(**{"max-model-len": 1024}).batched_tokens == 2048          # max(max_model_len, 2048)
    assert est(**{"max-model-len": 8192}).batched_tokens == 8192
    # V1 rule: a fixed batch, independent of max-model-len
    assert est(rule="8192", **{"max-model-len": 2048}).activations == est(rule="8192", **{"max-model-len": 32768}).activations


def test_no_max_model_len_uses_max_positions():
    assert est().max_model_len == 32768


def test_enforce_eager_removes_cuda_graphs():
    graphs = est(**{"max-model-len": 4096})
    eager = est(**{"max-model-len": 4096, "enforce-eager": True})
    assert graphs.cuda_graphs > 0 and eager.cuda_graphs == 0
    assert eager.kv_cache - graphs.kv_cache == graphs.cuda_graphs
    assert eager.blocks >= graphs.blocks


def test_fp8_kv_cache_halves_block_bytes():
    auto = est(**{"max-model-len": 4096, "dtype": "half"})
    for kv in ("fp8", "fp8_e5m2", "fp8_e4m3"):
        fp8 = est(**{"max-model-len": 4096, "dtype": "half", "kv-cache-dtype": kv})
        assert fp8.block_bytes * 2 == auto.block_bytes
        assert fp8.blocks >= 2 * auto.blocks - 1


def test_block_size_scales_block_bytes():
    assert est(**{"block-size": 32}).block_bytes == 2 * est(**{"block-size": 16}).block_bytes


def test_utilization_raises_budget():
    lo = est(**{"gpu-memory-utilization": 0.8, "max-model-len": 4096})
    hi = est(**{"gpu-memory-utilization": 0.95, "max-model-len": 4096})
    assert lo.kv_cache > 0
    assert hi.budget > lo.budget and hi.kv_cache - lo.kv_cache == hi.budget - lo.budget


def test_multi_gpu_pays_nccl_context():
    assert est(tp=2).context - est(tp=1, gpu_mib=81920).context == memory.NCCL_BUFFERS


def test_no_room_gives_zero_blocks_not_negative():
    m = est(tp=1, **{"max-model-len": 4096})                          # 14.2 GiB of weights on a 16 GB V100
    assert m.blocks == 0 and m.kv_cache == 0 and m.token_capacity == 0


def test_fp32_checkpoint_runs_fp16_under_auto():
    fp32 = dataclasses.replace(QWEN7, dtype="float32", weight_bytes=QWEN7.weight_bytes * 2)
    assert memory.runtime_dtype("auto", "float32") == "float16"
    m = est(model=fp32, gpu_mib=81920, **{"max-model-len": 4096})
    assert m.dtype == "float16"
    assert m.weights == pytest.approx(est(gpu_mib=81920, **{"max-model-len": 4096}).weights, rel=0.01)
