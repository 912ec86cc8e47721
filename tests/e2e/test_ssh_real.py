"""SSH as users have it, against real sshd on loopback (no rig): an ssh config alias reached only through a
ProxyJump bastion, a passphrase-protected key held by ssh-agent, a hashed known_hosts for the bastion and an
`@cert-authority` line for the host (its sshd presents a host certificate signed by that CA).

Needs root (sshd) and OpenSSH (sshd, ssh, ssh-agent, ssh-add, ssh-keygen); skipped cleanly otherwise. Two sshd
listen on free high ports of 127.0.0.1 for the module and are stopped after it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster import config, remote
from cluster.errors import RemoteError

REPO = Path(__file__).resolve().parents[2]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
TOOLS = ("ssh", "ssh-agent", "ssh-add", "ssh-keygen")
PASSPHRASE = "correct horse battery staple"
missing = [t for t in TOOLS if not shutil.which(t)] + ([] if os.path.exists(SSHD) else ["sshd"])
pytestmark = pytest.mark.skipif(bool(missing) or os.geteuid() != 0,
                                reason=f"needs root and OpenSSH ({', '.join(missing) or 'not root'})")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 15
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd on port {port} did not answer")


def keygen(path: Path, *, passphrase: str = "", comment: str = "test") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", comment, "-f", str(path)],
                   check=True)
    return path


def pub(path: Path) -> str:
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


class Lab:
    """Two sshd (a bastion, a host behind it), an agent, an ssh config, known_hosts files."""

    def __init__(self, d: Path):
        self.d = d
        self.procs: list[subprocess.Popen] = []
        self.host_port, self.bastion_port, self.tight_port = free_port(), free_port(), free_port()
        os.makedirs("/run/sshd", exist_ok=True)
        self.ca = keygen(d / "ca", comment="lab CA")
        self.host_key = keygen(d / "host_key")
        subprocess.run(["ssh-keygen", "-q", "-s", str(self.ca), "-h", "-I", "gpu1", "-n", "127.0.0.1",
                        f"{self.host_key}.pub"], check=True, capture_output=True)
        self.bastion_key = keygen(d / "bastion_key")
        self.user_key = keygen(d / "user_key", passphrase=PASSPHRASE)
        (d / "authorized_keys").write_text(Path(f"{self.user_key}.pub").read_text())
        self.host_log = self._sshd("host", self.host_port, self.host_key, f"HostCertificate {self.host_key}-cert.pub")
        self.bastion_log = self._sshd("bastion", self.bastion_port, self.bastion_key, "")
        self.tight_log = self._sshd("tight", self.tight_port, self.host_key,     # one session per connection
                                    f"HostCertificate {self.host_key}-cert.pub\nMaxSessions 1")
        # known_hosts: the bastion's hashed (as Debian's HashKnownHosts writes it), the host only through its CA
        self.kh_bastion = d / "known_hosts_bastion"
        self.kh_bastion.write_text(f"[127.0.0.1]:{self.bastion_port} {pub(self.bastion_key)}\n")
        subprocess.run(["ssh-keygen", "-H", "-f", str(self.kh_bastion)], check=True, capture_output=True)
        os.unlink(f"{self.kh_bastion}.old")
        self.kh_hosts = d / "known_hosts_hosts"
        self.kh_hosts.write_text(f"# the lab's hosts: certificates from the lab CA\n"
                                 f"@cert-authority [127.0.0.1]:{self.host_port},[127.0.0.1]:{self.tight_port} "
                                 f"{pub(self.ca)}\n"
                                 f"192.0.2.1 {pub(self.bastion_key)}\n")
        (d / "empty_known_hosts").write_text("")
        self.agent_sock = str(d / "agent.sock")
        self.procs.append(subprocess.Popen(["ssh-agent", "-D", "-a", self.agent_sock], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))
        for _ in range(100):
            if os.path.exists(self.agent_sock):
                break
            time.sleep(0.05)
        askpass = d / "askpass"
        askpass.write_text(f"#!/bin/sh\necho '{PASSPHRASE}'\n")
        askpass.chmod(0o700)
        r = subprocess.run(["ssh-add", str(self.user_key)], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           env={**os.environ, "SSH_AUTH_SOCK": self.agent_sock, "SSH_ASKPASS": str(askpass),
                                "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}, timeout=30)
        assert r.returncode == 0, r.stderr
        common = f"  HostName 127.0.0.1\n  User root\n  IdentityFile {self.user_key}\n"
        self.config = d / "ssh_config"
        self.config.write_text(
            f"# a user's ~/.ssh/config\n"
            f"Host lab-bastion\n{common}  Port {self.bastion_port}\n  UserKnownHostsFile {self.kh_bastion}\n"
            f"Host lab-gpu1\n{common}  Port {self.host_port}\n  UserKnownHostsFile {self.kh_hosts}\n"
            f"  ProxyJump lab-bastion\n"
            f"Host lab-gpu1-strange-bastion\n{common}  Port {self.host_port}\n  UserKnownHostsFile {self.kh_hosts}\n"
            f"  ProxyJump lab-bastion-unknown\n"
            f"Host lab-bastion-unknown\n{common}  Port {self.bastion_port}\n"
            f"  UserKnownHostsFile {d / 'empty_known_hosts'}\n  StrictHostKeyChecking no\n"
            f"Host lab-tight\n{common}  Port {self.tight_port}\n  UserKnownHostsFile {self.kh_hosts}\n"
            f"Host lab-gpu1-dead-bastion\n{common}  Port {self.host_port}\n  UserKnownHostsFile {self.kh_hosts}\n"
            f"  ProxyJump root@127.0.0.1:{free_port()}\n")

    def _sshd(self, name: str, port: int, key: Path, extra: str) -> Path:
        conf, log = self.d / f"sshd_{name}.conf", self.d / f"sshd_{name}.log"
        conf.write_text(f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {key}\n{extra}\n"
                        f"PidFile {self.d / f'sshd_{name}.pid'}\nAuthorizedKeysFile {self.d / 'authorized_keys'}\n"
                        "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
                        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nLogLevel VERBOSE\n"
                        "Subsystem sftp internal-sftp\n")
        p = subprocess.Popen([SSHD, "-D", "-f", str(conf), "-E", str(log)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        wait_port(port, p, log)
        return log

    def logins(self, log: Path) -> int:
        return log.read_text().count("Accepted publickey for root")

    def inventory(self, tmp_path: Path, ssh: dict | None = None, host_ssh: dict | None = None) -> config.Inventory:
        host = {"name": "gpu1", "address": "127.0.0.1", "gpus": {"count": 2, "name": "Tesla V100-PCIE-16GB",
                                                                   "memory_mib": 16160, "compute_capability": "7.0"}}
        if host_ssh:
            host["ssh"] = host_ssh
        data = {"cluster": {"name": "ssh-real", "ssh": {"connect_timeout": 5, **(ssh or {})}}, "hosts": [host],
                "deploy": {"profile": "vllm-v0.3.0", "model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel": 2}}
        path = tmp_path / "inventory.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return config.load_inventory(str(path))

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("sshlab"))
    yield lab
    lab.close()


@pytest.fixture
def as_user(lab, monkeypatch):
    """This process as the user: the lab's ssh config, the agent holding the passphrase-protected key."""
    monkeypatch.setenv("GPUCLUSTER_SSH_CONFIG", str(lab.config))
    monkeypatch.setenv("SSH_AUTH_SOCK", lab.agent_sock)
    return lab


