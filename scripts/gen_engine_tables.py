#!/usr/bin/env python3
"""Generate cluster/knowledge/vllm/<version>.json from vLLM's released wheels.

    python scripts/gen_engine_tables.py [VERSION ...]

    python scripts/gen_engine_tables.py --all [--reuse] [VERSION ...]

--all: every release on PyPI >= 0.3.0 (post releases included; the PEP 503 page
https://pypi.org/simple/vllm/ gives versions, upload dates and yanked marks; a release without a
CPython 3.11 linux x86_64 wheel, or yanked, is listed under "skipped" with the reason) into ONE
compact file cluster/knowledge/vllm/releases.json, read by cluster/knowledge/releases.py: pools of
distinct flag definitions / aliases / env var names / architectures, per release the pool ids as
"a-b,c" ranges plus the traits (entrypoint, pipeline_parallel, executor, multi_node,
engine_generation, v1_below_cc80; a fact not derivable is null and null_reasons says why).
Each wheel is downloaded once; only a slim copy (vllm/**/*.py + dist-info, a few MB) is kept in
$GPUCLUSTER_WHEEL_CACHE/src and the wheel is deleted unless GPUCLUSTER_KEEP_WHEELS=1.

With no version: 0.3.0 0.6.3 0.10.1.1 and the newest vLLM release on PyPI
(`pip index versions vllm`).  Each wheel is downloaded once with
`pip download --no-deps --only-binary=:all:` (linux x86_64, CPython 3.11 tags)
into $GPUCLUSTER_WHEEL_CACHE (default ~/.cache/gpucluster-wheels), never into
the repository.  The Python source inside the wheel is read with zipfile and
`ast`; vLLM is never installed or imported.

Flags are what the OpenAI API server's parser accepts: `make_arg_parser` in
vllm/entrypoints/openai/cli_args.py (vllm/entrypoints/common/cli_args.py in
newer releases) or `parse_args` in vllm/entrypoints/openai/api_server.py
(0.3.x), plus the flags that the `vllm serve` subcommand adds on top (e.g.
`--config` in 0.6.x).  The parser-building code is run by a small, side-effect
free interpreter over the AST: it follows `add_argument`,
`add_argument_group`, `EngineArgs.add_cli_args`, `FrontendArgs.add_cli_args`,
and re-implements vLLM's `get_kwargs(ConfigDataclass)` (argparse kwargs derived
from dataclass field annotations: bool -> BooleanOptionalAction, Literal ->
choices, list/tuple -> nargs, int/float/str -> type, ...).

Per-flag entry:
  value   false for bare flags (store_true/store_false/store_const/count and
          both spellings of BooleanOptionalAction, whose `--no-x` form is a
          flag of its own), true otherwise (nargs "?" = value optional)
  choices CLI-spellable choices (a `None` choice, which no command line can
          produce, is dropped), or null
  type    "str" | "int" | "float" | "bool" for builtin converters (wrappers
          such as optional_type()/nullable_str unwrapped), "json" for
          json.loads-style converters, else the converter's name
          (e.g. "human_readable_int", "union_dict_and_str"); null if none
  nargs   argparse nargs (int or "?", "+", "*") or null
"""

from __future__ import annotations

import argparse
import ast
import html.parser
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "cluster" / "knowledge" / "vllm"
CACHE = Path(os.environ.get("GPUCLUSTER_WHEEL_CACHE", "~/.cache/gpucluster-wheels")).expanduser()
DEFAULT_VERSIONS = ["0.3.0", "0.6.3", "0.10.1.1"]
PLATFORMS = [
    "manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
    "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64",
    "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
]
REQUIRES = ["torch", "transformers", "ray", "xformers", "huggingface-hub"]
ENV_RE = re.compile(r"^(VLLM_[A-Z0-9_]+|HOST_IP)$")


# --------------------------------------------------------------------------- wheels

def newest_version() -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "vllm"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"^vllm \(([^)]+)\)", out, re.M)
    if not m:
        raise SystemExit("cannot find the newest vllm version in `pip index versions vllm` output")
    return m.group(1)


def find_wheel(version: str) -> Path | None:
    hits = sorted(CACHE.glob(f"vllm-{version}-*.whl"))
    return hits[0] if hits else None


def fetch_wheel(version: str) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    if REPO in CACHE.resolve().parents or CACHE.resolve() == REPO:
        raise SystemExit(f"wheel cache {CACHE} must be outside the repository")
    whl = find_wheel(version)
    if whl:
        return whl
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"vllm=={version}", "-d", str(CACHE), "--python-version", "3.11",
           "--implementation", "cp"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    whl = find_wheel(version)
    if not whl:
        raise SystemExit(f"pip download did not leave a wheel for vllm=={version} in {CACHE}")
    return whl


SLIM_SUFFIX = ".py.zip"


class Wheel:
    """A vLLM wheel, or its slim copy (`<wheel name>.py.zip`: the Python files and dist-info)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.zip = zipfile.ZipFile(path)
        self.names = set(self.zip.namelist())
        self._ast: dict[str, ast.Module | None] = {}
        name = self.path.name
        self.wheel_name = name[: -len(SLIM_SUFFIX)] if name.endswith(SLIM_SUFFIX) else name

    def read(self, name: str) -> str:
        return self.zip.read(name).decode("utf-8", "replace")

    def module_file(self, mod: str) -> str | None:
        base = mod.replace(".", "/")
        for cand in (base + ".py", base + "/__init__.py"):
            if cand in self.names:
                return cand
        return None

    def is_package(self, mod: str) -> bool:
        return mod.replace(".", "/") + "/__init__.py" in self.names

    def tree(self, mod: str) -> ast.Module | None:
        if mod not in self._ast:
            f = self.module_file(mod)
            try:
                self._ast[mod] = ast.parse(self.read(f)) if f else None
            except SyntaxError:
                self._ast[mod] = None
        return self._ast[mod]

    def dist_info(self, fname: str) -> str | None:
        for n in self.names:
            if n.endswith(".dist-info/" + fname) and n.count("/") == 1:
                return self.read(n)
        return None

    def py_files(self):
        return sorted(n for n in self.names if n.startswith("vllm/") and n.endswith(".py"))


# --------------------------------------------------------------------------- interpreter values

class _Unknown:
    def __repr__(self):
        return "UNKNOWN"


UNKNOWN = _Unknown()


class Ext:
    """A name from outside the wheel (builtins, typing, argparse, json, ...)."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Ext({self.name})"

    def __eq__(self, o):
        return isinstance(o, Ext) and o.name == self.name

    def __hash__(self):
        return hash(("Ext", self.name))


class ModRef:
    def __init__(self, name):
        self.name = name


class ClassRef:
    def __init__(self, mod, node):
        self.mod, self.node, self.name = mod, node, node.name

    def __repr__(self):
        return f"Class({self.mod}.{self.name})"

    def __eq__(self, o):
        return isinstance(o, ClassRef) and o.node is self.node

    def __hash__(self):
        return id(self.node)


class FuncRef:
    def __init__(self, mod, node, owner=None, bound=None):
        self.mod, self.node, self.name = mod, node, node.name
        self.owner = owner      # ClassRef the function was defined in
        self.bound = bound      # value for the first parameter (cls) or None


class SuperRef:
    def __init__(self, cls, bound):
        self.cls, self.bound = cls, bound


class Generic:
    """A subscripted type: Literal[...], Optional[...], list[...], ..."""

    def __init__(self, origin, args):
        self.origin, self.args = origin, args


class UnionT:
    def __init__(self, args):
        self.args = args


class Conv:
    """A converter built by a call we do not run (optional_type(int), ...)."""

    def __init__(self, name):
        self.name = name


class EnumMember:
    def __init__(self, name, value):
        self.name, self.value = name, value


class Return(Exception):
    def __init__(self, value):
        self.value = value


class Parser:
    def __init__(self, interp, kind="argparse"):
        self.interp = interp
        self.kind = kind
        self.flags: dict[str, dict] = {}
        self.aliases: dict[str, str] = {}
        self.subparsers: dict[str, Parser] = {}
        interp.parsers.append(self)

    def add_argument(self, *names, **kw):
        opts = [n for n in names if isinstance(n, str) and n.startswith("-")]
        if not opts:
            return UNKNOWN          # positional argument (model_tag)
        longs = [o for o in opts if o.startswith("--")]
        canon = longs[0] if longs else opts[0]
        action = kw.get("action")
        aname = action if isinstance(action, str) else getattr(action, "name", None) or getattr(action, "__name__", None)
        nargs = kw.get("nargs")
        if nargs is UNKNOWN:
            nargs = None
        bare_actions = {"store_true", "store_false", "store_const", "count", "help", "version",
                        "append_const"}
        boolopt = aname is not None and aname.split(".")[-1] == "BooleanOptionalAction"
        value = not (aname in bare_actions or boolopt or nargs == 0)
        choices = kw.get("choices")
        if isinstance(choices, (list, tuple, set, dict)):
            choices = [c.value if isinstance(c, EnumMember) else c for c in choices]
            choices = [c for c in choices if c is not None]
            if not all(isinstance(c, (str, int, float, bool)) for c in choices):
                choices = None
            elif isinstance(kw.get("choices"), set):
                choices = sorted(choices, key=str)
        else:
            choices = None
        ctype = None if not value else type_name(kw.get("type"))
        if value and ctype is None:
            # argparse hands the raw string over (a lambda converter also takes a str);
            # vLLM's StoreBoolean action parses "true"/"false"
            ctype = "bool" if aname and "Boolean" in aname else "str"
        spec = {"value": value, "choices": choices or None, "type": ctype,
                "nargs": nargs if isinstance(nargs, (int, str)) else None}
        for o in opts:
            if o == canon:
                continue
            self.aliases[o] = canon
        self.flags[canon] = spec
        for o in longs[1:]:
            self.flags.setdefault(o, dict(spec))
        if boolopt:
            for o in longs:
                self.flags["--no-" + o[2:]] = {"value": False, "choices": None, "type": None, "nargs": None}
        return UNKNOWN

    def add_argument_group(self, *a, **kw):
        return self

    add_mutually_exclusive_group = add_argument_group

    def add_subparsers(self, *a, **kw):
        return _Subparsers(self)

    def add_parser(self, name, *a, **kw):   # via _Subparsers
        raise AttributeError


