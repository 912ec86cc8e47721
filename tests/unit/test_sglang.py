"""SGLang (issue 12, part 1, plan level): the flag generator on synthetic wheels (tests/fixtures/sglang), the
committed release table, and the engine's plan: compute capability, topology, launch argv per host, memory."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cluster import alternatives, config, engines, models, ops
from cluster import plan as planner
from cluster.errors import ConfigError
from cluster.executor import Result
from cluster.knowledge import sglang as sg
from cluster.knowledge.curated import version_key
from cluster.knowledge.sglang import releases as sg_releases

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "sglang"
V100 = str(ROOT / "inventories" / "v100-3node.yaml")
A10 = str(ROOT / "inventories" / "sglang-3node.yaml")
PROFILE = "sglang-v0.5.15"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_sglang_tables", ROOT / "scripts" / "gen_sglang_tables.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_sglang_tables"] = mod
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cluster", *args], capture_output=True, text=True, cwd=ROOT)


# ---------------------------------------------------------------- the generator, on synthetic wheels
def make_wheel(tmp_path: Path, tree: str, edit: dict[str, tuple[str, str]] | None = None) -> Path:
    """Zip a fixture source tree into a wheel (`edit`: file -> (old, new) to vary it)."""
    root = FIXTURES / tree
    info = next(p for p in root.iterdir() if p.name.endswith(".dist-info"))
    version = info.name[len("sglang-"):-len(".dist-info")]
    path = tmp_path / f"sglang-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p in sorted(root.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                name = p.relative_to(root).as_posix()
                text = p.read_text()
                if edit and name in edit:
                    text = text.replace(*edit[name])
                z.writestr(name, text)
    return path


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    return gen.extract(make_wheel(tmp_path_factory.mktemp("w04"), "wheel-0.4"))


@pytest.fixture(scope="module")
def new(tmp_path_factory):
    return gen.extract(make_wheel(tmp_path_factory.mktemp("w05"), "wheel-0.5"))


def test_generator_add_argument_style(old):
    f = old["flags"]
    assert old["version"] == "0.4.6.post4"
    assert set(f) == {"--model-path", "--port", "--tensor-parallel-size", "--tp-size", "--mem-fraction-static",
                      "--quantization", "--dist-init-addr", "--nccl-init-addr", "--nnodes", "--node-rank",
                      "--disable-cuda-graph", "--lora-paths", "--disable-flashinfer"}
    assert old["aliases"] == {"--nccl-init-addr": "--dist-init-addr", "--tp-size": "--tensor-parallel-size"}
    assert f["--quantization"] == {"value": True, "choices": ["awq", "fp8", "gptq"], "type": "str", "nargs": None}
    assert f["--disable-cuda-graph"]["value"] is False
    assert f["--disable-flashinfer"]["value"] is False          # DeprecatedAction: nargs=0 in its __init__
    assert f["--lora-paths"] == {"value": True, "choices": None, "type": "str", "nargs": "*"}
    assert old["entrypoint"] == ["python3", "-m", "sglang.launch_server"]
    assert old["dist_init_flag"] == "--dist-init-addr"
    assert old["min_cc"] == {"cc": "7.5", "quote": "SGLang only supports sm75 and above.",
                             "file": "sglang/srt/model_executor/model_runner.py"}
    mf = old["mem_fraction"]
    assert (mf["rule"], mf["by"], mf["table"], mf["otherwise"]) == \
        ("tp-table", "tp_size", [[16, 0.79], [8, 0.81], [2, 0.87]], 0.88)
    assert old["architectures"] == ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM"]
    assert old["requires"] == {"sgl-kernel": "==0.1.4", "torch": "==2.6.0", "transformers": "==4.51.1"}


def test_generator_dataclass_style(new):
    """0.5.14+: fields `A[T, "help" | Arg(...)]` on the namespace classes collect_input_fields assembles."""
    f = new["flags"]
    canon = {k for k in f if k not in new["aliases"]}
    assert canon == {"--tp-size", "--nnodes", "--node-rank", "--dist-init-addr", "--nccl-port", "--model-path",
                     "--host", "--port", "--log-level", "--enable-metrics", "--quantization", "--context-length",
                     "--mem-fraction-static", "--cuda-graph-bs", "--lora-paths", "--watchdog-timeout", "--config",
                     "--disable-cuda-graph", "--chunked-prefill"}
    assert "--tokenizer-worker-num" not in f and "--internal-counter" not in f     # no_cli; not annotated
    assert new["aliases"] == {"--model": "--model-path", "--nccl-init-addr": "--dist-init-addr",
                              "--tensor-parallel-size": "--tp-size"}
    assert f["--log-level"]["choices"] == ["debug", "info", "warning"]              # Literal
    assert f["--enable-metrics"]["value"] is False                                  # bool: store_true
    assert (f["--cuda-graph-bs"]["type"], f["--cuda-graph-bs"]["nargs"]) == ("int", "+")   # list[int]
    assert f["--quantization"]["choices"] == ["awq", "fp8", "gptq", "modelopt"]     # Arg(choices=...)
    assert f["--context-length"]["type"] == "human_readable_int"                    # Arg(type_parser=...)
    assert f["--lora-paths"]["nargs"] == "*"                                        # action_kwargs
    assert f["--disable-cuda-graph"]["value"] is False                              # Deprecated...(nargs=0)
    assert f["--chunked-prefill"]["value"] is True                                  # an alias store action
    assert new["mem_fraction"]["rule"] == "reserved-mem"
    assert new["min_cc"]["file"].endswith("load_model_utils.py")
    assert new["architectures"] == ["Qwen3ForCausalLM"]
    assert new["requires"]["torch"] == "==2.14.1" and new["requires"]["flashinfer-python"] == "==0.7.2"


def test_generator_refuses_a_parser_it_did_not_follow(tmp_path):
    whl = make_wheel(tmp_path, "wheel-0.4", {"sglang/srt/server_args.py": ('"--port"', '"--listen-port"')})
    with pytest.raises(SystemExit, match="missing --port"):
        gen.extract(whl)


def test_compact_round_trip(old, new):
    records = [{"released": "2025-05-13", **old}, {"released": None, **new}]
    data = json.loads(gen.base.dump_compact(gen.compact(records, [])))
    back = [sg_releases.decode(data, r) for r in data["releases"]]
    for rec, got in zip(records, back):
        assert got == rec


def test_parse_index_takes_pure_and_cp311_wheels():
    page = "".join(f'<a href="https://x/{fn}#sha256=0"{extra}>{fn}</a>\n' for fn, extra in [
        ("sglang-0.1.26-py3-none-any.whl", ""),
        ("sglang-0.2.0-py3-none-any.whl", ' data-upload-time="2024-07-25T01:00:00Z"'),
        ("sglang-0.2.0.tar.gz", ""),
        ("sglang-0.3.9.tar.gz", ""),
        ("sglang-0.4.0-py3-none-any.whl", ' data-yanked="broken"'),
        ("sglang-0.5.0rc2-py3-none-any.whl", ""),
        ("sglang-0.5.11-cp311-cp311-manylinux_2_34_aarch64.whl", ""),
        ("sglang-0.5.11-cp311-cp311-manylinux_2_34_x86_64.whl", ""),
    ])
    releases, skipped = gen.parse_index(page)
    assert [(r["version"], r["released"]) for r in releases] == [("0.2.0", "2024-07-25"), ("0.5.11", None)]
    assert releases[1]["wheel"].endswith("manylinux_2_34_x86_64.whl")
    assert {s["version"]: s["reason"].split(":")[0] for s in skipped} == {
        "0.3.9": "no wheel for CPython 3.11 on linux x86_64 (sdist only?)", "0.4.0": "yanked"}


# ---------------------------------------------------------------- the committed table
def test_committed_covers_every_release():
    vs = sg.versions()
    assert vs[0] == "0.2.0" and len(vs) >= 129 and vs == sorted(vs, key=version_key)
    assert {"0.3.6.post3", "0.4.6.post4", "0.5.15"} <= set(vs)
    for v in vs:
        f = sg.facts(v)
        assert f.min_compute_capability == "7.5" and not f.runs_on((7, 0)) and f.runs_on((8, 6)), v
        assert f.entrypoint == ("python3", "-m", "sglang.launch_server"), v
        assert f.flag("model-path") and f.flag("tp-size") and f.flag("nnodes") and f.flag("node-rank"), v
        assert sg.table(v)["dist_init_flag"] in ("--dist-init-addr", "--nccl-init-addr"), v


def test_committed_traits_follow_the_releases():
    t = sg.table
    assert t("0.2.0")["dist_init_flag"] == "--nccl-init-addr" and t("0.4.0")["dist_init_flag"] == "--dist-init-addr"
    assert t("0.2.14")["min_cc"] is None
    assert t("0.2.14.post1")["min_cc"]["quote"] == "SGLang only supports sm75 and above."
    assert sg.facts("0.4.8").flag("nccl-port") is None and sg.facts("0.4.9").flag("nccl-port")
    assert t("0.4.7")["mem_fraction"]["rule"] == "tp-table"
    assert t("0.4.7.post1")["mem_fraction"]["rule"] == "reserved-mem"
    assert t("0.2.0")["mem_fraction"]["table"][0] == [16, 0.8]
    assert sg.facts("0.2.0").torch == "2.3.1"          # the pinned vLLM's torch (sglang pinned vllm, not torch)
    assert sg.image_ref("0.3.6.post3") == "lmsysorg/sglang:v0.3.6.post3-cu124"      # the tag the field notes pulled
    assert sg.image_ref("0.5.15") == "lmsysorg/sglang:v0.5.15"


# ---------------------------------------------------------------- plan: V100 is refused, with an alternative
def test_v100_fails_compute_capability_and_names_an_alternative():
    inv, prof = ops.load(V100, profile=PROFILE)
    p = ops.make_plan(inv, prof, sets={"max-model-len": False})      # the inventory's vLLM flag, left out
    assert p.verdict == "fail"
    f = next(x for x in p.findings if x.code == "compute-capability")
    assert "SGLang only supports sm75 and above." in f.message and "gpu208" in f.message
    named = re.findall(r"vllm-v[\d.]+", f.fix)
    assert "vllm-v0.19.1" in named
    for name in named:                                   # every profile named runs on these GPUs
        p2 = config.load_profile(name)
        assert engines.get(p2.engine).facts(p2.version).runs_on((7, 0)), name


def test_cli_v100_fails_with_vllm_alternatives_only():
    r = _cli("plan", V100, "--profile", PROFILE)
    assert r.returncode == 1
    assert "compute-capability" in r.stdout and "--profile vllm-v0.19.1" in r.stdout
    assert "SGLang calls it context-length" in r.stdout               # the inventory's max-model-len
    alts = r.stdout.split("alternatives that pass every check", 1)[1]
    assert "lmsysorg/sglang" not in alts and "sglang-v" not in alts
    assert r.stdout.rstrip().endswith("verdict: fail")


def test_sglang_never_proposed_below_cc_75():
    inv, _ = ops.load(V100, profile=PROFILE)
    model = models.load("Qwen/Qwen2.5-7B-Instruct")
    found = alternatives.search(inv, model, engine="sglang", limit=3)
    assert found and all(a.profile.engine == "vllm" for a in found)


def test_sglang_alternatives_where_every_gpu_has_cc_75():
    inv = config.load_inventory(A10)
    model = models.load(inv.deploy.model)
    found = alternatives.search(inv, model, engine="sglang", limit=2)
    assert found and found[0].profile.engine == "sglang"
    assert found[0].profile.image.startswith("lmsysorg/sglang:v")


# ---------------------------------------------------------------- plan: the 3-node example
@pytest.fixture(scope="module")
def a10():
    inv, prof = ops.load(A10)
    return ops.make_plan(inv, prof)


def _engine_specs(p):
    d = p.deployment
    return {h.name: d.engine.container(d, h) for h in d.hosts}


def test_example_plans_ok(a10):
    assert a10.verdict in ("ok", "warn"), [f.as_dict() for f in a10.findings]
    assert (a10.topology.tp, a10.topology.nodes) == (4, ("gpu301", "gpu302"))
    specs = _engine_specs(a10)
    head = specs["gpu301"]
    assert (head.network, head.ipc, head.shm_size, head.entrypoint) == ("host", "host", "32g", "python3")
    assert dict(head.env) == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0", "TP_SOCKET_IFNAME": "eth0"}
    for rank, (host, spec) in enumerate(specs.items()):
        argv = list(spec.command)
        assert argv[:2] == ["-m", "sglang.launch_server"]
        assert argv[argv.index("--tp-size") + 1] == "4" and argv[argv.index("--nnodes") + 1] == "2"
        assert argv[argv.index("--node-rank") + 1] == str(rank)
        assert argv[argv.index("--dist-init-addr") + 1] == "172.18.9.31:29600"
        assert argv[argv.index("--nccl-port") + 1] == "29620"
        assert spec.command[spec.command.index("--context-length") + 1] == "32768"
    # readiness only on rank 0, from this machine
    ready = [s for s in a10.steps if s.phase == "ready"]
    assert ready and {s.host for s in ready} == {"control"}
    assert all(op.url.startswith("http://172.18.9.31:30000/") for s in ready for op in s.ops)


def _sections(runbook: str) -> dict[tuple[str, str], str]:
    out, key = {}, None
    for line in runbook.splitlines():
        m = re.match(r"# ==== phase (\S+) on (?:host (\S+) \(|this machine)", line)
        if m:
            key = (m.group(1), m.group(2) or "control")
            out.setdefault(key, "")
        elif key:
            out[key] += line + "\n"
    return out


def test_example_runbook_launches_every_rank():
    r = _cli("plan", A10, "--format", "sh")
    assert r.returncode == 0, r.stderr
    sections = _sections(r.stdout)
    for rank, host in enumerate(("gpu301", "gpu302")):
        body = sections[("engine", host)]
        run = next(shlex.split(line[line.index("docker run"):]) for line in body.splitlines()
                   if line.lstrip().startswith("*) docker run"))      # the create branch of the step's check
        assert run[run.index("--node-rank") + 1] == str(rank) and run[run.index("--nnodes") + 1] == "2"
        assert run[run.index("--dist-init-addr") + 1] == "172.18.9.31:29600"
        assert "sglang.launch_server" in run
    assert ("engine", "gpu303") not in sections


def test_three_hosts_three_ranks(tmp_path):
    """A model whose heads, KV heads and vocabulary split six ways: TP 6 over all three hosts."""
    model = tmp_path / "m48"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 32,
        "num_attention_heads": 48, "num_key_value_heads": 48, "hidden_size": 6144, "intermediate_size": 16384,
        "vocab_size": 50304, "max_position_embeddings": 4096, "torch_dtype": "float16"}))
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 14_000_000_000}}))
    inv = config.load_inventory(A10)
    inv = dataclasses.replace(inv, deploy=dataclasses.replace(inv.deploy, model=str(model), engine_args={},
                                                              tensor_parallel=6))
    p = planner.build(inv, config.load_profile(PROFILE), model=models.load(str(model)))
    assert p.verdict in ("ok", "warn"), [f.as_dict() for f in p.findings]
    specs = _engine_specs(p)
    assert list(specs) == ["gpu301", "gpu302", "gpu303"]
    for rank, spec in enumerate(specs.values()):
        argv = list(spec.command)
        assert (argv[argv.index("--nnodes") + 1], argv[argv.index("--node-rank") + 1]) == ("3", str(rank))
        assert argv[argv.index("--tp-size") + 1] == "6"
    assert [s.role for s in specs.values()] == ["sglang-head", "sglang-node-1", "sglang-node-2"]
    engine_steps = [s for s in p.steps if s.phase == "engine"]
    assert all(len(s.after) == 2 for s in engine_steps)        # one process group: a restart restarts them all


def test_tp_must_split_evenly_over_hosts():
    inv, prof = ops.load(A10)
    p = ops.make_plan(inv, prof, tp=3)
    codes = {f.code for f in p.findings}
    assert {"tp-not-per-node", "heads-not-divisible"} <= codes


def test_a_release_without_data_is_refused_where_the_profile_names_it(tmp_path):
    prof = tmp_path / "sg.yaml"
    prof.write_text("engine: sglang\nimage: lmsysorg/sglang:v0.5.99\n")
    with pytest.raises(ConfigError) as e:
        config.load_profile(str(prof))
    assert str(e.value) == (f"{prof}:2: image: no engine data for sglang 0.5.99 ({len(sg.versions())} releases known: "
                            f"0.2.0 .. {sg.versions()[-1]}) (fix: use one of the nearest: 0.5.22, 0.5.23)")


@pytest.mark.parametrize("port,refused", [(55535, False), (55536, True), (57345, True)])
def test_a_port_whose_grpc_twin_is_no_port_is_refused(port, refused):
    """SGLang 0.5.15 opens --port + 10000 and stops above 65535 (the rig's stand-in hit it with port 57345)."""
    inv, prof = ops.load(A10)
    inv = dataclasses.replace(inv, deploy=dataclasses.replace(inv.deploy, port=port))
    found = [f for f in ops.make_plan(inv, prof).findings if f.code == "port-too-high"]
    assert bool(found) == refused
    if refused:
        assert f"SGLANG_GRPC_PORT ({port + 10000}) must be between 1 and 65535" in found[0].message
        assert found[0].fix.startswith("set deploy.port to 55535 or lower")


# ---------------------------------------------------------------- flags, values, secrets
def test_flag_not_in_the_release_is_one_line():
    inv, prof = ops.load(A10)
    p = ops.make_plan(inv, prof, sets={"speculative-num-steps-typo": 3, "mem-fraction": 0.8,
                                        "dtype": "fp4"})
    msgs = {f.message: f.fix for f in p.findings if f.code == "unsupported-flag"}
    assert all("\n" not in m + fix for m, fix in msgs.items())
    assert msgs['SGLang 0.5.15 has no --speculative-num-steps-typo ("unrecognized arguments: '
                '--speculative-num-steps-typo")'].startswith("remove")
    assert msgs['SGLang 0.5.15 has no --mem-fraction ("unrecognized arguments: --mem-fraction")'] == \
        "write it in full: --mem-fraction-static"
    assert any(m.startswith("SGLang 0.5.15: --dtype fp4 is not one of auto, half") for m in msgs)
    r = _cli("plan", A10, "--set", "no-such-flag=1")
    assert r.returncode == 1
    assert [line for line in r.stdout.splitlines() if "no-such-flag" in line and line.startswith("ERROR")] == [
        'ERROR   unsupported-flag: SGLang 0.5.15 has no --no-such-flag ("unrecognized arguments: --no-such-flag")']


@pytest.mark.parametrize("key", ["tp", "node-rank", "dist-init-addr", "nccl-init-addr", "model-path"])
def test_managed_flags_are_refused(key):
    inv, prof = ops.load(A10)
    with pytest.raises(ConfigError, match="gpucluster sets this flag itself"):
        ops.make_plan(inv, prof, sets={key: "1"})


def test_api_key_is_refused_where_it_is_written(tmp_path):
    path = tmp_path / "inv.yaml"
    path.write_text(Path(A10).read_text().replace("  source: {kind: hf-mirror}", "  api_key: {env: KEY}\n"
                                                  "  source: {kind: hf-mirror}"))
    inv, prof = ops.load(str(path))
    with pytest.raises(ConfigError) as e:
        ops.make_plan(inv, prof)
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "api_key" in t)
    assert str(e.value).startswith(f"{path}:{line}: deploy.api_key: SGLang takes its API key only as --api-key")


