"""Model delivery on the rig: download once on the head, fan out host to host, verify, repair, resume.

Every test uses its own cluster name (dl-...) and its own model folder on each rig host, removed afterwards.
The head is h3 so that the mirror's request log (per client address) is not mixed with other tests' pulls."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.rig
REPO = Path(__file__).resolve().parents[2]


def gc(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class Case:
    """A test inventory over all rig hosts, head h3, model folders under <host model_dir>/<name>/."""

    def __init__(self, rig, tmp_path: Path, name: str, *, model: str | None = None, **source):
        self.rig, self.name = rig, name
        data = yaml.safe_load(Path(rig.inventory).read_text())
        data["cluster"]["name"] = name
        self.roots = {}
        for h in data["hosts"]:
            root = os.path.join(rig.host(h["name"])["model_dir"], name)
            h["model_dir"] = root
            self.roots[h["name"]] = root
            h.pop("role", None)
        data["hosts"][-1]["role"] = "head"
        self.head = data["hosts"][-1]["name"]
        data["deploy"]["tensor_parallel"] = 2 * len(data["hosts"])   # every host is part of the deployment
        if model:
            data["deploy"]["model"] = model
        data["deploy"]["source"].update(source)
        self.model = data["deploy"]["model"]
        self.path = tmp_path / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(data, sort_keys=False))

    def model_dir(self, host: str) -> Path:
        return Path(self.roots[host]) / self.model.replace("/", "--")

    def pull(self, *extra: str) -> subprocess.CompletedProcess:
        return gc("model", "pull", str(self.path), *extra)

    def pull_ok(self) -> dict:
        r = self.pull("--json")
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout)["hosts"]

    def cleanup(self) -> None:
        for root in self.roots.values():
            shutil.rmtree(root, ignore_errors=True)
        for h in self.rig.facts["hosts"]:
            ids = self.rig.docker(h["name"], "ps", "-aq", "--filter", f"label=gpucluster.cluster={self.name}").stdout
            assert not ids.split(), f"delivery containers left on {h['name']}"
        assert not glob.glob(f"/var/lib/gpucluster/{self.name}/*/*.secret"), "a token file left on a host"


@pytest.fixture
def case(rig, tmp_path, request):
    made = []

    def make(name, **kw):
        c = Case(rig, tmp_path, name, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.cleanup()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_identical(rig, c: Case, hosts=None) -> None:
    want = {f["path"]: (f["size"], f["sha256"]) for f in rig.facts["model"]["files"]}
    for h in hosts or c.roots:
        d = c.model_dir(h)
        got = {str(p.relative_to(d)): (p.stat().st_size, sha256(p)) for p in d.rglob("*")
               if p.is_file() and not str(p.relative_to(d)).startswith(".gpucluster")}
        assert got == want, f"{h}: model differs from the mirror's"


class Log:
    """The mirror's request log (JSON lines); `since()` returns what was requested after the mark."""

    def __init__(self, path: str):
        self.path = path
        self.mark()

    def mark(self) -> None:
        self.offset = os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def since(self, client: str | None = None) -> list[dict]:
        with open(self.path) as f:
            f.seek(self.offset)
            lines = [json.loads(x) for x in f if x.strip()]
        return [x for x in lines if client is None or x["client"] == client]


def file_gets(entries: list[dict], model: str) -> list[str]:
    """Paths of model files downloaded (GET .../resolve/<rev>/<path>), in request order."""
    out = []
    for e in entries:
        if e["method"] == "GET" and f"/{model}/resolve/" in e["path"]:
            out.append(e["path"].split("/resolve/", 1)[1].split("/", 1)[1])
    return out


def addr(rig, host: str) -> str:
    return rig.host(host)["address"]


