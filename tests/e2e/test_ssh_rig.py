"""SSH through a bastion on the rig: the hosts refuse SSH from this machine, a bastion in its own network
namespace is the only way in; the inventory names only ssh config aliases; the key is a passphrase-protected
copy of the rig's key held by ssh-agent; the bastion's key is in a hashed known_hosts.

The fixture adds (and removes) only: namespace gcrig-bastion on the rig bridge at .9 with its own sshd, and one
iptables rule per host namespace rejecting TCP 22 from the control address. `rig down` would clean both up
(it removes every gcrig-* namespace and its processes) if a run were killed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from test_lifecycle import gc, inventory

pytestmark = pytest.mark.rig
NS = "gcrig-bastion"
PASSPHRASE = "rig bastion passphrase"


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {r.stderr}")
    return r


def _reject_rule(rig) -> list[str]:
    return ["-p", "tcp", "--dport", "22", "-s", rig.facts["control_address"], "-j", "REJECT", "--reject-with",
            "tcp-reset"]


@pytest.fixture(scope="module")
def bastion(rig, tmp_path_factory):
    d = tmp_path_factory.mktemp("bastion")
    subnet = rig.facts["subnet"].rsplit(".", 1)[0]
    address = f"{subnet}.9"
    procs: list[subprocess.Popen] = []
    added: list[str] = []
    try:
        # the bastion: a namespace on the rig bridge with its own sshd
        _sh("ip", "netns", "add", NS)
        _sh("ip", "link", "add", NS, "type", "veth", "peer", "name", "eth0", "netns", NS)
        _sh("ip", "link", "set", NS, "master", rig.facts["bridge"], "up")
        _sh("ip", "-n", NS, "addr", "add", f"{address}/24", "dev", "eth0")
        _sh("ip", "-n", NS, "link", "set", "eth0", "up")
        _sh("ip", "-n", NS, "link", "set", "lo", "up")
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "bastion_host_key"))
        shutil.copyfile(f"{rig.facts['ssh']['identity_file']}.pub", d / "authorized_keys")
        (d / "sshd_config").write_text(
            f"ListenAddress {address}\nPort 22\nHostKey {d / 'bastion_host_key'}\nPidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\nUsePAM no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nLogLevel VERBOSE\n"
            "AllowTcpForwarding yes\nMaxStartups 100:30:200\n")
        log = open(d / "sshd.log", "ab")
        procs.append(subprocess.Popen(["nsenter", f"--net=/run/netns/{NS}", shutil.which("sshd") or "/usr/sbin/sshd",
                                       "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log,
                                      stdin=subprocess.DEVNULL))
        log.close()
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection((address, 22), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or procs[0].poll() is not None:
                    raise AssertionError("bastion sshd did not start: " + (d / "sshd.log").read_text()[-2000:])
                time.sleep(0.1)
        # the hosts refuse SSH from this machine from now on
        for h in rig.host_names():
            _sh("ip", "netns", "exec", rig.host(h)["netns"], "iptables", "-w", "-I", "INPUT", *_reject_rule(rig))
            added.append(h)
        # the user's side: an agent holding a passphrase-protected copy of the rig's key, an ssh config
        key = d / "id_ed25519"
        shutil.copyfile(rig.facts["ssh"]["identity_file"], key)
        key.chmod(0o600)
        _sh("ssh-keygen", "-q", "-p", "-N", PASSPHRASE, "-f", str(key))
        shutil.copyfile(f"{rig.facts['ssh']['identity_file']}.pub", f"{key}.pub")
        sock = str(d / "agent.sock")
        procs.append(subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        askpass = d / "askpass"
        askpass.write_text(f"#!/bin/sh\necho '{PASSPHRASE}'\n")
        askpass.chmod(0o700)
        r = subprocess.run(["ssh-add", str(key)], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30,
                           env={**os.environ, "SSH_AUTH_SOCK": sock, "SSH_ASKPASS": str(askpass),
                                "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"})
        assert r.returncode == 0, r.stderr
        kh = d / "known_hosts_bastion"
        kh.write_text(f"# the bastion\n{address} {' '.join((d / 'bastion_host_key.pub').read_text().split()[:2])}\n")
        _sh("ssh-keygen", "-H", "-f", str(kh))
        (d / "empty").write_text("")
        hosts = "".join(f"Host rig-{h}\n  HostName {rig.address(h)}\n  User root\n  IdentityFile {key}\n"
                        f"  UserKnownHostsFile {rig.facts['ssh']['known_hosts']}\n  ProxyJump {{jump}}\n"
                        for h in rig.host_names())
        common = f"  HostName {address}\n  User root\n  IdentityFile {key}\n"
        (d / "config").write_text(hosts.replace("{jump}", "rig-bastion")
                                  + f"Host rig-bastion\n{common}  UserKnownHostsFile {kh}\n")
        (d / "config-unknown-bastion").write_text(hosts.replace("{jump}", "rig-bastion")
                                                  + f"Host rig-bastion\n{common}  UserKnownHostsFile {d / 'empty'}\n"
                                                  "  StrictHostKeyChecking no\n")
        yield {"dir": d, "address": address, "agent": sock, "log": d / "sshd.log"}
    finally:
        for h in added:
            _sh("ip", "netns", "exec", rig.host(h)["netns"], "iptables", "-w", "-D", "INPUT", *_reject_rule(rig),
                check=False)
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        _sh("ip", "netns", "del", NS, check=False)
        _sh("ip", "link", "del", NS, check=False)


def alias_inventory(rig, tmp_path: Path) -> Path:
    """The rig's inventory with nothing about SSH but an alias per host (no user, port, key or known_hosts)."""
    inv = inventory(rig, tmp_path, name="e2e-bastion", hosts=len(rig.host_names()))
    data = yaml.safe_load(inv.read_text())
    data["cluster"]["ssh"] = {"connect_timeout": 10}
    for h in data["hosts"]:
        h["ssh"] = {"host": f"rig-{h['name']}"}
    inv.write_text(yaml.safe_dump(data, sort_keys=False))
    return inv