def test_hostile_values_stay_single_argv_elements():
    inv, prof = ops.load(A10)
    evil = "q; rm -rf / #"
    inv = dataclasses.replace(inv, deploy=dataclasses.replace(inv.deploy, served_model_name=evil))
    p = ops.make_plan(inv, prof, sets={"chat-template": "$(reboot) `x` 'y'"})
    cmd = _engine_specs(p)["gpu301"].command
    assert cmd[cmd.index("--served-model-name") + 1] == evil
    assert cmd[cmd.index("--chat-template") + 1] == "$(reboot) `x` 'y'"
    run = next(op.argv for s in p.steps if s.id == "gpu301/sglang-head" for op in s.ops)
    assert shlex.split(shlex.join(run)) == list(run)


# ---------------------------------------------------------------- memory: SGLang's static pool
def test_default_fraction_follows_the_release_rule(a10):
    s = a10.deployment.setup
    from cluster.engines import sglang as eng
    frac, why = eng.default_fraction(s, 23028)
    assert frac == round((23028 - (512 + 2048 * 1.5 + 80 * 2 + 4 * 128)) / 23028, 3)
    assert "reserved" in why and a10.memory.utilization == frac
    old = dataclasses.replace(s, facts=sg.facts("0.4.6.post4"), tp=2)
    assert eng.default_fraction(old, 23028)[0] == 0.87


