# Part of the gpucluster test rig's vLLM stand-in images; not an inference engine, not gpucluster code.
"""Run the REAL argument parser of the vLLM release baked into this image, on the stand-in's argv.

The release's own Python source (vllm/**/*.py and its dist-info, taken from the released wheel by
`rig setup`) sits next to this file in ``src/``; the few pure-Python libraries its parser code needs for
real (pydantic and friends, see ``deps/``) are in ``deps/``. Everything else it imports (torch,
transformers, fastapi, ...) is replaced by permissive fake modules, so that vLLM's own parser-building
code runs unmodified and accepts or rejects the command line exactly as that release does.

    python3 realparse.py api_server ARGV...   # python3 -m vllm.entrypoints.openai.api_server ARGV
    python3 realparse.py cli ARGV...          # the `vllm` console script: vllm serve MODEL ARGV

On success the parsed namespace is written as JSON to the file named by $GCRIG_REALPARSE_OUT and the exit
status is 0; when vLLM's parser or its argument validation rejects the command line, its own message is on
stderr and the exit status is vLLM's (2 for argparse errors).
"""
import abc
import argparse
import functools
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import runpy
import sys
import types
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "src")
DEPS = os.path.join(HERE, "deps")

# ------------------------------------------------------------------ permissive fake modules


class _FakeMeta(abc.ABCMeta):
    """A fake class: any attribute is another fake class (or a SPECIAL value), calling one gives one fake result
    (as a decorator: the class itself, or a fake that calls the function), subscripting gives itself; it can be
    subclassed (the subclass is a real class), raised if its name says it is an error, and compared."""

    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__") or name in _NOT_FAKED:
            raise AttributeError(name)
        path = "%s.%s" % (cls.__dict__.get("_gcrig_path", cls.__qualname__), name)
        child = SPECIAL[path] if path in SPECIAL else _fake_class(path, cls.__module__)
        type.__setattr__(cls, name, child)
        return child

    def __call__(cls, *a, **k):
        if "_gcrig_fake" not in cls.__dict__:  # a real class deriving from a fake one
            return super().__call__(*a, **k)
        wrapped = cls.__dict__.get("_gcrig_wrapped")
        if wrapped is not None:
            return wrapped(*a, **k)
        if len(a) == 1 and not k and callable(a[0]) and not isinstance(a[0], _FakeMeta):
            if isinstance(a[0], type):  # a class decorator: the class itself
                return a[0]
            # a function decorator: a fake that still calls the function (and has any attribute)
            w = _fake_class(getattr(a[0], "__qualname__", "fn"), getattr(a[0], "__module__", cls.__module__))
            type.__setattr__(w, "_gcrig_wrapped", a[0])
            type.__setattr__(w, "__doc__", getattr(a[0], "__doc__", None))
            return w
        result = cls.__dict__.get("_gcrig_result")  # one result per fake: equal calls compare equal
        if result is None:
            result = _fake_class(cls.__dict__.get("_gcrig_path", cls.__qualname__) + "()", cls.__module__)
            type.__setattr__(cls, "_gcrig_result", result)
        return result

    def register(cls, *a, **k):  # ABCMeta.register, unless a fake's own register (e.g. AutoConfig.register)
        if "_gcrig_fake" in cls.__dict__:
            return a[-1] if a else cls
        return super().register(*a, **k)

    def __get__(cls, obj, objtype=None):
        if obj is not None and cls.__dict__.get("_gcrig_wrapped") is not None:
            return functools.partial(cls, obj)
        return cls

    def __getitem__(cls, item):
        return cls

    def __iter__(cls):
        return iter(())

    def __len__(cls):
        return 0

    def __bool__(cls):
        return True

    def __contains__(cls, item):
        return False

    def __int__(cls):
        return 0

    def __index__(cls):
        return 0

    def __float__(cls):
        return 0.0

    def __enter__(cls):
        return cls

    def __exit__(cls, *a):
        return False

    def __lt__(cls, other):
        return False

    __gt__ = __le__ = __ge__ = __lt__

    def __add__(cls, other):
        return cls

    __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = __add__
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __matmul__ = __rmatmul__ = __add__
    __and__ = __rand__ = __xor__ = __rxor__ = __lshift__ = __rlshift__ = __rshift__ = __rrshift__ = __add__
    __neg__ = __pos__ = __invert__ = __abs__ = __add__

    def __hash__(cls):
        return id(cls)

    def __eq__(cls, other):
        return cls is other


