"""The only module that touches SSH: one lazy connection per host, commands as argv, parallel phases."""

from __future__ import annotations

import io
import shlex
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import paramiko
from fabric import Connection
from invoke.exceptions import CommandTimedOut
from tenacity import retry, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_exponential

from .config import Host, Inventory
from .errors import RemoteError
from .executor import Result

T = TypeVar("T")
DEFAULT_TIMEOUT = 120.0     # seconds a remote command may take unless its caller says otherwise
TIMED_OUT = 124             # the exit code a timed-out command reports (as timeout(1) does)

# Named retry policies, only at the I/O edge: connecting is retried, authentication is not.
TRANSIENT = (socket.timeout, TimeoutError, ConnectionError, paramiko.ssh_exception.NoValidConnectionsError,
             EOFError)
connect_policy = retry(retry=retry_if_exception_type(TRANSIENT), stop=stop_after_attempt(3) | stop_after_delay(40),
                       wait=wait_exponential(multiplier=1, max=8), reraise=True)


class HostKeyError(Exception):
    pass


class _SaveNewKey(paramiko.MissingHostKeyPolicy):
    """Accept an unknown host key and record it in known_hosts (only when asked for)."""

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        client.save_host_keys(str(self.path))


def _reason(e: BaseException) -> str:
    """One line for a connection failure, with the fix where there is one."""
    if isinstance(e, HostKeyError):
        return str(e)
    if isinstance(e, paramiko.BadHostKeyException):
        return f"host key mismatch for {e.hostname}: known_hosts has another key (possible MITM; fix known_hosts)"
    if isinstance(e, paramiko.AuthenticationException):
        return "SSH authentication failed (check ssh.user and ssh.identity_file)"
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
        return f"cannot connect: {', '.join(sorted({str(x.strerror or x) for x in e.errors.values()}))}"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "connection timed out"
    return " ".join(f"{type(e).__name__}: {e}".split())[:400]   # one line, whatever the exception held


class Hosts:
    """SSH to the inventory's hosts; every command is an argv list rendered once, with shlex."""

    def __init__(self, inventory: Inventory, *, accept_new_host_keys: bool = False):
        self.inventory = inventory
        self.accept_new = accept_new_host_keys
        self._conns: dict[str, Connection] = {}
        self._opening: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def host(self, name: str) -> Host:
        return next(h for h in self.inventory.hosts if h.name == name)

    def _connection(self, host: Host) -> Connection:
        with self._lock:
            conn = self._conns.get(host.name)
            if conn is not None:
                return conn
            ssh = self.inventory.ssh_for(host)
            kwargs = {"allow_agent": False, "look_for_keys": ssh.identity_file is None, "banner_timeout": 30}
            if ssh.identity_file:
                kwargs["key_filename"] = str(Path(ssh.identity_file).expanduser())
            conn = Connection(host=target(self.inventory, host), user=ssh.user, port=ssh.port,
                              connect_timeout=int(max(1, ssh.connect_timeout)), connect_kwargs=kwargs)
            known = Path(ssh.known_hosts).expanduser()
            client = conn.client
            client._system_host_keys = paramiko.HostKeys()   # only the configured file decides
            if known.exists():
                client.load_host_keys(str(known))
            if self.accept_new or ssh.accept_new_host_keys:
                client.set_missing_host_key_policy(_SaveNewKey(known))
            else:
                client.set_missing_host_key_policy(paramiko.RejectPolicy())
            self._conns[host.name] = conn
            self._opening[host.name] = threading.Lock()
            return conn

    def _open(self, conn: Connection, host: Host) -> None:
        """Connect once per host (threads share the connection); failures become one RemoteError line."""
        with self._opening[host.name]:
            if conn.is_connected:
                return
            try:
                self._connect(conn, host)
            except Exception as e:  # noqa: BLE001 - every SSH failure is reported as one line per host
                raise RemoteError("ssh", {host.name: _reason(e)}) from None

    @connect_policy
    def _connect(self, conn: Connection, host: Host) -> None:
        try:
            conn.open()
        except paramiko.SSHException as e:
            if "not found in known_hosts" in str(e):
                ssh = self.inventory.ssh_for(host)
                raise HostKeyError(f"host key of {target(self.inventory, host)}:{ssh.port} is not in "
                                   f"{ssh.known_hosts} (fix: add it with ssh-keyscan after checking its fingerprint, "
                                   "or pass --accept-new-host-keys)") from None
            raise

    def run(self, host: Host, argv: Iterable[str], *, timeout: float | None = DEFAULT_TIMEOUT) -> Result:
        """Run argv on host; the exit code decides, output is returned, nothing is echoed. A command still
        running after `timeout` seconds (None: no limit) gives exit code 124 and says so."""
        conn = self._connection(host)
        self._open(conn, host)
        try:
            r = conn.run(shlex.join(list(argv)), hide=True, warn=True, in_stream=False, pty=False, timeout=timeout)
        except CommandTimedOut as e:
            return Result(TIMED_OUT, e.result.stdout, f"`{' '.join(list(argv)[:2])}` still running after "
                                                      f"{timeout:.0f} s: stopped waiting")
        return Result(r.exited, r.stdout, r.stderr)

    def check(self, host: Host, argv: Iterable[str], *, timeout: float | None = DEFAULT_TIMEOUT) -> Result:
        argv = list(argv)
        r = self.run(host, argv, timeout=timeout)
        if not r.ok:
            raise RemoteError(f"`{' '.join(argv[:3])}`", {host.name: r.last_line()})
        return r

    def sftp(self, host: Host) -> paramiko.SFTPClient:
        """A new SFTP channel of its own on the host's connection (the caller closes it)."""
        conn = self._connection(host)
        self._open(conn, host)
        return paramiko.SFTPClient.from_transport(conn.client.get_transport())

    def put_text(self, host: Host, path: str, text: str, *, mode: int = 0o600) -> None:
        """Write a file on host over SFTP (never through a command line), mode set before content."""
        folder = path.rsplit("/", 1)[0]
        self.check(host, ["mkdir", "-p", "-m", "700", folder])
        sftp = self.sftp(host)
        try:
            with sftp.open(path, "w") as f:
                f.chmod(mode)
                f.write(text)
        finally:
            sftp.close()

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
        for conn in self._conns.values():
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._conns.clear()

    def __enter__(self) -> "Hosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def target(inventory: Inventory, host: Host) -> str:
    """What SSH dials: hosts[].ssh.host (a name or ~/.ssh/config alias) when given, else the address."""
    return (host.ssh.host if host.ssh and host.ssh.host else None) or host.address


def describe(e: BaseException) -> str:
    if isinstance(e, RemoteError):
        return "; ".join(e.failures.values())
    return _reason(e)


def stream(hosts: Hosts, host: Host, argv: list[str], sink: Callable[[str], None], *,
           timeout: float | None = None) -> int:
    """Run argv and feed each output line to sink as it arrives (for `logs --follow`)."""
    conn = hosts._connection(host)
    hosts._open(conn, host)

    class _Lines(io.TextIOBase):
        def __init__(self):
            self.buf = ""

        def write(self, s: str) -> int:
            self.buf += s
            while "\n" in self.buf:
                line, self.buf = self.buf.split("\n", 1)
                sink(line)
            return len(s)

    out = _Lines()
    try:
        r = conn.run(shlex.join(argv), hide=True, warn=True, in_stream=False, out_stream=out, err_stream=out,
                     timeout=timeout)
    except CommandTimedOut:
        sink(f"still running after {timeout:.0f} s: stopped waiting")
        return TIMED_OUT
    if out.buf:
        sink(out.buf)
    return r.exited
