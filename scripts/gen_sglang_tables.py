#!/usr/bin/env python3
"""Generate cluster/knowledge/sglang/releases.json from SGLang's released wheels.

    python3 scripts/gen_sglang_tables.py [--reuse] [--out FILE] [VERSION ...]

Every release of `sglang` on PyPI >= 0.2.0 (the PEP 503 page https://pypi.org/simple/sglang/ gives versions,
upload dates and yanked marks; pre-releases are left out; a release without a wheel pip could install for
CPython 3.11 on linux x86_64, or yanked, is listed under "skipped" with the reason) goes into ONE compact file,
read by cluster/knowledge/sglang/releases.py: pools of distinct flag definitions / aliases / architectures, and
per release the pool ids as "a-b,c" ranges plus the traits below. With versions: only those (to test).
`--reuse` keeps the records already in the output and reads only new releases.

Each wheel is downloaded once (`pip download --no-deps --only-binary=:all:`, CPython 3.11 linux x86_64 tags)
into $GPUCLUSTER_WHEEL_CACHE (default ~/.cache/gpucluster-wheels, never the repository); a slim copy
(sglang/**/*.py + dist-info) is kept in its src/ folder and the wheel deleted unless GPUCLUSTER_KEEP_WHEELS=1.
SGLang is never installed or imported: the source is read with zipfile and `ast`, by the side-effect free
interpreter of scripts/gen_engine_tables.py (vLLM's generator), extended here for SGLang's two parser styles:

- `ServerArgs.add_cli_args(parser)` in sglang/srt/server_args.py, a staticmethod of `parser.add_argument`
  calls (0.2 .. 0.5.13), run by the interpreter as it is;
- from 0.5.14, `add_cli_args_from_dataclass(parser, ServerArgs)`: argparse arguments derived from the fields
  annotated `A[T, "help"]` / `A[T, Arg(...)]` (on ServerArgs itself, or on the namespace classes that
  `collect_input_fields([...])` assembles it from). That function is re-implemented here
  (`SglInterp.dataclass_cli`), following sglang/srt/arg_groups/arg_utils.py: `action` given -> as is;
  Literal -> choices; list[X] -> nargs "+"; bool -> store_true; else a scalar with `type_parser` or
  int/float/str. Custom argparse.Action classes take their `nargs` default from their `__init__` (0: a bare
  switch, as SGLang's Deprecated*Action).

Per release:
  flags / aliases        what `python3 -m sglang.launch_server` accepts (the shape of vLLM's tables:
                         value, choices, type, nargs)
  entrypoint             ["python3", "-m", "sglang.launch_server"] when sglang/launch_server.py runs as __main__
  dist_init_flag         the rendezvous flag: "--dist-init-addr", or "--nccl-init-addr" where only that exists
  min_cc                 {"cc", "quote", "file"}: the wheel's own refusal ("SGLang only supports sm75 and
                         above."), or null
  mem_fraction           how --mem-fraction-static defaults: {"rule": "tp-table", "by", "table",
                         "otherwise", "gpu_gated"} (read from the if-chain) or {"rule": "reserved-mem"}
                         (the reserved-memory estimate), or null
  architectures          class names of EntryClass in sglang/srt/models/*.py
  requires               Requires-Dist specs of torch, transformers, flashinfer(-python), sgl-kernel, vllm
  null_reasons           why a fact is null
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_engine_tables as base  # noqa: E402  (the interpreter, the index parser and the compact writer)

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "cluster" / "knowledge" / "sglang" / "releases.json"
CACHE = Path(os.environ.get("GPUCLUSTER_WHEEL_CACHE", "~/.cache/gpucluster-wheels")).expanduser()
INDEX_URL = os.environ.get("GPUCLUSTER_SGLANG_INDEX", "https://pypi.org/simple/sglang/")
MIN_VERSION = "0.2.0"
SLIM_SUFFIX = ".py.zip"
SERVER_ARGS = "sglang.srt.server_args"
ENTRYPOINT = ["python3", "-m", "sglang.launch_server"]
REQUIRES = ("torch", "transformers", "flashinfer", "flashinfer-python", "sgl-kernel", "vllm")
SM_QUOTE = re.compile(r"""["'](SGLang only supports sm(\d)(\d) and above\.?)["']""")


# --------------------------------------------------------------------------- the interpreter, for SGLang
class SglWheel(base.Wheel):
    def py_files(self):
        return sorted(n for n in self.names if n.startswith("sglang/") and n.endswith(".py"))


class SglParser(base.Parser):
    def add_argument(self, *names, **kw):
        action = kw.get("action")
        if isinstance(action, base.ClassRef) and "nargs" not in kw:
            nargs = self.interp.action_nargs(action)
            if nargs is not None:
                kw["nargs"] = nargs
        return super().add_argument(*names, **kw)


class SglInterp(base.Interp):
    """vLLM's interpreter, plus SGLang's dataclass-derived arguments."""

    server_args_cls: base.ClassRef | None = None

    def call_func(self, fn, args, kwargs):
        if fn.name == "add_cli_args_from_dataclass":
            parser = args[0] if args else kwargs.get("parser")
            cls = args[1] if len(args) > 1 else kwargs.get("cls")
            only = kwargs.get("fields")
            self.dataclass_cli(parser, cls, only if isinstance(only, (list, tuple, set)) else None)
            return None
        return super().call_func(fn, args, kwargs)

    def action_nargs(self, c: base.ClassRef, depth: int = 0):
        """The `nargs` default of a custom argparse.Action's __init__ (None: argparse's own)."""
        for st in c.node.body:
            if isinstance(st, ast.FunctionDef) and st.name == "__init__":
                a = st.args
                pos = a.posonlyargs + a.args
                for p, d in zip(pos[len(pos) - len(a.defaults):], a.defaults):
                    if p.arg == "nargs":
                        v = self.ev(d, c.mod, {})
                        return v if isinstance(v, (int, str)) else None
                for p, d in zip(a.kwonlyargs, a.kw_defaults):
                    if p.arg == "nargs" and d is not None:
                        v = self.ev(d, c.mod, {})
                        return v if isinstance(v, (int, str)) else None
                return None
        if depth < 5:
            for b in self.class_bases(c):
                if isinstance(b, base.ClassRef):
                    return self.action_nargs(b, depth + 1)
        return None

    # ---------------------------------------------------------------- dataclass-derived arguments
    def _class_fields(self, c: base.ClassRef, seen: set, depth: int = 0) -> list[tuple[str, ast.AnnAssign]]:
        if id(c.node) in seen or depth > 10:
            return []
        seen.add(id(c.node))
        out: list[tuple[str, ast.AnnAssign]] = []
        for b in self.class_bases(c):
            if isinstance(b, base.ClassRef):
                out += self._class_fields(b, seen, depth + 1)
        out += [(c.mod, st) for st in c.node.body if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)]
        return out

    def namespace_classes(self) -> list[base.ClassRef]:
        """Classes ServerArgs is assembled from: the argument of `collect_input_fields(...)` in server_args."""
        tree = self.w.tree(SERVER_ARGS)
        for node in ast.walk(tree) if tree else ():
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == \
                    "collect_input_fields" and node.args:
                v = self.ev(node.args[0], SERVER_ARGS, {})
                if isinstance(v, (list, tuple)):
                    return [c for c in v if isinstance(c, base.ClassRef)]
        return []

    def annotated(self, ann, mod):
        """(type node, Arg metadata dict) of `A[T, "help" | Arg(...)]`; (None, None) for any other annotation."""
        if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
            try:
                ann = ast.parse(ann.value, mode="eval").body
            except SyntaxError:
                return None, None
        if not isinstance(ann, ast.Subscript):
            return None, None
        head = self.ev(ann.value, mod, {})
        if not (isinstance(head, base.Ext) and head.name.split(".")[-1] == "Annotated"):
            return None, None
        elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
        for m in elts[1:]:
            if isinstance(m, ast.Constant) and isinstance(m.value, str):
                return elts[0], {"help": m.value}
            if isinstance(m, ast.Call):
                f = self.ev(m.func, mod, {})
                if isinstance(f, base.ClassRef) and f.name == "Arg":
                    meta = {k.arg: self.ev(k.value, mod, {}) for k in m.keywords if k.arg}
                    return elts[0], meta
        return elts[0], None

    def dataclass_cli(self, parser, cls, only) -> None:
        """sglang/srt/arg_groups/arg_utils.py `add_cli_args_from_dataclass`, over the AST."""
        if not isinstance(parser, base.Parser):
            return
        if not isinstance(cls, base.ClassRef):
            cls = self.server_args_cls          # rebound at module level (msgspec.defstruct): the class itself
        if cls is None:
            return
        seen: set = set()
        fields = self._class_fields(cls, seen)
        if cls.mod == SERVER_ARGS:
            for ns in self.namespace_classes():
                fields += self._class_fields(ns, seen)
        for mod, st in fields:
            name = st.target.id
            if only is not None and name not in only:
                continue
            typ, meta = self.annotated(st.annotation, mod)
            if meta is None or meta.get("no_cli") is True:
                continue
            cli = meta.get("cli_name") if isinstance(meta.get("cli_name"), str) else "--" + name.replace("_", "-")
            aliases = meta.get("aliases")
            names = [cli] + [a for a in (aliases if isinstance(aliases, (list, tuple)) else []) if isinstance(a, str)]
            parser.add_argument(*names, **self._field_kwargs(typ, meta, mod))

    def _field_kwargs(self, typ, meta: dict, mod: str) -> dict:
        if meta.get("action") not in (None, base.UNKNOWN):
            kw = {"action": meta["action"]}
            if isinstance(meta.get("action_kwargs"), dict):
                kw.update(meta["action_kwargs"])
            return kw
        self._cur_mod = mod
        hints = self.hints(typ, mod) - {("none",)}
        kinds = {h[0] for h in hints}
        parse = meta.get("type_parser")
        parse = parse if parse not in (None, base.UNKNOWN) else None
        choices = meta.get("choices") if isinstance(meta.get("choices"), (list, tuple, set)) else None
        nargs = meta.get("nargs") if isinstance(meta.get("nargs"), (int, str)) else None
        lit = next((h for h in hints if h[0] == "literal"), None)
        if lit is not None and len(hints) == 1:
            vals = [v.value if isinstance(v, base.EnumMember) else v for v in lit[1]]
            infer = base.Ext(f"builtins.{type(vals[0]).__name__}") if vals and isinstance(
                vals[0], (int, float)) and not isinstance(vals[0], bool) else base.Ext("builtins.str")
            return {"type": parse or infer, "choices": choices or vals}
        if kinds == {"list"} and parse is None:
            elem = next(iter(hints))[1]
            kw = {"type": base.Ext(f"builtins.{elem}" if elem in ("int", "float") else "builtins.str"),
                  "nargs": nargs or "+"}
            if choices:
                kw["choices"] = choices
            return kw
        if kinds == {"bool"}:
            return {"action": "store_true"}
        scalar = next(iter(kinds)) if len(kinds) == 1 else "str"
        kw = {"type": parse or base.Ext(f"builtins.{scalar if scalar in ('int', 'float') else 'str'}")}
        if choices:
            kw["choices"] = choices
        if nargs is not None:
            kw["nargs"] = nargs
        return kw


