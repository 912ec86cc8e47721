"""Known failure signatures (cluster/failures.py, cluster/knowledge/failures.yaml) against real log excerpts.

Each tests/cases/logs/*.log is a verbatim excerpt (the field notes, vLLM/Ray issues) with a header naming its
source and the codes it must and must not give; the header ends at a line `---`."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from cluster import failures
from cluster.checks import ERROR, WARNING

LOGS = Path(__file__).resolve().parents[1] / "cases" / "logs"
CASES = sorted(LOGS.glob("*.log"))


def read_case(path: Path) -> tuple[dict[str, str], list[str]]:
    head, sep, body = path.read_text(encoding="utf-8").partition("\n---\n")
    assert sep, f"{path.name}: no `---` line after the header"
    meta = {}
    for line in head.splitlines():
        key, _, value = line.removeprefix("# ").partition(": ")
        meta[key] = value.strip()
    return meta, body.split("\n")


def test_there_are_cases_and_every_case_names_its_source():
    assert len(CASES) >= 30
    for path in CASES:
        meta, body = read_case(path)
        assert meta.get("source") and meta.get("expect"), path.name
        assert any(line.strip() for line in body), path.name


@pytest.mark.parametrize("path", CASES, ids=[p.name for p in CASES])
def test_real_log_excerpt(path: Path):
    meta, body = read_case(path)
    found = failures.explain(body, host="h1", component="api")
    codes = [f.code for f in found]
    detail = f"{path.name}: {codes}"
    for code in meta["expect"].split():
        assert code in codes, detail
    for code in meta.get("absent", "").split():
        assert code not in codes, detail
    if meta.get("only"):
        assert set(codes) == set(meta["expect"].split()), detail
    assert codes[0] == meta["expect"].split()[0], f"the most specific cause comes first: {detail}"
    assert len(codes) == len(set(codes)), f"one finding per code: {detail}"
    for f in found:
        assert f.host == "h1" and f.component == "api" and f.source and f.fix and f.message
        assert f.line().startswith(f"h1 api: {f.code}: ") and "(fix: " in f.line()
        assert len(f.excerpt) <= failures.EXCERPT + 2 and "\x1b" not in f.excerpt
        assert not re.search(r"\{\w+\}", f.message + f.fix), "a cause template was left unfilled"


def test_every_signature_is_complete_and_has_a_provenance():
    sigs = failures.signatures()
    assert len(sigs) >= 40
    for s in sigs:
        assert s.severity in (ERROR, WARNING) and s.cause and s.fix and len(s.source) > 10, s.code
        assert re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", s.code), s.code
        names = set(s.regex.groupindex)
        for name in re.findall(r"\{(\w+)\}", s.cause + s.fix):
            assert name in names, f"{s.code}: {{{name}}} is not a group of its pattern"


def test_every_code_has_a_real_excerpt():
    """Every code of the table is exercised by at least one excerpt, or is in this short list of codes whose
    wording is taken from the engine's source only (no real log excerpt found yet)."""
    source_only = {"unsupported-flag", "max-model-len-too-long", "swap-space-too-large", "trust-remote-code",
                   "arch-inspect-failed", "vocab-not-divisible", "pp-unsupported", "weights-corrupt",
                   "weights-missing", "gpu-runtime-missing", "no-gpu-visible", "invalid-device-ordinal",
                   "cuda-illegal-access", "ray-gpus-missing", "ray-driver-no-gpu", "ray-duplicate-ip",
                   "ray-node-dead", "ray-oom-killed", "ray-worker-died", "shm-too-small", "nccl-timeout",
                   "dist-network", "hf-repo-not-found", "hf-unreachable", "engine-start-failed"}
    covered = set()
    for path in CASES:
        covered |= set(read_case(path)[0]["expect"].split())
    table = {s.code for s in failures.signatures()}
    assert table - covered <= source_only, sorted(table - covered - source_only)
    assert not (covered - table), "a case expects a code the table does not have"