class _Subparsers:
    def __init__(self, parent):
        self.parent = parent

    def add_parser(self, name, *a, **kw):
        p = Parser(self.parent.interp, "sub")
        if isinstance(name, str):
            self.parent.subparsers[name] = p
        return p


def type_name(t):
    if t is None or t is UNKNOWN:
        return None
    if isinstance(t, Ext):
        n = t.name
        if n in ("builtins.int", "builtins.float", "builtins.str", "builtins.bool"):
            return n.split(".")[1]
        if n in ("json.loads",):
            return "json"
        return n.split(".")[-1]
    if isinstance(t, Conv):
        return t.name
    if isinstance(t, FuncRef):
        return {"nullable_str": "str"}.get(t.name, t.name)
    if isinstance(t, ClassRef):
        return t.name
    if isinstance(t, type):
        return t.__name__
    return None


SAFE_METHODS = {
    str: {"replace", "join", "split", "strip", "lower", "upper", "startswith", "endswith", "format",
          "rstrip", "lstrip", "removeprefix", "removesuffix"},
    list: {"append", "extend", "copy", "index", "count", "insert", "remove"},
    tuple: {"index", "count"},
    dict: {"items", "keys", "values", "get", "pop", "update", "copy", "setdefault"},
    set: {"add", "update", "union", "copy"},
}

BUILTIN_FUNCS = {
    "list": list, "tuple": tuple, "set": set, "sorted": sorted, "len": len, "dict": dict,
    "reversed": lambda x: list(reversed(x)), "frozenset": frozenset, "enumerate": lambda x: list(enumerate(x)),
    "zip": lambda *a: list(zip(*a)), "any": any, "all": all, "min": min, "max": max,
}


def _permutations(it, r=None):
    import itertools
    return list(itertools.permutations(list(it), r))


# --------------------------------------------------------------------------- interpreter

