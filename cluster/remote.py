"""The only module that touches SSH: the OpenSSH client, one shared connection per host, commands as argv.

Why the OpenSSH client (`ssh`) and not fabric/paramiko: SSH has to work as the user's own `ssh` does.
paramiko cannot verify host certificates against `@cert-authority` lines (one such line made every host
"unreachable"), reads only part of ssh_config (no Match, Include or ProxyJump; a jump host had to be
opened by hand, without host-key checking), and rewrote known_hosts when it saved a key. `ssh` does all
of that itself: Host aliases, User, Port, IdentityFile, ProxyJump (the jump host's key checked like any
other), ssh-agent (keys with passphrases), hashed known_hosts, host certificates and `@revoked`.

How it is driven:
- `ssh -F` a config written for this run into a private 0700 folder: first `BatchMode yes` (never a
  prompt), `StrictHostKeyChecking yes` and `UpdateHostKeys no`, which come first so that no other config
  can loosen them (in ssh_config the first value wins) and which reach jump hosts too (ssh hands `-F` to
  the `ssh -W` it starts for ProxyJump); then `Include` the user's config (`cluster.ssh.config`, else
  $GPUCLUSTER_SSH_CONFIG, else ~/.ssh/config) and the system's, as plain `ssh` reads them.
- The inventory's user, port, identity_file and known_hosts become `-o` options of that host's
  connection only where the inventory sets them; otherwise the user's ssh config decides.
- One master connection per host (ControlMaster, socket in the private folder, ControlPersist so that a
  killed run's masters go away by themselves); every command, stream and SFTP session is a multiplexed
  channel on it (where sshd's MaxSessions refuses one, ssh opens a connection of its own). Commands are
  `shlex.join(argv)`, the one shell layer; file contents go over stdin or SFTP, never on a command line.
- Failures are one line per host with the fix (`explain`, from ssh's own messages); a master that fails
  through a jump host is asked once more without ControlPersist, because with it ssh sends the jump's
  stderr to /dev/null.
- Unknown host keys are refused unless --accept-new-host-keys (then `StrictHostKeyChecking accept-new`
  for the inventory's hosts only; a jump host's key must already be known). ssh writes a key it accepts
  into a private file named first in UserKnownHostsFile, and this module appends that line to the real
  known_hosts under flock: the file is never rewritten and its other lines and comments stay. A changed
  key is always refused.
- fabric is gone; paramiko is kept only for its SFTP protocol, spoken over `ssh -s HOST sftp` (model
  copies through this machine; reads keep a window of requests in flight); every byte still goes through
  the OpenSSH client.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from tenacity import retry, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_exponential

from .config import SSH, Host, Inventory
from .errors import RemoteError
from .executor import Result

T = TypeVar("T")
DEFAULT_TIMEOUT = 120.0     # seconds a remote command may take unless its caller says otherwise
TIMED_OUT = 124             # the exit code a timed-out command reports (as timeout(1) does)
SSH_FAILED = 255            # what `ssh` exits with when it, not the remote command, failed
CONTROL_PERSIST = 600       # seconds an idle master connection stays (reopened on demand after)
SYSTEM_CONFIG = "/etc/ssh/ssh_config"

# Settings no user config may override (they come first); then the user's and the system's config; then
# defaults the user's config may change (they come last).
FORCED = ("BatchMode yes", "StrictHostKeyChecking yes", "UpdateHostKeys no")
DEFAULTS = ("ServerAliveInterval 15", "ServerAliveCountMax 4")


class _Transient(Exception):
    """A connection failure worth another try (refused, timed out, closed by the server)."""


class _Fatal(Exception):
    """A connection failure another try will not fix (host key, authentication, name, config)."""


# Named retry policy, only at the I/O edge: connecting is retried, host keys and authentication are not.
connect_policy = retry(retry=retry_if_exception_type(_Transient), stop=stop_after_attempt(3) | stop_after_delay(40),
                       wait=wait_exponential(multiplier=1, max=8), reraise=True)


# ---------------------------------------------------------------- pure: options and config
def cfg_quote(value: str, *, tokens: bool = True) -> str:
    """One ssh_config argument: double-quoted when needed, `%` doubled where ssh expands %-tokens."""
    if any(c in value for c in '"\n\r\x00') or "${" in value:
        raise ValueError(f"{value!r} cannot be passed to ssh (no double quotes, newlines or '${{')")
    value = value.replace("%", "%%") if tokens else value
    if re.search(r"[\s'\\#]", value) or not value:
        return '"' + value.replace("\\", "\\\\") + '"'
    return value


def user_config(ssh: SSH) -> tuple[str, bool]:
    """The user's ssh config file and whether it was named explicitly (then it must exist)."""
    if ssh.config:
        return str(Path(ssh.config).expanduser()), True
    env = os.environ.get("GPUCLUSTER_SSH_CONFIG")
    if env:
        return str(Path(env).expanduser()), True
    return str(Path("~/.ssh/config").expanduser()), False