def one_failure(inv, **kw) -> str:
    with remote.Hosts(inv, **kw) as hosts, pytest.raises(RemoteError) as e:
        hosts.run(hosts.host("gpu1"), ["true"])
    (line,) = e.value.failures.values()
    assert "\n" not in line
    return line


def test_alias_through_the_bastion_with_the_agents_key_and_a_host_certificate(as_user, tmp_path):
    """Nothing about SSH in the inventory but the alias: user, port, key, jump host and known_hosts all come from
    the ssh config; the bastion's key is checked against its hashed known_hosts, the host's certificate against
    the @cert-authority line; one master connection carries every command, stream and file."""
    lab = as_user
    before = {f: f.read_text() for f in (lab.kh_bastion, lab.kh_hosts)}
    host_logins, bastion_logins = lab.logins(lab.host_log), lab.logins(lab.bastion_log)
    inv = lab.inventory(tmp_path, host_ssh={"host": "lab-gpu1"})
    hostile = ["$(touch /tmp/gc-pwned)", "a b", "'", '"', ";x", "-o", "--", "*", "\\"]
    with remote.Hosts(inv) as hosts:
        h = hosts.host("gpu1")
        r = hosts.run(h, ["printf", "%s\\n", *hostile])
        assert r.ok and r.stdout.splitlines() == hostile and not os.path.exists("/tmp/gc-pwned")
        r = hosts.run(h, ["sh", "-c", 'echo "$SSH_CONNECTION"; whoami'])
        assert r.stdout.split()[3] == str(lab.host_port) and r.stdout.split()[-1] == "root"
        assert hosts.run(h, ["sh", "-c", "echo out; echo err >&2; exit 7"]) == remote.Result(7, "out\n", "err\n")
        t0 = time.time()
        r = hosts.run(h, ["sleep", "30"], timeout=1)
        assert r.rc == remote.TIMED_OUT and "still running after 1 s" in r.stderr and time.time() - t0 < 10
        lines: list[str] = []
        assert remote.stream(hosts, h, ["sh", "-c", "for i in 1 2 3; do echo line $i; done; exit 3"],
                             lines.append) == 3
        assert lines == ["line 1", "line 2", "line 3"]
        secret = tmp_path / "remote" / "token"
        hosts.put_text(h, str(secret), "s3cret value\n")
        assert secret.read_text() == "s3cret value\n" and secret.stat().st_mode & 0o777 == 0o600
        assert secret.parent.stat().st_mode & 0o777 == 0o700
        payload = os.urandom(3 << 20)
        sftp = hosts.sftp(h)
        try:
            with sftp.open(str(tmp_path / "blob"), "wb") as w:
                w.set_pipelined(True)
                w.write(payload)
            f = sftp.open(str(tmp_path / "blob"), "rb")
            got = b"".join(iter(lambda: f.read(1 << 20), b""))
            f.close()
        finally:
            sftp.close()
        assert got == payload
    assert lab.logins(lab.host_log) == host_logins + 1          # one connection, multiplexed
    assert lab.logins(lab.bastion_log) == bastion_logins + 1    # and it went through the bastion
    assert {f: f.read_text() for f in (lab.kh_bastion, lab.kh_hosts)} == before