class Interp:
    """Evaluates the argparse-building parts of vLLM's source without running vLLM."""

    MAX_DEPTH = 40

    def __init__(self, wheel: Wheel):
        self.w = wheel
        self.parsers: list[Parser] = []
        self._global_cache: dict = {}
        self._busy: set = set()
        self.depth = 0
        self.src_compute_kwargs = ""   # source of vLLM's _compute_kwargs (feature detection)
        self.unresolved_kwargs: list[str] = []

    # ---------------------------------------------------------------- name lookup
    def resolve_module(self, mod, level, name):
        if level:
            parts = mod.split(".")
            pkg = parts if self.w.is_package(mod) else parts[:-1]
            pkg = pkg[: len(pkg) - (level - 1)]
            return ".".join(pkg + ([name] if name else []))
        return name

    def lookup(self, mod: str, name: str):
        key = (mod, name)
        if key in self._global_cache:
            return self._global_cache[key]
        if key in self._busy:
            return UNKNOWN
        self._busy.add(key)
        try:
            val = self._lookup(mod, name)
        finally:
            self._busy.discard(key)
        self._global_cache[key] = val
        return val

    def _top_stmts(self, body):
        for st in body:
            if isinstance(st, ast.If):
                # `if TYPE_CHECKING:` blocks and platform branches: look in both arms
                yield from self._top_stmts(st.body)
                yield from self._top_stmts(st.orelse)
            elif isinstance(st, ast.Try):
                yield from self._top_stmts(st.body)
                for h in st.handlers:
                    yield from self._top_stmts(h.body)
                yield from self._top_stmts(st.orelse)
            else:
                yield st

    def _lookup(self, mod, name):
        tree = self.w.tree(mod)
        if tree is None:
            return Ext(f"{mod}.{name}")
        found = None
        for st in self._top_stmts(tree.body):
            if isinstance(st, ast.ClassDef) and st.name == name:
                found = ("class", st)
            elif isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)) and st.name == name:
                if found is None or found[0] != "func":   # first def wins over @overload stubs? keep last
                    pass
                found = ("func", st)
            elif isinstance(st, ast.Assign):
                for t in st.targets:
                    if isinstance(t, ast.Name) and t.id == name:
                        found = ("expr", st.value)
            elif isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and st.target.id == name:
                if st.value is not None:
                    found = ("expr", st.value)
            elif isinstance(st, ast.ImportFrom):
                for a in st.names:
                    if (a.asname or a.name) == name:
                        found = ("from", self.resolve_module(mod, st.level, st.module), a.name)
            elif isinstance(st, ast.Import):
                for a in st.names:
                    if a.asname == name:
                        found = ("mod", a.name)
                    elif a.asname is None and a.name.split(".")[0] == name:
                        found = ("mod", name)
        if found is None:
            if self.w.is_package(mod) and self.w.module_file(f"{mod}.{name}"):
                return ModRef(f"{mod}.{name}")
            return UNKNOWN
        kind = found[0]
        if kind == "class":
            return ClassRef(mod, found[1])
        if kind == "func":
            return FuncRef(mod, found[1])
        if kind == "expr":
            return self.ev(found[1], mod, {})
        if kind == "mod":
            return ModRef(found[1]) if self.w.module_file(found[1]) else Ext(found[1])
        src, attr = found[1], found[2]
        if self.w.module_file(src) is None:
            if self.w.module_file(f"{src}.{attr}"):
                return ModRef(f"{src}.{attr}")
            return Ext(f"{src}.{attr}")
        if self.w.module_file(f"{src}.{attr}") and self.w.is_package(src):
            v = self.lookup(src, attr)
            return v if v is not UNKNOWN else ModRef(f"{src}.{attr}")
        return self.lookup(src, attr)

    def class_bases(self, c: ClassRef):
        out = []
        for b in c.node.bases:
            v = self.ev(b, c.mod, {})
            if isinstance(v, Generic):
                v = v.origin
            out.append(v)
        return out

    def class_attr(self, c: ClassRef, attr: str, bound=None, _seen=None):
        _seen = _seen or set()
        if id(c.node) in _seen:
            return UNKNOWN
        _seen.add(id(c.node))
        for st in c.node.body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)) and st.name == attr:
                decos = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in st.decorator_list}
                if "staticmethod" in decos:
                    return FuncRef(c.mod, st, owner=c)
                if "classmethod" in decos:
                    return FuncRef(c.mod, st, owner=c, bound=bound or c)
                if isinstance(bound, ClassRef):   # plain method looked up on a class: unbound
                    return FuncRef(c.mod, st, owner=c)
                if "property" in decos:
                    return UNKNOWN
                return FuncRef(c.mod, st, owner=c, bound=bound)
            if isinstance(st, ast.Assign):
                for t in st.targets:
                    if isinstance(t, ast.Name) and t.id == attr:
                        if self.is_enum(c):
                            return EnumMember(attr, self.ev(st.value, c.mod, {}))
                        return self.ev(st.value, c.mod, {})
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and st.target.id == attr:
                if st.value is None:
                    return UNKNOWN
                return self.field_default(st.value, c.mod)
        for b in self.class_bases(c):
            if isinstance(b, ClassRef):
                v = self.class_attr(b, attr, bound=bound, _seen=_seen)
                if v is not UNKNOWN:
                    return v
        return UNKNOWN

    def field_default(self, node, mod):
        if isinstance(node, ast.Call):
            fn = node.func
            fname = fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", "")
            if fname in ("field", "Field"):
                for k in node.keywords:
                    if k.arg == "default":
                        return self.ev(k.value, mod, {})
                return UNKNOWN
        return self.ev(node, mod, {})

    def is_enum(self, c: ClassRef, depth=0):
        if depth > 10:
            return False
        for b in self.class_bases(c):
            if isinstance(b, Ext) and b.name.split(".")[-1] in ("Enum", "StrEnum", "IntEnum"):
                return True
            if isinstance(b, ClassRef) and self.is_enum(b, depth + 1):
                return True
        return False

    def enum_members(self, c: ClassRef):
        out = []
        for st in c.node.body:
            if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name):
                n = st.targets[0].id
                if n.startswith("_"):
                    continue
                v = self.ev(st.value, c.mod, {})
                if isinstance(v, Ext) and v.name.endswith("auto"):
                    v = n.lower()
                out.append(EnumMember(n, v))
        return out

    def is_dataclass(self, c: ClassRef, depth=0):
        for d in c.node.decorator_list:
            f = d.func if isinstance(d, ast.Call) else d
            n = f.id if isinstance(f, ast.Name) else getattr(f, "attr", "")
            if n in ("dataclass", "config"):
                return True
        if depth < 10:
            for b in self.class_bases(c):
                if isinstance(b, ClassRef) and self.is_dataclass(b, depth + 1):
                    return True
        return False

    def is_dict_subclass(self, c: ClassRef, depth=0):
        for b in self.class_bases(c):
            if isinstance(b, Ext) and b.name in ("builtins.dict",):
                return True
            if isinstance(b, Ext) and b.name.split(".")[-1] == "TypedDict":
                return False
            if isinstance(b, ClassRef) and depth < 10 and self.is_dict_subclass(b, depth + 1):
                return True
        return False

    # ---------------------------------------------------------------- expressions
    def name(self, n, mod, env):
        if n in env:
            return env[n]
        v = self.lookup(mod, n)
        if v is UNKNOWN:
            if n in BUILTIN_FUNCS or n in ("int", "float", "str", "bool", "bytes", "object", "type",
                                           "print", "isinstance", "getattr", "super", "Ellipsis"):
                return Ext(f"builtins.{n}")
            if n in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[n]
        return v

    def ev(self, node, mod, env):
        try:
            return self._ev(node, mod, env)
        except Return:
            raise
        except RecursionError:
            return UNKNOWN
        except Exception:
            return UNKNOWN

    def _ev(self, node, mod, env):
        E = lambda n: self.ev(n, mod, env)  # noqa: E731
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, str) and v and getattr(node, "_annotation", False):
                return v
            return v
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            out = []
            for e in node.elts:
                if isinstance(e, ast.Starred):
                    v = E(e.value)
                    if isinstance(v, ClassRef) and self.is_enum(v):
                        v = self.enum_members(v)
                    if not isinstance(v, (list, tuple, set, dict)):
                        return UNKNOWN
                    out.extend(v)
                else:
                    out.append(E(e))
            if isinstance(node, ast.Tuple):
                return tuple(out)
            if isinstance(node, ast.Set):
                try:
                    return set(out)
                except TypeError:
                    return UNKNOWN
            return out
        if isinstance(node, ast.Dict):
            out = {}
            for k, v in zip(node.keys, node.values):
                if k is None:
                    d = E(v)
                    if isinstance(d, dict):
                        out.update(d)
                    continue
                kk = E(k)
                try:
                    out[kk] = E(v)
                except TypeError:
                    pass
            return out
        if isinstance(node, ast.Name):
            return self.name(node.id, mod, env)
        if isinstance(node, ast.Attribute):
            base = E(node.value)
            return self.getattr(base, node.attr)
        if isinstance(node, ast.Subscript):
            base = E(node.value)
            sl = node.slice
            if isinstance(base, (Ext, ClassRef)) and not isinstance(base, dict):
                if isinstance(sl, ast.Tuple):
                    args = [E(e) for e in sl.elts]
                else:
                    args = [E(sl)]
                return Generic(base, args)
            idx = E(sl)
            if isinstance(base, (list, tuple, str, dict)):
                return base[idx]
            return UNKNOWN
        if isinstance(node, ast.Slice):
            return slice(E(node.lower) if node.lower else None, E(node.upper) if node.upper else None,
                         E(node.step) if node.step else None)
        if isinstance(node, ast.BinOp):
            a, b = E(node.left), E(node.right)
            if isinstance(node.op, ast.BitOr) and not (isinstance(a, (int, set, dict)) and isinstance(b, (int, set, dict))):
                return UnionT([a, b])
            if a is UNKNOWN or b is UNKNOWN:
                return UNKNOWN
            ops = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y,
                   ast.Mod: lambda x, y: x % y, ast.BitOr: lambda x, y: x | y,
                   ast.FloorDiv: lambda x, y: x // y, ast.Div: lambda x, y: x / y,
                   ast.Pow: lambda x, y: x ** y, ast.LShift: lambda x, y: x << y}
            f = ops.get(type(node.op))
            return f(a, b) if f else UNKNOWN
        if isinstance(node, ast.UnaryOp):
            v = E(node.operand)
            if v is UNKNOWN:
                return UNKNOWN
            if isinstance(node.op, ast.Not):
                return not v
            if isinstance(node.op, ast.USub):
                return -v
            return UNKNOWN
        if isinstance(node, ast.BoolOp):
            vals = []
            for e in node.values:
                v = E(e)
                if v is UNKNOWN:
                    return UNKNOWN
                vals.append(v)
                if isinstance(node.op, ast.And) and not v:
                    return v
                if isinstance(node.op, ast.Or) and v:
                    return v
            return vals[-1]
        if isinstance(node, ast.Compare):
            left = E(node.left)
            for op, comp in zip(node.ops, node.comparators):
                right = E(comp)
                if left is UNKNOWN or right is UNKNOWN:
                    return UNKNOWN
                try:
                    r = {ast.Eq: lambda x, y: x == y, ast.NotEq: lambda x, y: x != y,
                         ast.In: lambda x, y: x in y, ast.NotIn: lambda x, y: x not in y,
                         ast.Is: lambda x, y: x is y, ast.IsNot: lambda x, y: x is not y,
                         ast.Lt: lambda x, y: x < y, ast.Gt: lambda x, y: x > y,
                         ast.LtE: lambda x, y: x <= y, ast.GtE: lambda x, y: x >= y}[type(op)](left, right)
                except Exception:
                    return UNKNOWN
                if not r:
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            t = E(node.test)
            if t is UNKNOWN:
                return E(node.body)
            return E(node.body) if t else E(node.orelse)
        if isinstance(node, ast.JoinedStr):
            parts = []
            for v in node.values:
                if isinstance(v, ast.Constant):
                    parts.append(str(v.value))
                else:
                    x = E(v.value)
                    if x is UNKNOWN or not isinstance(x, (str, int, float)):
                        return UNKNOWN
                    parts.append(str(x))
            return "".join(parts)
        if isinstance(node, (ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.DictComp)):
            return self.comp(node, mod, env)
        if isinstance(node, ast.Call):
            return self.call(node, mod, env)
        if isinstance(node, ast.Starred):
            return E(node.value)
        return UNKNOWN

    def iterable(self, v):
        if isinstance(v, ClassRef) and self.is_enum(v):
            return self.enum_members(v)
        if isinstance(v, (list, tuple, set, str, dict)):
            return list(v)
        if isinstance(v, type({}.items())) or isinstance(v, type({}.keys())) or isinstance(v, type({}.values())):
            return list(v)
        return None

    def comp(self, node, mod, env):
        results = []
        env = dict(env)

        def bind(target, value):
            if isinstance(target, ast.Name):
                env[target.id] = value
            elif isinstance(target, (ast.Tuple, ast.List)):
                vals = list(value) if isinstance(value, (list, tuple)) else [UNKNOWN] * len(target.elts)
                for t, v in zip(target.elts, vals):
                    bind(t, v)

        def rec(i):
            if i == len(node.generators):
                if isinstance(node, ast.DictComp):
                    results.append((self.ev(node.key, mod, env), self.ev(node.value, mod, env)))
                else:
                    results.append(self.ev(node.elt, mod, env))
                return
            g = node.generators[i]
            it = self.iterable(self.ev(g.iter, mod, env))
            if it is None:
                raise ValueError("not iterable")
            for x in it:
                bind(g.target, x)
                if all(self.ev(c, mod, env) is True for c in g.ifs):
                    rec(i + 1)

        try:
            rec(0)
        except ValueError:
            return UNKNOWN
        if isinstance(node, ast.DictComp):
            return dict(results)
        if isinstance(node, ast.SetComp):
            return set(results)
        return results

    def getattr(self, base, attr):
        if base is UNKNOWN:
            return UNKNOWN
        if isinstance(base, ModRef):
            return self.lookup(base.name, attr)
        if isinstance(base, Ext):
            if base.name == "sys" and attr == "argv":
                return []
            return Ext(f"{base.name}.{attr}")
        if isinstance(base, ClassRef):
            if attr == "__name__":
                return base.name
            if attr == "__doc__":
                return ""
            return self.class_attr(base, attr, bound=base)
        if isinstance(base, SuperRef):
            for b in self.class_bases(base.cls):
                if isinstance(b, ClassRef):
                    v = self.class_attr(b, attr, bound=base.bound)
                    if v is not UNKNOWN:
                        return v
            return UNKNOWN
        if isinstance(base, EnumMember):
            return {"value": base.value, "name": base.name}.get(attr, UNKNOWN)
        if isinstance(base, (Parser, _Subparsers)):
            return getattr(base, attr, None) or (lambda *a, **k: UNKNOWN)
        for typ, names in SAFE_METHODS.items():
            if isinstance(base, typ) and attr in names:
                return getattr(base, attr)
        return UNKNOWN

    def call(self, node, mod, env):
        fn = self.ev(node.func, mod, env)
        args = []
        for a in node.args:
            if isinstance(a, ast.Starred):
                v = self.ev(a.value, mod, env)
                it = self.iterable(v)
                if it is None:
                    return UNKNOWN
                args.extend(it)
            else:
                args.append(self.ev(a, mod, env))
        kwargs = {}
        for k in node.keywords:
            v = self.ev(k.value, mod, env)
            if k.arg is None:
                if isinstance(v, dict):
                    kwargs.update({str(kk): vv for kk, vv in v.items()})
                else:
                    self.unresolved_kwargs.append(ast.unparse(k.value))
            else:
                kwargs[k.arg] = v
        return self.apply(fn, args, kwargs, node, mod, env)

    def apply(self, fn, args, kwargs, node=None, mod=None, env=None):
        if fn is UNKNOWN or fn is None:
            return UNKNOWN
        if callable(fn) and not isinstance(fn, (Ext, ClassRef, FuncRef, ModRef)):
            # bound method of a real container / str, or a Parser method
            if any(a is UNKNOWN for a in args) and not isinstance(getattr(fn, "__self__", None), (Parser, _Subparsers)):
                return UNKNOWN
            return fn(*args, **kwargs)
        if isinstance(fn, Ext):
            short = fn.name.split(".")[-1]
            if fn.name == "builtins.super":
                cls = env.get("__class__") if env else None
                bound = env.get("__self__") if env else None
                return SuperRef(cls, bound) if isinstance(cls, ClassRef) else UNKNOWN
            if fn.name.startswith("builtins.") and short in BUILTIN_FUNCS:
                if len(args) == 1 and isinstance(args[0], ClassRef) and self.is_enum(args[0]):
                    args = [self.enum_members(args[0])]
                if any(a is UNKNOWN for a in args):
                    return UNKNOWN
                return BUILTIN_FUNCS[short](*args, **kwargs)
            if fn.name in ("builtins.int", "builtins.str", "builtins.float", "builtins.bool"):
                if len(args) == 1 and isinstance(args[0], (int, float, str, bool)):
                    return {"int": int, "str": str, "float": float, "bool": bool}[short](args[0])
                return UNKNOWN
            if short == "ArgumentParser" or fn.name.endswith("ArgumentParser"):
                return Parser(self)
            if fn.name.endswith("itertools.permutations"):
                return _permutations(*args, **kwargs) if all(a is not UNKNOWN for a in args) else UNKNOWN
            if short == "get_args":
                a = args[0] if args else UNKNOWN
                if isinstance(a, Generic):
                    return tuple(a.args)
                return UNKNOWN
            return UNKNOWN
        if isinstance(fn, ClassRef):
            if fn.name.endswith("ArgumentParser"):
                return Parser(self, "flexible" if fn.name == "FlexibleArgumentParser" else "argparse")
            return UNKNOWN
        if isinstance(fn, FuncRef):
            return self.call_func(fn, args, kwargs)
        return UNKNOWN

    # ---------------------------------------------------------------- functions and statements
    def call_func(self, fn: FuncRef, args, kwargs):
        name = fn.name
        if name in ("get_kwargs", "_compute_kwargs"):
            if not self.src_compute_kwargs:
                self.src_compute_kwargs = ast.unparse(fn.node)
                other = self.lookup(fn.mod, "_compute_kwargs")
                if isinstance(other, FuncRef):
                    self.src_compute_kwargs += ast.unparse(other.node)
                lk = self.lookup(fn.mod, "literal_to_kwargs")
                if isinstance(lk, FuncRef):
                    self.src_compute_kwargs += ast.unparse(lk.node)
            cls = args[0] if args else kwargs.get("cls")
            return self.dataclass_kwargs(cls) if isinstance(cls, ClassRef) else UNKNOWN
        if name in ("optional_type", "parse_type"):
            inner = args[0] if args else UNKNOWN
            t = type_name(inner)
            return Conv(t) if t else UNKNOWN
        if name in ("load_general_plugins", "pre_register_and_update"):
            return UNKNOWN
        if self.depth > self.MAX_DEPTH:
            return UNKNOWN
        env = {}
        params = fn.node.args
        pos = [a.arg for a in params.posonlyargs + params.args]
        allargs = list(args)
        if fn.bound is not None:
            allargs = [fn.bound] + allargs
        defaults = params.defaults
        for i, p in enumerate(pos):
            if i < len(allargs):
                env[p] = allargs[i]
            elif p in kwargs:
                env[p] = kwargs[p]
            else:
                di = i - (len(pos) - len(defaults))
                env[p] = self.ev(defaults[di], fn.mod, {}) if di >= 0 else UNKNOWN
        for a, d in zip(params.kwonlyargs, params.kw_defaults):
            env[a.arg] = kwargs.get(a.arg, self.ev(d, fn.mod, {}) if d is not None else UNKNOWN)
        if params.vararg:
            env[params.vararg.arg] = tuple(allargs[len(pos):])
        if params.kwarg:
            env[params.kwarg.arg] = {k: v for k, v in kwargs.items() if k not in pos}
        if fn.owner is not None:
            env["__class__"] = fn.owner
            env["__self__"] = fn.bound
        self.depth += 1
        try:
            self.exec_block(fn.node.body, fn.mod, env)
        except Return as r:
            return r.value
        finally:
            self.depth -= 1
        return None

    def assign(self, target, value, mod, env):
        if isinstance(target, ast.Name):
            env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            vals = list(value) if isinstance(value, (list, tuple)) and len(value) == len(target.elts) \
                else [UNKNOWN] * len(target.elts)
            for t, v in zip(target.elts, vals):
                self.assign(t, v, mod, env)
        elif isinstance(target, ast.Subscript):
            cont = self.ev(target.value, mod, env)
            key = self.ev(target.slice, mod, env)
            if isinstance(cont, dict) and key is not UNKNOWN:
                cont[key] = value
            elif isinstance(cont, list) and isinstance(key, int):
                try:
                    cont[key] = value
                except IndexError:
                    pass

    def exec_block(self, stmts, mod, env):
        for st in stmts:
            self.exec_stmt(st, mod, env)

    def exec_stmt(self, st, mod, env):
        if isinstance(st, ast.Return):
            raise Return(self.ev(st.value, mod, env) if st.value else None)
        if isinstance(st, ast.Assign):
            v = self.ev(st.value, mod, env)
            for t in st.targets:
                self.assign(t, v, mod, env)
        elif isinstance(st, ast.AnnAssign):
            if st.value is not None:
                self.assign(st.target, self.ev(st.value, mod, env), mod, env)
        elif isinstance(st, ast.AugAssign):
            cur = self.ev(st.target, mod, env)
            v = self.ev(st.value, mod, env)
            if isinstance(cur, list) and isinstance(st.op, ast.Add):
                it = self.iterable(v)
                if it is not None and all(x is not UNKNOWN for x in it):
                    cur.extend(it)         # in place, like list +=
                return
            if cur is UNKNOWN or v is UNKNOWN:
                self.assign(st.target, UNKNOWN, mod, env)
                return
            try:
                new = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y,
                       ast.BitOr: lambda x, y: x | y}[type(st.op)](cur, v)
            except Exception:
                new = UNKNOWN
            self.assign(st.target, new, mod, env)
        elif isinstance(st, ast.Delete):
            for t in st.targets:
                if isinstance(t, ast.Subscript):
                    cont = self.ev(t.value, mod, env)
                    key = self.ev(t.slice, mod, env)
                    if isinstance(cont, dict):
                        cont.pop(key, None)
        elif isinstance(st, ast.Expr):
            self.ev(st.value, mod, env)
        elif isinstance(st, ast.If):
            t = self.ev(st.test, mod, env)
            if t is UNKNOWN:
                self.exec_block(st.body, mod, env)
                self.exec_block(st.orelse, mod, env)
            elif t:
                self.exec_block(st.body, mod, env)
            else:
                self.exec_block(st.orelse, mod, env)
        elif isinstance(st, ast.For):
            it = self.iterable(self.ev(st.iter, mod, env))
            if it is not None:
                for x in it:
                    self.assign(st.target, x, mod, env)
                    self.exec_block(st.body, mod, env)
        elif isinstance(st, (ast.With, ast.AsyncWith)):
            self.exec_block(st.body, mod, env)
        elif isinstance(st, ast.Try):
            self.exec_block(st.body, mod, env)
            self.exec_block(st.orelse, mod, env)
            self.exec_block(st.finalbody, mod, env)
        elif isinstance(st, ast.ImportFrom):
            for a in st.names:
                src = self.resolve_module(mod, st.level, st.module)
                env[a.asname or a.name] = (self.lookup(src, a.name) if self.w.module_file(src)
                                           else Ext(f"{src}.{a.name}"))
        elif isinstance(st, ast.Import):
            for a in st.names:
                n = a.asname or a.name.split(".")[0]
                target = a.name if a.asname else a.name.split(".")[0]
                env[n] = ModRef(target) if self.w.module_file(target) else Ext(target)

    # ---------------------------------------------------------------- dataclass fields -> argparse kwargs
    def dataclass_fields(self, c: ClassRef, depth=0):
        fields: dict[str, ast.expr] = {}
        if depth < 10:
            for b in reversed(self.class_bases(c)):
                if isinstance(b, ClassRef) and self.is_dataclass(b):
                    fields.update(self.dataclass_fields(b, depth + 1))
        for st in c.node.body:
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                ann = ast.unparse(st.annotation)
                if ann.startswith(("ClassVar", "typing.ClassVar", "InitVar", "dataclasses.InitVar")):
                    continue
                fields[st.target.id] = (st.annotation, c.mod)
        return fields

    def hints(self, ann, mod, depth=0):
        """Flatten an annotation into a set of hint tuples (like vLLM's get_type_hints)."""
        if depth > 15:
            return {("other",)}
        v = ann
        if isinstance(ann, ast.AST):
            if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
                try:
                    ann = ast.parse(ann.value, mode="eval").body
                except SyntaxError:
                    return {("other",)}
            v = self.ev(ann, mod, {})
        return self.hints_of(v, depth)

    def hints_of(self, v, depth=0):
        if depth > 15:
            return {("other",)}
        if isinstance(v, str):   # forward reference in a string
            try:
                return self.hints(ast.parse(v, mode="eval").body, self._cur_mod, depth + 1)
            except SyntaxError:
                return {("other",)}
        if v is None:
            return {("none",)}
        if isinstance(v, UnionT):
            out = set()
            for a in v.args:
                out |= self.hints_of(a, depth + 1)
            return out
        if isinstance(v, Generic):
            o = v.origin
            on = o.name if isinstance(o, Ext) else getattr(o, "name", "")
            short = on.split(".")[-1]
            if short in ("Annotated", "SkipValidation", "InitVar"):
                return self.hints_of(v.args[0], depth + 1)
            if short == "Optional":
                return self.hints_of(v.args[0], depth + 1) | {("none",)}
            if short == "Union":
                out = set()
                for a in v.args:
                    out |= self.hints_of(a, depth + 1)
                return out
            if short == "Literal":
                vals = []
                for a in v.args:
                    if isinstance(a, EnumMember):
                        a = a.value
                    inner = self.hints_of(a, depth + 1) if isinstance(a, Generic) else set()
                    if len(inner) == 1 and next(iter(inner))[0] == "literal":
                        vals.extend(next(iter(inner))[1])    # Literal["auto", OtherLiteral] is flat
                    else:
                        vals.append(a)
                return {("literal", tuple(vals))}
            if short in ("list", "List", "Sequence", "MutableSequence"):
                return {("list", self._elem(v.args[0] if v.args else UNKNOWN, depth))}
            if short in ("set", "Set", "frozenset", "FrozenSet", "AbstractSet"):
                return {("set", self._elem(v.args[0] if v.args else UNKNOWN, depth))}
            if short in ("tuple", "Tuple"):
                ell = any(a is Ellipsis or (isinstance(a, Ext) and a.name == "builtins.Ellipsis") for a in v.args)
                n = len([a for a in v.args if a is not Ellipsis])
                return {("tuple", self._elem(v.args[0] if v.args else UNKNOWN, depth), "+" if ell else n)}
            if short in ("dict", "Dict", "Mapping", "MutableMapping"):
                return {("dict",)}
            if short in ("type", "Type"):
                return {("builtin-other",)}
            if isinstance(o, ClassRef):
                return self.hints_of(o, depth + 1)
            return {("other",)}
        if isinstance(v, Ext):
            n = v.name
            short = n.split(".")[-1]
            if n.startswith("builtins."):
                if short in ("bool", "int", "float", "str", "dict", "list", "tuple", "set"):
                    return {(short,)} if short not in ("list", "set", "tuple") else {(short, "str", "+")} if short == "tuple" else {(short, "str")}
                return {("builtin-other",)}
            if short in ("Dict", "Mapping"):
                return {("dict",)}
            if short in ("List",):
                return {("list", "str")}
            return {("other",)}
        if isinstance(v, ClassRef):
            if self.is_dataclass(v):
                return {("dataclass", v.name)}
            if self.is_dict_subclass(v):
                return {("dict",)}
            return {("other",)}
        return {("other",)}

    def _elem(self, a, depth):
        hs = self.hints_of(a, depth + 1)
        kinds = {h[0] for h in hs}
        if len(hs) > 1:
            return "str" if "str" in kinds else "str"
        h = next(iter(hs))
        if h[0] in ("int", "float", "str", "bool"):
            return h[0]
        if h[0] == "literal":
            return ("literal", h[1])
        return "str"

    def dataclass_kwargs(self, cls: ClassRef) -> dict:
        src = self.src_compute_kwargs
        optional_flag_case = "type(None)}" in src and "bool, str" in src
        sort_literals = "sorted(options)" in src
        out = {}
        for name, (ann, mod) in self.dataclass_fields(cls).items():
            self._cur_mod = mod
            hs = self.hints(ann, mod)
            kinds = {h[0] for h in hs}
            kw: dict = {}
            lit = next((h for h in hs if h[0] == "literal"), None)
            if "dataclass" in kinds:
                kw["type"] = Conv("json")
            elif optional_flag_case and kinds == {"bool", "str", "none"}:
                kw.update(type=Ext("builtins.str"), nargs="?", const=True)
            elif "bool" in kinds:
                kw["action"] = Ext("argparse.BooleanOptionalAction")
            elif lit is not None:
                opts = list(lit[1])
                if sort_literals:
                    try:
                        opts = sorted(opts)
                    except TypeError:
                        pass
                kw["type"] = Ext(f"builtins.{type(opts[0]).__name__}") if opts else Ext("builtins.str")
                if "str" not in kinds:
                    kw["choices"] = opts
            elif kinds & {"tuple", "list", "set"}:
                h = next(h for h in hs if h[0] in ("tuple", "list", "set"))
                elem = h[1]
                if isinstance(elem, tuple) and elem[0] == "literal":
                    opts = sorted(elem[1]) if sort_literals else list(elem[1])
                    kw["type"] = Ext(f"builtins.{type(opts[0]).__name__}")
                    kw["choices"] = opts
                else:
                    kw["type"] = Ext(f"builtins.{elem}")
                kw["nargs"] = h[2] if h[0] == "tuple" else "+"
            elif "int" in kinds:
                kw["type"] = Ext("builtins.int")
                if name == "max_model_len" and "human_readable_int_or_auto" in src:
                    kw["type"] = Conv("human_readable_int_or_auto")
                elif name in ("max_model_len", "max_num_batched_tokens") or \
                        (f'"{name}"' in src and "human_readable_int" in src):
                    kw["type"] = Conv("human_readable_int")
            elif "float" in kinds:
                kw["type"] = Ext("builtins.float")
            elif "dict" in kinds and ("str" in kinds or "other" in kinds):
                kw["type"] = Conv("union_dict_and_str")
            elif "dict" in kinds:
                kw["type"] = Conv("json")
            else:
                kw["type"] = Ext("builtins.str")
            if "none" in kinds and "bool" not in kinds and kw.get("choices"):
                kw["choices"] = list(kw["choices"]) + [None]
            out[name] = kw
        return out