# attributes that libraries probe with getattr() and must find absent on a fake
_NOT_FAKED = {"_gcrig_wrapped", "_gcrig_result", "_gcrig_fake", "_gcrig_path", "_is_protocol", "_fields", "_name",
              "_field_defaults", "_abc_impl", "_is_runtime_protocol", "__origin__", "__args__", "_gorg", "_special"}


def _fake_class(path, module):
    name = path.rsplit(".", 1)[-1]
    bases = (Exception,) if name.endswith(("Error", "Exception", "Warning", "Exit", "Interrupt")) else ()
    return _FakeMeta(name, bases, {
        "__module__": module, "__qualname__": name, "_gcrig_path": path, "_gcrig_fake": True, "__init__": _init,
        "__init_subclass__": classmethod(_init_subclass),
        "__get_pydantic_core_schema__": classmethod(_any_schema)})


def _any_schema(cls, source, handler):  # pydantic (real) validating a field of a faked type: anything goes
    from pydantic_core import core_schema
    return core_schema.any_schema()


def _init(self, *a, **k):
    pass


def _init_subclass(cls, **kw):  # class X(fake.Base, option=...): options are accepted and ignored
    pass


def _infer_schema(fn):
    """torch.library.infer_schema, roughly: vLLM (0.2x+) registers its IR ops at import and checks that the
    schemas of an op's implementations agree and that in-place variants return one Tensor per activation."""
    import inspect
    import typing

    def t(ann):
        if ann is None or ann is type(None) or ann is inspect.Signature.empty:
            return "()" if ann is not inspect.Signature.empty else "Any"
        if isinstance(ann, str):
            n = ann.count("Tensor")
            return "(%s)" % ", ".join(["Tensor"] * n) if ann.startswith(("tuple", "Tuple")) else (
                "Tensor" if n else ann)
        if typing.get_origin(ann) is tuple:
            return "(%s)" % ", ".join(t(x) for x in typing.get_args(ann))
        if isinstance(ann, _FakeMeta):
            return "Tensor"
        return {int: "SymInt", float: "float", bool: "bool", str: "str"}.get(ann, "Any")

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return "() -> Tensor"
    params = ", ".join("%s %s" % (t(p.annotation), p.name) for p in sig.parameters.values())
    return "(%s) -> %s" % (params, t(sig.return_annotation))


# The few values of faked libraries that vLLM's import-time code checks (not the parser itself).
SPECIAL = {
    "torch.iinfo": lambda dtype: argparse.Namespace(min=-(1 << 63), max=(1 << 63) - 1),
    "torch.library.infer_schema": lambda fn, *a, **k: _infer_schema(fn),
    # a CUDA build of torch: no other accelerator
    "torch.cuda.is_available": lambda: True,
    "torch.version.hip": None,
    "torch.xpu.is_available": lambda: False,
    "torch.distributed.is_xccl_available": lambda: False,
    "torch.backends.mps.is_available": lambda: False,
}


def _gpu():
    """The GPU the rig's runtime hook describes in --gpus containers (else a V100-like default)."""
    try:
        with open("/etc/gpucluster-rig/gpus.json") as f:
            g = json.load(f)
    except (OSError, ValueError):
        g = {}
    cc = tuple(int(x) for x in str(g.get("compute_capability", "7.0")).split("."))
    mem = int(g.get("memory_mib", 16160)) << 20
    return {"count": max(1, int(g.get("count", 1))), "cc": cc, "name": g.get("name", "Tesla V100-PCIE-16GB"),
            "mem": mem}


for _nvml in ("pynvml", "vllm.third_party.pynvml"):  # NVIDIA GPUs, so that vLLM picks its CUDA platform
    SPECIAL[_nvml + ".nvmlDeviceGetCount"] = lambda: _gpu()["count"]
    SPECIAL[_nvml + ".nvmlDeviceGetCudaComputeCapability"] = lambda h: _gpu()["cc"]
    SPECIAL[_nvml + ".nvmlDeviceGetName"] = lambda h: _gpu()["name"]
    SPECIAL[_nvml + ".nvmlDeviceGetMemoryInfo"] = lambda h: argparse.Namespace(
        total=_gpu()["mem"], free=_gpu()["mem"], used=0)
SPECIAL["torch.cuda.device_count"] = lambda: _gpu()["count"]
SPECIAL["torch.cuda.get_device_capability"] = lambda *a, **k: _gpu()["cc"]
SPECIAL["torch.cuda.get_device_name"] = lambda *a, **k: _gpu()["name"]


class _FakeModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        path = "%s.%s" % (self.__name__, name)
        child = SPECIAL[path] if path in SPECIAL else _fake_class(path, self.__name__)
        setattr(self, name, child)
        return child