def test_too_small_a_static_pool_is_an_error():
    inv, prof = ops.load(A10)
    p = ops.make_plan(inv, prof, tp=4, sets={"mem-fraction-static": 0.6})
    f = next(x for x in p.findings if x.code == "kv-cache-insufficient")
    assert "Not enough memory. Please try to increase --mem-fraction-static." in f.message
    assert "mem-fraction-static 0.6 (set)" in f.message


def test_short_context_is_a_warning():
    inv, prof = ops.load(A10)
    p = ops.make_plan(inv, prof, tp=4, sets={"context-length": 131072, "mem-fraction-static": 0.72})
    f = next(x for x in p.findings if x.code == "kv-cache-short")
    assert f.severity == "warning" and "context length 131072" in f.message


# ---------------------------------------------------------------- profiles, status, logs
def test_short_profile_reads_the_version_past_the_cuda_suffix(tmp_path):
    path = tmp_path / "my-sglang.yaml"
    path.write_text("engine: sglang\nimage: lmsysorg/sglang:v0.4.6.post4-cu124\n")
    p = config.load_profile(str(path))
    assert (p.engine, p.version) == ("sglang", "0.4.6.post4")
    path.write_text("engine: sglang\nimage: lmsysorg/sglang:v0.4.99-cu124\n")
    inv = config.load_inventory(A10)
    with pytest.raises(ConfigError) as e:
        planner.build(inv, config.load_profile(str(path)), model=None)
    assert str(e.value).startswith(f"{path}:2: image: no engine data for sglang 0.4.99")
    assert "0.4.10" in e.value.fix