# --------------------------------------------------------------------------- extraction

def find_parser_builder(interp: Interp, w: Wheel):
    """The function that builds the OpenAI API server's parser, and how to call it."""
    cands = ["vllm.entrypoints.openai.cli_args", "vllm.entrypoints.common.cli_args",
             "vllm.entrypoints.launchers.cli_args"]
    # wherever `vllm serve` imports make_arg_parser from (it moved between releases)
    serve = w.tree("vllm.entrypoints.cli.serve")
    for st in ast.walk(serve) if serve else []:
        if isinstance(st, ast.ImportFrom) and st.module and any(a.name == "make_arg_parser" for a in st.names):
            cands.append(interp.resolve_module("vllm.entrypoints.cli.serve", st.level, st.module))
    for mod in dict.fromkeys(cands):
        if w.module_file(mod):
            f = interp.lookup(mod, "make_arg_parser")
            if isinstance(f, FuncRef):
                return f, mod, True
    mod = "vllm.entrypoints.openai.api_server"
    f = interp.lookup(mod, "parse_args")
    if isinstance(f, FuncRef):
        return f, mod, False
    raise SystemExit("cannot find the OpenAI API server's argument parser")


def serve_extra_flags(interp: Interp, w: Wheel) -> tuple[bool, dict, dict]:
    """Whether `vllm serve` exists, and flags its subparser adds besides make_arg_parser."""
    ep = w.dist_info("entry_points.txt") or ""
    m = re.search(r"^\s*vllm\s*=\s*([\w.]+):(\w+)", ep, re.M)
    if not m:
        return False, {}, {}
    cands = ["vllm.entrypoints.cli.serve", m.group(1), "vllm.scripts"]
    flags, aliases, found = {}, {}, False
    for mod in cands:
        tree = w.tree(mod)
        if tree is None:
            continue
        src = ast.unparse(tree)
        if not re.search(r"""add_parser\(\s*['"]serve['"]""", src) and "ServeSubcommand" not in src:
            continue
        found = True
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            fsrc = ast.unparse(fn)
            if "add_parser" not in fsrc or ("'serve'" not in fsrc and '"serve"' not in fsrc
                                            and "self.name" not in fsrc):
                continue
            p = Parser(interp)
            for call in ast.walk(fn):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) \
                        and call.func.attr == "add_argument":
                    args = [interp.ev(a, mod, {}) for a in call.args]
                    kw = {k.arg: interp.ev(k.value, mod, {}) for k in call.keywords if k.arg}
                    p.add_argument(*args, **kw)
            flags.update(p.flags)
            aliases.update(p.aliases)
        break
    return found, flags, aliases


