"""The all-releases generator (scripts/gen_engine_tables.py --all) and its committed output.

The generator is run on tiny synthetic wheels built here (zip files holding a fake vLLM source
tree in the two parser styles: 0.3-style `parse_args()` in api_server.py, and the newer
`make_arg_parser()` + `EngineArgs.add_cli_args()` over config dataclasses).  Nothing is
downloaded.  The last tests read the committed cluster/knowledge/vllm/releases.json through
cluster/knowledge/releases.py.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KNOWLEDGE = ROOT / "cluster" / "knowledge" / "vllm"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_engine_tables", ROOT / "scripts" / "gen_engine_tables.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_engine_tables"] = mod
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


def _releases():
    spec = importlib.util.spec_from_file_location("gc_releases", ROOT / "cluster" / "knowledge" / "releases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_wheel(tmp_path: Path, name: str, version: str, files: dict[str, str], metadata: list[str],
               entry_points: str | None = None) -> Path:
    path = tmp_path / name
    di = f"vllm-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        for fn, src in files.items():
            z.writestr(fn, textwrap.dedent(src).lstrip())
        z.writestr(f"{di}/METADATA", "\n".join(["Metadata-Version: 2.1", "Name: vllm", f"Version: {version}",
                                                *metadata]) + "\n")
        z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\n")
        if entry_points:
            z.writestr(f"{di}/entry_points.txt", entry_points)
    return path


PKG_INITS = {f"{d}/__init__.py": "" for d in (
    "vllm", "vllm/engine", "vllm/entrypoints", "vllm/entrypoints/openai", "vllm/model_executor",
    "vllm/model_executor/models")}


# --------------------------------------------------------------------------- 0.3-style wheel

OLD_FILES = {
    **PKG_INITS,
    "vllm/entrypoints/openai/api_server.py": """
        import argparse
        import os
        from vllm.engine.arg_utils import AsyncEngineArgs

        def parse_args():
            parser = argparse.ArgumentParser(description="vLLM OpenAI-Compatible RESTful API server.")
            parser.add_argument("--host", type=str, default=None, help="host name")
            parser.add_argument("--port", type=int, default=8000, help="port number")
            parser.add_argument("--api-key", type=str, default=None)
            parser = AsyncEngineArgs.add_cli_args(parser)
            return parser.parse_args()

        if __name__ == "__main__":
            args = parse_args()
            token = os.environ.get("VLLM_API_KEY") or args.api_key
            home = os.environ.get("HOME")
    """,
    "vllm/engine/arg_utils.py": """
        import argparse
        from dataclasses import dataclass

        @dataclass
        class EngineArgs:
            model: str

            @staticmethod
            def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
                parser.add_argument("--model", type=str, default="facebook/opt-125m")
                parser.add_argument("--dtype", type=str, default="auto",
                                    choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
                parser.add_argument("--worker-use-ray", action="store_true")
                parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
                parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
                parser.add_argument("--quantization", "-q", type=str, choices=["awq", "squeezellm", None],
                                    default=None)
                return parser

        @dataclass
        class AsyncEngineArgs(EngineArgs):
            engine_use_ray: bool = False

            @staticmethod
            def add_cli_args(parser):
                parser = EngineArgs.add_cli_args(parser)
                parser.add_argument("--engine-use-ray", action="store_true")
                parser.add_argument("--max-log-len", type=int, default=None)
                return parser
    """,
    "vllm/engine/llm_engine.py": """
        class LLMEngine:
            def step(self):
                return []
    """,
    "vllm/config.py": """
        class ParallelConfig:
            def _verify_args(self) -> None:
                if self.pipeline_parallel_size > 1:
                    raise NotImplementedError("Pipeline parallelism is not supported yet.")
    """,
    "vllm/model_executor/models/__init__.py": """
        _MODELS = {
            "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
            "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
        }
    """,
}
OLD_META = ["Requires-Dist: ray >=2.9", "Requires-Dist: torch ==2.1.2", "Requires-Dist: xformers ==0.0.23.post1",
            "Requires-Dist: transformers >=4.37.0", 'Requires-Dist: pytest ; extra == "dev"']


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    whl = make_wheel(tmp_path_factory.mktemp("old"), "vllm-0.3.0-cp311-cp311-manylinux1_x86_64.whl",
                     "0.3.0", OLD_FILES, OLD_META)
    return gen.extract(whl)


def test_old_style_flags(old):
    assert old["version"] == "0.3.0"
    assert old["wheel"] == "vllm-0.3.0-cp311-cp311-manylinux1_x86_64.whl"
    assert set(old["flags"]) == {"--host", "--port", "--api-key", "--model", "--dtype", "--worker-use-ray",
                                 "--pipeline-parallel-size", "--tensor-parallel-size", "--quantization",
                                 "--engine-use-ray", "--max-log-len"}
    assert old["flags"]["--dtype"] == {"value": True, "type": "str", "nargs": None,
                                       "choices": ["auto", "half", "float16", "bfloat16", "float", "float32"]}
    # a None choice cannot be spelled on a command line
    assert old["flags"]["--quantization"]["choices"] == ["awq", "squeezellm"]
    assert old["flags"]["--worker-use-ray"] == {"value": False, "choices": None, "type": None, "nargs": None}
    assert old["flags"]["--port"]["type"] == "int"
    assert old["aliases"] == {"-pp": "--pipeline-parallel-size", "-q": "--quantization",
                              "-tp": "--tensor-parallel-size"}
    assert old["underscores"] is False


def test_old_style_traits(old):
    assert old["api_server_module"] == "vllm.entrypoints.openai.api_server"
    assert old["serve_subcommand"] is False
    assert old["entrypoint"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert old["api_server_deprecated"] is False
    pp = old["pipeline_parallel"]
    assert pp["flag"] is True and pp["supported"] is False and pp["raises_not_implemented"] is True
    assert pp["not_implemented"] == [{"file": "vllm/config.py", "kind": "always",
                                      "when": "self.pipeline_parallel_size > 1",
                                      "message": "Pipeline parallelism is not supported yet."}]
    assert old["executor"] == {"flag": "--worker-use-ray", "choices": None, "worker_use_ray": True,
                               "ray_args": ["--worker-use-ray"]}
    assert old["multi_node"] == {"ray": True, "mp": False, "mp_flags": [], "data_parallel_flags": []}
    assert old["engine_generation"] == {"default": "v0", "v0": True, "v1": False, "VLLM_USE_V1_default": None}
    assert old["v1_below_cc80"] is None
    assert old["null_reasons"]["v1_below_cc80"] == "no V1 engine in this release"
    assert old["env_vars"] == ["VLLM_API_KEY"]          # HOME is read too, but is not a VLLM_* name
    assert old["architectures"] == ["GPT2LMHeadModel", "LlamaForCausalLM"]
    assert old["requires"] == {"ray": ">=2.9", "torch": "==2.1.2", "transformers": ">=4.37.0",
                               "xformers": "==0.0.23.post1"}


# --------------------------------------------------------------------------- new-style wheel

def new_files(v0: bool) -> dict[str, str]:
    files = {
        **PKG_INITS,
        **{f"{d}/__init__.py": "" for d in ("vllm/entrypoints/cli", "vllm/v1", "vllm/v1/engine",
                                            "vllm/config", "vllm/platforms")},
        "vllm/utils/__init__.py": """
            import argparse
            import sys

            class FlexibleArgumentParser(argparse.ArgumentParser):
                def parse_args(self, args=None, namespace=None):
                    if args is None:
                        args = sys.argv[1:]
                    processed = []
                    for arg in args:
                        if arg.startswith("--"):
                            processed.append("--" + arg[2:].replace("_", "-"))
                        else:
                            processed.append(arg)
                    return super().parse_args(processed, namespace)
        """,
        "vllm/config/parallel.py": """
            from dataclasses import dataclass
            from typing import Literal, Optional

            DistributedExecutorBackend = Literal["ray", "mp", "uni", "external_launcher"]
            RunnerType = Literal["generate", "pooling", "draft"]
            RunnerOption = Literal["auto", RunnerType]

            @dataclass
            class ParallelConfig:
                pipeline_parallel_size: int = 1
                tensor_parallel_size: int = 1
                distributed_executor_backend: Optional[DistributedExecutorBackend] = None
                nnodes: int = 1
                node_rank: int = 0
                master_addr: str = "127.0.0.1"
                master_port: int = 29501
                enable_expert_parallel: bool = False
                runner: RunnerOption = "auto"
        """,
        "vllm/config/model.py": """
            class ModelConfig:
                def verify_with_parallel_config(self, parallel_config):
                    pipeline_parallel_size = parallel_config.pipeline_parallel_size
                    if pipeline_parallel_size > 1 and not self.registry.is_pp_supported_model(
                            self.architectures, self):
                        raise NotImplementedError(
                            "Pipeline parallelism is not supported for this model. "
                            "Supported models implement the `SupportsPP` interface.")
        """,
        "vllm/engine/arg_utils.py": """
            from dataclasses import fields
            from vllm.config.parallel import ParallelConfig
            from vllm.utils import FlexibleArgumentParser
            import vllm.envs as envs

            def _compute_kwargs(cls):
                return {f.name: {} for f in fields(cls)}

            def get_kwargs(cls):
                return _compute_kwargs(cls)

            class EngineArgs:
                @staticmethod
                def add_cli_args(parser: FlexibleArgumentParser) -> FlexibleArgumentParser:
                    parser.add_argument("--model", type=str, default="facebook/opt-125m")
                    parallel_kwargs = get_kwargs(ParallelConfig)
                    group = parser.add_argument_group(title="ParallelConfig")
                    group.add_argument("--tensor-parallel-size", "-tp", **parallel_kwargs["tensor_parallel_size"])
                    group.add_argument("--pipeline-parallel-size", "-pp",
                                       **parallel_kwargs["pipeline_parallel_size"])
                    group.add_argument("--distributed-executor-backend",
                                       **parallel_kwargs["distributed_executor_backend"])
                    group.add_argument("--nnodes", "-n", **parallel_kwargs["nnodes"])
                    group.add_argument("--node-rank", "-r", **parallel_kwargs["node_rank"])
                    group.add_argument("--master-addr", **parallel_kwargs["master_addr"])
                    group.add_argument("--master-port", **parallel_kwargs["master_port"])
                    group.add_argument("--enable-expert-parallel", **parallel_kwargs["enable_expert_parallel"])
                    group.add_argument("--runner", **parallel_kwargs["runner"])
                    return parser

            class AsyncEngineArgs(EngineArgs):
                @staticmethod
                def add_cli_args(parser):
                    parser = EngineArgs.add_cli_args(parser)
                    parser.add_argument("--enable-log-requests", action="store_true")
                    return parser
        """,
        "vllm/entrypoints/openai/cli_args.py": """
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.utils import FlexibleArgumentParser

            def make_arg_parser(parser: FlexibleArgumentParser) -> FlexibleArgumentParser:
                parser.add_argument("--host", type=str, default=None)
                parser.add_argument("--port", type=int, default=8000)
                parser.add_argument("--headless", action="store_true", default=False)
                parser.add_argument("--data-parallel-start-rank", "-dpr", type=int, default=0)
                parser = AsyncEngineArgs.add_cli_args(parser)
                return parser
        """,
        "vllm/entrypoints/openai/api_server.py": """
            import warnings
            from vllm.entrypoints.openai.cli_args import make_arg_parser
            from vllm.utils import FlexibleArgumentParser

            if __name__ == "__main__":
                warnings.warn("The `python -m vllm.entrypoints.openai.api_server` command is deprecated. "
                              "Please use `vllm serve` instead.", DeprecationWarning)
                parser = FlexibleArgumentParser()
                parser = make_arg_parser(parser)
                args = parser.parse_args()
        """,
        "vllm/entrypoints/cli/main.py": """
            def main():
                pass
        """,
        "vllm/entrypoints/cli/serve.py": """
            from vllm.entrypoints.openai.cli_args import make_arg_parser

            class ServeSubcommand:
                name = "serve"

                def subparser_init(self, subparsers):
                    serve_parser = subparsers.add_parser("serve", help="Start the server")
                    serve_parser.add_argument("model_tag", type=str, nargs="?")
                    serve_parser.add_argument("--config", type=str, default="")
                    return make_arg_parser(serve_parser)
        """,
        "vllm/envs.py": """
            import os
            from typing import Any, Callable

            environment_variables: dict[str, Callable[[], Any]] = {
                "VLLM_HOST_IP": lambda: os.getenv("VLLM_HOST_IP", ""),
                "VLLM_USE_V1": lambda: bool(int(os.getenv("VLLM_USE_V1", "1"))),
                "VLLM_PP_LAYER_PARTITION": lambda: os.getenv("VLLM_PP_LAYER_PARTITION", None),
                "CUDA_VISIBLE_DEVICES": lambda: os.environ.get("CUDA_VISIBLE_DEVICES", None),
            }
        """,
        "vllm/v1/engine/core.py": "class EngineCore:\n    pass\n",
        "vllm/v1/engine/async_llm.py": "class AsyncLLM:\n    pass\n",
        "vllm/model_executor/models/registry.py": """
            _TEXT_GENERATION_MODELS = {
                "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
                "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
                "OPTForCausalLM": ("opt", "OPTForCausalLM"),
            }
            _SPECULATIVE_DECODING_MODELS = {
                "EagleLlamaForCausalLM": ("llama_eagle", "EagleLlamaForCausalLM"),
            }
            _VLLM_MODELS = {**_TEXT_GENERATION_MODELS, **_SPECULATIVE_DECODING_MODELS}
        """,
        "vllm/model_executor/models/interfaces.py": """
            from typing import Protocol

            class SupportsPP(Protocol):
                supports_pp = True

            class SupportsLoRA(Protocol):
                supports_lora = True
        """,
        "vllm/model_executor/models/llama.py": """
            from torch import nn
            from .interfaces import SupportsLoRA, SupportsPP

            class LlamaForCausalLM(nn.Module, SupportsLoRA, SupportsPP):
                pass
        """,
        "vllm/model_executor/models/qwen3.py": """
            from .llama import LlamaForCausalLM

            class Qwen3ForCausalLM(LlamaForCausalLM):
                pass
        """,
        "vllm/model_executor/models/opt.py": """
            from torch import nn
            from .interfaces import SupportsLoRA

            class OPTForCausalLM(nn.Module, SupportsLoRA):
                pass
        """,
    }
    if v0:
        files["vllm/engine/llm_engine.py"] = "class LLMEngine:\n    pass\n"
        files["vllm/engine/arg_utils.py"] += textwrap.dedent("""
            def _raise_or_fallback(feature_name: str, recommend_to_remove: bool):
                if envs.is_set("VLLM_USE_V1") and envs.VLLM_USE_V1:
                    raise NotImplementedError(f"VLLM_USE_V1=1 is not supported with {feature_name}.")
                logger.warning("%s is not supported by the V1 Engine. Falling back to V0.", feature_name)

            def _is_v1_supported_oracle(self, model_config):
                if current_platform.get_device_capability().major < 8:
                    _raise_or_fallback(feature_name="Compute Capability < 8.0", recommend_to_remove=False)
                    return False
                return True
        """)
    else:
        files["vllm/engine/llm_engine.py"] = ("from vllm.v1.engine.llm_engine import LLMEngine as V1LLMEngine\n"
                                              "LLMEngine = V1LLMEngine\n")
        files["vllm/platforms/cuda.py"] = """
            class CudaPlatform:
                @classmethod
                def get_attn_backend_cls(cls, selected_backend, head_size, dtype):
                    if cls.has_device_capability(80):
                        return "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"
                    # FlexAttention is the default for older GPUs
                    return "vllm.v1.attention.backends.flex_attention.FlexAttentionBackend"
        """
    return files


NEW_META = ["Requires-Dist: torch==2.8.0", "Requires-Dist: transformers>=4.56.0",
            'Requires-Dist: ray[cgraph]>=2.48.0; extra == "ray"', "Requires-Dist: numpy"]
EP = "[console_scripts]\nvllm = vllm.entrypoints.cli.main:main\n"


@pytest.fixture(scope="module")
def new(tmp_path_factory):
    whl = make_wheel(tmp_path_factory.mktemp("new"), "vllm-0.11.0-cp38-abi3-manylinux1_x86_64.whl",
                     "0.11.0", new_files(v0=False), NEW_META, EP)
    return gen.extract(whl)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    whl = make_wheel(tmp_path_factory.mktemp("hybrid"), "vllm-0.8.5.post1-cp38-abi3-manylinux1_x86_64.whl",
                     "0.8.5.post1", new_files(v0=True), NEW_META, EP)
    return gen.extract(whl)


def test_new_style_flags(new):
    f = new["flags"]
    assert new["version"] == "0.11.0"
    assert f["--distributed-executor-backend"] == {"value": True, "type": "str", "nargs": None,
                                                   "choices": ["ray", "mp", "uni", "external_launcher"]}
    assert f["--nnodes"] == {"value": True, "choices": None, "type": "int", "nargs": None}
    assert f["--runner"]["choices"] == ["auto", "generate", "pooling", "draft"]   # nested Literal, flattened
    assert f["--master-addr"]["type"] == "str"
    # bool dataclass fields become BooleanOptionalAction: two bare spellings
    assert f["--enable-expert-parallel"]["value"] is False and f["--no-enable-expert-parallel"]["value"] is False
    assert f["--headless"]["value"] is False
    assert f["--config"]["value"] is True            # added by the `vllm serve` subparser only
    assert "model_tag" not in f
    assert new["aliases"] == {"-dpr": "--data-parallel-start-rank", "-n": "--nnodes", "-pp": "--pipeline-parallel-size",
                              "-r": "--node-rank", "-tp": "--tensor-parallel-size"}
    assert new["underscores"] is True


def test_new_style_traits(new):
    assert new["serve_subcommand"] is True
    assert new["api_server_deprecated"] is True
    assert new["entrypoint"] == ["vllm", "serve"]
    pp = new["pipeline_parallel"]
    assert pp["supported"] is True and pp["raises_not_implemented"] is False and pp["model_restricted"] is True
    assert pp["architectures"] == ["LlamaForCausalLM", "Qwen3ForCausalLM"]   # OPT lacks SupportsPP
    assert [s["kind"] for s in pp["not_implemented"]] == ["model"]
    assert new["executor"]["ray_args"] == ["--distributed-executor-backend", "ray"]
    assert new["executor"]["worker_use_ray"] is False
    assert new["multi_node"]["mp"] is True
    assert new["multi_node"]["mp_flags"] == ["--nnodes", "--node-rank", "--master-addr", "--master-port", "--headless"]
    assert new["multi_node"]["data_parallel_flags"] == ["--data-parallel-start-rank"]
    assert new["engine_generation"] == {"default": "v1", "v0": False, "v1": True, "VLLM_USE_V1_default": "1"}
    assert new["v1_below_cc80"]["behaviour"] == "runs V1 with the FlexAttention backend"
    assert new["env_vars"] == ["VLLM_HOST_IP", "VLLM_PP_LAYER_PARTITION", "VLLM_USE_V1"]
    assert new["architectures"] == ["LlamaForCausalLM", "OPTForCausalLM", "Qwen3ForCausalLM"]
    assert new["requires"] == {"torch": "==2.8.0", "transformers": ">=4.56.0"}
    assert "requires.ray" in new["null_reasons"] and "requires.torch" not in new["null_reasons"]


def test_v1_default_with_v0_fallback(hybrid):
    assert hybrid["engine_generation"] == {"default": "v1", "v0": True, "v1": True, "VLLM_USE_V1_default": "1"}
    below = hybrid["v1_below_cc80"]
    assert below["behaviour"] == "falls back to V0"
    assert below["error_if_VLLM_USE_V1_set"] is True
    assert hybrid["entrypoint"] == ["vllm", "serve"]


def test_compact_round_trip(old, new, hybrid):
    recs = [dict(r, released=d) for r, d in ((old, "2024-01-31"), (hybrid, "2025-05-02"), (new, "2025-10-04"))]
    data = json.loads(gen.dump_compact(gen.compact(recs, [{"version": "0.2.1", "reason": "yanked"}])))
    # a flag definition shared by several releases is stored once
    names = [f[0] for f in data["pools"]["flags"]]
    assert names.count("--host") == 1 and names.count("--nnodes") == 1
    reader = _releases()
    for r in recs:
        rec = next(x for x in data["releases"] if x["version"] == r["version"])
        assert reader.decode(data, rec) == r


def test_parse_index():
    def a(fn, **attrs):
        extra = "".join(f' data-{k.replace("_", "-")}="{v}"' for k, v in attrs.items())
        return f'<a href="https://files.example/{fn}#sha256=00"{extra}>{fn}</a><br/>'
    page = "\n".join([
        a("vllm-0.2.7-cp311-cp311-manylinux1_x86_64.whl", upload_time="2024-01-04T00:00:00Z"),
        a("vllm-0.3.0.tar.gz", upload_time="2024-01-31T10:00:00Z"),
        a("vllm-0.3.0-cp311-cp311-manylinux1_x86_64.whl", upload_time="2024-01-31T09:00:00Z"),
        a("vllm-0.3.0-cp310-cp310-manylinux1_x86_64.whl", upload_time="2024-01-31T09:00:00Z"),
        a("vllm-0.3.1.tar.gz", upload_time="2024-02-16T00:00:00Z"),
        a("vllm-0.3.2-cp311-cp311-manylinux1_x86_64.whl", yanked="broken", upload_time="2024-02-21T00:00:00Z"),
        a("vllm-0.8.5.post1-cp38-abi3-manylinux1_x86_64.whl", upload_time="2025-05-02T00:00:00Z"),
        a("vllm-0.8.5-cp38-abi3-manylinux1_x86_64.whl", upload_time="2025-04-28T00:00:00Z"),
        a("vllm-0.9.0rc1-cp38-abi3-manylinux1_x86_64.whl", upload_time="2025-05-10T00:00:00Z"),
        a("vllm-0.9.0-cp38-abi3-manylinux_2_28_aarch64.whl", upload_time="2025-05-15T00:00:00Z"),
        a("vllm-0.10.0-cp38-abi3-manylinux1_x86_64.whl", upload_time="2025-07-24T00:00:00Z"),
    ])
    rels, skipped = gen.parse_index(page)
    assert [(r["version"], r["released"]) for r in rels] == [
        ("0.3.0", "2024-01-31"), ("0.8.5", "2025-04-28"), ("0.8.5.post1", "2025-05-02"), ("0.10.0", "2025-07-24")]
    assert rels[0]["wheel"] == "vllm-0.3.0-cp311-cp311-manylinux1_x86_64.whl"
    assert [(s["version"], s["reason"].split(" ")[0]) for s in skipped] == [
        ("0.3.1", "no"), ("0.3.2", "yanked:"), ("0.9.0", "no")]


# --------------------------------------------------------------------------- committed releases.json

@pytest.fixture(scope="module")
def rel():
    return _releases()


def test_committed_coverage(rel):
    vs = rel.versions()
    for v in ("0.3.0", "0.8.5", "0.8.5.post1", "0.9.0.1", "0.9.2", "0.10.1.1", "0.11.0", "0.33.0"):
        assert v in vs, v
    assert vs[0] == "0.3.0" and vs[-1] == "0.33.0"       # 0.33.0: newest on PyPI when generated
    assert vs.index("0.8.5") + 1 == vs.index("0.8.5.post1") and vs.index("0.8.5.post1") + 1 == vs.index("0.9.0")
    assert vs.index("0.9.2") < vs.index("0.10.0") < vs.index("0.11.0")
    assert len(vs) >= 80
    with pytest.raises(KeyError):
        rel.table("0.8.6")


@pytest.mark.parametrize("version", ["0.3.0", "0.6.3", "0.10.1.1", "0.33.0"])
def test_committed_matches_per_version_files(rel, version):
    """Regression against the tables the older generator committed (cluster/knowledge/vllm/<v>.json)."""
    want = json.loads((KNOWLEDGE / f"{version}.json").read_text())
    got = rel.table(version)
    # Only change since then: choices of a Literal nested in a Literal (Literal["auto", RunnerType]),
    # which the older generator missed; the real 0.32.0 parser has them (crosscheck_vllm_parser.py).
    improved = {"--runner", "--convert", "--spec-method", "--anthropic-disabled-thinking-effort"} \
        if version == "0.33.0" else set()
    for name in improved:
        assert want["flags"][name]["choices"] is None and got["flags"][name]["choices"], name
        assert {k: v for k, v in want["flags"][name].items() if k != "choices"} == \
            {k: v for k, v in got["flags"][name].items() if k != "choices"}
    if improved:
        assert got["flags"]["--runner"]["choices"] == ["auto", "draft", "generate", "pooling"]
    for key, value in want.items():
        if key == "flags":
            value = {k: v for k, v in value.items() if k not in improved}
            assert {k: v for k, v in got[key].items() if k not in improved} == value, version
        else:
            assert got[key] == value, (version, key)


def test_committed_facts(rel):
    t = rel.table("0.3.0")
    assert t["pipeline_parallel"]["supported"] is False and t["executor"]["ray_args"] == ["--worker-use-ray"]
    assert t["released"] == "2024-01-31" and t["requires"]["torch"] == "==2.1.2"
    t = rel.table("0.8.5.post1")
    assert t["engine_generation"]["default"] == "v1" and t["engine_generation"]["v0"] is True
    assert t["v1_below_cc80"]["behaviour"] == "falls back to V0"
    assert t["pipeline_parallel"]["supported"] is True
    assert "Qwen3ForCausalLM" in t["architectures"] and "Qwen3ForCausalLM" in t["pipeline_parallel"]["architectures"]
    assert t["multi_node"]["mp"] is False
    t = rel.table("0.11.0")
    assert t["engine_generation"]["v0"] is False and t["engine_generation"]["default"] == "v1"
    t = rel.table("0.33.0")
    assert t["entrypoint"] == ["vllm", "serve"] and t["multi_node"]["mp"] is True
    assert set(rel.table("0.6.3")) >= {"released", "entrypoint", "pipeline_parallel", "executor", "multi_node",
                                       "engine_generation", "v1_below_cc80", "null_reasons"}