# --------------------------------------------------------------------------- facts of one wheel
def server_args_class(w: SglWheel) -> base.ClassRef:
    tree = w.tree(SERVER_ARGS)
    node = next((st for st in (tree.body if tree else []) if isinstance(st, ast.ClassDef) and st.name == "ServerArgs"),
                None)
    if node is None:
        raise SystemExit(f"{w.wheel_name}: no class ServerArgs in sglang/srt/server_args.py")
    return base.ClassRef(SERVER_ARGS, node)


def literal_flags(w: SglWheel) -> set[str]:
    """Option strings written literally in `add_argument("--x", ...)` calls of server_args.py (a cross-check)."""
    tree = w.tree(SERVER_ARGS)
    out = set()
    for node in ast.walk(tree) if tree else ():
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            out |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                    and a.value.startswith("--")}
    return out


def min_cc(w: SglWheel, nulls: dict) -> dict | None:
    for n in w.py_files():
        if not n.startswith("sglang/srt/"):
            continue
        m = SM_QUOTE.search(w.read(n))
        if m:
            return {"cc": f"{m.group(2)}.{m.group(3)}", "quote": m.group(1), "file": n}
    nulls["min_cc"] = "the wheel has no \"SGLang only supports smXY and above\" check"
    return None


_TP_STEP = re.compile(r"(tp_size|parallel_size) >= (\d+):\s*self\.mem_fraction_static = ([\d.]+)")