def flexible_underscores(w: Wheel, api_src: str) -> bool:
    if "FlexibleArgumentParser" not in api_src:
        return False
    for n in w.py_files():
        s = w.read(n)
        m = re.search(r"class FlexibleArgumentParser\b.*", s, re.S)
        if m and re.search(r"""replace\(\s*['"]_['"]\s*,\s*['"]-['"]\s*\)""", m.group(0)):
            return True
    return False


def env_vars(w: Wheel) -> list[str]:
    names: set[str] = set()
    for n in w.py_files():
        text = w.read(n)
        if n != "vllm/envs.py" and "environ" not in text and "getenv" not in text:
            continue            # no read of the environment can be in this file
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            # os.getenv("X"), os.environ.get("X"), environ.get("X", ...)
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                f = ast.unparse(node.func)
                if f.endswith(("getenv", "environ.get", "environ.setdefault")):
                    names.add(node.args[0].value)
            # os.environ["X"] being read
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) \
                    and ast.unparse(node.value).endswith("environ") \
                    and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                names.add(node.slice.value)
            # `"X" in os.environ` alone is not counted as a read: 0.10+ tests HOST_IP only
            # to warn that it is ignored.  Names that are tested and also read are caught above.
        if n == "vllm/envs.py":
            for node in ast.walk(tree):
                target = None
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    target = node.target.id
                elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                    target = node.targets[0].id
                if target == "environment_variables" and isinstance(node.value, ast.Dict):
                    for k in node.value.keys:
                        if isinstance(k, ast.Constant) and isinstance(k.value, str):
                            names.add(k.value)
    return sorted(x for x in names if ENV_RE.match(x))


