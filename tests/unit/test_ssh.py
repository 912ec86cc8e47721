"""cluster.remote over the OpenSSH client: options, quoting, the user's config, host-key failures as one line,
known_hosts appends under a lock.

Live parts run the real `ssh` client on loopback: against a closed port, and against a small paramiko SSH server
(a real key exchange with its own host key; every authentication refused), so the messages mapped are the ones
`ssh` really prints. The full path (sshd, agent, ProxyJump, certificates) is tests/e2e/test_ssh_real.py.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from cluster import config, remote
from cluster.config import SSH
from cluster.errors import RemoteError

HAVE_SSH = shutil.which("ssh") is not None and shutil.which("ssh-keygen") is not None
needs_ssh = pytest.mark.skipif(not HAVE_SSH, reason="the OpenSSH client (ssh, ssh-keygen) is not installed")
GPUS = {"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160, "compute_capability": "7.0"}


def inventory(tmp_path: Path, ssh: dict, hosts: list[dict] | None = None) -> config.Inventory:
    import yaml
    data = {"cluster": {"name": "t", "ssh": ssh},
            "hosts": hosts or [{"name": "h1", "address": "127.0.0.1", "gpus": GPUS}],
            "deploy": {"profile": "vllm-v0.3.0", "model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel": 2}}
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(data))
    return config.load_inventory(str(path))


def opts(argv: list[str]) -> dict[str, str]:
    """-o Key=Value pairs of an argv."""
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-o")


# ---------------------------------------------------------------- options: only what the inventory sets
def test_inventory_that_sets_nothing_leaves_user_port_identity_known_hosts_to_ssh_config():
    o = opts(remote.host_options(SSH(), accept_new=False))
    assert o == {"StrictHostKeyChecking": "yes", "ConnectTimeout": "10"}


def test_inventory_values_become_options_of_that_host():
    ssh = SSH(user="deploy", port=2222, identity_file="~/keys/id_ed25519", known_hosts="/etc/lab_known_hosts",
              connect_timeout=2.5)
    o = opts(remote.host_options(ssh, accept_new=False))
    assert o == {"User": "deploy", "Port": "2222", "IdentityFile": str(Path("~/keys/id_ed25519").expanduser()),
                 "IdentitiesOnly": "yes", "UserKnownHostsFile": "/etc/lab_known_hosts",
                 "StrictHostKeyChecking": "yes", "ConnectTimeout": "3"}


def test_accepting_new_keys_names_the_private_file_first():
    o = opts(remote.host_options(SSH(), accept_new=True, known_hosts=["/tmp/gc/new-0", "/home/u/.ssh/known_hosts"]))
    assert o["StrictHostKeyChecking"] == "accept-new"
    assert o["UserKnownHostsFile"] == "/tmp/gc/new-0 /home/u/.ssh/known_hosts"   # ssh writes new keys to the first


def test_per_host_override_reaches_only_that_host(tmp_path):
    inv = inventory(tmp_path, {"user": "root"}, [
        {"name": "a", "address": "10.0.0.1", "gpus": GPUS},
        {"name": "b", "address": "10.0.0.2", "gpus": GPUS, "ssh": {"host": "gpu-b", "port": 2200, "user": "ops"}}])
    a, b = (opts(remote.host_options(inv.ssh_for(h), accept_new=False)) for h in inv.hosts)
    assert a.get("User") == "root" and "Port" not in a
    assert b["User"] == "ops" and b["Port"] == "2200"
    assert [remote.target(inv, h) for h in inv.hosts] == ["10.0.0.1", "gpu-b"]


@pytest.mark.parametrize("value, quoted", [
    ("/home/u/.ssh/id", "/home/u/.ssh/id"),
    ("/home/my keys/id", '"/home/my keys/id"'),
    ("/k/100%/id", "/k/100%%/id"),                # ssh expands %-tokens in paths
    ("/k/it's#1", '"/k/it\'s#1"'),
    ("C:\\odd\\path", '"C:\\\\odd\\\\path"'),
])
def test_config_values_are_quoted(value, quoted):
    assert remote.cfg_quote(value) == quoted


@pytest.mark.parametrize("value", ['/k/"x', "/k/a\nIdentityFile /etc/shadow", "${HOME}/k", "a\x00b"])
def test_values_ssh_cannot_take_are_refused(value):
    with pytest.raises(ValueError):
        remote.cfg_quote(value)


@needs_ssh
@pytest.mark.parametrize("path", ["/tmp/my keys/id_ed25519", "/tmp/100%/id", "/tmp/it's #1/key", "/tmp/a\\b/k"])
def test_quoted_paths_reach_ssh_unchanged(path):
    """What ssh itself reads back (`ssh -G`, no connection) is the path the inventory named."""
    argv = ["ssh", "-F", "/dev/null", *remote.host_options(SSH(identity_file=path, known_hosts=path),
                                                           accept_new=False), "-G", "--", "example.invalid"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.splitlines()
    assert f"userknownhostsfile {path}" in out
    assert f"identityfile {path.replace('%', '%%')}" in out     # -G shows it before ssh expands its %-tokens


def test_config_rejects_hostile_ssh_values(tmp_path):
    for ssh in ({"user": "root -oProxyCommand=x"}, {"identity_file": 'a"b'}, {"known_hosts": "a\nb"},
                {"config": "${HOME}/x"}):
        with pytest.raises(config.ConfigError):
            inventory(tmp_path, ssh)


def test_command_is_one_shell_word_after_the_destination(tmp_path):
    """argv -> shlex.join -> the remote shell: hostile values come back as they were (run here with sh -c)."""
    inv = inventory(tmp_path, {"known_hosts": str(tmp_path / "kh")})
    hosts = remote.Hosts(inv)
    hosts._open = hosts._conn                  # build the argv without connecting
    hostile = ["$(touch pwned)", "`id`", "a b", "'", '"', ";rm -rf /", "x\ny", "-o", "--", "*", "$HOME", "\\"]
    try:
        argv = hosts._command(inv.hosts[0], ["printf", "%s\\0", *hostile])
        assert argv[-3:-1] == ["--", "127.0.0.1"] and argv.count("--") == 1
        assert shlex.split(argv[-1]) == ["printf", "%s\\0", *hostile]
        out = subprocess.run(["sh", "-c", argv[-1]], capture_output=True, cwd=tmp_path, timeout=30).stdout
        assert out.decode().split("\0")[:-1] == hostile and not (tmp_path / "pwned").exists()
        assert opts(argv)["ControlMaster"] == "no" and "-T" in argv
    finally:
        hosts.close()


def test_private_folder_and_config_are_private_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCLUSTER_SSH_CONFIG", str(tmp_path / "cfg"))
    (tmp_path / "cfg").write_text("Host x\n  User u\n")
    hosts = remote.Hosts(inventory(tmp_path, {}))
    d = hosts._workdir()
    assert os.stat(d).st_mode & 0o777 == 0o700 and os.stat(f"{d}/config").st_mode & 0o777 == 0o600
    text = Path(f"{d}/config").read_text()
    assert f"Include {tmp_path / 'cfg'}" in text
    hosts.close()
    assert not os.path.exists(d)


# ---------------------------------------------------------------- the user's ssh config, under forced checking
def test_generated_config_puts_forced_settings_first():
    text = remote.config_text("/home/u/.ssh/config", system_file="/etc/ssh/ssh_config").splitlines()
    assert text[1:5] == ["Host *", "  BatchMode yes", "  StrictHostKeyChecking yes", "  UpdateHostKeys no"]
    assert text[5:7] == ["Include /home/u/.ssh/config", "Include /etc/ssh/ssh_config"]
    assert text[7] == "Host *" and "  ServerAliveInterval 15" in text[8:]


@needs_ssh
def test_alias_user_port_identity_from_the_users_config_and_no_way_to_loosen_checking(tmp_path):
    user = tmp_path / "config"
    user.write_text("Host gpu1\n  HostName 192.0.2.7\n  User ops\n  Port 2201\n  IdentityFile /keys/gpu\n"
                    "  StrictHostKeyChecking no\n  BatchMode no\n  UpdateHostKeys yes\n"
                    "  UserKnownHostsFile /dev/null\n"
                    "Match host 192.0.2.7 exec true\n  ServerAliveInterval 3\n")
    gen = tmp_path / "gen"
    gen.write_text(remote.config_text(str(user), system_file=None))

    def resolved(*extra):
        r = subprocess.run(["ssh", "-F", str(gen), *extra, "-G", "--", "gpu1"], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        return {k: v for k, _, v in (ln.partition(" ") for ln in r.stdout.splitlines())}
    g = resolved(*remote.host_options(SSH(), accept_new=False))
    assert (g["hostname"], g["user"], g["port"], g["identityfile"]) == ("192.0.2.7", "ops", "2201", "/keys/gpu")
    assert (g["stricthostkeychecking"], g["batchmode"], g["updatehostkeys"]) == ("true", "yes", "false")
    assert g["serveraliveinterval"] == "3"          # Match blocks apply: the user's value over our default
    g = resolved(*remote.host_options(SSH(user="root", port=22), accept_new=False))
    assert (g["user"], g["port"]) == ("root", "22")  # what the inventory sets wins over the config


def test_which_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv("GPUCLUSTER_SSH_CONFIG", raising=False)
    assert remote.user_config(SSH()) == (str(Path("~/.ssh/config").expanduser()), False)
    monkeypatch.setenv("GPUCLUSTER_SSH_CONFIG", "/env/config")
    assert remote.user_config(SSH()) == ("/env/config", True)
    assert remote.user_config(SSH(config="/inv/config")) == ("/inv/config", True)


def test_a_named_config_that_does_not_exist_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCLUSTER_SSH_CONFIG", str(tmp_path / "nope"))
    with remote.Hosts(inventory(tmp_path, {})) as hosts, pytest.raises(RemoteError) as e:
        hosts.run(hosts.host("h1"), ["true"])
    assert e.value.failures == {"h1": f"ssh config {tmp_path / 'nope'} does not exist (set by GPUCLUSTER_SSH_CONFIG)"}


def test_ssh_does_not_hand_this_machines_locale_to_the_hosts():
    env = remote.ssh_env({"LANG": "de_DE.UTF-8", "LC_ALL": "x", "LC_TIME": "y", "SSH_AUTH_SOCK": "/a", "PATH": "/b"})
    assert env == {"SSH_AUTH_SOCK": "/a", "PATH": "/b"}


# ---------------------------------------------------------------- ssh's messages -> one line
# Captured from OpenSSH 9.2p1 (Debian 12) against real sshd on loopback (the e2e test asserts them live too).
UNKNOWN_JUMP = ("No ED25519 host key is known for [127.0.0.1]:42023 and you have requested strict checking.\n"
                "Host key verification failed.\nkex_exchange_identification: Connection closed by remote host\n"
                "Connection closed by UNKNOWN port 65535\n")
CHANGED = """@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
It is also possible that a host key has just been changed.
The fingerprint for the ED25519 key sent by the remote host is
SHA256:X+R4kDuCFCvqPMRB2dFLEQHmdEhwmF4U7ujIAEPXgvQ.
Please contact your system administrator.
Add correct host key in /tmp/sshx/new2 to get rid of this message.
Offending ED25519 key in /tmp/sshx/kh2:1
  remove with:
  ssh-keygen -f "/tmp/sshx/kh2" -R "[127.0.0.1]:42022"