def config_text(user_file: str, *, system_file: str | None = SYSTEM_CONFIG) -> str:
    """The ssh_config this run passes with -F: forced settings, the user's and system's config, defaults."""
    lines = ["# written by gpucluster for one run; in ssh_config the first value wins, so these come first",
             "Host *", *(f"  {o}" for o in FORCED), f"Include {cfg_quote(user_file, tokens=False)}"]
    if system_file:
        lines.append(f"Include {cfg_quote(system_file, tokens=False)}")
    lines += ["Host *", *(f"  {o}" for o in DEFAULTS)]
    return "\n".join(lines) + "\n"


def host_options(ssh: SSH, *, accept_new: bool, known_hosts: list[str] | None = None) -> list[str]:
    """`-o` options for one inventory host: only what the inventory sets, plus host-key policy and timeout.

    known_hosts: the files to check against when they must be named (accepting new keys: the private file
    ssh writes new keys into first, then the real ones); None: the inventory's file if set, else ssh's."""
    opts: list[str] = []
    if ssh.user:
        opts += ["-o", f"User={cfg_quote(ssh.user)}"]
    if ssh.port:
        opts += ["-o", f"Port={int(ssh.port)}"]
    if ssh.identity_file:
        opts += ["-o", f"IdentityFile={cfg_quote(str(Path(ssh.identity_file).expanduser()))}",
                 "-o", "IdentitiesOnly=yes"]   # that key (from the agent or the file), not every key the agent has
    files = known_hosts if known_hosts is not None else (
        [str(Path(ssh.known_hosts).expanduser())] if ssh.known_hosts else [])
    if files:
        opts += ["-o", "UserKnownHostsFile=" + " ".join(cfg_quote(f) for f in files)]
    opts += ["-o", f"StrictHostKeyChecking={'accept-new' if accept_new else 'yes'}",
             "-o", f"ConnectTimeout={max(1, math.ceil(ssh.connect_timeout))}"]
    return opts