def architectures(interp: Interp, w: Wheel) -> list[str]:
    mod = "vllm.model_executor.models.registry"
    if w.module_file(mod):
        allm = interp.lookup(mod, "_VLLM_MODELS")
        if not isinstance(allm, dict):
            raise SystemExit("cannot evaluate _VLLM_MODELS")
        names = set(allm)
        for internal in ("_SPECULATIVE_DECODING_MODELS", "_TRANSFORMERS_BACKEND_MODELS"):
            d = interp.lookup(mod, internal)
            if isinstance(d, dict):
                names -= set(d)
        return sorted(n for n in names if isinstance(n, str))
    d = interp.lookup("vllm.model_executor.models", "_MODELS")
    if not isinstance(d, dict):
        raise SystemExit("cannot evaluate _MODELS")
    return sorted(d)


def requires(w: Wheel) -> dict[str, str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    meta = w.dist_info("METADATA") or ""
    env = {"python_version": "3.11", "python_full_version": "3.11.0", "platform_system": "Linux",
           "platform_machine": "x86_64", "sys_platform": "linux", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    out: dict[str, str] = {}
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        try:
            req = Requirement(line.split(":", 1)[1].strip())
        except Exception:
            continue
        name = canonicalize_name(req.name)
        if name not in REQUIRES or name in out:
            continue
        if req.marker is not None and not req.marker.evaluate(env):
            continue          # extras-only or other-platform requirement
        spec = ",".join(sorted(str(s) for s in req.specifier))
        if name == "huggingface-hub" and not spec:
            continue
        out[name.replace("huggingface-hub", "huggingface_hub")] = spec
    return out


# --------------------------------------------------------------------------- traits

def _main_block(tree: ast.Module | None) -> ast.If | None:
    for st in (tree.body if tree else []):
        if isinstance(st, ast.If) and re.fullmatch(r"__name__ == ['\"]__main__['\"]", ast.unparse(st.test)):
            return st
    return None


def entrypoint_trait(w: Wheel, api_server_module: str | None, serve: bool) -> dict:
    """How a server is started: `python3 -m <api_server>` and/or `vllm serve`."""
    deprecated = False
    if api_server_module:
        main = _main_block(w.tree(api_server_module))
        deprecated = bool(main and "deprecat" in ast.unparse(main).lower())
    if serve and (api_server_module is None or deprecated):
        preferred = ["vllm", "serve"]
    elif api_server_module:
        preferred = ["python3", "-m", api_server_module]
    else:
        preferred = None
    return {"entrypoint": preferred, "api_server_deprecated": deprecated}


def _raise_message(node: ast.Raise) -> str | None:
    call = node.exc
    if not isinstance(call, ast.Call) or not call.args:
        return None
    parts = []
    for a in ast.walk(call.args[0]):
        if isinstance(a, ast.Constant) and isinstance(a.value, str):
            parts.append(a.value)
    return "".join(parts) or ast.unparse(call.args[0])


def _raises_not_implemented(st) -> bool:
    return isinstance(st, ast.Raise) and st.exc is not None and \
        ast.unparse(st.exc.func if isinstance(st.exc, ast.Call) else st.exc).endswith("NotImplementedError")


_PP_TEST = re.compile(r"pipeline_parallel_size\s*>\s*1")
_PP_ALWAYS = re.compile(r"^[\w.]*pipeline_parallel_size > 1$")
_PP_MODEL = re.compile(r"is_pp_supported_model|_PP_SUPPORTED_MODELS|SupportsPP|supports_pp")


def pp_raise_sites(w: Wheel) -> list[dict]:
    """Every `raise NotImplementedError` guarded by `pipeline_parallel_size > 1`."""
    sites, seen = [], set()
    for n in w.py_files():
        text = w.read(n)
        if "pipeline_parallel_size" not in text or "NotImplementedError" not in text:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.If) or not _PP_TEST.search(ast.unparse(node.test)):
                continue
            outer = ast.unparse(node.test)
            cands = [(st, outer, True) for st in node.body]
            cands += [(inner, f"{outer} and {ast.unparse(st.test)}", False)
                      for st in node.body if isinstance(st, ast.If) for inner in st.body]
            for st, cond, direct in cands:
                if not _raises_not_implemented(st) or (n, st.lineno) in seen:
                    continue
                seen.add((n, st.lineno))
                in_config = n == "vllm/config.py" or n.startswith("vllm/config/")
                if _PP_MODEL.search(cond):
                    kind = "model"
                elif direct and in_config and _PP_ALWAYS.match(cond):
                    kind = "always"
                else:
                    kind = "other"
                sites.append({"file": n, "when": cond, "kind": kind, "message": _raise_message(st)})
    return sorted(sites, key=lambda s: (s["file"], s["when"]))


def _registry(interp: Interp, w: Wheel) -> dict:
    mod = "vllm.model_executor.models.registry"
    d = interp.lookup(mod, "_VLLM_MODELS") if w.module_file(mod) else \
        interp.lookup("vllm.model_executor.models", "_MODELS")
    return d if isinstance(d, dict) else {}


def _has_base(interp: Interp, c, name: str, depth=0) -> bool:
    if depth > 12 or not isinstance(c, ClassRef):
        return False
    for b in interp.class_bases(c):
        bname = b.name if isinstance(b, (ClassRef, Ext)) else ""
        if bname.split(".")[-1] == name or _has_base(interp, b, name, depth + 1):
            return True
    return False


def pp_architectures(interp: Interp, w: Wheel, archs: list[str]) -> tuple[list[str] | None, str | None]:
    """Architectures that may run with PP>1, or (None, reason)."""
    lst = interp.lookup("vllm.config", "_PP_SUPPORTED_MODELS") if w.module_file("vllm.config") else UNKNOWN
    if isinstance(lst, (list, tuple, set)):
        return sorted(a for a in lst if isinstance(a, str)), None
    reg = _registry(interp, w)
    out, unresolved = [], []
    for arch in archs:
        ent = reg.get(arch)
        if not (isinstance(ent, tuple) and len(ent) >= 2 and all(isinstance(x, str) for x in ent[:2])):
            unresolved.append(arch)
            continue
        cls = interp.lookup(f"vllm.model_executor.models.{ent[0]}", ent[1])
        if not isinstance(cls, ClassRef):
            unresolved.append(arch)
            continue
        if _has_base(interp, cls, "SupportsPP"):
            out.append(arch)
    if unresolved and len(unresolved) > len(archs) // 2:
        return None, f"model classes not resolvable from the registry ({len(unresolved)} of {len(archs)})"
    return sorted(out), None


def pipeline_parallel_trait(interp: Interp, w: Wheel, flags: dict, archs: list[str], nulls: dict) -> dict:
    sites = pp_raise_sites(w)
    flag = "--pipeline-parallel-size" in flags
    always = [s for s in sites if s["kind"] == "always"]
    model = [s for s in sites if s["kind"] == "model"]
    supported = flag and not always
    out = {"flag": flag, "supported": supported, "raises_not_implemented": bool(always),
           "model_restricted": bool(model) if supported else None, "architectures": None,
           "not_implemented": sites}
    if supported and model:
        pp_archs, why = pp_architectures(interp, w, archs)
        out["architectures"] = pp_archs
        if pp_archs is None:
            nulls["pipeline_parallel.architectures"] = why
    elif not supported:
        nulls["pipeline_parallel.model_restricted"] = "pipeline parallelism not supported in this release"
    return out


def executor_trait(flags: dict) -> dict:
    deb = flags.get("--distributed-executor-backend")
    ray_args = None
    if deb is not None and (deb["choices"] is None or "ray" in deb["choices"]):
        ray_args = ["--distributed-executor-backend", "ray"]
    elif "--worker-use-ray" in flags:
        ray_args = ["--worker-use-ray"]
    return {"flag": "--distributed-executor-backend" if deb else
            ("--worker-use-ray" if "--worker-use-ray" in flags else None),
            "choices": deb["choices"] if deb else None,
            "worker_use_ray": "--worker-use-ray" in flags,
            "ray_args": ray_args}


MP_NODE_FLAGS = ["--nnodes", "--node-rank", "--master-addr", "--master-port", "--headless"]


def multi_node_trait(flags: dict, executor: dict) -> dict:
    present = [f for f in MP_NODE_FLAGS if f in flags]
    return {"ray": executor["ray_args"] is not None,
            "mp": all(f in flags for f in ("--nnodes", "--node-rank", "--master-addr")),
            "mp_flags": present,
            "data_parallel_flags": sorted(f for f in flags if f.startswith("--data-parallel-"))}


def _env_default(w: Wheel, name: str) -> str | None:
    """The default string in envs.py's `os.getenv(name, "<default>")`."""
    tree = w.tree("vllm.envs")
    for node in ast.walk(tree) if tree else []:
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == name:
                    for c in ast.walk(v):
                        if isinstance(c, ast.Call) and len(c.args) >= 2 and \
                                isinstance(c.args[0], ast.Constant) and c.args[0].value == name and \
                                isinstance(c.args[1], ast.Constant):
                            return str(c.args[1].value)
    return None


def engine_trait(w: Wheel, nulls: dict) -> dict:
    v1 = any(n in w.names for n in ("vllm/v1/engine/core.py", "vllm/v1/engine/llm_engine.py",
                                    "vllm/v1/engine/async_llm.py"))
    tree = w.tree("vllm.engine.llm_engine")
    v0 = bool(tree) and any(isinstance(st, ast.ClassDef) and st.name == "LLMEngine" for st in tree.body)
    env_default = _env_default(w, "VLLM_USE_V1")
    if not v1:
        default = "v0"
    elif not v0:
        default = "v1"
    elif env_default is not None:
        default = "v1" if env_default.strip().lower() in ("1", "true") else "v0"
    else:
        default = None
        nulls["engine_generation.default"] = "V0 and V1 both present and no VLLM_USE_V1 default in envs.py"
    if env_default is None:
        nulls["engine_generation.VLLM_USE_V1_default"] = "envs.py does not read VLLM_USE_V1"
    return {"default": default, "v0": v0, "v1": v1, "VLLM_USE_V1_default": env_default}


_SAFE_CAP = re.compile(r"^[\w\s.,()\[\]<>=!]+$")


class _Cap(tuple):
    def __new__(cls, major, minor=0):
        return super().__new__(cls, (major, minor))

    major = property(lambda s: s[0])
    minor = property(lambda s: s[1])

    def to_int(self):
        return self[0] * 10 + self[1]


def _cap_check(fn: ast.FunctionDef, cap: tuple[int, int]) -> bool | None:
    """Evaluate a one-line `supports_compute_capability` body at `cap`; None if not that simple."""
    body = [st for st in fn.body if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]
    if len(body) != 1 or not isinstance(body[0], ast.Return) or body[0].value is None:
        return None
    expr = ast.unparse(body[0].value)
    if not _SAFE_CAP.match(expr) or "__" in expr:
        return None
    names = {a.arg: _Cap(*cap) for a in fn.args.args[1:]}
    names.update(DeviceCapability=_Cap, True_=True)
    try:
        r = eval(compile(expr, "<cap>", "eval"), {"__builtins__": {}}, names)   # noqa: S307
    except Exception:
        return None
    return r if isinstance(r, bool) else None


def _attention_backends_below_80(w: Wheel) -> dict[str, dict] | None:
    """V1 attention backends (non-MLA) and whether each accepts cc 7.0 / 7.5."""
    out = {}
    for n in w.py_files():
        if not n.startswith("vllm/v1/attention/backends/") or "/mla/" in n:
            continue
        try:
            tree = ast.parse(w.read(n))
        except SyntaxError:
            continue
        for c in tree.body:
            if not isinstance(c, ast.ClassDef) or not c.name.endswith("Backend"):
                continue
            for fn in c.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "supports_compute_capability":
                    out[c.name] = {"7.0": _cap_check(fn, (7, 0)), "7.5": _cap_check(fn, (7, 5)),
                                   "file": n}
    return out or None


def v1_below_cc80_trait(w: Wheel, eng: dict, nulls: dict) -> dict | None:
    key = "v1_below_cc80"
    if not eng["v1"]:
        nulls[key] = "no V1 engine in this release"
        return None
    args = w.read("vllm/engine/arg_utils.py") if "vllm/engine/arg_utils.py" in w.names else ""
    if re.search(r"""_raise_or_fallback\(\s*feature_name\s*=\s*['"]Compute Capability < 8\.0""", args):
        m = re.search(r"def _raise_or_fallback\(.*?(?=\ndef |\Z)", args, re.S)
        forced = bool(m and "NotImplementedError" in m.group(0) and "VLLM_USE_V1" in m.group(0))
        if eng["v0"]:
            return {"behaviour": "falls back to V0",
                    "error_if_VLLM_USE_V1_set": forced,
                    "evidence": "vllm/engine/arg_utils.py: _is_v1_supported_oracle -> "
                                "_raise_or_fallback(feature_name=\"Compute Capability < 8.0\")"}
    if eng["default"] != "v1":
        nulls[key] = "V1 is opt-in (VLLM_USE_V1 default %r) and the source has no cc < 8.0 rule for it" \
            % eng["VLLM_USE_V1_default"]
        return None
    cuda = w.read("vllm/platforms/cuda.py") if "vllm/platforms/cuda.py" in w.names else ""
    m = re.search(r"#\s*(FlexAttention is the default for older GPUs)", cuda)
    if m:
        return {"behaviour": "runs V1 with the FlexAttention backend", "error_if_VLLM_USE_V1_set": False,
                "evidence": "vllm/platforms/cuda.py: get_attn_backend_cls: " + m.group(1)}
    backends = _attention_backends_below_80(w)
    if backends and "_get_backend_priorities" in cuda:
        ok70 = sorted(b for b, v in backends.items() if v["7.0"])
        ok75 = sorted(b for b, v in backends.items() if v["7.5"])
        unknown = sorted(b for b, v in backends.items() if v["7.0"] is None)
        if ok70:
            return {"behaviour": "runs V1; attention backend picked by priority among those "
                                 "whose supports_compute_capability() accepts the GPU",
                    "error_if_VLLM_USE_V1_set": False,
                    "backends_cc70": ok70, "backends_cc75": ok75, "backends_unevaluated": unknown,
                    "evidence": "vllm/platforms/cuda.py: _get_backend_priorities; "
                                "vllm/v1/attention/backends/*: supports_compute_capability"}
    nulls[key] = "V1 is the default but no cc < 8.0 rule was recognised in the source"
    return None


# --------------------------------------------------------------------------- one wheel

def extract(path: Path) -> dict:
    """All facts of one vLLM wheel (or slim copy); nothing is downloaded."""
    w = Wheel(path)
    meta = w.dist_info("METADATA") or ""
    mv = re.search(r"^Version:\s*(\S+)", meta, re.M)
    version = mv.group(1) if mv else w.wheel_name.split("-")[1]
    interp = Interp(w)
    builder, api_mod, takes_parser = find_parser_builder(interp, w)
    if takes_parser:
        root = Parser(interp, "flexible")
        interp.call_func(builder, [root], {})
    else:
        interp.call_func(builder, [], {})
    flags: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    for p in interp.parsers:
        flags.update(p.flags)
        aliases.update(p.aliases)
    serve, sflags, saliases = serve_extra_flags(interp, w)
    for k, v in sflags.items():
        flags.setdefault(k, v)
    for k, v in saliases.items():
        aliases.setdefault(k, v)
    if not flags:
        raise SystemExit(f"no flags found for {version}")
    api_server_module = "vllm.entrypoints.openai.api_server"
    api_src = w.read(w.module_file(api_server_module)) if w.module_file(api_server_module) else ""
    if "__main__" not in api_src:
        api_server_module = None
    archs = architectures(interp, w)
    nulls: dict[str, str] = {}
    reqs = requires(w)
    for r in ("torch", "transformers", "ray", "xformers"):
        if r not in reqs:
            nulls[f"requires.{r}"] = "not an unconditional Requires-Dist of the wheel (absent or extra-only)"
    flags = dict(sorted(flags.items()))
    executor = executor_trait(flags)
    eng = engine_trait(w, nulls)
    out = {
        "engine": "vllm",
        "version": version,
        "wheel": w.wheel_name,
        "generated_by": "scripts/gen_engine_tables.py",
        "flags": flags,
        "aliases": dict(sorted(aliases.items())),
        "underscores": flexible_underscores(w, api_src + w.read(w.module_file(api_mod))),
        "api_server_module": api_server_module,
        "serve_subcommand": serve,
        "env_vars": env_vars(w),
        "architectures": archs,
        "requires": reqs,
    }
    out.update(entrypoint_trait(w, api_server_module, serve))
    out["pipeline_parallel"] = pipeline_parallel_trait(interp, w, flags, archs, nulls)
    out["executor"] = executor
    out["multi_node"] = multi_node_trait(flags, executor)
    out["engine_generation"] = eng
    out["v1_below_cc80"] = v1_below_cc80_trait(w, eng, nulls)
    out["null_reasons"] = dict(sorted(nulls.items()))
    return out


# keys of extract() that the per-version files (cluster/knowledge/vllm/<version>.json) carry
TABLE_KEYS = ["engine", "version", "wheel", "generated_by", "flags", "aliases", "underscores",
              "api_server_module", "serve_subcommand", "env_vars", "architectures", "requires"]


def generate(version: str) -> dict:
    """The per-version table (the shape of cluster/knowledge/vllm/<version>.json)."""
    full = extract(source_for(version))
    return {k: full[k] for k in TABLE_KEYS}


# --------------------------------------------------------------------------- releases on PyPI

INDEX_URL = os.environ.get("GPUCLUSTER_VLLM_INDEX", "https://pypi.org/simple/vllm/")
MIN_VERSION = "0.3.0"
RELEASES_OUT = OUT_DIR / "releases.json"


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, dict]] = []
        self._attrs = None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._attrs = dict(attrs)
            self._text = ""

    def handle_data(self, data):
        if self._attrs is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "a" and self._attrs is not None:
            self.links.append((self._text.strip(), self._attrs))
            self._attrs = None


