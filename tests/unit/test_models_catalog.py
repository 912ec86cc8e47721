"""The built-in model catalog (cluster/knowledge/models.yaml) is well formed and plausible.

No network: everything is checked against the file itself and a small parameter-count
estimator written from the architecture fields.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CATALOG_PATH = Path(__file__).resolve().parents[2] / "cluster" / "knowledge" / "models.yaml"

INT_KEYS = (
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "weight_bytes",
)
STR_KEYS = ("modelscope", "architecture", "model_type", "torch_dtype", "sources")
BOOL_KEYS = ("tie_word_embeddings", "gated")
ALL_KEYS = set(INT_KEYS) | set(STR_KEYS) | set(BOOL_KEYS) | {"head_dim"}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

EXPECTED_MODELS = {
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen2.5-3B-Instruct",
    "Qwen/Qwen2.5-7B-Instruct",
    "Qwen/Qwen2.5-14B-Instruct",
    "Qwen/Qwen2.5-32B-Instruct",
    "Qwen/Qwen2.5-1.5B",
    "Qwen/Qwen2.5-7B",
    "Qwen/Qwen2.5-14B",
    "Qwen/Qwen2.5-32B",
    "Qwen/Qwen3-8B",
    "Qwen/Qwen3-14B",
    "Qwen/Qwen3-32B",
    "meta-llama/Llama-2-7b-chat-hf",
    "mistralai/Mistral-7B-Instruct-v0.2",
    "baichuan-inc/Baichuan2-7B-Chat",
    "tiiuae/falcon-7b",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
}


def _load() -> dict:
    with CATALOG_PATH.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


CATALOG = _load()


def estimate_params(m: dict) -> int:
    """Parameter count of a dense decoder from the catalog's architecture fields.

    Covers the families in the catalog: Llama/Mistral/Qwen2/Qwen3 (gated SwiGLU MLP,
    separate or fused q/k/v - same count), Baichuan (fused W_pack, same count), and Falcon
    (multi-query attention, plain 4h MLP). Norm weights are included; rotary buffers are not.
    """
    h = m["hidden_size"]
    heads = m["num_attention_heads"]
    kv = m["num_key_value_heads"]
    hd = m["head_dim"] or h // heads
    inter = m["intermediate_size"]
    vocab = m["vocab_size"]
    mtype = m["model_type"]

    q = h * heads * hd
    k = v = h * kv * hd
    o = heads * hd * h
    attn = q + k + v + o
    if mtype == "qwen2":  # q/k/v projections carry biases
        attn += heads * hd + 2 * kv * hd
    if mtype == "qwen3":  # per-head RMSNorm on q and k
        attn += 2 * hd

    if mtype in ("falcon", "RefinedWebModel"):
        mlp = 2 * h * inter  # dense_h_to_4h + dense_4h_to_h, no gate
        norms = 2 * h  # one LayerNorm (weight + bias), parallel attention
        final_norm = 2 * h
    else:
        mlp = 3 * h * inter  # gate, up, down
        norms = 2 * h  # two RMSNorm weights
        final_norm = h

    per_layer = attn + mlp + norms
    embed = vocab * h
    lm_head = 0 if m["tie_word_embeddings"] else vocab * h
    return m["num_hidden_layers"] * per_layer + embed + lm_head + final_norm


def test_catalog_is_a_mapping_of_the_expected_models():
    assert isinstance(CATALOG, dict)
    assert set(CATALOG) == EXPECTED_MODELS


@pytest.mark.parametrize("hub_id", sorted(EXPECTED_MODELS))
def test_entry_has_every_key_with_the_right_type(hub_id):
    m = CATALOG[hub_id]
    assert set(m) == ALL_KEYS, f"{hub_id}: keys differ by {set(m) ^ ALL_KEYS}"
    for key in INT_KEYS:
        assert type(m[key]) is int and m[key] > 0, f"{hub_id}.{key} = {m[key]!r}"
    for key in STR_KEYS:
        assert isinstance(m[key], str) and m[key].strip(), f"{hub_id}.{key} = {m[key]!r}"
    for key in BOOL_KEYS:
        assert type(m[key]) is bool, f"{hub_id}.{key} = {m[key]!r}"
    assert m["head_dim"] is None or (type(m["head_dim"]) is int and m["head_dim"] > 0)
    assert m["torch_dtype"] in DTYPE_BYTES
    assert m["architecture"].endswith("ForCausalLM")
    assert "/" in m["modelscope"]


@pytest.mark.parametrize("hub_id", sorted(EXPECTED_MODELS))
def test_heads_divisible_by_kv_heads(hub_id):
    m = CATALOG[hub_id]
    assert m["num_key_value_heads"] <= m["num_attention_heads"]
    assert m["num_attention_heads"] % m["num_key_value_heads"] == 0


@pytest.mark.parametrize("hub_id", sorted(EXPECTED_MODELS))
def test_implicit_head_dim_divides_hidden(hub_id):
    m = CATALOG[hub_id]
    if m["head_dim"] is None:
        assert m["hidden_size"] % m["num_attention_heads"] == 0


@pytest.mark.parametrize("hub_id", sorted(EXPECTED_MODELS))
def test_weight_bytes_close_to_architecture_estimate(hub_id):
    m = CATALOG[hub_id]
    estimate = estimate_params(m) * DTYPE_BYTES[m["torch_dtype"]]
    ratio = m["weight_bytes"] / estimate
    assert 0.8 <= ratio <= 1.2, f"{hub_id}: weight_bytes {m['weight_bytes']} vs estimate {estimate}"


@pytest.mark.parametrize(
    "hub_id, exact_params",
    [
        # Where the index total_size is exactly params x 2, the estimator must agree exactly:
        # this pins the Qwen2 bias, tied-embedding and Qwen3 q/k-norm handling.
        ("Qwen/Qwen2.5-3B-Instruct", 3_085_938_688),
        ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512),
        ("Qwen/Qwen2.5-14B-Instruct", 14_770_033_664),
        ("Qwen/Qwen3-8B", 8_190_735_360),
        ("mistralai/Mistral-7B-Instruct-v0.2", 7_241_732_096),
        ("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", 70_553_706_496),
    ],
)
def test_estimator_matches_published_totals(hub_id, exact_params):
    m = CATALOG[hub_id]
    assert estimate_params(m) == exact_params
    assert m["weight_bytes"] == exact_params * 2


def test_spot_checks_of_well_known_numbers():
    q7 = CATALOG["Qwen/Qwen2.5-7B-Instruct"]
    assert (q7["hidden_size"], q7["intermediate_size"], q7["num_key_value_heads"]) == (3584, 18944, 4)
    assert q7["vocab_size"] == 152064
    assert q7["weight_bytes"] == 15231233024
    assert q7["tie_word_embeddings"] is False

    # Small Qwen2.5 models use the 151936 padded vocab and tie embeddings; 7B+ use 152064.
    for small in ("0.5B", "1.5B", "3B"):
        m = CATALOG[f"Qwen/Qwen2.5-{small}-Instruct"]
        assert m["vocab_size"] == 151936 and m["tie_word_embeddings"] is True
    for big in ("7B", "14B", "32B"):
        assert CATALOG[f"Qwen/Qwen2.5-{big}-Instruct"]["vocab_size"] == 152064
    assert CATALOG["Qwen/Qwen2.5-0.5B-Instruct"]["num_attention_heads"] == 14

    # Qwen3 states head_dim explicitly; for 32B it is not hidden/heads (5120/64 = 80).
    q3 = CATALOG["Qwen/Qwen3-32B"]
    assert q3["head_dim"] == 128 and q3["num_attention_heads"] == 64
    assert q3["hidden_size"] // q3["num_attention_heads"] != q3["head_dim"]
    assert all(CATALOG[f"Qwen/Qwen3-{s}"]["max_position_embeddings"] == 40960 for s in ("8B", "14B", "32B"))

    llama2 = CATALOG["meta-llama/Llama-2-7b-chat-hf"]
    assert (llama2["vocab_size"], llama2["max_position_embeddings"], llama2["torch_dtype"]) == (32000, 4096, "float16")
    assert llama2["num_key_value_heads"] == 32
    assert llama2["gated"] is True

    mistral = CATALOG["mistralai/Mistral-7B-Instruct-v0.2"]
    assert (mistral["num_key_value_heads"], mistral["max_position_embeddings"]) == (8, 32768)

    falcon = CATALOG["tiiuae/falcon-7b"]
    assert (falcon["num_attention_heads"], falcon["num_key_value_heads"]) == (71, 1)
    assert (falcon["hidden_size"], falcon["vocab_size"]) == (4544, 65024)

    baichuan = CATALOG["baichuan-inc/Baichuan2-7B-Chat"]
    assert baichuan["vocab_size"] == 125696
    assert baichuan["num_key_value_heads"] == baichuan["num_attention_heads"] == 32
    assert baichuan["max_position_embeddings"] == 4096

    r1_70b = CATALOG["deepseek-ai/DeepSeek-R1-Distill-Llama-70B"]
    assert (r1_70b["num_hidden_layers"], r1_70b["vocab_size"]) == (80, 128256)
    assert r1_70b["weight_bytes"] == 141107412992


def test_gated_only_where_a_license_must_be_accepted():
    for hub_id, m in CATALOG.items():
        if hub_id.startswith("meta-llama/"):
            assert m["gated"] is True, hub_id
        if hub_id.startswith(("Qwen/", "deepseek-ai/")):
            assert m["gated"] is False, hub_id
