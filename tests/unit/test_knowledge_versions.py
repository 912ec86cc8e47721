"""knowledge.engine for every generated vLLM release: wired from releases.json + curated image facts."""

from __future__ import annotations

import pytest

from cluster import checks, config, knowledge
from cluster.errors import ConfigError
from cluster.knowledge import curated, releases

ALL = releases.versions()


def test_every_release_has_facts():
    assert len(ALL) >= 83 and ALL[0] == "0.3.0"
    for v in ALL:
        f = knowledge.engine("vllm", v)
        assert f.version == v and f.entrypoint and f.executor_args and f.torch[0].isdigit(), v
        assert f.cuda in {"12.1", "12.4", "12.8", "12.9", "13.0"}, v
        assert checks.capability(f.min_compute_capability) >= (5, 0), v


def test_release_order_is_pep440():
    assert ALL == sorted(ALL, key=curated.version_key)
    assert curated.version_key("0.9.0") < curated.version_key("0.9.0.post1") < curated.version_key("0.9.0.1") \
        < curated.version_key("0.9.1")


def test_user_pinned_images():
    f = knowledge.engine("vllm", "0.8.5.post1")
    assert "Qwen3ForCausalLM" in f.architectures
    assert (f.torch, f.cuda, f.min_compute_capability) == ("2.6.0", "12.4", "7.0")
    assert f.executor_args == ("--distributed-executor-backend", "ray") and not f.even_layers_required
    assert f.v1 and f.batched_tokens_default == "max-model-len-or-2048"   # V0 fallback below cc 8.0 exists
    g = knowledge.engine("vllm", "0.9.2")
    assert (g.torch, g.cuda, g.min_compute_capability) == ("2.7.0", "12.8", "7.5")
    h = knowledge.engine("vllm", "0.11.0")
    assert h.batched_tokens_default == "v1-server" and h.chunked_prefill_over == 0   # V0 removed


def test_traits_follow_the_wheels():
    old = knowledge.engine("vllm", "0.3.0")
    assert not old.pipeline_parallel and old.even_layers_required and old.chunked_prefill_over is None
    assert old.executor_args == ("--worker-use-ray",) and not old.honours_host_ip
    assert knowledge.engine("vllm", "0.5.3").even_layers_required          # before VLLM_PP_LAYER_PARTITION
    assert not knowledge.engine("vllm", "0.5.4").even_layers_required
    assert knowledge.engine("vllm", "0.28.0").entrypoint[:2] == ("python3", "-m")
    assert knowledge.engine("vllm", "0.29.0").entrypoint == ("vllm", "serve")
    assert knowledge.engine("vllm", "0.6.3").pp_architectures and \
        "Qwen2ForCausalLM" in knowledge.engine("vllm", "0.6.3").pp_architectures


@pytest.mark.parametrize("version, near", [("0.8.6", ["0.8.5.post1", "0.9.0"]), ("0.2.7", ["0.3.0"]),
                                           ("9.0.0", ["0.33.0"])])
def test_unknown_version_names_nearest(version, near):
    with pytest.raises(ConfigError) as exc:
        knowledge.engine("vllm", version)
    e = exc.value
    assert e.field == "profile.version" and "\n" not in str(e)
    for v in near:
        assert v in e.fix, e.fix


def test_post_release_version_parses():
    assert __import__("re").match(config.VERSION_PATTERN, "0.8.5.post1")
    assert not __import__("re").match(config.VERSION_PATTERN, "0.8.5-post1")


# ---------------------------------------------------------------- image facts (part 2)
def test_anchor_0_3_0_runs_on_sm70():
    assert knowledge.engine("vllm", "0.3.0").runs_on((7, 0))


@pytest.mark.parametrize("version", ["0.9.0", "0.10.1.1"])
def test_anchor_cu128_torch27_refuses_sm70(version, tmp_path):
    f = knowledge.engine("vllm", version)
    assert not f.runs_on((7, 0)) and f.runs_on((7, 5)) and f.min_compute_capability == "7.5"
    inv = tmp_path / "inv.yaml"
    inv.write_text("cluster: {name: t}\nhosts:\n- {name: a, address: 10.0.0.1, gpus: {count: 2, memory_mib: 16160, "
                   f"compute_capability: '7.0'}}}}\ndeploy: {{model: Qwen/Qwen2.5-7B-Instruct}}\n")
    prof = tmp_path / "p.yaml"
    prof.write_text(f"image: vllm/vllm-openai:v{version}\n")
    from cluster import ops
    i = config.load_inventory(inv)
    p = ops.make_plan(i, config.load_profile(str(prof)), tp=2, pp=1)
    msgs = [f.message for f in p.findings if f.code == "compute-capability"]
    assert msgs and "The minimum cuda capability supported by this library is 7.5" in msgs[0]


def test_newest_sm70_image_is_0_19_1():
    runs = [v for v in ALL if knowledge.engine("vllm", v).runs_on((7, 0))]
    assert runs[-1] == "0.19.1"
    assert "0.8.5.post1" in runs and "0.9.0" not in runs and "0.10.2" in runs
    assert not knowledge.engine("vllm", "0.20.0").runs_on((7, 0))


def test_every_range_has_provenance():
    d = curated.data()
    for entry in d["images"] + d["rules"]:
        assert "from" in entry and entry["from"] in ALL or str(entry["from"]) in ALL
    for entry in d["images"]:
        assert entry["sources"] and isinstance(entry["confirmed"], bool) and entry["torch_arch"]
    assert not knowledge.engine("vllm", "0.19.1").image_confirmed
    assert knowledge.engine("vllm", "0.9.0").image_confirmed


def test_driver_floor_per_cuda_major():
    assert knowledge.engine("vllm", "0.19.1").min_driver == "525.60.13"
    assert knowledge.engine("vllm", "0.20.0").min_driver == "580.65.06"


@pytest.mark.parametrize("arch, cc, ok", [
    (["sm_80", "sm_86"], (8, 9), True),          # same major, lower minor cubin runs
    (["sm_75", "sm_80"], (7, 0), False),
    (["sm_90", "compute_90"], (12, 0), True),    # PTX JIT for newer GPUs
    (["sm_90"], (12, 0), False),
])
def test_runs_on_rule(arch, cc, ok):
    assert curated.runs_on(arch, cc) is ok


def test_rig_flag_tables_agree_with_releases():
    """cluster/knowledge/vllm/<v>.json stay for the rig (tests/rig/rigimage.py); their flags must not drift."""
    import json
    for path in sorted((curated.PATH.parent).glob("[0-9]*.json")):
        old = json.loads(path.read_text())
        new = releases.table(path.stem)
        assert set(old["flags"]) == set(new["flags"]), path.name
        for name, spec in old["flags"].items():
            assert (spec["value"], spec["nargs"]) == (new["flags"][name]["value"], new["flags"][name]["nargs"]), name
        assert old["architectures"] == new["architectures"] and old["env_vars"] == new["env_vars"], path.name