# Wording from the engines' own source (the file named in each signature's `source`), formatted as they print it.
FROM_SOURCE = [
    ("vllm: error: unrecognized arguments: --max-paddings 256", "unsupported-flag"),
    ("api_server.py: error: argument --block-size: invalid choice: 64 (choose from 8, 16, 32)", "unsupported-flag"),
    ("ValueError: User-specified max_model_len (65536) is greater than the derived max_model_len "
     "(max_position_embeddings=32768 or model_max_length=None in model's config.json).", "max-model-len-too-long"),
    ("ValueError: Too large swap space. 32.00 GiB out of the 31.25 GiB total CPU memory is allocated for the "
     "swap space.", "swap-space-too-large"),
    ("ValueError: Model architectures ['Qwen3ForCausalLM'] failed to be inspected. Please check the logs for more "
     "details.", "arch-inspect-failed"),
    ("ValueError: Model architectures ['Qwen3ForCausalLM'] are not supported for now. Supported architectures: "
     "['LlamaForCausalLM']", "arch-unsupported"),
    ("AssertionError: 151936 is not divisible by 6", "vocab-not-divisible"),
    ("NotImplementedError: Pipeline parallelism is not supported yet.", "pp-unsupported"),
    ("RuntimeError: safetensors_rust.SafetensorError: Error while deserializing header: HeaderTooLarge",
     "weights-corrupt"),
    ("RuntimeError: Cannot find any model weights with `/models/Qwen--Qwen2.5-7B`", "weights-missing"),
    ('docker: Error response from daemon: could not select device driver "" with capabilities: [[gpu]].',
     "gpu-runtime-missing"),
    ("RuntimeError: No CUDA GPUs are available", "no-gpu-visible"),
    ("RuntimeError: Failed to infer device type, please set the environment variable `VLLM_LOGGING_LEVEL=DEBUG`",
     "no-gpu-visible"),
    ("RuntimeError: CUDA error: invalid device ordinal", "invalid-device-ordinal"),
    ("RuntimeError: CUDA error: an illegal memory access was encountered", "cuda-illegal-access"),
    ("ValueError: Cannot provide a placement group of placement_group_specs=[{'GPU': 1.0}, {'GPU': 1.0}] within "
     "1800 seconds. See `ray status` and `ray list nodes` to make sure the cluster has enough resources.",
     "ray-gpus-missing"),
    ("ValueError: The number of required GPUs exceeds the total number of available GPUs in the cluster.",
     "ray-gpus-missing"),
    ("ValueError: Ray does not allocate any GPUs on the driver node. Consider adjusting the Ray placement group "
     "or running the driver on a GPU node.", "ray-driver-no-gpu"),
    ("RuntimeError: Every node should have a unique IP address. Got 2 nodes with node ids ['a', 'b'] and 1 unique "
     "IP addresses ['10.0.0.1'].", "ray-duplicate-ip"),
    ("The node with node id: 7f0e has been marked dead because the detector has missed too many heartbeats from "
     "it.", "ray-node-dead"),
    ("(raylet) 1 worker(s) were killed due to the node running low on memory.", "ray-oom-killed"),
    ("ray.exceptions.RayActorError: The actor died unexpectedly before finishing this task.", "ray-worker-died"),
    ("h1:123:456 [0] include/shm.h:28 NCCL WARN Error while creating shared memory segment /dev/shm/nccl-x "
     "(size 9637888)", "shm-too-small"),
    ("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=2, OpType=ALLREDUCE)", "nccl-timeout"),
    ("torch.distributed.DistNetworkError: The client socket has timed out after 600s while trying to connect to "
     "(10.0.0.1, 29501).", "dist-network"),
    ("huggingface_hub.errors.RepositoryNotFoundError: 401 Client Error. (Request ID: Root=1-x)", "hf-repo-not-found"),
    ("OSError: We couldn't connect to 'https://huggingface.co' to load this file, couldn't find it in the cached "
     "files", "hf-unreachable"),
    ("RuntimeError: Engine process failed to start. See stack trace for the root cause.", "engine-start-failed"),
    ("ValueError: VLLM_PORT 'tcp://10.96.0.12:8000' appears to be a URI. This may be caused by a Kubernetes "
     "service discovery issue,check the warning in: https://docs.vllm.ai/en/latest/configuration/env_vars.html",
     "port-env-invalid"),
    ("ValueError: Loading Qwen/x requires you to execute the configuration file in that repo on your local "
     "machine. Make sure you have read the code there to avoid malicious use, then set the option "
     "`trust_remote_code=True` to remove this error.", "trust-remote-code"),
]


