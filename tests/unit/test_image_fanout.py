"""Image fan-out: the plan's shape, its runbook, the executor's skip/relay decisions, the layer selection on a
`docker save` layout, and the agent's chain (send -> relay -> relay) over loopback with real sockets."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import yaml

from cluster import image_fanout_agent as agent
from cluster import ops, render
from cluster.errors import ConfigError
from cluster.executor import Executor
from cluster.steps import Cmd, Put

AGENT = Path(agent.__file__)


def _inv(tmp_path: Path, hosts: int = 3, **cluster) -> Path:
    inv = {"cluster": {"name": "lab", "model_dir": "/Data/models", **cluster},
           "hosts": [{"name": f"h{i + 1}", "address": f"10.0.0.{i + 1}", "interface": "eth0",
                      "gpus": {"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160,
                               "compute_capability": "7.0"}} for i in range(hosts)],
           "deploy": {"profile": "vllm-v0.6.3", "model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel": 2,
                      "pipeline_parallel": hosts}}
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inv))
    return path


def _plan(tmp_path: Path, hosts: int = 3, **cluster):
    i, p = ops.load(str(_inv(tmp_path, hosts, **cluster)))
    return ops.make_plan(i, p)


def _image_steps(plan):
    return [s for s in plan.steps if s.phase in ("image", "image-fanout")]


# ---------------------------------------------------------------- plan shape
def test_lan_plan_pulls_once_and_chains_the_others(tmp_path):
    steps = _image_steps(_plan(tmp_path))
    assert [(s.id, s.phase) for s in steps] == [("h1/image", "image"), ("h1/image-send", "image-fanout"),
                                                ("h2/image", "image-fanout"), ("h3/image", "image-fanout")]
    pull, send, h2, h3 = steps
    assert any("pull" in op.argv for op in pull.all_ops() if isinstance(op, Cmd))
    assert send.needed_by == ("h2/image", "h3/image")
    assert h2.after == ("h3/image",) and h3.after == ("h2/image",)       # a present host still relays
    assert h2.variants["restart"] == h2.ops
    jobs = {s.id: json.loads(next(op.text for op in s.ops if isinstance(op, Put) and op.path.endswith(".json")))
            for s in (send, h2, h3)}
    assert jobs["h2/image"]["upstream"] == "10.0.0.1" and jobs["h2/image"]["downstream"] == "h3"
    assert jobs["h3/image"]["upstream"] == "10.0.0.2" and "downstream" not in jobs["h3/image"]
    assert jobs["h1/image-send"]["bind"] == "10.0.0.1"
    # the LAN path failing: the host pulls through the mirrors itself, its token file removed first
    alt = h3.otherwise[0]
    assert alt[0].argv[:2] == ("rm", "-f") and alt[1].argv[:2] == ("docker", "pull")
    # nothing from any host reaches the pull on a second up: every target's check skips a present image
    assert all(s.check and s.check.argv[:3] == ("docker", "image", "inspect") for s in (pull, h2, h3))


def test_token_is_a_secret_file_never_argv(tmp_path):
    plan = _plan(tmp_path)
    steps = _image_steps(plan)
    token = next(k for s in steps for op in s.all_ops() if isinstance(op, Put) for k, v in op.secrets)
    assert token == "GPUCLUSTER_TRANSFER_TOKEN"
    secret = next(v for s in steps for op in s.all_ops() if isinstance(op, Put) for _, v in op.secrets)
    dumped = json.dumps([s.as_dict() for s in steps])
    assert secret.reveal() not in dumped and "***" in dumped
    puts = [op for s in steps for op in s.all_ops() if isinstance(op, Put) and op.secrets]
    assert all(op.mode == 0o600 for op in puts)
    assert all(secret.reveal() not in " ".join(op.argv) for s in steps for op in s.all_ops() if isinstance(op, Cmd))


@pytest.mark.parametrize("hosts,cluster", [(3, {"image_fanout": "mirror"}), (1, {})])
def test_mirror_mode_and_single_host_pull_everywhere(tmp_path, hosts, cluster):
    steps = _image_steps(_plan(tmp_path, hosts, **cluster))
    assert [s.id for s in steps] == [f"h{i + 1}/image" for i in range(hosts)]
    assert {s.phase for s in steps} == {"image"}


def test_bad_switch_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        ops.load(str(_inv(tmp_path, image_fanout="torrent")))
    text = str(e.value)
    assert "image_fanout" in text and "\n" not in text.strip()


def test_runbook_shows_the_chain(tmp_path):
    plan = _plan(tmp_path)
    book = render.runbook(plan)
    assert "# ==== phase image-fanout on host h2" in book
    assert "image_fanout_agent.py relay /var/lib/gpucluster/lab/h2/image/relay.json" in book
    assert "Export first: GPUCLUSTER_TRANSFER_TOKEN" in book
    assert "|| { rm -f /var/lib/gpucluster/lab/h3/image/relay.secret && docker pull" in book


# ---------------------------------------------------------------- the executor's decisions
class _Hosts:
    """Answers each host's `docker image inspect` as if the image is (or is not) there."""

    def __init__(self, present: set[str]):
        self.present = present

    def host(self, name):
        return name

    def run(self, host, argv, timeout=None):
        class R:
            rc, stdout, stderr = (0, "skip present sha256:abc\n", "") if host in self.present else (1, "", "none")
        return R()