def wheel_usable(filename: str) -> bool:
    """A wheel that pip could install for CPython 3.11 on linux x86_64."""
    from packaging.utils import parse_wheel_filename
    try:
        _, _, _, tags = parse_wheel_filename(filename)
    except Exception:
        return False
    for t in tags:
        if "x86_64" not in t.platform or "linux" not in t.platform:
            continue
        if t.interpreter == "cp311" or t.interpreter in ("py3", "py311"):
            return True
        m = re.fullmatch(r"cp3(\d+)", t.interpreter)
        if t.abi == "abi3" and m and int(m.group(1)) <= 11:
            return True
    return False


def parse_index(page: str, min_version: str = MIN_VERSION) -> tuple[list[dict], list[dict]]:
    """(releases, skipped) from a PEP 503 simple page; releases in version order."""
    from packaging.utils import parse_sdist_filename, parse_wheel_filename
    from packaging.version import Version

    lp = _Links()
    lp.feed(page)
    by_ver: dict = {}
    for text, attrs in lp.links:
        fn = text or attrs.get("href", "").split("#")[0].rsplit("/", 1)[-1]
        try:
            ver = parse_wheel_filename(fn)[1] if fn.endswith(".whl") else parse_sdist_filename(fn)[1]
        except Exception:
            continue
        by_ver.setdefault(ver, []).append((fn, attrs))
    releases, skipped = [], []
    for ver in sorted(by_ver):
        if ver < Version(min_version) or ver.is_prerelease or ver.is_devrelease:
            continue
        files = by_ver[ver]
        dates = sorted(a.get("data-upload-time", "") for _, a in files if a.get("data-upload-time"))
        released = dates[0][:10] if dates else None
        wheels = [(fn, a) for fn, a in files if fn.endswith(".whl") and wheel_usable(fn)]
        live = [(fn, a) for fn, a in wheels if "data-yanked" not in a]
        if not wheels:
            kinds = sorted({"sdist" if not fn.endswith(".whl") else fn.split("-")[-1][:-4] for fn, _ in files})
            skipped.append({"version": str(ver), "released": released,
                            "reason": "no CPython 3.11 linux x86_64 wheel (files: %s)" % ", ".join(kinds)})
        elif not live:
            why = next((a.get("data-yanked") for _, a in wheels if a.get("data-yanked")), "")
            skipped.append({"version": str(ver), "released": released,
                            "reason": "yanked" + (f": {why}" if why else "")})
        else:
            releases.append({"version": str(ver), "released": released, "wheel": live[0][0]})
    return releases, skipped