def ssh_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for `ssh`: this one, less the locale (SendEnv LANG LC_* would hand the hosts' commands
    this machine's locale; their output is parsed, so they keep their own)."""
    env = dict(os.environ if env is None else env)
    for k in list(env):
        if k in ("LANG", "LANGUAGE") or k.startswith("LC_"):
            del env[k]
    return env


# ---------------------------------------------------------------- pure: ssh's messages -> one line
@dataclass(frozen=True)
class Failure:
    text: str
    transient: bool = False


def explain(stderr: str, *, names: Iterable[str] = (), known_hosts: str = "known_hosts",
            rc: int | None = None) -> Failure:
    """One line (with the fix) for what `ssh` printed when it failed.

    names: how the target appears in known_hosts (`host` or `[host]:port`); a key message for another
    name is about a jump host."""
    lines = [ln.strip() for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    text = "\n".join(lines)
    names = set(names)

    def whose(name: str) -> str:
        return name if not names or name in names else f"jump host {name}"

    m = re.search(r"Host key for (\S+) has changed and you have requested strict checking", text)
    if m or "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        name = m.group(1) if m else "the host"
        off = re.search(r"Offending \S+ key in (\S+):(\d+)", text)
        where = f"{off.group(1)}:{off.group(2)}" if off else "known_hosts"
        fix = f"ssh-keygen -R '{name}'" + (f" -f {off.group(1)}" if off else "")
        return Failure(f"host key of {whose(name)} has CHANGED: {where} holds another key (possible "
                       f"man-in-the-middle; refused. If the host was reinstalled, check its new fingerprint, "
                       f"then remove the old line: {fix})")
    m = re.search(r"The \S+ host key for (\S+) is marked as revoked", text)
    if m or "REVOKED HOST KEY DETECTED" in text:
        return Failure(f"host key of {whose(m.group(1)) if m else 'the host'} is marked @revoked in known_hosts: "
                       "refused (a stolen key may be impersonating it)")
    m = re.search(r"No (\S+) host key is known for (\S+) and you have requested strict checking", text)
    if m:
        name = m.group(2)
        cert = re.search(r"Certificate invalid: (.+)", text)
        why = f" (its certificate is invalid: {cert.group(1).rstrip('.')})" if cert else ""
        if names and name not in names:
            return Failure(f"host key of jump host {name} is not known{why} (fix: check its fingerprint and "
                           "add it to the known_hosts your ssh config uses for it; --accept-new-host-keys "
                           "covers only the inventory's hosts)")
        return Failure(f"host key of {name} is not in {known_hosts}{why} (fix: add it with ssh-keyscan after "
                       "checking its fingerprint, or pass --accept-new-host-keys)")
    if "Host key verification failed" in text:
        return Failure(f"host key verification failed ({_last(lines)})")
    m = re.search(r"^(\S+): Permission denied \(([^)]*)\)", text, re.M)
    if m:
        why = [ln for ln in lines if re.match(r"(Warning: Identity file|Load key|no such identity)", ln)]
        extra = f"; {why[0].rstrip('.')}" if why else ""
        return Failure(f"SSH authentication failed for {m.group(1)} ({m.group(2)}{extra}; fix: check ssh.user "
                       "and ssh.identity_file or your ssh config, or add the key to ssh-agent)")
    m = re.search(r"Could not resolve hostname (\S+): (.+)", text)
    if m:
        reason = m.group(2).rstrip(".")
        return Failure(f"cannot resolve {m.group(1)}: {reason} (fix: check the address, or hosts[].ssh.host "
                       "and its Host entry in your ssh config)", transient="Temporary failure" in reason)
    if "stdio forwarding failed" in text or re.search(r"channel \d+: open failed", text):
        m = re.search(r"open failed: (?:connect failed: )?(.+)", text)
        return Failure(f"the jump host cannot connect: {m.group(1).rstrip('.') if m else _last(lines)}",
                       transient=True)
    m = re.search(r"ssh: connect to host \S+ port \d+: (.+)", text)
    if m:
        return Failure(f"cannot connect: {m.group(1).rstrip('.')}", transient=True)
    if re.search(r"timed out during banner exchange|Connection to \S+ port \d+ timed out|Connection timed out", text):
        return Failure("connection timed out", transient=True)
    m = re.search(r"(\S+: line \d+: .+|Bad owner or permissions on .+|Can't open user config file .+|"
                  r"no argument after keyword .+|Unsupported option .+)", text)
    if m:
        return Failure(f"ssh config: {m.group(1).rstrip('.')}")
    if re.search(r"kex_exchange_identification|Connection closed by|Connection reset by|"
                 r"Broken pipe|Connection to \S+ closed", text):
        return Failure(f"the server closed the connection ({_last(lines)})", transient=True)
    if not lines:
        return Failure(f"ssh exited with code {rc}" if rc is not None else "ssh failed", transient=rc == SSH_FAILED)
    return Failure(_last(lines))


def _last(lines: list[str]) -> str:
    keep = [ln for ln in lines if not ln.startswith(("Warning: Permanently added", "@"))] or lines
    return " ".join(keep[-1].split())[:400]


# ---------------------------------------------------------------- known_hosts
def append_known_hosts(path: str | os.PathLike, lines: Iterable[str]) -> list[str]:
    """Append host-key lines to a known_hosts file under an exclusive flock: never rewritten, lines already
    there are not added again, every other line and comment stays. Returns the lines appended."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            existing = f.read()
            have = {ln.strip() for ln in existing.decode("utf-8", "replace").splitlines()}
            new: list[str] = []
            for ln in lines:
                ln = ln.strip()
                if ln and not ln.startswith("#") and ln not in have and "\n" not in ln:
                    new.append(ln)
                    have.add(ln)
            if new:
                lead = b"\n" if existing and not existing.endswith(b"\n") else b""
                f.write(lead + "".join(ln + "\n" for ln in new).encode())
                f.flush()
                os.fsync(f.fileno())
            return new
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- the connections
class _Conn:
    """One inventory host: its destination, options and master connection."""

    def __init__(self, host: Host, ssh: SSH, dest: str, index: int, accept_new: bool):
        self.host, self.ssh, self.dest, self.index, self.accept_new = host, ssh, dest, index, accept_new
        self.lock = threading.Lock()
        self.opened = False
        self.resolved: dict[str, str] | None = None


class Hosts:
    """SSH to the inventory's hosts; every command is an argv list rendered once, with shlex."""

    def __init__(self, inventory: Inventory, *, accept_new_host_keys: bool = False):
        self.inventory = inventory
        self.accept_new = accept_new_host_keys
        self._conns: dict[str, _Conn] = {}
        self._lock = threading.Lock()
        self._dir: str | None = None
        self._exits: list[list[str]] = []      # `ssh -O exit` per open master, for close()
        self._finalizer = None

    def host(self, name: str) -> Host:
        return next(h for h in self.inventory.hosts if h.name == name)

    # ---- setup
    def _workdir(self) -> str:
        """The private 0700 folder: the run's ssh config, master sockets, keys ssh just accepted."""
        if self._dir is None:
            ssh = self.inventory.cluster.ssh
            path, explicit = user_config(ssh)
            if explicit and not os.path.isfile(path):
                why = f"ssh config {path} does not exist (set by " + (
                    "cluster.ssh.config)" if ssh.config else "GPUCLUSTER_SSH_CONFIG)")
                raise RemoteError("ssh", {h.name: why for h in self.inventory.hosts})
            if shutil.which("ssh") is None:
                raise RemoteError("ssh", {h.name: "the OpenSSH client `ssh` is not installed on this machine"
                                          for h in self.inventory.hosts})
            try:
                text = config_text(path, system_file=SYSTEM_CONFIG if os.path.exists(SYSTEM_CONFIG) else None)
            except ValueError as e:
                raise RemoteError("ssh", {h.name: f"ssh config path: {e}" for h in self.inventory.hosts}) from None
            d = tempfile.mkdtemp(prefix="gcssh-")          # 0700; short, for the socket paths
            fd = os.open(os.path.join(d, "config"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            self._dir, self._exits = d, []
            self._finalizer = weakref.finalize(self, _cleanup, d, self._exits)   # also if close() is never called
        return self._dir

    def _conn(self, host: Host) -> _Conn:
        with self._lock:
            c = self._conns.get(host.name)
            if c is None:
                self._workdir()
                ssh = self.inventory.ssh_for(host)
                c = _Conn(host, ssh, target(self.inventory, host), len(self._conns),
                          self.accept_new or ssh.accept_new_host_keys)
                self._conns[host.name] = c
            return c

    def _socket(self, c: _Conn) -> str:
        return os.path.join(self._dir, f"m{c.index}")

    def _base(self, c: _Conn, *, known_hosts: list[str] | None = None) -> list[str]:
        return ["ssh", "-F", os.path.join(self._dir, "config"),
                *host_options(c.ssh, accept_new=c.accept_new and known_hosts is not None, known_hosts=known_hosts),
                "-o", f"ControlPath={cfg_quote(self._socket(c))}"]

    def _resolve(self, c: _Conn) -> dict[str, str]:
        """What ssh will use for this host (`ssh -G`: HostName, Port, known_hosts files, ...); no connection."""
        if c.resolved is None:
            try:
                r = subprocess.run([*self._base(c), "-G", "--", c.dest], capture_output=True, text=True,
                                   timeout=30, stdin=subprocess.DEVNULL, env=ssh_env())
                out = r.stdout if r.returncode == 0 else ""
            except (OSError, subprocess.SubprocessError):
                out = ""
            c.resolved = {}
            for ln in out.splitlines():
                k, _, v = ln.partition(" ")
                c.resolved.setdefault(k.lower(), v)
        return c.resolved

    def _names(self, c: _Conn) -> set[str]:
        """How this host appears in known_hosts (what ssh's key messages name)."""
        g = self._resolve(c)
        if g.get("hostkeyalias") and g["hostkeyalias"] != "none":
            return {g["hostkeyalias"]}
        host, port = g.get("hostname", c.dest), g.get("port", "22")
        return {host if port == "22" else f"[{host}]:{port}"}

    def _known_hosts_files(self, c: _Conn) -> list[str]:
        if c.ssh.known_hosts:
            return [str(Path(c.ssh.known_hosts).expanduser())]
        files = self._resolve(c).get("userknownhostsfile", "").split()
        return files or [str(Path("~/.ssh/known_hosts").expanduser())]

    # ---- the master connection
    def _open(self, host: Host) -> _Conn:
        """Connect once per host (threads share the connection); failures become one RemoteError line."""
        c = self._conn(host)
        with c.lock:
            if c.opened and os.path.exists(self._socket(c)):
                return c
            try:
                self._connect(c)
            except (_Transient, _Fatal) as e:
                raise RemoteError("ssh", {host.name: str(e)}) from None
            if not c.opened:
                with self._lock:
                    self._exits.append([*self._base(c), "-O", "exit", "--", c.dest])
            c.opened = True      # a master that exits (idle, lost) is reopened: its socket is gone
            return c

    @connect_policy
    def _connect(self, c: _Conn) -> None:
        known = None
        if c.accept_new:
            fresh = os.path.join(self._dir, f"new-{c.index}")
            known = [fresh, *self._known_hosts_files(c)]
        argv = [*self._base(c, known_hosts=known), "-o", "ControlMaster=yes", "-o", f"ControlPersist={CONTROL_PERSIST}",
                "-N", "-f", "--", c.dest]
        limit = 3 * max(1.0, c.ssh.connect_timeout) + 30     # a jump host is a second connection
        try:
            r = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=limit,
                               stdin=subprocess.DEVNULL, env=ssh_env())
            if r.returncode != 0 and "UNKNOWN port 65535" in r.stderr:
                # A jump host (ProxyJump/ProxyCommand) failed, and with ControlPersist ssh sends the jump's
                # stderr to /dev/null: ask once more without a master, only to hear why.
                again = subprocess.run([*self._base(c, known_hosts=known), "-o", "ControlMaster=no", "-T", "--",
                                        c.dest, "true"], capture_output=True, text=True, errors="replace",
                                       timeout=limit, stdin=subprocess.DEVNULL, env=ssh_env())
                r = again if again.returncode != 0 and again.stderr.strip() else r
        except subprocess.TimeoutExpired:
            raise _Transient("connection timed out") from None
        except OSError as e:
            raise _Fatal(f"cannot run ssh: {e}") from None
        finally:
            if known:
                self._record_new_keys(known[0], known[1])
        if r.returncode != 0:
            files = " ".join(self._known_hosts_files(c)) if not c.ssh.known_hosts else c.ssh.known_hosts
            f = explain(r.stderr, names=self._names(c), known_hosts=files, rc=r.returncode)
            raise (_Transient if f.transient else _Fatal)(f.text)

    def _record_new_keys(self, fresh: str, real: str) -> None:
        """Move what ssh accepted (into the private file) to the real known_hosts: appended under flock."""
        try:
            with open(fresh, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return
        append_known_hosts(real, lines)
        os.unlink(fresh)

    # ---- commands
    def _command(self, host: Host, argv: Iterable[str], *, extra: tuple[str, ...] = ()) -> list[str]:
        c = self._open(host)
        argv = list(argv)
        if not argv:
            raise ValueError("empty argv")
        return [*self._base(c), "-o", "ControlMaster=no", "-T", *extra, "--", c.dest, shlex.join(argv)]

    def _lost(self, host: Host, r: Result) -> None:
        """ssh itself failed (the connection was lost, not the command): that is an SSH error for this host."""
        if r.rc == SSH_FAILED and re.search(r"^(ssh: |kex_exchange_identification|Connection (closed|reset|to)|"
                                            r"client_loop)", r.stderr, re.M):
            raise RemoteError("ssh", {host.name: explain(r.stderr, rc=r.rc).text})

    def run(self, host: Host, argv: Iterable[str], *, timeout: float | None = DEFAULT_TIMEOUT,
            input: bytes | None = None) -> Result:
        """Run argv on host; the exit code decides, output is returned, nothing is echoed. A command still
        running after `timeout` seconds (None: no limit) gives exit code 124 and says so."""
        argv = list(argv)
        cmd = self._command(host, argv)
        try:
            p = subprocess.run(cmd, input=input, stdin=None if input is not None else subprocess.DEVNULL,
                               capture_output=True, timeout=timeout, env=ssh_env())
        except subprocess.TimeoutExpired as e:
            return Result(TIMED_OUT, _text(e.stdout), f"`{' '.join(argv[:2])}` still running after "
                                                      f"{timeout:.0f} s: stopped waiting")
        r = Result(p.returncode, _text(p.stdout), _quiet(_text(p.stderr)))
        self._lost(host, r)
        return r

    def check(self, host: Host, argv: Iterable[str], *, timeout: float | None = DEFAULT_TIMEOUT) -> Result:
        argv = list(argv)
        r = self.run(host, argv, timeout=timeout)
        if not r.ok:
            raise RemoteError(f"`{' '.join(argv[:3])}`", {host.name: r.last_line()})
        return r

    def sftp(self, host: Host):
        """An SFTP session of its own (paramiko.SFTPClient over `ssh -s HOST sftp`; the caller closes it)."""
        import paramiko   # the SFTP protocol only; the connection is OpenSSH's
        cmd = self._command(host, ["sftp"], extra=("-s",))
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=ssh_env())
        pipe = _Pipe(proc)
        try:
            return _sftp_class(paramiko)(pipe)
        except Exception as e:  # noqa: BLE001 - no SFTP session: one line for this host
            err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
            pipe.close()
            raise RemoteError("sftp", {host.name: explain(err, rc=proc.returncode).text if err else str(e)}) from None

    def put_text(self, host: Host, path: str, text: str, *, mode: int = 0o600) -> None:
        """Write a file on host from stdin (never through a command line): created 0600 beside it, the mode
        set, then renamed over the path."""
        folder = path.rsplit("/", 1)[0]
        if folder:
            self.check(host, ["mkdir", "-p", "-m", "700", folder])
        script = ('t="$0.gctmp.$$"; umask 077; '
                  'if cat > "$t" && chmod "$1" "$t" && mv -f "$t" "$0"; then exit 0; fi; rm -f "$t"; exit 1')
        argv = ["sh", "-c", script, path, format(mode, "o")]
        r = self.run(host, argv, input=text.encode())
        if not r.ok:
            raise RemoteError(f"write {path}", {host.name: r.last_line()})

    def each(self, hosts: Iterable, fn: Callable[..., T], *, workers: int = 16,
             key: Callable[..., str] = lambda h: h.name) -> dict[str, T | BaseException]:
        """Run fn(item) for every host (or item) in parallel; key -> result or the exception it raised."""
        hosts = list(hosts)
        out: dict[str, T | BaseException] = {}
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(hosts)))) as pool:
            futures = {key(h): pool.submit(fn, h) for h in hosts}
            for name, fut in futures.items():
                try:
                    out[name] = fut.result()
                except Exception as e:  # noqa: BLE001 - collected and reported per host
                    out[name] = e
        return out

    def phase(self, what: str, hosts: Iterable[Host], fn: Callable[[Host], T]) -> dict[str, T]:
        """A barrier: fn on every host; if any failed, one error naming every failed host."""
        results = self.each(hosts, fn)
        failed = {n: describe(r) for n, r in results.items() if isinstance(r, BaseException)}
        if failed:
            raise RemoteError(what, failed)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the master connections and remove the private folder."""
        if self._finalizer is not None:
            self._finalizer()
        self._conns.clear()
        self._dir, self._finalizer = None, None

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cleanup(folder: str, exits: list[list[str]]) -> None:
    for argv in exits:
        try:
            subprocess.run(argv, capture_output=True, timeout=10, stdin=subprocess.DEVNULL, env=ssh_env())
        except (OSError, subprocess.SubprocessError):
            pass
    shutil.rmtree(folder, ignore_errors=True)


def _quiet(stderr: str) -> str:
    """The command's stderr without ssh's note that the shared connection had no session left (sshd's
    MaxSessions): ssh then ran the command on a connection of its own, and the note is not the command's."""
    if "mux_client_request_session" not in stderr:
        return stderr
    return "".join(ln for ln in stderr.splitlines(keepends=True)
                   if not ln.startswith("mux_client_request_session: session request failed"))


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b if isinstance(b, str) else b.decode("utf-8", "replace")