# vLLM's own ctypes binding of the NVIDIA driver's NVML (the rig has no driver library): faked like pynvml;
# install() adds the release's compiled modules.
FAKED_VLLM = {"vllm.third_party.pynvml"}

# Not installed in vLLM's CUDA image either: other accelerators' libraries (vLLM probes them to pick its
# platform) and documentation tooling. Importing them fails as it would there.
ABSENT = {"libtpu", "tpu_inference", "torch_xla", "amdsmi", "intel_extension_for_pytorch",
          "oneccl_bindings_for_pytorch", "transformers_neuronx", "neuronx_distributed_inference", "neuronxcc",
          "habana_frameworks", "torch_npu", "vllm_omni", "sphinx", "mkdocs"}


class _FakeFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """First on sys.meta_path: every top-level name that is neither the standard library, vllm, nor a real
    dependency in deps/ is answered with a fake module (and so are all its submodules)."""

    def __init__(self, real):
        self.real = real
        self.faked = set()

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.split(".")[0]
        if top in self.real and fullname not in FAKED_VLLM:
            return None
        if top in ABSENT:
            raise ModuleNotFoundError("No module named %r" % fullname, name=fullname)
        self.faked.add(fullname if top == "vllm" else top)
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        m = _FakeModule(spec.name)
        m.__path__ = []
        m.__file__ = "/gcrig-fake/%s.py" % spec.name.replace(".", "/")
        m.__version__ = "0.0.0+gcrig.fake"
        return m

    def exec_module(self, module):
        pass


def real_top_level():
    real = set(sys.stdlib_module_names) | {"vllm", "_distutils_hack", "_sysconfigdata__linux_x86_64-linux-gnu"}
    for d in (DEPS,):
        if os.path.isdir(d):
            for n in os.listdir(d):
                if n.endswith(".py"):
                    real.add(n[:-3])
                elif os.path.isdir(os.path.join(d, n)) and not n.endswith((".dist-info", ".data")):
                    real.add(n)
                elif n.endswith(".so"):
                    real.add(n.split(".")[0])
    return real


def compiled_modules():
    """The release's compiled extension modules (vllm._C, ...): named by rig setup from the wheel's .so files;
    they need CUDA and torch's C++ ABI, so they are faked like torch."""
    p = os.path.join(SRC, "gcrig-compiled-modules.txt")
    return set(open(p).read().split()) if os.path.exists(p) else set()


def install():
    # only this image's real vLLM source and deps/: not the stand-in `vllm` in dist-packages, nor the
    # image's other site packages
    sys.path[:] = [SRC, DEPS] + [p for p in sys.path if "-packages" not in p and p not in ("", HERE)]
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]
    FAKED_VLLM.update(compiled_modules())
    finder = _FakeFinder(real_top_level())
    sys.meta_path.insert(0, finder)
    return finder


# ------------------------------------------------------------------ running vLLM's own entry points


class Captured(BaseException):
    def __init__(self, args):
        self.args_ns = args


def _dispatch_capture(fn):
    def capture(args):
        c = Captured(args)
        c.dispatch = getattr(fn, "__qualname__", repr(fn))
        raise c
    return capture


def run_cli(argv):
    """The `vllm` console script named in the release's entry_points.txt, run for real up to the point where
    it dispatches to the sub-command (parsing and the sub-command's validation included)."""
    ep = None
    for d in os.listdir(SRC):
        if d.startswith("vllm-") and d.endswith(".dist-info"):
            p = os.path.join(SRC, d, "entry_points.txt")
            if os.path.exists(p):
                section = None
                for line in open(p):
                    line = line.strip()
                    if line.startswith("["):
                        section = line
                    elif section == "[console_scripts]" and line.split("=")[0].strip() == "vllm":
                        ep = line.split("=", 1)[1].strip()
    if not ep:
        sys.stderr.write("vllm: command not found (this release has no `vllm` console script)\n")
        return 127
    orig = argparse.ArgumentParser.set_defaults

    def set_defaults(self, **kw):
        if "dispatch_function" in kw:
            kw["dispatch_function"] = _dispatch_capture(kw["dispatch_function"])
        return orig(self, **kw)

    argparse.ArgumentParser.set_defaults = set_defaults
    mod, fn = ep.split(":")
    sys.argv = ["vllm"] + list(argv)
    try:
        getattr(importlib.import_module(mod), fn)()
    except Captured as c:
        c.args_ns.gcrig_dispatch = c.dispatch
        return c.args_ns
    return 0  # e.g. `vllm --help`, or no sub-command: vLLM printed what it prints