Host key for [127.0.0.1]:42022 has changed and you have requested strict checking.
Host key verification failed.
"""
AUTH = ("Warning: Identity file /nonexist/key not accessible: No such file or directory.\n"
        "root@127.0.0.1: Permission denied (publickey).\n")
JUMP_CONNECT = ("channel 0: open failed: connect failed: Connection refused\nstdio forwarding failed\n"
                "kex_exchange_identification: Connection closed by remote host\n"
                "Connection closed by UNKNOWN port 65535\n")
CONFIG = ("/tmp/sshx/userconf2: line 13: Bad configuration option: foo\n"
          "/tmp/sshx/userconf2: terminating, 1 bad configuration options\n")
TIMEOUT = "Connection timed out during banner exchange\nConnection to 10.255.255.1 port 22 timed out\n"


@pytest.mark.parametrize("stderr, names, expect, transient", [
    (UNKNOWN_JUMP, {"[127.0.0.1]:42022"}, "host key of jump host [127.0.0.1]:42023 is not known (fix: check its "
     "fingerprint and add it to the known_hosts your ssh config uses for it; --accept-new-host-keys covers only "
     "the inventory's hosts)", False),
    (UNKNOWN_JUMP, {"[127.0.0.1]:42023"}, "host key of [127.0.0.1]:42023 is not in known_hosts (fix: add it with "
     "ssh-keyscan after checking its fingerprint, or pass --accept-new-host-keys)", False),
    (CHANGED, {"[127.0.0.1]:42022"}, "host key of [127.0.0.1]:42022 has CHANGED: /tmp/sshx/kh2:1 holds another key "
     "(possible man-in-the-middle; refused. If the host was reinstalled, check its new fingerprint, then remove the "
     "old line: ssh-keygen -R '[127.0.0.1]:42022' -f /tmp/sshx/kh2)", False),
    (AUTH, (), "SSH authentication failed for root@127.0.0.1 (publickey; Warning: Identity file /nonexist/key not "
     "accessible: No such file or directory; fix: check ssh.user and ssh.identity_file or your ssh config, or add "
     "the key to ssh-agent)", False),
    (JUMP_CONNECT, (), "the jump host cannot connect: Connection refused", True),
    (CONFIG, (), "ssh config: /tmp/sshx/userconf2: line 13: Bad configuration option: foo", False),
    (TIMEOUT, (), "connection timed out", True),
    ("ssh: connect to host 10.0.0.9 port 22: No route to host\r\n", (), "cannot connect: No route to host", True),
    ("ssh: Could not resolve hostname gpu9: Name or service not known\n", (), "cannot resolve gpu9: Name or service "
     "not known (fix: check the address, or hosts[].ssh.host and its Host entry in your ssh config)", False),
    ("", (), "ssh exited with code 255", True),
])
def test_ssh_messages_become_one_line_with_the_fix(stderr, names, expect, transient):
    f = remote.explain(stderr, names=names, rc=255)
    assert (f.text, f.transient) == (expect, transient) and "\n" not in f.text


@needs_ssh
def test_closed_port_live_is_one_line(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                            # nothing listens there now
    r = subprocess.run(["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-p", str(port), "127.0.0.1", "true"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 255
    assert remote.explain(r.stderr, rc=r.returncode) == remote.Failure("cannot connect: Connection refused", True)


# ---------------------------------------------------------------- live: the real ssh client, a paramiko server
class FakeSSHD:
    """A paramiko SSH server on 127.0.0.1: a real key exchange with its host key, every authentication refused."""

    def __init__(self, keyfile: Path):
        import paramiko
        self.paramiko = paramiko
        self.key = paramiko.Ed25519Key.from_private_key_file(str(keyfile))
        self.public = (keyfile.with_suffix(".pub")).read_text().split()[:2]
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.transports = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        paramiko = self.paramiko

        class Refuse(paramiko.ServerInterface):
            def get_allowed_auths(self, username):
                return "publickey"

            def check_auth_publickey(self, username, key):
                return paramiko.AUTH_FAILED
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = paramiko.Transport(conn)
            t.add_server_key(self.key)
            self.transports.append(t)
            try:
                t.start_server(server=Refuse())
            except Exception:  # noqa: BLE001 - the client hung up (unknown key): that is the point
                pass

    def close(self):
        self.sock.close()
        for t in self.transports:
            t.close()


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)], check=True)
    return path


@pytest.fixture
def sshd(tmp_path):
    pytest.importorskip("paramiko")
    if not HAVE_SSH:
        pytest.skip("the OpenSSH client is not installed")
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    server = FakeSSHD(keygen(tmp_path / "hostkey"))
    yield server
    server.close()


@pytest.fixture
def client(tmp_path, monkeypatch):
    """An inventory for the fake server: our own key, an empty user config (nothing of the machine's applies)."""
    (tmp_path / "user_config").write_text("# empty\n")
    monkeypatch.setenv("GPUCLUSTER_SSH_CONFIG", str(tmp_path / "user_config"))
    keygen(tmp_path / "id")

    def make(sshd, known_hosts: Path) -> config.Inventory:
        return inventory(tmp_path, {"user": "root", "port": sshd.port, "identity_file": str(tmp_path / "id"),
                                    "known_hosts": str(known_hosts), "connect_timeout": 5})
    return make


def failure(inv, **kw) -> str:
    with remote.Hosts(inv, **kw) as hosts, pytest.raises(RemoteError) as e:
        hosts.run(hosts.host("h1"), ["true"])
    (line,) = e.value.failures.values()
    assert "\n" not in line
    return line


def test_unknown_host_key_is_refused_with_the_fix(sshd, client, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("# lab hosts\n")
    line = failure(client(sshd, kh))
    assert line == (f"host key of [127.0.0.1]:{sshd.port} is not in {kh} (fix: add it with ssh-keyscan after "
                    "checking its fingerprint, or pass --accept-new-host-keys)")
    assert kh.read_text() == "# lab hosts\n"


def test_changed_host_key_is_refused_even_when_accepting_new_ones(sshd, client, tmp_path):
    other = keygen(tmp_path / "other").with_suffix(".pub").read_text().split()[:2]
    kh = tmp_path / "known_hosts"
    before = f"# keep me\n[127.0.0.1]:{sshd.port} {' '.join(other)}\n"
    kh.write_text(before)
    for accept in (False, True):
        line = failure(client(sshd, kh), accept_new_host_keys=accept)
        assert line.startswith(f"host key of [127.0.0.1]:{sshd.port} has CHANGED: {kh}:2 holds another key")
        assert kh.read_text() == before


def test_known_key_gets_to_authentication_and_a_refusal_is_one_line(sshd, client, tmp_path):
    """A @cert-authority line, hashed entries and comments in known_hosts do not stop other hosts."""
    ca = keygen(tmp_path / "ca").with_suffix(".pub").read_text().split()[:2]
    kh = tmp_path / "known_hosts"
    kh.write_text(f"# comment\n@cert-authority *.lab.example {' '.join(ca)}\n")
    with kh.open("a") as f:
        f.write(f"[127.0.0.1]:{sshd.port} {' '.join(sshd.public)}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(kh)], check=True, capture_output=True)   # hashed, as Debian does
    assert "127.0.0.1" not in kh.read_text()
    line = failure(client(sshd, kh))
    assert line.startswith("SSH authentication failed for root@127.0.0.1 (publickey; fix:")


def test_accepting_a_new_key_appends_it_and_keeps_the_file(sshd, client, tmp_path):
    ca = keygen(tmp_path / "ca").with_suffix(".pub").read_text().split()[:2]
    kh = tmp_path / "known_hosts"
    before = f"# our lab, do not edit\n@cert-authority *.lab.example {' '.join(ca)}\n\n# end\n"
    kh.write_text(before)
    line = failure(client(sshd, kh), accept_new_host_keys=True)    # the key is taken; the server refuses everyone
    assert line.startswith("SSH authentication failed")
    after = kh.read_text()
    assert after.startswith(before) and len(after.splitlines()) == len(before.splitlines()) + 1
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{sshd.port}", "-f", str(kh)], capture_output=True,
                           text=True)
    assert found.returncode == 0 and " ".join(sshd.public) in found.stdout
    assert failure(client(sshd, kh)).startswith("SSH authentication failed")    # known now, without accepting


# ---------------------------------------------------------------- known_hosts: appended under a lock
def test_many_threads_append_under_the_lock_and_nothing_is_lost(tmp_path):
    kh = tmp_path / "known_hosts"
    before = ("# managed by hand: keep this comment\n@cert-authority *.example.org ssh-ed25519 AAAACA\n"
              "|1|c2FsdA==|aGFzaA== ssh-ed25519 AAAAHASHED\n10.0.0.1 ssh-ed25519 AAAAOLD\n")
    kh.write_text(before)
    lines = [f"10.1.{i}.{j} ssh-ed25519 AAAA{i}x{j}" for i in range(32) for j in range(20)]
    barrier = threading.Barrier(32)

    def worker(i):
        barrier.wait()
        for j in range(20):
            remote.append_known_hosts(kh, [lines[i * 20 + j], "10.0.0.1 ssh-ed25519 AAAAOLD", "# not copied"])
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = kh.read_text()
    assert after.startswith(before) and after.endswith("\n")
    added = after[len(before):].splitlines()
    assert sorted(added) == sorted(lines)                      # each once, whole lines, the old one not again


def test_append_to_a_file_without_final_newline_and_to_a_new_file(tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("# no newline at the end")
    assert remote.append_known_hosts(kh, ["h ssh-ed25519 AAAA"]) == ["h ssh-ed25519 AAAA"]
    assert kh.read_text() == "# no newline at the end\nh ssh-ed25519 AAAA\n"
    new = tmp_path / "sub" / "known_hosts"
    remote.append_known_hosts(new, ["h ssh-ed25519 AAAA", "h ssh-ed25519 AAAA"])
    assert new.read_text() == "h ssh-ed25519 AAAA\n" and new.stat().st_mode & 0o777 == 0o600