def mem_fraction(w: SglWheel, nulls: dict) -> dict | None:
    """How --mem-fraction-static defaults: the `if self.mem_fraction_static is None:` block that sets it."""
    for n in w.py_files():
        if not n.startswith("sglang/srt/") or "mem_fraction_static is None" not in (src := w.read(n)):
            continue
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.If) and "mem_fraction_static is None" in ast.unparse(node.test)):
                continue
            block = ast.unparse(node)
            if "mem_fraction_static =" not in block:
                continue
            if "reserved_mem" in block:
                return {"rule": "reserved-mem", "file": n}
            steps = _TP_STEP.findall(block)
            if steps:
                tail = re.search(r"else:\s*self\.mem_fraction_static = ([\d.]+)", block)
                return {"rule": "tp-table", "file": n,
                        "by": "tp_size*pp_size" if steps[0][0] == "parallel_size" else "tp_size",
                        "table": [[int(k), float(v)] for _, k, v in steps],
                        "otherwise": float(tail.group(1)) if tail else None,
                        "gpu_gated": "81920" in block}
    for n in w.py_files():      # the estimate moved into a resolution hook with another guard (0.5.19)
        src = w.read(n)
        if n.startswith("sglang/srt/") and "reserved_mem" in src and re.search(r"mem_fraction_static\s*=", src):
            return {"rule": "reserved-mem", "file": n}
    nulls["mem_fraction"] = "no `if self.mem_fraction_static is None:` block that sets it was recognised"
    return None


