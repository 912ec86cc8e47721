# Part of the gpucluster test rig's SGLang stand-in image (stand-in: not SGLang, not gpucluster code).
"""Run the REAL argument handling of the SGLang release baked into this image on the stand-in's argv: what
`python3 -m sglang.launch_server ARGV` does before it starts anything, i.e. SGLang's own
`prepare_server_args(argv)` (`ServerArgs.add_cli_args` + `parse_args` + `ServerArgs.from_cli_args`, whose
`__post_init__` resolves and validates the arguments) and then `ServerArgs.check_server_args()`.

It reuses the vLLM images' fake-module machinery (realparse.py, imported, unmodified): the release's own Python
source (sglang/**/*.py from the wheel, `rig setup`) is real, and so are the pure-Python libraries in deps/;
everything else (torch, transformers, triton, sgl_kernel, ...) is a permissive fake. A few values SGLang checks at
import or in __post_init__ are given (below), so that it sees a CUDA build of torch on the rig's GPUs.

    python3 realparse_sglang.py ARGV...    # GCRIG_REALPARSE_OUT=FILE: the resolved server args as JSON

Paths: $GCRIG_REALPARSER_DIR (default /opt/gcrig-realparser) holds realparse.py, src/ (SGLang's source) and
deps/; $GCRIG_REALPARSE_SRC and $GCRIG_REALPARSE_DEPS override the last two (the loopback test uses the cache).
Exit status: 0 parsed; SGLang's own (argparse: 2, with its message) when it refuses the command line; 1 with its
traceback when its validation raises.
"""
import argparse
import json
import os
import sys
import tempfile
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
RP_DIR = os.environ.get("GCRIG_REALPARSER_DIR", "/opt/gcrig-realparser")
SRC = os.environ.get("GCRIG_REALPARSE_SRC") or os.path.join(RP_DIR, "src")
DEPS = os.environ.get("GCRIG_REALPARSE_DEPS") or os.path.join(RP_DIR, "deps")

# torch attributes that exist only in other accelerators' builds of torch (SGLang probes them with hasattr)
TORCH_ABSENT = {"npu", "hpu", "mlu", "musa"}


def torch_pin():
    """The torch version the release pins (its METADATA), which the image's torch would be."""
    for d in os.listdir(SRC):
        if d.startswith("sglang-") and d.endswith(".dist-info"):
            for line in open(os.path.join(SRC, d, "METADATA")):
                if line.startswith("Requires-Dist: torch==") and ";" not in line:
                    return line.split("==", 1)[1].strip()
    return "2.11.0"


def load_realparse():
    sys.path.insert(0, RP_DIR)
    try:
        import realparse
    finally:
        sys.path.remove(RP_DIR)
    return realparse


class _Library:
    """torch.library.Library, enough for SGLang's op registration at import (the name it checks)."""

    def __init__(self, ns, kind="DEF", *a, **k):
        self.m = argparse.Namespace(name=ns)

    def define(self, *a, **k):
        pass

    impl = _register_fake = define


class _HFConfig:
    """A model's config.json as transformers' PretrainedConfig presents it (attributes; absent keys absent)."""

    def __init__(self, d):
        self.__dict__.update({"architectures": None, "quantization_config": None, "torch_dtype": None,
                              "tie_word_embeddings": False})
        for k, v in d.items():
            setattr(self, k, _HFConfig(v) if isinstance(v, dict) and k.endswith("_config") and k !=
                    "quantization_config" else v)

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, _HFConfig) else v for k, v in vars(self).items()}

    def get_text_config(self, *a, **k):
        return self

    def update(self, d):
        self.__dict__.update(d)


class _AutoConfig:
    """transformers.AutoConfig.from_pretrained for a local model directory: its config.json, or the error
    transformers raises without one (the rig gives SGLang a mounted directory, never a hub id)."""

    @classmethod
    def from_pretrained(cls, model, *a, **k):
        path = os.path.join(str(model), "config.json")
        if not os.path.isfile(path):
            raise OSError("%s does not appear to have a file named config.json. Checkout "
                          "'https://huggingface.co/%s/tree/main' for available files." % (model, model))
        with open(path) as f:
            return _HFConfig(json.load(f))

    register = classmethod(lambda cls, *a, **k: None)