def test_the_hosts_refuse_this_machine_directly(rig, bastion, tmp_path):
    r = gc("probe", str(inventory(rig, tmp_path, name="e2e-direct", hosts=len(rig.host_names()))))
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert r.stdout.count("UNREACHABLE: cannot connect: Connection refused") == len(rig.host_names()), r.stdout


def test_probe_through_the_bastion_with_aliases_and_the_agents_key(rig, bastion, tmp_path):
    env = {"GPUCLUSTER_SSH_CONFIG": str(bastion["dir"] / "config"), "SSH_AUTH_SOCK": bastion["agent"]}
    logins = bastion["log"].read_text().count("Accepted publickey for root")
    r = gc("probe", str(alias_inventory(rig, tmp_path)), "--json", env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    facts = json.loads(r.stdout)["hosts"]
    assert all(facts[h]["reachable"] and facts[h]["docker_version"] for h in rig.host_names()), facts
    assert bastion["log"].read_text().count("Accepted publickey for root") == logins + len(rig.host_names())


def test_without_the_agent_the_key_is_not_usable(rig, bastion, tmp_path):
    env = {"GPUCLUSTER_SSH_CONFIG": str(bastion["dir"] / "config"), "SSH_AUTH_SOCK": ""}
    r = gc("probe", str(alias_inventory(rig, tmp_path)), env=env)
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert r.stdout.count("UNREACHABLE: SSH authentication failed for root@") == len(rig.host_names()), r.stdout


def test_an_unknown_bastion_key_is_refused_even_with_accept_new(rig, bastion, tmp_path):
    env = {"GPUCLUSTER_SSH_CONFIG": str(bastion["dir"] / "config-unknown-bastion"), "SSH_AUTH_SOCK": bastion["agent"]}
    for extra in ([], ["--accept-new-host-keys"]):
        r = gc("probe", str(alias_inventory(rig, tmp_path)), *extra, env=env)
        assert r.returncode == 3 and "Traceback" not in r.stderr
        expect = f"UNREACHABLE: host key of jump host {bastion['address']} is not known (fix:"
        assert r.stdout.count(expect) == len(rig.host_names()), r.stdout
    assert (bastion["dir"] / "empty").read_text() == ""


def test_commands_files_and_logs_through_the_bastion(rig, bastion, tmp_path, monkeypatch):
    """The same interface as before, over the jump: a command, a 0600 file from stdin, SFTP, a stream."""
    from cluster import config, remote
    monkeypatch.setenv("GPUCLUSTER_SSH_CONFIG", str(bastion["dir"] / "config"))
    monkeypatch.setenv("SSH_AUTH_SOCK", bastion["agent"])
    inv = config.load_inventory(str(alias_inventory(rig, tmp_path)))
    path = f"/tmp/gpucluster-ssh-rig-{os.getpid()}/secret"
    with remote.Hosts(inv) as hosts:
        h = hosts.host("h1")
        assert hosts.run(h, ["hostname"]).stdout.strip() == "h1"
        hosts.put_text(h, path, "token-value\n")
        assert hosts.run(h, ["stat", "-c", "%a", path]).stdout.strip() == "600"
        sftp = hosts.sftp(h)
        try:
            f = sftp.open(path, "rb")
            assert f.read() == b"token-value\n"
            f.close()
        finally:
            sftp.close()
        lines: list[str] = []
        assert remote.stream(hosts, h, ["sh", "-c", "echo one; echo two"], lines.append) == 0
        assert lines == ["one", "two"]
        hosts.run(h, ["rm", "-rf", path.rsplit("/", 1)[0]])