def architectures(w: SglWheel) -> list[str]:
    out: set[str] = set()
    for n in w.py_files():
        if not n.startswith("sglang/srt/models/"):
            continue
        try:
            tree = ast.parse(w.read(n))
        except SyntaxError:
            continue
        for st in tree.body:
            if isinstance(st, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "EntryClass" for t in st.targets):
                vals = st.value.elts if isinstance(st.value, (ast.List, ast.Tuple)) else [st.value]
                out |= {v.id if isinstance(v, ast.Name) else v.attr for v in vals
                        if isinstance(v, (ast.Name, ast.Attribute))}
    return sorted(out)


def requires(w: SglWheel) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (w.dist_info("METADATA") or "").splitlines():
        m = re.match(r"Requires-Dist:\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*\(?([^;)]*)\)?\s*(;.*)?$", line)
        if not m:
            continue
        name = m.group(1).lower().replace("_", "-")
        if name in REQUIRES and name not in out and m.group(2).strip():
            out[name] = m.group(2).strip().replace(" ", "")
    return dict(sorted(out.items()))


def extract(path: Path) -> dict:
    """All facts of one SGLang wheel (or slim copy); nothing is downloaded."""
    w = SglWheel(path)
    mv = re.search(r"^Version:\s*(\S+)", w.dist_info("METADATA") or "", re.M)
    version = mv.group(1) if mv else w.wheel_name.split("-")[1]
    interp = SglInterp(w)
    cls = server_args_class(w)
    interp.server_args_cls = cls
    builder = interp.class_attr(cls, "add_cli_args", bound=cls)
    if not isinstance(builder, base.FuncRef):
        raise SystemExit(f"sglang {version}: no ServerArgs.add_cli_args")
    root = SglParser(interp)
    interp.call_func(builder, [root], {})
    flags: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    for p in interp.parsers:
        flags.update(p.flags)
        aliases.update(p.aliases)
    lost = sorted(f for f in literal_flags(w) if f not in flags and f not in aliases)
    lost += sorted({"--model-path", "--port", "--tp-size"} - set(flags) - set(aliases))
    if lost:
        raise SystemExit(f"sglang {version}: the parser was not followed (missing {', '.join(lost)})")
    nulls: dict[str, str] = {}
    launcher = w.read("sglang/launch_server.py") if "sglang/launch_server.py" in w.names else ""
    if "__main__" not in launcher:
        nulls["entrypoint"] = "sglang/launch_server.py does not run as __main__"
    known = set(flags) | set(aliases)
    dist = next((f for f in ("--dist-init-addr", "--nccl-init-addr") if f in known), None)
    if dist is None:
        nulls["dist_init_flag"] = "neither --dist-init-addr nor --nccl-init-addr"
    return {
        "engine": "sglang",
        "version": version,
        "wheel": w.wheel_name,
        "generated_by": "scripts/gen_sglang_tables.py",
        "flags": dict(sorted(flags.items())),
        "aliases": dict(sorted(aliases.items())),
        "entrypoint": ENTRYPOINT if "__main__" in launcher else None,
        "dist_init_flag": dist,
        "min_cc": min_cc(w, nulls),
        "mem_fraction": mem_fraction(w, nulls),
        "architectures": architectures(w),
        "requires": requires(w),
        "null_reasons": dict(sorted(nulls.items())),
    }


