"""The memory estimate against the formula in shared/notes/vllm-facts.md, computed here independently."""

from __future__ import annotations

import dataclasses

import pytest

from cluster import memory, models

MIB, GIB = 1024 ** 2, 1024 ** 3
QWEN7 = models.load("Qwen/Qwen2.5-7B-Instruct")


def est(model=QWEN7, tp=2, pp=1, gpu_mib=16160, rule="max-model-len-or-2048", generation="v0", version="",
        over=None, **args):
    return memory.estimate(model=model, tp=tp, pp=pp, gpu_mib=gpu_mib, args=args, batched_rule=rule,
                           generation=generation, version=version, chunked_prefill_over=over)


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
    # Changed with the log calibration: the peak is the larger of the forward pass and the sampler (they
    # do not overlap), so short batches sit on the sampler's floor instead of growing from zero.
    peaks = [est(**{"max-model-len": n}).activations for n in (2048, 4096, 16384, 32768)]
    assert peaks == sorted(peaks) and peaks[-1] > peaks[0]
    sampler = 8 * 256 * 152064 * 4                                    # 8 fp32 copies of 256 x vocab logits
    assert peaks[0] == sampler
    assert peaks[-1] == 32768 * (3 * 18944 // 2 + 3 * 3584) * 2 > sampler   # MLP: 3 x intermediate/TP + 3 x hidden
    assert est(**{"max-model-len": 1024}).batched_tokens == 2048          # max(max_model_len, 2048)
    assert est(**{"max-model-len": 8192}).batched_tokens == 8192
    # V1 rule: a fixed batch, independent of max-model-len
    assert est(rule="8192", **{"max-model-len": 2048}).activations == est(rule="8192", **{"max-model-len": 32768}).activations


def test_no_max_model_len_uses_max_positions():
    assert est().max_model_len == 32768


def test_cuda_graphs_count_only_where_the_engine_profiles_them():
    # Changed with the log calibration: V0 and V1 before 0.21 capture graphs after the KV cache is
    # allocated, so graphs do not shrink the cache; they need room beside the budget instead.
    for gen, ver in (("v0", "0.6.3"), ("v1", "0.10.1.1"), ("v1", "0.20.1")):
        graphs = est(generation=gen, version=ver, **{"max-model-len": 4096})
        eager = est(generation=gen, version=ver, **{"max-model-len": 4096, "enforce-eager": True})
        assert graphs.cuda_graphs == 0 and graphs.graphs_outside == memory.CUDA_GRAPHS
        assert eager.graphs_outside == 0 and eager.kv_cache == graphs.kv_cache
    # From 0.21 V1 profiles graph memory and takes it out of the KV budget.
    graphs = est(generation="v1", version="0.21.0", gpu_mib=81920, **{"max-model-len": 4096})
    eager = est(generation="v1", version="0.21.0", gpu_mib=81920, **{"max-model-len": 4096, "enforce-eager": True})
    assert graphs.cuda_graphs > 0 and graphs.graphs_outside == 0 and eager.cuda_graphs == 0
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


def test_v1_profiles_the_server_batch_not_max_model_len():
    # V1 always chunks prefills: its batch is the server default (vllm 0.8.5 _set_default_args_v1),
    # 2048 tokens and 256 sequences below 70 GiB, 8192 and 1024 from 70 GiB, whatever max-model-len is
    for n in (4096, 32768, 131072):
        small = est(generation="v1", version="0.8.5.post1", **{"max-model-len": n})
        assert (small.batched_tokens, small.max_num_seqs) == (2048, 256)
        big = est(generation="v1", version="0.8.5.post1", gpu_mib=81920, **{"max-model-len": n})
        assert (big.batched_tokens, big.max_num_seqs) == (8192, 1024)
    given = est(generation="v1", **{"max-model-len": 4096, "max-num-batched-tokens": 4096, "max-num-seqs": 16})
    assert (given.batched_tokens, given.max_num_seqs) == (4096, 16)
    v0 = est(generation="v0", **{"max-model-len": 8192})
    assert (v0.batched_tokens, v0.max_num_seqs) == (8192, 256)


def test_v0_turns_chunked_prefill_on_above_its_threshold():
    assert est(over=32768).batched_tokens == 32768                    # Qwen2.5-7B-Instruct: 32768 positions, not over
    assert est(over=32768, **{"max-model-len": 32769}).batched_tokens == 512
    assert est(over=32768, **{"max-model-len": 32768}).batched_tokens == 32768
    assert est(over=32768, **{"max-model-len": 65536, "enable-chunked-prefill": False}).batched_tokens == 65536
    assert est(over=None, **{"max-model-len": 65536}).batched_tokens == 65536       # 0.3.0: never on its own
    assert est(**{"max-model-len": 4096, "enable-chunked-prefill": True}).batched_tokens == 512


def test_sampler_peak_follows_max_num_seqs():
    few = est(**{"max-model-len": 2048, "max-num-seqs": 16})
    assert few.activations == 2048 * (3 * 18944 // 2 + 3 * 3584) * 2  # the forward pass is now the larger
    assert est(**{"max-model-len": 2048}).activations == 8 * 256 * 152064 * 4


def test_v1_has_no_cpu_swap():
    assert est(generation="v1").cpu_swap == 0
    assert est().cpu_swap == 4 * GIB                                  # V0 --swap-space default 4 GiB
    assert est(**{"swap-space": 1}).cpu_swap == GIB


def _plan(tmp_path, version: str, cc: str, name: str):
    from cluster import ops
    import yaml
    inv = {"cluster": {"name": "gen"},
           "hosts": [{"name": "n0", "address": "192.0.2.10",
                      "gpus": {"count": 2, "name": name, "memory_mib": 81920 if cc != "7.0" else 32510,
                               "compute_capability": cc}}],
           "deploy": {"profile": f"vllm-v{version}", "model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel": 2,
                      "pipeline_parallel": 1, "engine_args": {"max-model-len": 4096, "dtype": "half"}}}
    path = tmp_path / f"{version}-{cc}.yaml"
    path.write_text(yaml.safe_dump(inv))
    return ops.make_plan(*ops.load(str(path)))


@pytest.mark.parametrize("version, cc, name, generation", [
    ("0.3.0", "7.0", "Tesla V100-SXM2-32GB", "v0"),
    ("0.6.3", "8.0", "NVIDIA A100-SXM4-80GB", "v0"),
    ("0.10.1.1", "7.0", "Tesla V100-SXM2-32GB", "v0"),      # V1 is the default but V0 still runs below cc 8.0
    ("0.10.1.1", "8.0", "NVIDIA A100-SXM4-80GB", "v1"),
    ("0.33.0", "8.0", "NVIDIA A100-SXM4-80GB", "v1"),
])
def test_plan_estimates_the_engine_that_will_run(tmp_path, version, cc, name, generation):
    m = _plan(tmp_path, version, cc, name).memory
    assert m.generation == generation
    assert (m.cpu_swap == 0) == (generation == "v1")
