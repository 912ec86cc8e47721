"""Short profiles (just an image), alternatives that pass every check, and `--profile auto`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import alternatives, checks, config, knowledge, models, ops
from cluster import plan as planner
from cluster.errors import ConfigError
from cluster.knowledge import curated

ROOT = Path(__file__).resolve().parents[2]
V100 = str(ROOT / "inventories" / "v100-3node.yaml")


def _profile(tmp_path, text, name="my-vllm.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------- part 3: short profiles
def test_image_only_profile(tmp_path):
    p = config.load_profile(str(_profile(tmp_path, "image: vllm/vllm-openai:v0.8.5.post1\n")))
    assert (p.name, p.engine, p.version, p.image) == ("my-vllm", "vllm", "0.8.5.post1", "vllm/vllm-openai:v0.8.5.post1")
    assert knowledge.engine(p.engine, p.version).entrypoint


def test_explicit_version_wins(tmp_path):
    p = config.load_profile(str(_profile(tmp_path, "image: my.registry/vllm:custom\nversion: 0.9.2\nname: x\n")))
    assert (p.name, p.version) == ("x", "0.9.2")


@pytest.mark.parametrize("text, needle, fix", [
    ("env: {}\nimage: vllm/vllm-openai:v0.8.6\n", "no engine data for vllm 0.8.6", "0.8.5.post1"),
    ("image: vllm/vllm-openai:latest\n", "cannot tell the engine version", "version:"),
    ("image: vllm/vllm-openai:v0.8.5\nversion: 0.8.6\n", "no engine data for vllm 0.8.6", "0.9.0"),
])
def test_bad_image_tag_is_one_located_error(tmp_path, text, needle, fix):
    path = _profile(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        config.load_profile(str(path))
    e = str(exc.value)
    assert needle in e and fix in exc.value.fix and "\n" not in e
    key = "version" if "version:" in text and "0.8.6" in text.split("version:")[-1] else "image"
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith(key + ":"))
    assert e.startswith(f"{path}:{line}: {key}: "), e


def test_image_version_parsing():
    assert config.image_version("vllm/vllm-openai:v0.10.1.1") == "0.10.1.1"
    assert config.image_version("localhost:5000/vllm/vllm-openai:v0.6.3@sha256:abc") == "0.6.3"
    assert config.image_version("localhost:5000/vllm") is None
    assert config.image_version("vllm/vllm-openai:nightly") is None


def test_shipped_v100_profile_is_short_and_runs_on_sm70():
    text = (ROOT / "profiles" / "vllm-v0.19.1.yaml").read_text()
    assert "version:" not in text and "name:" not in text
    p = config.load_profile("vllm-v0.19.1")
    f = knowledge.engine(p.engine, p.version)
    assert p.version == "0.19.1" and f.runs_on((7, 0)) and "Qwen3ForCausalLM" in f.architectures
    newest_sm70 = [v for v in knowledge.known_versions("vllm") if knowledge.engine("vllm", v).runs_on((7, 0))][-1]
    assert p.version == newest_sm70


# ---------------------------------------------------------------- part 4: alternatives and auto
@pytest.fixture(scope="module")
def qwen3_32b_auto():
    inv, prof = ops.load(V100, profile="auto", model="Qwen/Qwen3-32B")
    return inv, prof, ops.make_plan(inv, prof)


def test_auto_acceptance_qwen3_32b_on_three_v100_hosts(qwen3_32b_auto):
    inv, prof, p = qwen3_32b_auto
    f = knowledge.engine(prof.engine, prof.version)
    assert p.verdict in ("ok", "warn"), [x.as_dict() for x in p.findings]
    assert f.runs_on((7, 0)) and "Qwen3ForCausalLM" in f.architectures
    assert len(p.topology.nodes) == 3 and p.topology.tp * p.topology.pp == 6


def test_inventory_without_profile_is_auto(tmp_path, qwen3_32b_auto):
    text = Path(V100).read_text().replace("  profile: vllm-v0.3.0\n", "").replace(
        "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen3-32B")
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    assert config.load_inventory(path).deploy.profile is None
    inv, prof = ops.load(str(path))
    assert prof.version == qwen3_32b_auto[1].version and ops.make_plan(inv, prof).verdict != "fail"


def _inv(model, cc="7.0", mem=16160, hosts=3, count=2):
    inv = config.load_inventory(V100)
    host = inv.hosts[0]
    hs = [dataclasses.replace(host, name=f"h{i}", address=f"10.0.0.{i + 1}", role=None,
                              gpus=dataclasses.replace(host.gpus, compute_capability=cc, memory_mib=mem, count=count))
          for i in range(hosts)]
    deploy = dataclasses.replace(inv.deploy, model=model, engine_args={}, tensor_parallel=None, pipeline_parallel=None)
    return dataclasses.replace(inv, hosts=hs, deploy=deploy)


def test_alternatives_pass_when_planned_and_are_ranked():
    inv = _inv("Qwen/Qwen3-14B")
    model = models.load("Qwen/Qwen3-14B")
    found = alternatives.search(inv, model, limit=6)
    assert len(found) == 6
    keys = [(curated.version_key(a.profile.version), -a.gpus) for a in found]
    assert keys == sorted(keys, reverse=True)
    for a in found:
        assert knowledge.engine("vllm", a.profile.version).runs_on((7, 0)), a.profile.version
        d = a.as_dict()
        assert set(d) == {"profile", "image", "engine", "version", "tensor_parallel", "pipeline_parallel",
                          "engine_args", "verdict", "why"}
        assert d["engine_args"].get("dtype") == "half" or a.profile.engine_args.get("dtype") == "half"
        again = dataclasses.replace(inv, deploy=dataclasses.replace(inv.deploy, engine_args=a.engine_args))
        p = planner.build(again, a.profile, model=model, tp=a.tp, pp=a.pp)   # the real planner agrees
        assert p.verdict == a.verdict, (a.profile.version, [f.as_dict() for f in p.findings])


def test_alternative_shrinks_max_model_len_to_fit():
    inv = _inv("Qwen/Qwen2.5-7B-Instruct", hosts=1, mem=10240)   # 2 x 10 GiB: 32768 tokens do not fit
    model = models.load("Qwen/Qwen2.5-7B-Instruct")
    found = alternatives.search(inv, model, limit=2)
    assert found
    a = found[0]
    assert 1024 <= a.engine_args["max-model-len"] < model.max_positions
    assert "fits the KV cache" in a.why
    again = dataclasses.replace(inv, deploy=dataclasses.replace(inv.deploy, engine_args={}))
    p = planner.build(again, a.profile, model=model, tp=a.tp, pp=a.pp)
    assert "kv-cache-insufficient" in {f.code for f in p.findings}      # without the fix it fails


def test_no_alternative_for_a_model_too_big():
    inv = _inv("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", hosts=1, count=1, mem=8192)
    assert alternatives.search(inv, models.load("deepseek-ai/DeepSeek-R1-Distill-Llama-70B"), limit=3) == []
    with pytest.raises(alternatives.NoAlternative):
        alternatives.auto(inv, models.load("deepseek-ai/DeepSeek-R1-Distill-Llama-70B"))


def test_capability_fix_names_runnable_profiles_only(monkeypatch):
    fix = checks._profiles_for("vllm", (7, 0))
    assert "vllm-v0.19.1" in fix and "vllm-v0.3.0" in fix
    assert "vllm-v0.10.1.1" not in fix and "vllm-v0.33.0" not in fix
    monkeypatch.setattr(config, "available_profiles", lambda: [])
    fix = checks._profiles_for("vllm", (7, 0), "Qwen3ForCausalLM")
    assert "image: vllm/vllm-openai:v0.19.1" in fix and "0.20" not in fix


def test_arch_fix_names_a_profile_that_runs_here():
    inv, prof = ops.load(V100, model="Qwen/Qwen3-32B")
    p = ops.make_plan(inv, prof, tp=2, pp=3)
    fix = next(f.fix for f in p.findings if f.code == "arch-unsupported")
    assert "vllm-v0.19.1" in fix and "vllm-v0.33.0" not in fix and "vllm-v0.10.1.1" not in fix


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cluster", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_json_always_has_alternatives():
    r = _cli("plan", V100, "--json")
    assert r.returncode == 0, r.stderr
    alts = json.loads(r.stdout)["alternatives"]
    assert alts and all(a["image"].startswith("vllm/vllm-openai:v") for a in alts)


def test_cli_fail_lists_alternatives_and_keeps_verdict_last():
    r = _cli("plan", V100, "--model", "Qwen/Qwen3-32B")
    assert r.returncode == 1
    assert "alternatives that pass every check" in r.stdout and "--profile vllm-v0.19.1" in r.stdout
    assert r.stdout.rstrip().endswith("verdict: fail")


def test_passing_plan_does_not_search(monkeypatch, capsys):
    from typer.testing import CliRunner
    from cluster import cli

    def boom(*a, **k):
        raise AssertionError("searched")
    monkeypatch.setattr(alternatives, "search", boom)
    r = CliRunner().invoke(cli.app, ["plan", V100])
    assert r.exit_code == 0, r.output