def test_status_and_logs_per_host(a10):
    d = a10.deployment

    def run(host, argv):
        return Result(rc=0, stdout="running\n" if host == "gpu301" else "exited\n")
    state, summary, problems = d.engine.status(d, run)
    assert state == {"nodes": {"gpu301": "running", "gpu302": "exited"}}
    assert summary == ["sglang: 1 of 2 rank(s) running"]
    assert problems == ["gpu302: SGLang rank 1 (gpucluster-a10-lab-sglang-node-1) is exited"]
    logs = d.engine.logs(d, tail=50, follow=True)
    assert [(s.host, s.component, s.argv[-1]) for s in logs] == [
        ("gpu301", "head", "gpucluster-a10-lab-sglang-head"), ("gpu302", "node", "gpucluster-a10-lab-sglang-node-1")]
    assert all("-f" in s.argv for s in logs)
    assert set(d.engine.containers(d)) == {"gpu301", "gpu302"}


def test_example_runbook_runs_by_hand(tmp_path, a10):
    """`plan --format sh` runs as a script (docker and curl stubbed out, paths under tmp_path) to its end."""
    from cluster import render
    bin_dir, work, root = tmp_path / "bin", tmp_path / "work", tmp_path / "root"
    bin_dir.mkdir()
    work.mkdir()
    for tool in ("docker", "curl"):
        (bin_dir / tool).write_text(f"#!/bin/sh\nprintf '%s\\0' {tool} \"$@\" >> {tmp_path}/calls.log\n"
                                    f'[ {tool} = curl ] && cat {tmp_path}/answer\nexit 0\n')
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "answer").write_text(json.dumps({"data": [{"id": a10.served_name}], "choices": []}))
    steps = [step for part in ops.up_steps(a10) for step in part]
    text = render.runbook(a10, steps).replace("/var/lib/gpucluster", f"{root}/var").replace(
        "/Data/models", f"{root}/models").replace("/tmp/gpucluster-", f"{root}/lock-")
    (tmp_path / "runbook.sh").write_text(text)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "GPUCLUSTER_TRANSFER_TOKEN": "t"}
    r = subprocess.run(["bash", str(tmp_path / "runbook.sh")], cwd=work, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    calls = (tmp_path / "calls.log").read_text().split("\0")
    runs = [i for i, c in enumerate(calls) if c == "run" and calls[i - 1] == "docker" and "sglang.launch_server"
            in calls[i:i + 60]]
    ranks = [calls[calls.index("--node-rank", i) + 1] for i in runs]
    assert ranks == ["0", "1"]
    assert calls[-2:] == ["http://172.18.9.31:30000/v1/completions", ""]
