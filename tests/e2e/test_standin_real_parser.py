"""The rig's vLLM stand-in checks flags with vLLM's real parser, not gpucluster's tables: a wrong table fails e2e.

gpucluster validates `--set` overrides against its flag table (cluster/knowledge/vllm/releases.json). Here a copy
of that file gets a flag vLLM 0.6.3 does not have; with it, gpucluster accepts `--set not-a-real-flag=1` and
starts the engine, and the stand-in (which runs vLLM 0.6.3's own argument parser from the release's wheel, see
tests/rig/README.md) refuses it the way vLLM does: `up` must fail with "unrecognized arguments". Without the
planted flag gpucluster itself refuses the override before touching a host.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_lifecycle import REPO, gc, inventory, labelled

pytestmark = pytest.mark.rig
FLAG = "--not-a-real-flag"
VERSION = "0.6.3"

# The real CLI (`python -m cluster ...`), with the release table file pointed at a copy: a wrapper instead of an
# edit of cluster/ (cluster.knowledge.releases reads its file lazily, through PATH).
WRAPPER = textwrap.dedent("""
    import runpy, sys
    from pathlib import Path
    import cluster.knowledge.releases as releases
    releases.PATH = Path(sys.argv[1])
    sys.argv = ["cluster"] + sys.argv[2:]
    runpy.run_module("cluster", run_name="__main__", alter_sys=True)
""")


def plant_flag(tmp_path: Path) -> Path:
    """A copy of releases.json in which vLLM 0.6.3 has FLAG (takes an int value)."""
    from cluster.knowledge import releases
    data = json.loads(releases.PATH.read_text())
    pools = data["pools"]
    assert not any(f[0] == FLAG for f in pools["flags"])
    pools["flags"].append([FLAG, True, None, "int", None])  # name + releases.FLAG_FIELDS
    new_id = len(pools["flags"]) - 1
    rec = next(r for r in data["releases"] if r["version"] == VERSION)
    rec["flags"] = f"{rec['flags']},{new_id}" if rec["flags"] else str(new_id)
    out = tmp_path / "releases.json"
    out.write_text(json.dumps(data))
    table = releases.decode(data, rec)  # as gpucluster will read it
    assert table["flags"][FLAG]["value"] is True
    return out


def gc_with_table(table: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRAPPER, str(table), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_wrong_flag_in_gpuclusters_table_fails_up_on_the_real_parser(rig, tmp_path):
    inv = inventory(rig, tmp_path, name="e2e-wrongflag", hosts=1, profile=f"vllm-v{VERSION}",
                    tensor_parallel=1, pipeline_parallel=1)
    override = ["--set", FLAG[2:] + "=1"]

    # the shipped table does not have the flag: gpucluster refuses it itself, nothing is started
    plain = gc("up", str(inv), "--yes", *override)
    assert plain.returncode != 0
    assert labelled(rig, "e2e-wrongflag") == {}

    table = plant_flag(tmp_path)
    plan = gc_with_table(table, "plan", str(inv), *override)  # now gpucluster believes 0.6.3 has the flag
    assert plan.returncode == 0 and f"{FLAG} 1" in plan.stdout, plan.stdout[-3000:] + plan.stderr[-3000:]
    try:
        up = gc_with_table(table, "up", str(inv), "--yes", "--ready-timeout", "300", *override, timeout=600)
        out = up.stdout + up.stderr
        assert up.returncode != 0, "up succeeded with a flag vLLM 0.6.3 does not have:\n" + out[-4000:]
        assert "unrecognized arguments: %s" % FLAG in out, out[-6000:]
    finally:
        gc("down", str(inv), "--yes")
    assert labelled(rig, "e2e-wrongflag") == {}