@pytest.mark.parametrize("present,expect", [
    ({"h1", "h2", "h3"}, {"h1/image": "would-skip", "h1/image-send": "would-skip", "h2/image": "would-skip",
                          "h3/image": "would-skip"}),
    ({"h1", "h2"}, {"h1/image": "would-skip", "h1/image-send": "would-run", "h2/image": "would-run restart",
                    "h3/image": "would-run"}),
    (set(), {"h1/image": "would-run", "h1/image-send": "would-run", "h2/image": "would-run", "h3/image": "would-run"}),
])
def test_dry_run_skips_complete_hosts_and_relays_through_present_ones(tmp_path, present, expect):
    steps = _image_steps(_plan(tmp_path))
    report = Executor(_Hosts(present)).evaluate(steps)
    got = {o.step.id: o.status + (f" {o.variant}" if o.variant else "") for o in report.outcomes}
    assert got == expect


# ---------------------------------------------------------------- layer selection
def _layer(seed: str, size: int = 3000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        data = (seed * size).encode()[:size]
        info = tarfile.TarInfo(f"{seed}.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _save_tar(layers: list[bytes], *, oci: bool, tag: str = "img:1") -> tuple[bytes, str, list[str]]:
    """A tarball in `docker save`'s layout (legacy <v1id>/layer.tar, or Docker 25's blobs/sha256), its ID, diff IDs."""
    diff_ids = ["sha256:" + hashlib.sha256(b).hexdigest() for b in layers]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}, "os": "linux"}).encode()
    image_id = "sha256:" + hashlib.sha256(config).hexdigest()
    files: list[tuple[str, bytes]] = []
    paths = []
    for i, b in enumerate(layers):
        if oci:
            paths.append(f"blobs/sha256/{diff_ids[i][7:]}")
        else:   # v1 IDs do not reveal the diff ID (sorted names, like docker's own tar of its temp folder)
            paths.append(f"{hashlib.sha256(b'v1' + bytes([i])).hexdigest()}/layer.tar")
        files.append((paths[-1], b))
    cfg_path = f"blobs/sha256/{image_id[7:]}" if oci else f"{image_id[7:]}.json"
    files.append((cfg_path, config))
    files.append(("manifest.json", json.dumps([{"Config": cfg_path, "RepoTags": [tag], "Layers": paths}]).encode()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue(), image_id, diff_ids


def _names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return [m.name for m in t.getmembers()]


@pytest.mark.parametrize("oci", [False, True])
def test_filter_save_leaves_out_only_the_skipped_layers(tmp_path, oci):
    layers = [_layer("a"), _layer("b"), _layer("c")]
    data, _, diff_ids = _save_tar(layers, oci=oci)
    out = io.BytesIO()
    counts = agent.filter_save(io.BytesIO(data), out, set(diff_ids[:2]), str(tmp_path))
    kept = _names(out.getvalue())
    assert counts["skipped"] == 2 and counts["bytes"] == len(out.getvalue())
    assert "manifest.json" in kept and len(kept) == len(_names(data)) - 2
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as t:       # the kept layer is byte for byte the same
        blobs = [t.extractfile(m).read() for m in t.getmembers() if m.size == len(layers[2])]
    assert layers[2] in blobs and layers[0] not in blobs and layers[1] not in blobs
    assert list(tmp_path.iterdir()) == []                             # spool files are gone


def test_need_layers_follows_chain_ids():
    d = ["sha256:" + c * 64 for c in "abc"]
    have = agent.present_chain_ids([d[:2]])
    assert agent.need_layers(d, have) == [2]
    assert agent.need_layers(d, agent.present_chain_ids([[d[1]]])) == [0, 1, 2]   # a layer on another base differs
    assert agent.chain_ids(d)[0] == d[0]


# ---------------------------------------------------------------- the chain over loopback, real sockets
FAKE_DOCKER = '''#!/usr/bin/env python3
"""stand-in for the docker CLI (test only): images in $FAKE_DOCKER/images.json, `save` prints save.tar, `load`
refuses a manifest layer that is neither in the stream nor present (by chain ID), as Docker's load does."""
import hashlib, io, json, os, sys, tarfile
sys.path.insert(0, os.environ["AGENT_DIR"])
from image_fanout_agent import chain_ids
state = os.environ["FAKE_DOCKER"]
db_path = os.path.join(state, "images.json")
db = json.load(open(db_path)) if os.path.exists(db_path) else {}
a = sys.argv[1:]
if a[:2] == ["image", "inspect"]:
    fmt, names = a[3], a[4:]
    found = [db.get(n) or next((i for i in db.values() if i["id"] == n), None) for n in names]
    if not all(found):
        sys.exit("Error: No such image")
    for img in found:
        print(img["id"] if fmt == "{{.Id}}" else json.dumps(img["layers"]))
elif a[:2] == ["image", "ls"]:
    print("\\n".join(sorted({i["id"] for i in db.values()})))
elif a[0] == "info":
    print("[]")
elif a[0] == "save":
    sys.stdout.buffer.write(open(os.path.join(state, "save.tar"), "rb").read())
elif a[0] == "load":
    data = sys.stdin.buffer.read()
    open(os.path.join(state, "loaded.tar"), "wb").write(data)
    t = tarfile.open(fileobj=io.BytesIO(data))
    names = set(t.getnames())
    m = json.load(t.extractfile("manifest.json"))[0]
    config = t.extractfile(m["Config"]).read()
    diffs = json.loads(config)["rootfs"]["diff_ids"]
    have = {c for i in db.values() for c in chain_ids(i["layers"])}
    for path, chain in zip(m["Layers"], chain_ids(diffs)):
        if chain not in have and path not in names:
            sys.exit("open " + path + ": no such file or directory")
    for tag in m["RepoTags"]:
        db[tag] = {"id": "sha256:" + hashlib.sha256(config).hexdigest(), "layers": diffs}
    json.dump(db, open(db_path, "w"))
    print("Loaded image: " + m["RepoTags"][0])
else:
    sys.exit("unknown " + " ".join(a))
'''


def _host(tmp: Path, name: str, images: dict, save: bytes | None = None) -> dict:
    state = tmp / name
    state.mkdir()
    (state / "images.json").write_text(json.dumps(images))
    if save is not None:
        (state / "save.tar").write_bytes(save)
    (state / "docker").write_text(FAKE_DOCKER)
    (state / "docker").chmod(0o755)
    return {"PATH": f"{state}:{os.environ['PATH']}", "FAKE_DOCKER": str(state), "AGENT_DIR": str(AGENT.parent)}


def _run_chain(tmp: Path, hosts: dict[str, dict], *, port: int, tokens: dict[str, str] | None = None,
               within: float = 20) -> dict[str, tuple[int, list[dict]]]:
    names = list(hosts)
    procs = {}
    for i, name in enumerate(names):
        tok = tmp / f"{name}.secret"
        tok.write_text(f"GPUCLUSTER_TRANSFER_TOKEN={(tokens or {}).get(name, 'right')}\n")
        tok.chmod(0o600)
        job = {"image": "img:1", "host": name, "bind": f"127.0.0.{i + 1}", "port": port, "token_file": str(tok),
               "spool": str(tmp), "accept_within": within, "connect_within": within}
        if i:
            job["upstream"] = f"127.0.0.{i}"
        if 0 < i < len(names) - 1:
            job["downstream"] = names[i + 1]
        (tmp / f"{name}.json").write_text(json.dumps(job))
        procs[name] = subprocess.Popen([sys.executable, "-u", str(AGENT), "send" if i == 0 else "relay",
                                        str(tmp / f"{name}.json")], env={**os.environ, **hosts[name]},
                                       stdout=subprocess.PIPE, text=True)
    out = {}
    for name, p in procs.items():
        text, _ = p.communicate(timeout=120)
        out[name] = (p.returncode, [json.loads(line) for line in text.splitlines() if line.strip()])
    return out


def _images(env: dict) -> dict:
    return json.loads((Path(env["FAKE_DOCKER"]) / "images.json").read_text())


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chain_delivers_the_same_image_id_to_every_host(tmp_path):
    layers = [_layer("a", 200_000), _layer("b", 3_000_000), _layer("c", 50_000)]
    save, image_id, diff_ids = _save_tar(layers, oci=False)
    hosts = {"h1": _host(tmp_path, "h1", {"img:1": {"id": image_id, "layers": diff_ids}}, save),
             "h2": _host(tmp_path, "h2", {}), "h3": _host(tmp_path, "h3", {})}
    res = _run_chain(tmp_path, hosts, port=_free_port())
    assert {n: rc for n, (rc, _) in res.items()} == {"h1": 0, "h2": 0, "h3": 0}, res
    for name in ("h2", "h3"):
        assert _images(hosts[name])["img:1"]["id"] == image_id
        assert (Path(hosts[name]["FAKE_DOCKER"]) / "loaded.tar").read_bytes() == save    # everything, unaltered
        assert "loaded img:1" in res[name][1][-1]["summary"]
    assert "3 of 3 layer(s)" in res["h1"][1][-1]["summary"]


def test_chain_sends_only_layers_some_host_lacks_and_relays_through_a_complete_host(tmp_path):
    layers = [_layer("a", 200_000), _layer("b", 3_000_000), _layer("c", 50_000)]
    save, image_id, diff_ids = _save_tar(layers, oci=False)
    base = {"base:1": {"id": "sha256:" + "e" * 64, "layers": diff_ids[:2]}}
    hosts = {"h1": _host(tmp_path, "h1", {"img:1": {"id": image_id, "layers": diff_ids}}, save),
             "h2": _host(tmp_path, "h2", {"img:1": {"id": image_id, "layers": diff_ids}}),   # complete: relays
             "h3": _host(tmp_path, "h3", base)}                                               # lacks layer c only
    res = _run_chain(tmp_path, hosts, port=_free_port())
    assert {n: rc for n, (rc, _) in res.items()} == {"h1": 0, "h2": 0, "h3": 0}, res
    assert "relayed" in res["h2"][1][-1]["summary"] and not (Path(hosts["h2"]["FAKE_DOCKER"]) / "loaded.tar").exists()
    loaded = (Path(hosts["h3"]["FAKE_DOCKER"]) / "loaded.tar").read_bytes()
    assert len(loaded) < 200_000 and [n for n in _names(loaded) if n.endswith("layer.tar")] != []
    assert _images(hosts["h3"])["img:1"]["id"] == image_id
    assert "1 of 3 layer(s)" in res["h1"][1][-1]["summary"]


def test_a_wrong_token_gets_nothing(tmp_path):
    save, image_id, diff_ids = _save_tar([_layer("a")], oci=False)
    hosts = {"h1": _host(tmp_path, "h1", {"img:1": {"id": image_id, "layers": diff_ids}}, save),
             "h2": _host(tmp_path, "h2", {})}
    res = _run_chain(tmp_path, hosts, port=_free_port(), tokens={"h2": "wrong"}, within=3)
    rc, events = res["h2"]
    assert rc == 1 and events[-1]["ev"] == "error" and "h2:" in events[-1]["msg"]
    assert "img:1" not in _images(hosts["h2"])
    assert res["h1"][0] == 0 and "no host connected" in res["h1"][1][-1]["summary"]   # h2 falls back to the mirrors
    assert any("wrong token" in e.get("msg", "") for e in res["h1"][1])


def test_a_cut_stream_is_not_loaded(tmp_path):
    """The upstream stops mid-stream: the receiver never hands docker load a partial image as complete."""
    import socket
    port = _free_port()
    server = agent.listen("127.0.0.1", port)
    got: dict = {}

    def upstream():
        link = agent.accept_downstream(server, "tok", 20, lambda e: None)
        agent.send_header(link, "tok", {"image": "img:1", "id": "sha256:" + "1" * 64, "layers": ["sha256:" + "2" * 64],
                                        "source": "h1"})
        link.send_frame(b"x" * 1000)
        link.sock.shutdown(socket.SHUT_RDWR)
        link.close()

    t = threading.Thread(target=upstream)
    t.start()
    link = agent.connect_upstream("127.0.0.1", port, "tok", "h2", 20)
    header = agent.recv_header(link, "tok")
    link.send_json({"need": [0]})
    assert link.recv_frame() == b"x" * 1000
    with pytest.raises(agent.FanoutError, match="cut short"):
        link.recv_frame()
    t.join()
    server.close()
    got["header"] = header
    assert got["header"]["source"] == "h1"