def run_api_server(argv):
    """`python3 -m vllm.entrypoints.openai.api_server ARGV`: the module's own __main__ block, stopped where
    it starts the server; releases whose module defines parse_args() (0.3.x): that function."""
    name = "vllm.entrypoints.openai.api_server"
    path = os.path.join(SRC, *name.split(".")) + ".py"
    sys.argv = [path] + list(argv)
    text = open(path).read()
    if "\ndef parse_args(" in text:
        return importlib.import_module(name).parse_args()
    uvloop = importlib.import_module("uvloop")

    def run(coro, *a, **k):
        coro.close()
        raise Captured(sys._getframe(1).f_locals["args"])  # the __main__ block's (or its main()'s) args

    uvloop.run = run
    try:
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    except Captured as c:
        return c.args_ns
    sys.stderr.write("realparse: %s's __main__ returned without starting the server\n" % name)
    return 70


def check_env():
    """What the release does with VLLM_PORT, read the way it reads it (vllm.envs): Kubernetes' service
    variables (VLLM_PORT=tcp://...) make it fail as it does."""
    if "VLLM_PORT" not in os.environ:
        return
    envs = importlib.import_module("vllm.envs")
    if "VLLM_PORT" in getattr(envs, "environment_variables", {}):
        getattr(envs, "VLLM_PORT")


def jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple, set)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if hasattr(v, "value") and isinstance(getattr(v, "value"), (str, int, float)):  # enums
        return v.value
    return repr(v)


def selftest(modes):
    """Run by `rig setup` in the freshly built image (also writes the bytecode the image keeps): per mode, a
    good command line parses (tensor parallel 2 read back, the model registry loads) and an unknown flag is
    refused by vLLM's parser with status 2. Prints a JSON summary; exit status 1 if anything is off."""
    import subprocess
    import tempfile
    import time
    report, ok = {}, True
    for mode in modes:
        good = (["serve", "/m"] if mode == "cli" else ["--model", "/m"]) + ["--tensor-parallel-size", "2"]
        out = tempfile.mktemp(suffix=".json")
        t = time.monotonic()
        r = subprocess.run([sys.executable, __file__, mode] + good, capture_output=True, text=True,
                           env=dict(os.environ, GCRIG_REALPARSE_OUT=out))
        took = round(time.monotonic() - t, 2)
        d = json.load(open(out)) if r.returncode == 0 and os.path.exists(out) else {}
        bad = subprocess.run([sys.executable, __file__, mode] + good + ["--gcrig-not-a-flag"],
                             capture_output=True, text=True)
        rep = {"rc": r.returncode, "seconds": took, "tp": d.get("args", {}).get("tensor_parallel_size"),
               "architectures": len(d.get("architectures") or []), "faked": d.get("faked"),
               "bad_flag_rc": bad.returncode, "bad_flag_refused": "unrecognized arguments" in bad.stderr}
        good_ok = r.returncode == 0 and rep["tp"] == 2 and rep["architectures"] > 0
        if not (good_ok and bad.returncode == 2 and rep["bad_flag_refused"]):
            ok = False
            rep["stderr"] = r.stderr[-3000:] + bad.stderr[-1500:]
        report[mode] = rep
    print(json.dumps(report))
    return 0 if ok else 1


def main():
    if sys.argv[1] == "selftest":
        return selftest(sys.argv[2:])
    mode, argv = sys.argv[1], sys.argv[2:]
    finder = install()
    warnings.simplefilter("ignore")
    try:
        result = run_cli(argv) if mode == "cli" else run_api_server(argv)
    except SystemExit as e:  # argparse errors, --help, --version
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(result, int):
        return result
    out = {k: jsonable(v) for k, v in vars(result).items() if not callable(v) or isinstance(v, type)}
    check_env()
    payload = {"args": out, "dispatch": out.pop("gcrig_dispatch", None), "architectures": None,
               "architectures_error": None}
    try:  # the model architectures this release supports: its model registry
        from vllm.model_executor.models import ModelRegistry
        payload["architectures"] = sorted(ModelRegistry.get_supported_archs())
    except Exception as e:  # rig setup's self-test makes sure this does not happen
        payload["architectures_error"] = "%s: %s" % (type(e).__name__, e)
    payload["faked"] = sorted(finder.faked)
    dest = os.environ.get("GCRIG_REALPARSE_OUT")
    if dest:
        with open(dest, "w") as f:
            json.dump(payload, f)
    else:
        sys.stdout.write(json.dumps(payload) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