def test_hf_mirror_once_fanned_out_byte_identical_and_second_run_moves_nothing(rig, case):
    c = case("dl-fanout")
    log = Log(rig.facts["hf"]["access_log"])
    r = c.pull()
    assert r.returncode == 0, r.stderr[-3000:]
    assert_identical(rig, c)
    gets = file_gets(log.since(addr(rig, c.head)), c.model)
    assert sorted(gets) == sorted(f["path"] for f in rig.facts["model"]["files"]), "each file fetched exactly once"
    out = dict(line.split(": ", 1) for line in r.stdout.strip().splitlines())
    assert out[c.head].startswith("fetched") and all(out[h].startswith("copied") for h in out if h != c.head)
    assert f"{c.head}: download: " in r.stderr and "B/s" in r.stderr, r.stderr     # per-host progress
    assert all(f"{h}: copy" in r.stderr for h in c.roots if h != c.head), r.stderr
    for h in c.roots:
        m = json.loads((c.model_dir(h) / ".gpucluster-manifest.json").read_text())
        assert m["commit"] == rig.facts["model"]["revision"]
    log.mark()
    assert c.pull_ok() == {h: "present" for h in c.roots}
    assert log.since(addr(rig, c.head)) == [], "a complete cluster costs no request to the mirror"


def test_rerun_after_interrupted_download_fetches_only_what_is_missing(rig, case):
    c = case("dl-resume")
    c.pull_ok()
    d = c.model_dir(c.head)
    files = sorted(rig.facts["model"]["files"], key=lambda f: -f["size"])
    big, small = files[0]["path"], files[-1]["path"]
    with open(d / big, "r+b") as f:       # an interrupted download: half a shard ...
        f.truncate(files[0]["size"] // 2)
    (d / small).unlink()                  # ... and a file never started
    log = Log(rig.facts["hf"]["access_log"])
    hosts = c.pull_ok()
    assert sorted(file_gets(log.since(addr(rig, c.head)), c.model)) == sorted([big, small])
    assert hosts[c.head].startswith("fetched 2 file(s)")
    assert all(v == "present" for h, v in hosts.items() if h != c.head)
    assert_identical(rig, c)


def test_partial_file_left_by_a_killed_download_is_completed(rig, case):
    c = case("dl-partial")
    c.pull_ok()
    d = c.model_dir(c.head)
    big = max(rig.facts["model"]["files"], key=lambda f: f["size"])
    part = d / ".gpucluster-partial" / big["path"]
    part.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(d / big["path"], part)     # what a download killed midway leaves behind
    with open(part, "r+b") as f:
        f.truncate(big["size"] // 3)
    log = Log(rig.facts["hf"]["access_log"])
    hosts = c.pull_ok()
    assert file_gets(log.since(addr(rig, c.head)), c.model) == [big["path"]]
    assert hosts[c.head].startswith("fetched 1 file(s)")
    assert not part.exists()
    assert_identical(rig, c)


def test_corrupt_copy_on_one_host_is_detected_and_repaired(rig, case):
    c = case("dl-corrupt")
    c.pull_ok()
    victim = next(h for h in c.roots if h != c.head)
    big = max(rig.facts["model"]["files"], key=lambda f: f["size"])
    p = c.model_dir(victim) / big["path"]
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))             # same size, new mtime: the manifest no longer vouches for it
    log = Log(rig.facts["hf"]["access_log"])
    hosts = c.pull_ok()
    assert hosts[victim].startswith("repaired 1 file(s)") and f"from {c.head}" in hosts[victim]
    assert all(v == "present" for h, v in hosts.items() if h != victim)
    assert log.since(addr(rig, c.head)) == [], "repaired from the head; the mirror is not asked"
    assert_identical(rig, c)
    # corrupt again and put the verified mtime back: only a full verification can tell
    st = p.stat()
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert c.pull_ok()[victim] == "present"                                 # sizes and mtimes agree
    r = c.pull("--verify", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["hosts"][victim].startswith("repaired 1 file(s)")
    assert_identical(rig, c)


def test_download_on_control_pushes_to_the_head_only(rig, case, tmp_path, monkeypatch):
    c = case("dl-control", download_on="control")
    monkeypatch.setenv("GPUCLUSTER_CACHE", str(tmp_path / "cache"))
    log = Log(rig.facts["hf"]["access_log"])
    r = subprocess.run([sys.executable, "-m", "cluster", "model", "pull", str(c.path), "--json"], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env={**os.environ})
    assert r.returncode == 0, r.stderr[-3000:]
    hosts = json.loads(r.stdout)["hosts"]
    assert "from this machine" in hosts[c.head]
    assert all(v.startswith("copied") and "via this machine" not in v for h, v in hosts.items() if h != c.head)
    assert f"from {c.head}" in hosts[next(h for h in c.roots if h != c.head)]
    assert {e["client"] for e in log.since() if "/resolve/" in e["path"]} == {rig.facts["control_address"]}
    assert_identical(rig, c)


def test_modelscope_source(rig, case):
    if not rig.facts.get("modelscope", {}).get("endpoint"):
        pytest.skip("the rig has no ModelScope endpoint")
    c = case("dl-ms", kind="modelscope", endpoint=rig.facts["modelscope"]["endpoint"])
    log = Log(rig.facts["modelscope"]["access_log"])
    hosts = c.pull_ok()
    assert hosts[c.head].startswith("fetched")
    assert_identical(rig, c)
    gets = [e for e in log.since() if "FilePath=" in e["path"]]
    assert len(gets) == len(rig.facts["model"]["files"])
    assert c.pull_ok() == {h: "present" for h in c.roots}


def test_shared_model_dir_downloads_once_and_copies_nothing(rig, case, tmp_path):
    c = case("dl-shared")
    data = yaml.safe_load(c.path.read_text())
    data["cluster"]["shared_model_dir"] = True
    c.path.write_text(yaml.safe_dump(data, sort_keys=False))
    first = c.pull_ok()
    assert first[c.head].startswith("fetched")
    assert all(first[h] == "present" for h in c.roots if h != c.head)
    assert_identical(rig, c, hosts=[c.head])
    assert not any(c.model_dir(h).exists() for h in c.roots if h != c.head)


def test_missing_repository_is_one_clear_line(rig, case):
    c = case("dl-missing", model="gpucluster/no-such-model")
    r = c.pull()
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "gpucluster/no-such-model@main" in last and "HTTP" in last and "not found" in last, r.stderr
    assert "Traceback" not in r.stderr


def test_relay_through_this_machine_when_hosts_cannot_reach_each_other(rig, case):
    c = case("dl-relay")
    port = str(yaml.safe_load(c.path.read_text())["cluster"].get("transfer_port", 29650))
    rules = [["ip", "netns", "exec", rig.host(h)["netns"], "iptables", "{}", "OUTPUT", "-p", "tcp", "-d",
              addr(rig, c.head), "--dport", port, "-j", "REJECT"] for h in c.roots if h != c.head]
    for rule in rules:     # a firewall between the hosts: only this machine reaches them all (over SSH)
        subprocess.run([a if a != "{}" else "-I" for a in rule], check=True)
    try:
        r = c.pull()
    finally:
        for rule in rules:
            subprocess.run([a if a != "{}" else "-D" for a in rule], check=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = dict(line.split(": ", 1) for line in r.stdout.strip().splitlines())
    assert all(f"from {c.head} via this machine" in v for h, v in out.items() if h != c.head), out
    assert "fallback 1 worked" in r.stderr, r.stderr[-2000:]
    assert_identical(rig, c)


def test_chain_each_host_pulls_from_the_one_before(rig, case):
    c = case("dl-chain")
    hosts = c.pull_ok()
    order = [c.head] + [h for h in c.roots if h != c.head]
    for up, h in zip(order, order[1:]):
        assert hosts[h].startswith("copied") and f"from {up};" in hosts[h], hosts
    assert_identical(rig, c)
    assert c.pull_ok() == {h: "present" for h in c.roots}