@pytest.mark.parametrize("line,code", FROM_SOURCE, ids=[c for _, c in FROM_SOURCE])
def test_wording_from_the_engines_source(line, code):
    assert [f.code for f in failures.explain([line])] == [code]


UNRELATED = [
    "INFO 05-16 23:06:07 [api_server.py:1043] vLLM API server version 0.8.5.post1",
    "INFO 02-07 03:20:01 llm_engine.py:337] # GPU blocks: 1873, # CPU blocks: 1170",
    "INFO:     10.77.0.1:53012 - \"POST /v1/chat/completions HTTP/1.1\" 200 OK",
    "INFO:     Uvicorn running on http://0.0.0.0:8000 (Press CTRL+C to quit)",
    "[rank0]:[W207 01:57:35.912382100 ProcessGroupNCCL.cpp:1250] Warning: WARNING: process group has NOT been "
    "destroyed before we destruct ProcessGroupNCCL.",
    "(RayWorkerVllm pid=1756) INFO 09-11 02:01:17 pynccl_utils.py:45] vLLM is using nccl==2.18.1",
    "Chunked prefill is enabled with max_num_batched_tokens=4096.",
    "2024-08-19 21:32:14,787 INFO usage_lib.py:467 -- Usage stats collection is disabled.",
    "Local node IP: 10.77.0.11",
    "--------------------",
    "Ray runtime started.",
    "INFO 08-28 09:12:58 [parallel_state.py:1402] world_size=1 rank=0 local_rank=0 "
    "distributed_init_method=tcp://172.17.0.2:44261 backend=nccl",
    "error: none; errors=0; NCCL_SOCKET_IFNAME=eth0 GLOO_SOCKET_IFNAME=eth0",
    "WARNING 05-16 23:06:14 [cuda.py:93] To see benefits of async output processing, enable CUDA graph.",
    "",
]


def test_unrelated_lines_give_nothing():
    assert failures.explain(UNRELATED) == []
    assert failures.explain([]) == []


def test_a_line_counts_for_its_most_specific_signature():
    line = ("(autoscaler +5s) Error: No available node types can fulfill resource request {'GPU': 1.0, "
            "'node:10.77.0.11': 0.001}. Add suitable node types to this cluster to resolve this issue.")
    assert [f.code for f in failures.explain([line])] == ["ray-node-ip-mismatch"]


def test_a_generic_symptom_only_when_nothing_specific_matched():
    symptom = "RuntimeError: Engine process failed to start. See stack trace for the root cause."
    assert [f.code for f in failures.explain([symptom])] == ["engine-start-failed"]
    cause = "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization`"
    assert [f.code for f in failures.explain([cause, symptom])] == ["kv-cache-insufficient"]


def test_captured_values_fill_the_cause():
    f, = failures.explain(["ValueError: The model's max seq len (131072) is larger than the maximum number of "
                           "tokens that can be stored in KV cache (93760). Try increasing"])
    assert "93760 tokens" in f.message and "131072" in f.message and "at most 93760" in f.fix


def test_hostile_input():
    ansi = "\x1b[31m\x1b]0;title\x07\x1b[1;33mERROR\x1b[0m \x00\x07\x08\x1b "
    line = ansi + "ValueError: No available memory for the cache blocks.\u202e\x9b" + "A" * (10 * 1024 * 1024)
    t0 = time.time()
    found = failures.explain([line, "\r".join(["x" * 5000] * 1000), b"\xff\xfe garbage \x1b[2J"])
    assert time.time() - t0 < 3
    assert [f.code for f in found] == ["kv-cache-insufficient"]
    ex = found[0].excerpt
    assert len(ex) <= failures.EXCERPT + 2
    assert not re.search("[\x00-\x1f\x7f-\x9f\u202a-\u202e]", ex), repr(ex)
    assert re.match(r"ERROR\s+ValueError: No available memory for the cache blocks\.", ex), repr(ex)
    # the match after 10 MB of junk is not looked for, and costs no time either
    t0 = time.time()
    assert failures.explain(["A" * (10 * 1024 * 1024) + "No available memory for the cache blocks"]) == []
    assert time.time() - t0 < 2