# --------------------------------------------------------------------------- wheels and the index
def wheel_usable(filename: str) -> bool:
    """A wheel pip could install for CPython 3.11 on linux x86_64: pure Python (py3-none-any, most releases)
    or, from 0.5.11, a cp311 manylinux x86_64 build."""
    from packaging.utils import parse_wheel_filename
    try:
        tags = parse_wheel_filename(filename)[3]
    except Exception:
        return False
    return any(t.platform == "any" and t.interpreter in ("py3", "py311", "cp311") for t in tags) or \
        base.wheel_usable(filename)


def parse_index(page: str, min_version: str = MIN_VERSION) -> tuple[list[dict], list[dict]]:
    """(releases, skipped) from the PEP 503 page, releases in version order (pre-releases left out)."""
    from packaging.utils import parse_sdist_filename, parse_wheel_filename
    from packaging.version import Version
    links = base._Links()
    links.feed(page)
    by_ver: dict = {}
    for text, attrs in links.links:
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
            skipped.append({"version": str(ver), "released": released,
                            "reason": "no wheel for CPython 3.11 on linux x86_64 (sdist only?)"})
        elif not live:
            why = next((a.get("data-yanked") for _, a in wheels if a.get("data-yanked")), "")
            skipped.append({"version": str(ver), "released": released,
                            "reason": "yanked" + (f": {why}" if why else "")})
        else:
            releases.append({"version": str(ver), "released": released, "wheel": live[0][0]})
    return releases, skipped