def install(rp):
    """realparse's fake modules, pointed at SGLang's source instead of vLLM's."""
    rp.SRC, rp.DEPS = SRC, DEPS
    fm = rp._FakeMeta  # what SGLang's import-time code does with fakes, beyond what vLLM's needs
    for name in ("__neg__", "__pos__", "__invert__", "__abs__"):  # -torch.finfo(...).max
        setattr(fm, name, lambda cls: cls)
    fm.__setitem__ = lambda cls, key, value: None                 # CONFIG_MAPPING._extra_content[...] = ...
    fm.__delitem__ = lambda cls, key: None
    gpu = rp._gpu
    rp.SPECIAL.update({
        "torch.library.Library": _Library,
        "transformers.AutoConfig": _AutoConfig,
        "dill.dumps": lambda *a, **k: b"gcrig",                   # CustomLogitProcessor.to_str() at import
        "torch.version.cuda": "12.9",
        "torch.version.musa": None,
        "torch.hpu.is_available": lambda: False,
        "torch.cpu.is_available": lambda: True,
        "torch.cuda.get_device_properties": lambda *a, **k: argparse.Namespace(
            name=gpu()["name"], total_memory=gpu()["mem"], major=gpu()["cc"][0], minor=gpu()["cc"][1],
            multi_processor_count=80),
        "torch.cuda.mem_get_info": lambda *a, **k: (gpu()["mem"], gpu()["mem"]),
        "triton.runtime.driver.active.get_current_target": lambda: argparse.Namespace(
            backend="cuda", arch=gpu()["cc"][0] * 10 + gpu()["cc"][1], warp_size=32),
    })
    # only the release's source and deps/: not this stand-in's `sglang` (nor the vLLM stand-in beside it)
    drop = ("", HERE, os.path.dirname(HERE), RP_DIR)
    sys.path[:] = [SRC, DEPS] + [p for p in sys.path if "-packages" not in p and os.path.abspath(p or ".")
                                 not in map(os.path.abspath, drop) and p]
    for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]:
        del sys.modules[name]
    rp.FAKED_VLLM.update(rp.compiled_modules())  # the wheel's .so modules (sglang.srt.grpc._core)
    finder = rp._FakeFinder(rp.real_top_level() | {"sglang"})
    sys.meta_path.insert(0, finder)
    import torch

    class Torch(type(torch)):
        def __getattr__(self, name):
            if name in TORCH_ABSENT:
                raise AttributeError("module 'torch' has no attribute %r" % name)
            return super().__getattr__(name)

    torch.__class__ = Torch
    torch.__version__ = torch_pin()
    return finder


def main(argv):
    rp = load_realparse()
    finder = install(rp)
    warnings.simplefilter("ignore")
    try:
        from sglang.srt.server_args import prepare_server_args
        server_args = prepare_server_args(list(argv))   # launch_server's own call
        server_args.check_server_args()                 # what the engine asserts next
    except SystemExit as e:  # argparse errors, --help
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception:
        traceback.print_exc()
        return 1
    args = {k: rp.jsonable(v) for k, v in vars(server_args).items()
            if not k.startswith("_") and (not callable(v) or isinstance(v, type))}
    payload = {"args": args, "faked": sorted(finder.faked)}
    dest = os.environ.get("GCRIG_REALPARSE_OUT")
    if dest:
        with open(dest, "w") as f:
            json.dump(payload, f)
    else:
        sys.stdout.write(json.dumps(payload) + "\n")
    return 0


def selftest():
    """Run by `rig setup` in the freshly built image (also writes the bytecode the image keeps): a good command
    line resolves (tp_size 2 read back) and an unknown flag is refused by SGLang's parser with status 2."""
    import subprocess
    import time
    model = tempfile.mkdtemp(prefix="gcrig-selftest-model-")
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256,
                   "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 2,
                   "intermediate_size": 512, "vocab_size": 1024, "max_position_embeddings": 2048,
                   "torch_dtype": "bfloat16"}, f)
    good = ["--model-path", model, "--tp-size", "2", "--nnodes", "2", "--node-rank", "1",
            "--dist-init-addr", "10.0.0.1:29600", "--host", "0.0.0.0", "--port", "30000"]
    out = os.path.join(model, "args.json")
    t = time.monotonic()
    r = subprocess.run([sys.executable, __file__] + good, capture_output=True, text=True,
                       env=dict(os.environ, GCRIG_REALPARSE_OUT=out))
    took = round(time.monotonic() - t, 2)
    args = json.load(open(out))["args"] if r.returncode == 0 and os.path.exists(out) else {}
    bad = subprocess.run([sys.executable, __file__] + good + ["--gcrig-not-a-flag"], capture_output=True, text=True)
    rep = {"rc": r.returncode, "seconds": took, "tp_size": args.get("tp_size"), "nnodes": args.get("nnodes"),
           "bad_flag_rc": bad.returncode,
           "bad_flag_refused": "unrecognized arguments: --gcrig-not-a-flag" in bad.stderr}
    ok = r.returncode == 0 and rep["tp_size"] == 2 and rep["nnodes"] == 2 and bad.returncode == 2 and \
        rep["bad_flag_refused"]
    if not ok:
        rep["stderr"] = r.stderr[-4000:] + bad.stderr[-1500:]
    print(json.dumps(rep))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(selftest() if sys.argv[1:] == ["selftest"] else main(sys.argv[1:]))