def test_line_count_is_capped_and_the_tail_is_kept():
    def endless():
        for i in range(10 ** 9):
            yield f"INFO {i} loading"
    t0 = time.time()
    assert failures.explain(endless()) == []               # stops after MAX_READ items
    assert time.time() - t0 < 10
    lines = ["Bfloat16 is only supported on GPUs with compute capability of at least 8.0"] + \
            ["INFO filler"] * (failures.MAX_LINES + 10) + ["CUDA out of memory. Tried to allocate 1.25 GiB."]
    assert [f.code for f in failures.explain(lines)] == ["cuda-oom"]


def test_patterns_do_not_backtrack_catastrophically():
    """Every pattern against adversarial lines made of its own literal pieces, repeated: each search stays fast."""
    for s in failures.signatures():
        pieces = re.findall(r"[A-Za-z0-9 _.:'`(\[-]{3,}", s.regex.pattern) or ["x"]
        for piece in pieces[:4]:
            text = failures.clean((piece + " ") * (failures.MAX_LINE // (len(piece) + 1) + 1))
            t0 = time.perf_counter()
            s.regex.search(text)
            assert time.perf_counter() - t0 < 0.05, f"{s.code}: {s.regex.pattern}"


def test_secrets_never_reach_the_excerpt():
    line = ("ValueError: No available memory for the cache blocks. args: Namespace(api_key='sk-rig-secret-4242', "
            "hf_token=hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345, Authorization: Bearer eyJhbGciOi.eyJzdWIiOiIx.sig123, "
            "url=https://user:pa55word@mirror.example/x, token: 9f8e7d6c5b4a39281716151413121110aabbccdd)")
    f, = failures.explain([line])
    for secret in ("sk-rig-secret-4242", "hf_AbCdEf", "eyJhbGciOi", "pa55word", "9f8e7d6c5b4a3928"):
        assert secret not in f.excerpt and secret not in f.message
    long_line = "x" * 30 + "ValueError: No available memory for the cache blocks. api_key=" + "s3cr3tvalue" * 3
    f, = failures.explain([long_line])
    assert "s3cr3tvalue" not in f.excerpt


def test_captured_values_are_redacted_and_short():
    f, = failures.explain(["ValueError: Unknown quantization method: hf_AbCdEfGhIjKlMnOpQr0123. Must be one of "
                           "['awq']"])
    assert "hf_AbCdEfGh" not in f.message and "***" in f.message


def test_merge_one_line_per_cause_over_hosts():
    a = failures.explain(["RuntimeError: NCCL error: unhandled system error"], host="h1", component="api")
    b = failures.explain(["RuntimeError: NCCL error: unhandled system error",
                          "Custom allreduce is disabled because your platform lacks GPU P2P capability"],
                         host="h2", component="ray-worker")
    c = failures.explain(["RuntimeError: Engine process failed to start."], host="h1", component="api")
    merged = failures.merge([*c, *a, *b])
    assert [f.code for f in merged] == ["nccl-error", "no-p2p"]
    assert merged[0].line().startswith("h1 api, h2 ray-worker: nccl-error: ")
    assert failures.summary(merged) == [merged[0].line()]               # warnings only when no error matched
    assert failures.summary(failures.merge(b[1:])) == [b[1].line()]
    assert failures.merge(c)[0].code == "engine-start-failed"


def test_stopped_container_fallback_reads_the_file_with_docker_cp():
    argv = ("docker", "exec", "gpucluster-c-ray-head", "tail", "-n", "200", "/var/log/gpucluster/api.log")
    fb = failures.stopped_fallback(argv)
    assert fb[:2] == ("sh", "-c") and fb[3:] == ("gpucluster-c-ray-head", "/var/log/gpucluster/api.log", "200")
    assert "docker cp" in fb[2] and "$0" in fb[2]          # names are arguments, never part of the script
    assert failures.stopped_fallback(("docker", "logs", "--tail", "200", "x")) is None


def test_as_dict_for_json():
    f, = failures.explain(["CUDA out of memory. Tried to allocate 2.31 GiB. GPU 0 has a total capacty"],
                          host="h2", component="ray-worker")
    d = f.as_dict()
    assert d["code"] == "cuda-oom" and d["severity"] == ERROR and d["host"] == "h2"
    assert d["component"] == "ray-worker" and "2.31 GiB" in d["message"] and d["source"] and d["excerpt"]


# ---------------------------------------------------------------- wired into `up` and `doctor --logs` (fake hosts)
class FakeHosts:
    """remote.Hosts' surface that diagnose.read_logs uses: argv -> (rc, stdout, stderr) per host, calls recorded."""

    def __init__(self, answers=None, fail: Exception | None = None):
        self.answers, self.fail, self.calls = answers or {}, fail, []

    def host(self, name):
        return name

    def run(self, host, argv, *, timeout=None):
        from cluster.executor import Result
        self.calls.append((host, tuple(argv), timeout))
        if self.fail:
            raise self.fail
        for (h, head), answer in self.answers.items():
            if h == host and tuple(argv[:len(head)]) == head:
                return Result(*answer)
        return Result(1, "", "Error response from daemon: No such container: x")

    def each(self, items, fn, *, key=lambda h: h.name, workers=16):
        out = {}
        for item in items:
            try:
                out[key(item)] = fn(item)
            except Exception as e:  # noqa: BLE001 - as remote.Hosts.each does
                out[key(item)] = e
        return out


@pytest.fixture(scope="module")
def two_host_plan():
    from cluster import ops
    inv, prof = ops.load(str(Path(__file__).resolve().parents[2] / "inventories" / "v100-3node.yaml"))
    plan = ops.make_plan(inv, prof, tp=4)
    assert plan.topology.nodes == ("gpu208", "gpu209")
    return plan


def _failed(plan, step_id: str, why: str):
    from cluster.executor import Outcome, PhaseFailed, Report
    step = next(s for s in plan.steps if s.id == step_id)
    return PhaseFailed(step.phase, [Outcome(step, "failed", why)], Report())


API_LOG = ("INFO 02-07 03:20:01 api_server.py:209] args: Namespace(api_key='sk-never-printed-0001')\n"
           "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
           "initializing the engine.\n")


def test_a_readiness_failure_reads_every_hosts_logs_and_puts_the_cause_first(two_host_plan):
    from cluster import diagnose
    e = _failed(two_host_plan, "control/health", "the server exited while loading; last log lines:\nTraceback")
    hosts = FakeHosts({("gpu208", ("docker", "exec")): (0, API_LOG, ""),
                       ("gpu209", ("docker", "logs")): (0, "Ray runtime started.\n", "")})
    said = []
    out = diagnose.explain_failure(e, two_host_plan, hosts, said.append)
    assert isinstance(out, diagnose.ExplainedFailure) and out.original is e and out.failed == e.failed
    text = str(out)
    assert text.startswith("the logs show why:\n  gpu208 api: kv-cache-insufficient: ")
    assert "(fix: raise gpu-memory-utilization" in text and text.endswith(str(e))
    assert "sk-never-printed" not in text
    assert {h for h, _, _ in hosts.calls} == {"gpu208", "gpu209"}
    assert all(t == diagnose.LOG_TIMEOUT for _, _, t in hosts.calls) and said[0].startswith("== explain")
    assert all(("200" in argv) for _, argv, _ in hosts.calls)


def test_a_container_that_never_started_is_explained_from_the_failure_itself(two_host_plan):
    from cluster import diagnose
    why = ("`docker run -d` exited 125: docker: Error response from daemon: failed to create task for container: "
           "nvidia-container-cli: requirement error: unsatisfied condition: cuda>=12.8, please update your driver")
    e = _failed(two_host_plan, "gpu209/ray-worker", why)
    hosts = FakeHosts()
    out = diagnose.explain_failure(e, two_host_plan, hosts)
    assert {h for h, _, _ in hosts.calls} == {"gpu209"}       # a step of its own host: only that host is read
    assert str(out).splitlines()[1].startswith("  gpu209 ray-worker: driver-too-old: the image needs CUDA 12.8")


def test_explaining_never_masks_the_failure(two_host_plan):
    from cluster import diagnose
    e = _failed(two_host_plan, "control/health", "did not answer 200 within 1800s")
    assert diagnose.explain_failure(e, two_host_plan, FakeHosts(fail=OSError("connection reset"))) is e   # unreadable
    assert diagnose.explain_failure(e, two_host_plan, FakeHosts()) is e                                   # nothing known
    image = _failed(two_host_plan, "gpu208/image", "CUDA out of memory. Tried to allocate 1 GiB")
    hosts = FakeHosts()
    assert diagnose.explain_failure(image, two_host_plan, hosts) is image and hosts.calls == []          # not the engine


def test_read_logs_statuses_and_the_stopped_container_fallback(two_host_plan):
    from cluster import diagnose
    d = two_host_plan.deployment
    not_running = (1, "", "Error response from daemon: container x is not running")
    hosts = FakeHosts({("gpu208", ("docker", "exec")): not_running,
                       ("gpu208", ("sh", "-c")): (0, API_LOG, ""),
                       ("gpu208", ("docker", "logs")): (124, "partial\n", "`docker logs` still running after 20 s")})
    rows = {(r["host"], r["component"]): r for r in diagnose.read_logs(d, hosts, ["gpu208", "gpu209"])}
    assert rows[("gpu208", "api")]["status"] == "ok"
    assert [f.code for f in rows[("gpu208", "api")]["findings"]] == ["kv-cache-insufficient"]
    assert rows[("gpu208", "ray-head")]["status"].startswith("exit 124: ")
    assert rows[("gpu209", "ray-worker")]["status"] == "no container"
    fallback = [argv for h, argv, _ in hosts.calls if argv[:2] == ("sh", "-c")]
    assert fallback and "docker cp" in fallback[0][2]


def test_doctor_logs_scan_merges_findings(two_host_plan, monkeypatch):
    from cluster import diagnose

    class Remote:
        @staticmethod
        def Hosts(inv, accept_new_host_keys=False):   # noqa: N802 - stands in for remote.Hosts
            class Ctx(FakeHosts):
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    return None
            return Ctx({("gpu208", ("docker", "exec")): (0, API_LOG, ""),
                        ("gpu209", ("docker", "logs")): (0, API_LOG, "")})

        @staticmethod
        def describe(e):
            return str(e)
    monkeypatch.setattr(diagnose, "_remote", lambda: Remote)
    scan = diagnose.scan_logs(two_host_plan, tail=50)
    assert scan["tail"] == 50 and scan["errors"] == 1
    assert [f["code"] for f in scan["findings"]] == ["kv-cache-insufficient"]
    assert sorted(scan["findings"][0]["seen"]) == ["gpu208 api", "gpu209 ray-worker"]
    assert {r["status"] for r in scan["sources"]} == {"ok", "no container"}
    assert all("findings" not in r for r in scan["sources"])


def test_doctor_logs_text():
    from cluster import cli
    f, = failures.merge(failures.explain([API_LOG], host="h1", component="api"))
    scan = {"tail": 200, "findings": [f.as_dict()], "errors": 1,
            "sources": [{"host": "h1", "component": "api", "status": "ok", "lines": 2},
                        {"host": "h2", "component": "ray-worker", "status": "no container", "lines": 0}]}
    text = cli._log_findings_text(scan)
    assert "  h1 api: 2 lines\n  h2 ray-worker: no container\n" in text
    assert "ERROR h1 api: kv-cache-insufficient: " in text and "\n    fix: raise" in text
    assert "\n    log: ValueError: No available memory" in text and "sk-never" not in text
    assert "no known failure" in cli._log_findings_text({**scan, "findings": []})