def list_releases() -> tuple[list[dict], list[dict]]:
    import urllib.request
    req = urllib.request.Request(INDEX_URL, headers={"Accept": "application/vnd.pypi.simple.v1+html"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return parse_index(r.read().decode("utf-8", "replace"))


def fetch_wheel(version: str) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    if REPO in CACHE.resolve().parents or CACHE.resolve() == REPO:
        raise SystemExit(f"wheel cache {CACHE} must be outside the repository")
    hits = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
    if not hits:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"sglang=={version}",
               "-d", str(CACHE), "--python-version", "3.11", "--implementation", "cp"]
        for p in base.PLATFORMS:
            cmd += ["--platform", p]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        hits = sorted(CACHE.glob(f"sglang-{version}-*.whl"))
    if not hits:
        raise SystemExit(f"pip download did not leave a wheel for sglang=={version} in {CACHE}")
    return hits[0]


def source_for(version: str) -> Path:
    """The slim copy (sglang/**/*.py + dist-info) of sglang==version's wheel, made once."""
    hits = sorted((CACHE / "src").glob(f"sglang-{version}-*.whl{SLIM_SUFFIX}"))
    if hits:
        return hits[0]
    whl = fetch_wheel(version)
    dst = CACHE / "src" / (whl.name + SLIM_SUFFIX)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    with zipfile.ZipFile(whl) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
        for n in zi.namelist():
            if (n.startswith("sglang/") and n.endswith(".py")) or \
                    (".dist-info/" in n and n.count("/") == 1 and not n.endswith("RECORD")):
                zo.writestr(n, zi.read(n))
    tmp.replace(dst)
    if os.environ.get("GPUCLUSTER_KEEP_WHEELS") != "1":
        whl.unlink()
    return dst


# --------------------------------------------------------------------------- compact form
def compact(records: list[dict], skipped: list[dict]) -> dict:
    """Pools of distinct flag definitions / aliases / architectures, and per release their ids as ranges."""
    pools: dict[str, list] = {"flags": [], "aliases": [], "architectures": []}
    index: dict[str, dict] = {k: {} for k in pools}

    def ids(pool, items):
        out = []
        for it in items:
            key = json.dumps(it, sort_keys=True)
            if key not in index[pool]:
                index[pool][key] = len(pools[pool])
                pools[pool].append(it)
            out.append(index[pool][key])
        return base._ranges(out)

    rels = []
    for r in records:
        r = {k: v for k, v in r.items() if k not in ("engine", "generated_by")}
        r["flags"] = ids("flags", [[n, s["value"], s["choices"], s["type"], s["nargs"]] for n, s in r["flags"].items()])
        r["aliases"] = ids("aliases", [[a, t] for a, t in r["aliases"].items()])
        r["architectures"] = ids("architectures", r["architectures"])
        rels.append(r)
    return {"format": "gpucluster-sglang-releases/1", "generated_by": "scripts/gen_sglang_tables.py",
            "source": f"{INDEX_URL} (wheels: pip download --no-deps)",
            "id_lists": "comma-separated ids and id ranges (a-b) into pools",
            "pools": pools, "releases": rels, "skipped": skipped}


def decode_all(data: dict) -> dict[str, dict]:
    sys.path.insert(0, str(REPO))
    from cluster.knowledge.sglang import releases as reader
    return {r["version"]: reader.decode(data, r) for r in data["releases"]}


def generate(out: Path, only: list[str] | None = None, reuse: bool = False) -> int:
    releases, skipped = list_releases()
    if only:
        releases = [r for r in releases if r["version"] in only]
    old = decode_all(json.loads(out.read_text())) if reuse and out.exists() else {}
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
                skipped.append({"version": v, "released": rel["released"], "reason": f"extraction failed: {e}"})
                print(f"sglang {v}: FAILED ({e})", file=sys.stderr)
                continue
            if rec["version"] != v:
                raise SystemExit(f"wheel for {v} says it is {rec['version']}")
            mf = rec["mem_fraction"]["rule"] if rec["mem_fraction"] else None
            print(f"sglang {v}: {len(rec['flags'])} flags, {len(rec['architectures'])} architectures, "
                  f"{rec['dist_init_flag']}, min cc {(rec['min_cc'] or {}).get('cc')}, mem fraction {mf} "
                  f"({time.time() - t0:.1f}s)", flush=True)
        records.append({"released": rel["released"], **rec})
    from packaging.version import Version
    skipped.sort(key=lambda s: Version(s["version"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(base.dump_compact(compact(records, skipped)))
    print(f"{len(records)} releases -> {out}; skipped: "
          + (", ".join(f"{s['version']} ({s['reason']})" for s in skipped) or "none"))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("versions", nargs="*", help=f"only these releases (default: every release >= {MIN_VERSION})")
    ap.add_argument("--out", type=Path, default=OUT, help=f"output file (default {OUT.relative_to(REPO)})")
    ap.add_argument("--reuse", action="store_true", help="keep the records already in the output file")
    a = ap.parse_args(argv)
    return generate(a.out, only=a.versions or None, reuse=a.reuse)


if __name__ == "__main__":
    sys.exit(main())