def test_the_inventory_can_name_user_port_and_key_itself(lab, tmp_path, monkeypatch):
    """No ssh config at all (an empty one); the key still comes from the agent (its file needs a passphrase)."""
    (tmp_path / "empty_config").write_text("")
    monkeypatch.setenv("GPUCLUSTER_SSH_CONFIG", str(tmp_path / "empty_config"))
    monkeypatch.setenv("SSH_AUTH_SOCK", lab.agent_sock)
    inv = lab.inventory(tmp_path, {"user": "root", "port": lab.host_port, "identity_file": str(lab.user_key),
                                   "known_hosts": str(lab.kh_hosts)})
    with remote.Hosts(inv) as hosts:
        assert hosts.run(hosts.host("gpu1"), ["echo", "ok"]).stdout == "ok\n"
    monkeypatch.delenv("SSH_AUTH_SOCK")
    assert one_failure(inv).startswith("SSH authentication failed for root@127.0.0.1 (publickey; fix:")


def test_without_the_agent_the_passphrase_key_is_not_usable(as_user, tmp_path, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK")
    line = one_failure(as_user.inventory(tmp_path, host_ssh={"host": "lab-gpu1"}))
    assert line.startswith("SSH authentication failed for root@127.0.0.1 (publickey")


def test_an_unknown_bastion_key_is_refused_even_when_accepting_new_keys(as_user, tmp_path):
    lab = as_user
    inv = lab.inventory(tmp_path, host_ssh={"host": "lab-gpu1-strange-bastion"})
    for accept in (False, True):
        line = one_failure(inv, accept_new_host_keys=accept)
        assert line.startswith(f"host key of jump host [127.0.0.1]:{lab.bastion_port} is not known (fix:")
    assert (lab.d / "empty_known_hosts").read_text() == ""


def test_a_bastion_that_does_not_answer_is_one_line(as_user, tmp_path):
    line = one_failure(as_user.inventory(tmp_path, host_ssh={"host": "lab-gpu1-dead-bastion"}))
    assert line == "cannot connect: Connection refused"


def test_unknown_host_key_refused_then_accepted_by_appending(as_user, tmp_path):
    """The inventory's known_hosts (no CA line in it): refused with the fix, from the CLI as one line; accepted
    with --accept-new-host-keys by appending one line, comments kept; a changed key is refused either way."""
    lab = as_user
    kh = tmp_path / "known_hosts"
    kh.write_text("# my hosts\n# keep this\n")
    inv = lab.inventory(tmp_path, {"known_hosts": str(kh)}, host_ssh={"host": "lab-gpu1"})
    expect = f"host key of [127.0.0.1]:{lab.host_port} is not in {kh} (fix: add it with ssh-keyscan"
    assert one_failure(inv).startswith(expect)
    r = subprocess.run([sys.executable, "-m", "cluster", "probe", inv.path], cwd=REPO, capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 3 and expect in r.stdout and "--accept-new-host-keys" in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and kh.read_text() == "# my hosts\n# keep this\n"
    with remote.Hosts(inv, accept_new_host_keys=True) as hosts:
        assert hosts.run(hosts.host("gpu1"), ["true"]).ok
    text = kh.read_text()
    assert text.startswith("# my hosts\n# keep this\n") and len(text.splitlines()) == 3
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{lab.host_port}", "-f", str(kh)], capture_output=True,
                           text=True)
    assert found.returncode == 0 and pub(lab.host_key) in found.stdout
    with remote.Hosts(inv) as hosts:                                   # known now
        assert hosts.run(hosts.host("gpu1"), ["true"]).ok
    kh.write_text(f"# my hosts\n[127.0.0.1]:{lab.host_port} {pub(lab.bastion_key)}\n")   # another key
    for accept in (False, True):
        line = one_failure(inv, accept_new_host_keys=accept)
        assert line.startswith(f"host key of [127.0.0.1]:{lab.host_port} has CHANGED: {kh}:2 holds another key")
    assert kh.read_text() == f"# my hosts\n[127.0.0.1]:{lab.host_port} {pub(lab.bastion_key)}\n"


def test_many_hosts_accepting_at_once_append_each_key_once(lab, tmp_path, monkeypatch):
    """Eight inventory hosts (aliases of the one sshd) accept their keys in parallel into one known_hosts."""
    cfg = tmp_path / "config"
    cfg.write_text("".join(f"Host n{i}\n  HostName 127.0.0.1\n  HostKeyAlias node{i}\n  Port {lab.host_port}\n"
                           f"  User root\n" for i in range(8)))
    monkeypatch.setenv("GPUCLUSTER_SSH_CONFIG", str(cfg))
    monkeypatch.setenv("SSH_AUTH_SOCK", lab.agent_sock)
    kh = tmp_path / "known_hosts"
    kh.write_text("# shared\n")
    inv = lab.inventory(tmp_path, {"known_hosts": str(kh)})
    data = yaml.safe_load(Path(inv.path).read_text())
    data["hosts"] = [{**data["hosts"][0], "name": f"h{i}", "address": f"127.0.0.{i + 1}", "ssh": {"host": f"n{i}"}}
                     for i in range(8)]
    Path(inv.path).write_text(yaml.safe_dump(data, sort_keys=False))
    inv = config.load_inventory(inv.path)
    with remote.Hosts(inv, accept_new_host_keys=True) as hosts:
        results = hosts.each(inv.hosts, lambda h: hosts.run(h, ["true"]).rc)
    assert results == {f"h{i}": 0 for i in range(8)}
    lines = kh.read_text().splitlines()
    assert lines[0] == "# shared" and len(lines) == 9
    for i in range(8):
        assert subprocess.run(["ssh-keygen", "-F", f"node{i}", "-f", str(kh)], capture_output=True).returncode == 0


def test_a_host_that_allows_one_session_per_connection_still_runs_commands_side_by_side(as_user, tmp_path):
    """sshd's MaxSessions caps the channels of the shared connection: ssh then opens one of its own, and the
    command's stderr does not carry ssh's note about it."""
    import threading
    inv = as_user.inventory(tmp_path, host_ssh={"host": "lab-tight"})
    before = as_user.logins(as_user.tight_log)
    with remote.Hosts(inv) as hosts:
        h = hosts.host("gpu1")
        slow: list = []
        t = threading.Thread(target=lambda: slow.append(hosts.run(h, ["sh", "-c", "sleep 2; echo slow"])))
        t.start()
        time.sleep(0.7)
        assert hosts.run(h, ["echo", "fast"]) == remote.Result(0, "fast\n", "")
        lines: list[str] = []
        assert remote.stream(hosts, h, ["echo", "streamed"], lines.append) == 0 and lines == ["streamed"]
        t.join()
        assert slow == [remote.Result(0, "slow\n", "")]
    assert as_user.logins(as_user.tight_log) >= before + 3       # the master, and a connection per extra command