def _sftp_class(paramiko):
    """paramiko's SFTPClient whose files opened for reading read ahead (a window of requests in flight): one
    request at a time would wait a round trip per 32 KiB (the jump host, the multiplexed channel, a WAN)."""

    class SFTP(paramiko.SFTPClient):
        def open(self, filename, mode="r", bufsize=-1):
            f = super().open(filename, mode, bufsize)
            if set(mode) & {"w", "a", "+", "x"}:
                return f
            return _ReadAhead(f, f.stat().st_size or 0)
    return SFTP


class _ReadAhead:
    """Sequential reads of a remote file with up to WINDOW bytes requested ahead (bounded memory)."""

    WINDOW = 8 << 20

    def __init__(self, f, size: int):
        self.f, self.size = f, size
        self._blocks = self._fetch()
        self._buf = b""

    def _fetch(self):
        step = self.f.MAX_REQUEST_SIZE
        for start in range(0, self.size, self.WINDOW):
            end = min(self.size, start + self.WINDOW)
            yield from self.f.readv([(o, min(step, end - o)) for o in range(start, end, step)])

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            block = next(self._blocks, None)
            if not block:
                break
            self._buf += block
        out, self._buf = (self._buf, b"") if n < 0 else (self._buf[:n], self._buf[n:])
        return out

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Pipe:
    """A socket-like end of `ssh -s HOST sftp` for paramiko's SFTP client. A thread drains ssh's stdout into
    a buffer (as a paramiko Channel does), so pipelined writes never stall on a full pipe."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._buf = bytearray()
        self._eof = False
        self._cv = threading.Condition()
        self._timeout: float | None = None
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                data = b""
            with self._cv:
                if not data:
                    self._eof = True
                else:
                    self._buf += data
                self._cv.notify_all()
            if not data:
                return

    def send(self, data: bytes) -> int:
        try:
            return os.write(self.proc.stdin.fileno(), data)
        except (OSError, ValueError):
            return 0          # paramiko turns 0 into EOFError

    def recv(self, n: int) -> bytes:
        with self._cv:
            if not self._cv.wait_for(lambda: self._buf or self._eof, timeout=self._timeout):
                raise TimeoutError("no answer from sftp")
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out

    def recv_ready(self) -> bool:
        with self._cv:
            return bool(self._buf)

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, blocking: bool) -> None:
        self._timeout = None if blocking else 0.0

    def get_name(self) -> str:
        return "ssh-sftp"

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def target(inventory: Inventory, host: Host) -> str:
    """What SSH dials: hosts[].ssh.host (a name or ssh config Host alias) when given, else the address."""
    return (host.ssh.host if host.ssh and host.ssh.host else None) or host.address


def describe(e: BaseException) -> str:
    if isinstance(e, RemoteError):
        return "; ".join(e.failures.values())
    return " ".join(f"{type(e).__name__}: {e}".split())[:400]   # one line, whatever the exception held


def stream(hosts: Hosts, host: Host, argv: list[str], sink: Callable[[str], None], *,
           timeout: float | None = None) -> int:
    """Run argv and feed each output line (stdout and stderr) to sink as it arrives (for `logs --follow`)."""
    cmd = hosts._command(host, argv)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=ssh_env())
    fired = threading.Event()

    def stop() -> None:
        fired.set()
        proc.kill()
    timer = threading.Timer(timeout, stop) if timeout is not None else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if _quiet(line + "\n"):
                sink(line)
        rc = proc.wait()
    finally:
        if timer:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if fired.is_set():
        sink(f"still running after {timeout:.0f} s: stopped waiting")
        return TIMED_OUT
    return rc
