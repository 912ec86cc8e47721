"""Shared pytest fixtures. `rig`: simulated bare-metal GPU hosts (tests/rig/rig), one per test session.

Environment:
  GPUCLUSTER_RIG_DIR=/path    reuse a rig already brought up with `tests/rig/rig up --dir /path` (never torn down here)
  GPUCLUSTER_SKIP_RIG=1       skip every test that needs the rig instead of failing where it cannot run
  GPUCLUSTER_RIG_HOSTS=N      hosts for a rig this session creates (default 3)

Every test runs with GPUCLUSTER_OFFLINE=1 (no model hub is asked, not even the rig's) and GPUCLUSTER_CACHE_DIR in
its own temporary folder; a test marked `hub_online` may ask the hubs its inventory names (loopback or the rig's).
"""
import json
import os
import shutil
import subprocess

import pytest

RIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rig", "rig")


def pytest_configure(config):
    config.addinivalue_line("markers", "rig: needs the simulated-host test rig (root, tests/rig/rig setup done)")
    config.addinivalue_line("markers", "hub_online: may ask the model hub its inventory names (GPUCLUSTER_OFFLINE "
                                       "is not set for it)")


@pytest.fixture(autouse=True)
def _hub_offline(request, monkeypatch, tmp_path_factory):
    """No test reaches a model hub unless it opts in, and none reads or writes the user's cache."""
    monkeypatch.setenv("GPUCLUSTER_CACHE_DIR", str(tmp_path_factory.mktemp("gpucluster-cache")))
    if request.node.get_closest_marker("hub_online"):
        monkeypatch.delenv("GPUCLUSTER_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("GPUCLUSTER_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "rig" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.rig)


class Rig:
    """A live rig: .dir, .inventory (path of inventory.yaml), .facts (rig.json as a dict)."""

    def __init__(self, d, owned):
        self.dir = d
        self.inventory = os.path.join(d, "inventory.yaml")
        with open(os.path.join(d, "rig.json")) as f:
            self.facts = json.load(f)
        self.owned = owned

    def host(self, name):
        return next(h for h in self.facts["hosts"] if h["name"] == name)

    def host_names(self):
        return [h["name"] for h in self.facts["hosts"]]

    def address(self, name):
        return self.host(name)["address"]

    def docker_socket(self, name):
        return self.host(name)["docker_socket"]

    def unused_address(self):
        """An address on the rig LAN that nothing answers (for unreachable-host tests)."""
        return self.facts["unused_address"]

    def docker(self, host, *args, check=True, timeout=300, **kw):
        """`docker` against one host's daemon (its unix socket on this machine)."""
        h = self.host(host)
        env = dict(os.environ)
        env.pop("DOCKER_HOST", None)
        r = subprocess.run(["docker", "-H", h["docker_host"]] + list(args), capture_output=True, text=True,
                           timeout=timeout, env=env, **kw)
        if check and r.returncode != 0:
            raise AssertionError("docker %s on %s failed (%d):\n%s\n%s" % (" ".join(args), host, r.returncode,
                                                                          r.stdout[-3000:], r.stderr[-3000:]))
        return r

    def ssh_argv(self, host):
        s = self.facts["ssh"]
        return ["ssh", "-i", s["identity_file"], "-o", "UserKnownHostsFile=" + s["known_hosts"],
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                "-p", str(s["port"]), "%s@%s" % (s["user"], self.host(host)["address"])]

    def ssh(self, host, command, check=True, timeout=120):
        r = subprocess.run(self.ssh_argv(host) + [command], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError("ssh %s %r failed (%d):\n%s\n%s" % (host, command, r.returncode, r.stdout[-3000:],
                                                                    r.stderr[-3000:]))
        return r


def _live(d):
    try:
        with open(os.path.join(d, "rig.json")) as f:
            facts = json.load(f)
        sock = facts["hosts"][0]["docker_host"]
        return subprocess.run(["docker", "-H", sock, "version"], capture_output=True, timeout=20).returncode == 0
    except Exception:
        return False


@pytest.fixture(scope="session")
def rig(tmp_path_factory):
    d = os.environ.get("GPUCLUSTER_RIG_DIR")
    if d:
        if not _live(d):
            pytest.fail("GPUCLUSTER_RIG_DIR=%s is not a live rig (no rig.json or host h1's dockerd does not answer); "
                        "run `sudo tests/rig/rig up --dir %s` or unset it" % (d, d))
        yield Rig(d, owned=False)
        return
    if os.environ.get("GPUCLUSTER_SKIP_RIG") == "1":
        pytest.skip("GPUCLUSTER_SKIP_RIG=1: tests needing the simulated-host rig are skipped")
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root (the rig creates network namespaces, dockerd and sshd)")
    for tool in ("dockerd", "sshd", "docker-registry", "debootstrap", "ip", "nsenter"):
        if not shutil.which(tool) and not os.path.exists("/usr/sbin/" + tool):
            problems.append("`%s` not installed" % tool)
    if problems:
        pytest.fail("the simulated-host test rig cannot run here: %s.\nRun `sudo tests/rig/rig setup` on a Debian 12 "
                    "machine as root, or set GPUCLUSTER_SKIP_RIG=1 to skip tests marked `rig`."
                    % "; ".join(problems), pytrace=False)
    d = str(tmp_path_factory.mktemp("rig"))
    hosts = os.environ.get("GPUCLUSTER_RIG_HOSTS", "3")
    r = subprocess.run([RIG, "up", "--hosts", hosts, "--dir", d], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        subprocess.run([RIG, "down", "--dir", d], capture_output=True, timeout=600)
        pytest.fail("`tests/rig/rig up` failed (%d):\n%s" % (r.returncode, r.stderr[-6000:]), pytrace=False)
    try:
        yield Rig(d, owned=True)
    finally:
        subprocess.run([RIG, "down", "--dir", d], capture_output=True, timeout=600)