def list_releases() -> tuple[list[dict], list[dict]]:
    import urllib.request
    try:
        req = urllib.request.Request(INDEX_URL, headers={"Accept": "application/vnd.pypi.simple.v1+html"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return parse_index(r.read().decode("utf-8", "replace"))
    except OSError as e:
        print(f"warning: cannot read {INDEX_URL} ({e}); falling back to `pip index versions` "
              "(no release dates, no yanked marks)", file=sys.stderr)
    from packaging.version import Version
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "vllm"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"Available versions:\s*(.+)", out)
    vers = sorted(Version(v.strip()) for v in (m.group(1).split(",") if m else []))
    return [{"version": str(v), "released": None, "wheel": None} for v in vers
            if v >= Version(MIN_VERSION) and not v.is_prerelease], []


def slim_copy(whl: Path) -> Path:
    """Keep only vllm/**/*.py and dist-info from a wheel (a few MB instead of hundreds)."""
    dst = CACHE / "src" / (whl.name + SLIM_SUFFIX)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    with zipfile.ZipFile(whl) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
        for n in zi.namelist():
            if (n.startswith("vllm/") and n.endswith(".py")) or \
                    (".dist-info/" in n and n.count("/") == 1 and not n.endswith("RECORD")):
                zo.writestr(n, zi.read(n))
    tmp.replace(dst)
    return dst


def source_for(version: str) -> Path:
    """The slim copy of vllm==version's wheel: downloaded once, the wheel deleted afterwards
    unless GPUCLUSTER_KEEP_WHEELS=1."""
    hits = sorted((CACHE / "src").glob(f"vllm-{version}-*.whl{SLIM_SUFFIX}"))
    if hits:
        return hits[0]
    whl = fetch_wheel(version)
    slim = slim_copy(whl)
    if os.environ.get("GPUCLUSTER_KEEP_WHEELS") != "1":
        whl.unlink()
    return slim


# --------------------------------------------------------------------------- compact form

LIST_KEYS = {"env_vars": "env_vars", "architectures": "architectures"}


def _ranges(ids: list[int]) -> str:
    ids = sorted(set(ids))
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def compact(records: list[dict], skipped: list[dict]) -> dict:
    """Pools of distinct flag definitions / aliases / names, and per release their ids as ranges."""
    pools: dict[str, list] = {"flags": [], "aliases": [], "env_vars": [], "architectures": []}
    index: dict[str, dict] = {k: {} for k in pools}

    def ids(pool, items):
        out = []
        for it in items:
            key = json.dumps(it, sort_keys=True)
            if key not in index[pool]:
                index[pool][key] = len(pools[pool])
                pools[pool].append(it)
            out.append(index[pool][key])
        return _ranges(out)

    rels = []
    for r in records:
        r = dict(r)
        for k in ("engine", "generated_by"):
            r.pop(k, None)
        r["flags"] = ids("flags", [[n, s["value"], s["choices"], s["type"], s["nargs"]]
                                   for n, s in r["flags"].items()])
        r["aliases"] = ids("aliases", [[a, t] for a, t in r["aliases"].items()])
        r["env_vars"] = ids("env_vars", r["env_vars"])
        r["architectures"] = ids("architectures", r["architectures"])
        pp = dict(r["pipeline_parallel"])
        if pp.get("architectures") is not None:
            pp["architectures"] = ids("architectures", pp["architectures"])
        r["pipeline_parallel"] = pp
        rels.append(r)
    return {"format": "gpucluster-vllm-releases/1",
            "generated_by": "scripts/gen_engine_tables.py --all",
            "source": f"{INDEX_URL} (wheels: pip download --no-deps)",
            "id_lists": "comma-separated ids and id ranges (a-b) into pools",
            "pools": pools, "releases": rels, "skipped": skipped}


def dump_compact(data: dict) -> str:
    """Stable JSON, one pool entry / release per line (reviewable diffs)."""
    d = lambda x: json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # noqa: E731
    lines = ["{"]
    for k in ("format", "generated_by", "source", "id_lists"):
        lines.append(f" {d(k)}: {d(data[k])},")
    lines.append(' "pools": {')
    pk = list(data["pools"])
    for i, k in enumerate(pk):
        lines.append(f"  {d(k)}: [")
        items = data["pools"][k]
        lines += [f"   {d(x)}{',' if j < len(items) - 1 else ''}" for j, x in enumerate(items)]
        lines.append("  ]" + ("," if i < len(pk) - 1 else ""))
    lines.append(" },")
    for key in ("releases", "skipped"):
        lines.append(f" {d(key)}: [")
        items = data[key]
        lines += [f"  {d(x)}{',' if j < len(items) - 1 else ''}" for j, x in enumerate(items)]
        lines.append(" ]" + ("," if key == "releases" else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def generate_all(out: Path, only: list[str] | None = None, reuse: bool = False) -> int:
    releases, skipped = list_releases()
    if only:
        releases = [r for r in releases if r["version"] in only]
    old = {}
    if reuse and out.exists():
        sys.path.insert(0, str(REPO))
        from cluster.knowledge import releases as reader
        data = json.loads(out.read_text())
        old = {r["version"]: reader.decode(data, r) for r in data["releases"]}
    records = []
    for rel in releases:
        v = rel["version"]
        if v in old:
            rec = old[v]
        else:
            t0 = time.time()
            try:
                rec = extract(source_for(v))
            except (SystemExit, Exception) as e:    # one bad release must not sink the others
                skipped.append({"version": v, "released": rel["released"],
                                "reason": f"extraction failed: {e}"})
                print(f"vllm {v}: FAILED ({e})", file=sys.stderr)
                continue
            if rec["version"] != v:
                raise SystemExit(f"wheel for {v} says it is {rec['version']}")
            print(f"vllm {v}: {len(rec['flags'])} flags, {len(rec['architectures'])} architectures, "
                  f"{len(rec['env_vars'])} env vars, engine {rec['engine_generation']['default']}, "
                  f"pp {rec['pipeline_parallel']['supported']} ({time.time() - t0:.0f}s)", flush=True)
        rec = {"released": rel["released"], **rec}
        records.append(rec)
    from packaging.version import Version
    skipped.sort(key=lambda s: Version(s["version"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_compact(compact(records, skipped)))
    print(f"{len(records)} releases -> {out}; skipped: "
          + (", ".join(f"{s['version']} ({s['reason']})" for s in skipped) or "none"))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("versions", nargs="*", help="vLLM versions (default: %s + newest on PyPI)"
                    % " ".join(DEFAULT_VERSIONS))
    ap.add_argument("--out", type=Path, default=None,
                    help=f"output directory (per-version files) or file (--all; default {RELEASES_OUT})")
    ap.add_argument("--all", action="store_true",
                    help=f"every release on PyPI >= {MIN_VERSION} into one compact releases.json "
                         "(with versions: only those, e.g. to test)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --all: keep the records already in the output file, process only new releases")
    a = ap.parse_args(argv)
    if a.all:
        return generate_all(a.out or RELEASES_OUT, only=a.versions or None, reuse=a.reuse)
    out_dir = a.out or OUT_DIR
    versions = a.versions or DEFAULT_VERSIONS + [newest_version()]
    out_dir.mkdir(parents=True, exist_ok=True)
    for v in dict.fromkeys(versions):
        data = generate(v)
        path = out_dir / f"{v}.json"
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"vllm {v}: {len(data['flags'])} flags, {len(data['architectures'])} architectures, "
              f"{len(data['env_vars'])} env vars -> {path.relative_to(REPO) if REPO in path.parents else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
