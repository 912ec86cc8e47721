"""The image fan-out agent: stdlib only (Python >= 3.8), run by the host's python3 beside the host's docker CLI.

    python3 image_fanout_agent.py send JOB.json    the source: `docker save` of the layers some host lacks, streamed
    python3 image_fanout_agent.py relay JOB.json   a target: receive, tee into `docker load` and to the next host

A chain over the LAN: source -> h2 -> h3 ...; each link carries the stream once, and each host loads while it
forwards. Handshake (JSON lines), the token never on the wire: upstream sends a challenge, downstream answers
with HMAC(token, "down:" + challenge) and its own challenge, upstream sends the image (ID, diff IDs) with
HMAC(token, "up:" + challenge); downstream answers which layers the rest of the chain lacks; then frames of
8-byte length + data, a zero-length frame at the end (a stream cut short is never taken as complete).
Events are JSON lines on stdout ({"ev": "note" | "done" | "error", ...}), as the model delivery agent's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

TOKEN_KEY = "GPUCLUSTER_TRANSFER_TOKEN"
CHUNK = 1 << 20
CONNECT_WITHIN = 90.0     # seconds a host keeps trying to reach its upstream (that host's agent starts meanwhile)
ACCEPT_WITHIN = 90.0      # seconds a host waits for its downstream to connect before it goes on without it
IO_TIMEOUT = 120.0        # seconds any one read or write on a link may wait
MAX_LINE = 1 << 20
Emit = Callable[[Dict[str, Any]], None]


class FanoutError(Exception):
    """One line for the user."""


def _emit_stdout(event: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- pure: which layers, which tar members
def chain_ids(diff_ids: List[str]) -> List[str]:
    """The layer store's chain IDs of each prefix: ChainID(L0) = L0, ChainID(Ln) = sha256(ChainID(Ln-1) + " " + Ln)."""
    out: List[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def need_layers(diff_ids: List[str], present: Set[str]) -> List[int]:
    """Indices of the image's layers whose chain ID this host does not hold (`docker load` skips the others unread)."""
    return [i for i, c in enumerate(chain_ids(diff_ids)) if c not in present]


def present_chain_ids(layer_lists: Iterable[List[str]]) -> Set[str]:
    """Every chain ID the local images' layer lists imply."""
    out: Set[str] = set()
    for layers in layer_lists:
        out.update(chain_ids([str(x) for x in layers]))
    return out


def blob_digest(name: str) -> Optional[str]:
    """`blobs/sha256/<hex>` (the OCI layout of Docker >= 25) -> "sha256:<hex>"; else None."""
    parts = name.lstrip("./").split("/")
    if len(parts) == 3 and parts[0] == "blobs" and parts[1] == "sha256" and len(parts[2]) == 64:
        return "sha256:" + parts[2]
    return None


def filter_save(src, out, skip: Set[str], spool_dir: str, on_bytes: Callable[[int], None] = lambda n: None) -> Dict[str, int]:
    """Copy a `docker save` tar stream from src to out, leaving out the layers whose diff ID is in `skip`.

    A layer named by its digest (`blobs/sha256/<diffid>`) is recognised by name. A legacy `<v1id>/layer.tar`
    (Docker < 25) is named by a v1 ID, so it is spooled to spool_dir while hashed: its sha256 is its diff ID.
    Returns counts: skipped layers, bytes written."""
    counts = {"skipped": 0, "bytes": 0}

    class _Counter:
        def write(self, data: bytes) -> int:
            out.write(data)
            counts["bytes"] += len(data)
            on_bytes(len(data))
            return len(data)

        def flush(self) -> None:
            pass

    tin = tarfile.open(fileobj=src, mode="r|", bufsize=CHUNK)
    tout = tarfile.open(fileobj=_Counter(), mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK)
    tout.copybufsize = CHUNK    # type: ignore[attr-defined]
    for m in tin:
        if not m.isreg():
            tout.addfile(m)
            continue
        reader = tin.extractfile(m)
        digest = blob_digest(m.name)
        if digest is not None:
            if digest in skip:
                counts["skipped"] += 1
                continue
            tout.addfile(m, reader)
            continue
        if m.name.endswith("/layer.tar") and skip:
            h = hashlib.sha256()
            with tempfile.TemporaryFile(dir=spool_dir) as spool:
                for block in iter(lambda: reader.read(CHUNK), b""):   # type: ignore[union-attr]
                    h.update(block)
                    spool.write(block)
                if "sha256:" + h.hexdigest() in skip:
                    counts["skipped"] += 1
                    continue
                spool.seek(0)
                tout.addfile(m, spool)
            continue
        tout.addfile(m, reader)
    tout.close()
    return counts


# ---------------------------------------------------------------- the link: JSON lines, then frames
class Link:
    """One TCP connection between neighbours in the chain."""

    def __init__(self, sock: socket.socket):
        sock.settimeout(IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf = sock, b""

    def send_json(self, doc: Dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(doc).encode() + b"\n")

    def recv_json(self) -> Dict[str, Any]:
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise FanoutError("the peer sent an over-long handshake line")
            data = self.sock.recv(65536)
            if not data:
                raise FanoutError("the peer closed the connection during the handshake")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        doc = json.loads(line.decode())
        if not isinstance(doc, dict):
            raise FanoutError("the peer sent a malformed handshake")
        return doc

    def _exactly(self, n: int) -> bytes:
        parts, have = [], 0
        if self.buf:
            take = self.buf[:n]
            self.buf = self.buf[n:]
            parts.append(take)
            have = len(take)
        while have < n:
            data = self.sock.recv(min(n - have, CHUNK))
            if not data:
                raise FanoutError("the stream was cut short (the upstream host stopped)")
            parts.append(data)
            have += len(data)
        return b"".join(parts)

    def send_frame(self, data: bytes) -> None:
        self.sock.sendall(struct.pack(">Q", len(data)) + data)

    def finish(self) -> None:
        """After the last frame: wait until the peer has read everything and closed (its close is the receipt)."""
        self.sock.shutdown(socket.SHUT_WR)
        self.sock.recv(1)

    def recv_frame(self) -> bytes:
        (n,) = struct.unpack(">Q", self._exactly(8))
        if n > 64 * CHUNK:
            raise FanoutError("the peer sent an over-long frame")
        return self._exactly(n) if n else b""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class FrameWriter:
    """A file-like writer that sends CHUNK-sized frames (what filter_save writes into)."""

    def __init__(self, link: Link):
        self.link, self.pending = link, bytearray()

    def write(self, data: bytes) -> int:
        self.pending += data
        while len(self.pending) >= CHUNK:
            self.link.send_frame(bytes(self.pending[:CHUNK]))
            del self.pending[:CHUNK]
        return len(data)

    def finish(self) -> None:
        if self.pending:
            self.link.send_frame(bytes(self.pending))
            self.pending.clear()
        self.link.send_frame(b"")


def mac(token: str, side: str, challenge: str) -> str:
    return hmac.new(token.encode(), f"{side}:{challenge}".encode(), hashlib.sha256).hexdigest()


def listen(bind: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bind, port))
    s.listen(4)
    return s


def accept_downstream(server: socket.socket, token: str, within: float, emit: Emit) -> Optional[Link]:
    """Wait for the next host; a connection that fails the challenge is dropped and the wait goes on."""
    deadline = time.monotonic() + within
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        server.settimeout(left)
        try:
            sock, addr = server.accept()
        except socket.timeout:
            return None
        link = Link(sock)
        try:
            challenge = secrets.token_hex(16)
            link.send_json({"challenge": challenge})
            hello = link.recv_json()
            if not hmac.compare_digest(str(hello.get("mac", "")), mac(token, "down", challenge)):
                emit({"ev": "note", "msg": f"refused a connection from {addr[0]}: wrong token"})
                link.close()
                continue
            link.peer = " ".join(str(hello.get("host", addr[0])).split())[:64]   # type: ignore[attr-defined]
            link.peer_challenge = str(hello.get("challenge", ""))               # type: ignore[attr-defined]
            return link
        except (OSError, ValueError, FanoutError) as e:
            emit({"ev": "note", "msg": f"dropped a connection from {addr[0]}: {e}"})
            link.close()


def connect_upstream(address: str, port: int, token: str, me: str, within: float) -> Link:
    """Reach the previous host (retrying while its agent starts) and pass its challenge."""
    deadline, last = time.monotonic() + within, ""
    while True:
        try:
            sock = socket.create_connection((address, port), timeout=10)
            break
        except OSError as e:
            last = str(e)
            if time.monotonic() >= deadline:
                raise FanoutError(f"cannot reach {address}:{port} within {within:g} s: {last}") from None
            time.sleep(1.0)
    link = Link(sock)
    challenge = link.recv_json().get("challenge", "")
    mine = secrets.token_hex(16)
    link.send_json({"host": me, "mac": mac(token, "down", str(challenge)), "challenge": mine})
    link.my_challenge = mine    # type: ignore[attr-defined]
    return link


def send_header(link: Link, token: str, header: Dict[str, Any]) -> List[int]:
    """Give the downstream host the image and take back which layers the rest of the chain lacks."""
    link.send_json({**header, "mac": mac(token, "up", link.peer_challenge)})   # type: ignore[attr-defined]
    answer = link.recv_json()
    need = answer.get("need")
    if not isinstance(need, list) or not all(isinstance(i, int) for i in need):
        raise FanoutError("the downstream host sent a malformed answer")
    return need


def recv_header(link: Link, token: str) -> Dict[str, Any]:
    header = link.recv_json()
    if not hmac.compare_digest(str(header.get("mac", "")), mac(token, "up", link.my_challenge)):  # type: ignore[attr-defined]
        raise FanoutError("the upstream host did not prove it holds the transfer token")
    layers = header.get("layers")
    if not isinstance(layers, list) or not isinstance(header.get("id"), str):
        raise FanoutError("the upstream host sent a malformed header")
    return header


# ---------------------------------------------------------------- docker (the host's CLI)
def docker(*args: str, timeout: float = 600) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise FanoutError(f"docker {args[0]} {args[1] if len(args) > 1 else ''}: "
                          f"{(r.stderr.strip().splitlines() or ['exit ' + str(r.returncode)])[-1]}")
    return r.stdout


def image_id(image: str) -> Optional[str]:
    try:
        return docker("image", "inspect", "--format", "{{.Id}}", image).strip() or None
    except FanoutError:
        return None


def local_chain_ids() -> Set[str]:
    ids = docker("image", "ls", "-aq", "--no-trunc").split()
    if not ids:
        return set()
    out = docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", *sorted(set(ids)))
    return present_chain_ids(json.loads(line) or [] for line in out.splitlines() if line.strip())


def snapshotter_store() -> bool:
    """Docker's containerd image store: its `docker load` wants every blob, so nothing may be left out."""
    try:
        return "snapshotter" in docker("info", "--format", "{{json .DriverStatus}}")
    except FanoutError:
        return True


# ---------------------------------------------------------------- the two roles
def _token(job: Dict[str, Any]) -> str:
    path = job.get("token_file")
    with open(str(path)) as f:
        for line in f:
            key, sep, value = line.rstrip("\n").partition("=")
            if sep and key == TOKEN_KEY and value:
                return value
    raise FanoutError("the job names no transfer token")


class _Meter:
    def __init__(self, emit: Emit, what: str, every: float = 5.0):
        self.emit, self.what, self.every = emit, what, every
        self.t0 = self.last = time.monotonic()
        self.bytes = 0

    def add(self, n: int) -> None:
        self.bytes += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.emit({"ev": "note", "msg": f"{self.what} {self.bytes / 1e6:.0f} MB, "
                                            f"{self.bytes / 1e6 / max(now - self.t0, 1e-6):.0f} MB/s"})


def agent_send(job: Dict[str, Any], emit: Emit) -> str:
    """The source: wait for the first host of the chain, send what the chain lacks. Never fails the step: a host
    that got nothing falls back to the registry mirrors itself."""
    token, image = _token(job), str(job["image"])
    the_id = image_id(image)
    if the_id is None:
        raise FanoutError(f"{job.get('host')} has no {image} to send")
    layers = json.loads(docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", image))
    try:
        server = listen(str(job["bind"]), int(job["port"]))
    except OSError as e:
        emit({"ev": "note", "msg": f"cannot listen on {job['bind']}:{job['port']}: {e}"})
        return "not sent: the other hosts fetch the image from the mirrors"
    try:
        link = accept_downstream(server, token, float(job.get("accept_within", ACCEPT_WITHIN)), emit)
    finally:
        server.close()
    if link is None:
        return "no host connected: they fetch the image from the mirrors"
    try:
        need = sorted(set(send_header(link, token, {"image": image, "id": the_id, "layers": layers,
                                                    "source": job.get("host")})))
        skip = {layers[i] for i in range(len(layers)) if i not in need}
        meter = _Meter(emit, f"sent to {link.peer}")                                  # type: ignore[attr-defined]
        proc = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        writer = FrameWriter(link)
        assert proc.stdout is not None
        if skip and snapshotter_store():
            skip = set()
        if skip:
            counts = filter_save(proc.stdout, writer, skip, str(job.get("spool", tempfile.gettempdir())), meter.add)
        else:
            counts = {"skipped": 0}
            for block in iter(lambda: proc.stdout.read(CHUNK), b""):   # type: ignore[union-attr]
                writer.write(block)
                meter.add(len(block))
        if proc.wait() != 0:
            raise FanoutError(f"docker save {image} exited {proc.returncode}")
        writer.finish()
        link.finish()
        return (f"sent {image} to {link.peer}: {meter.bytes / 1e6:.1f} MB, {len(layers) - counts['skipped']} of {len(layers)} "  # type: ignore[attr-defined]
                f"layer(s) ({len(layers) - len(need)} present on every host of the chain), "
                f"{time.monotonic() - meter.t0:.1f} s")
    except (OSError, FanoutError, tarfile.TarError) as e:
        emit({"ev": "note", "msg": f"sending to {getattr(link, 'peer', '?')} stopped: {e}"})
        return "the chain broke: hosts that got nothing fetch the image from the mirrors"
    finally:
        link.close()


def agent_relay(job: Dict[str, Any], emit: Emit) -> str:
    """A target: take the stream from upstream, load what this host lacks, forward everything to the next host.
    A host that already holds the same image only forwards, and never fails the step."""
    token, image, me = _token(job), str(job["image"]), str(job["host"])
    before = image_id(image)
    server = listen(str(job["bind"]), int(job["port"])) if job.get("downstream") else None
    up: Optional[Link] = None
    down: Optional[Link] = None
    header: Dict[str, Any] = {}
    try:
        up = connect_upstream(str(job["upstream"]), int(job["port"]), token, me,
                              float(job.get("connect_within", CONNECT_WITHIN)))
        header = recv_header(up, token)
        layers = [str(x) for x in header["layers"]]
        have = header["id"] == before
        if before and not have:
            emit({"ev": "note", "msg": f"{me} holds another {image} ({before[:19]}): loading {header.get('source')}'s"})
        mine = [] if have else (list(range(len(layers))) if snapshotter_store()
                                else need_layers(layers, local_chain_ids()))
        need = set(mine)
        if server is not None:
            down = accept_downstream(server, token, float(job.get("accept_within", ACCEPT_WITHIN)), emit)
            server.close()
            server = None
            if down is None:
                emit({"ev": "note", "msg": f"{job.get('downstream')} did not connect: it fetches the image itself"})
            else:
                try:
                    need |= set(send_header(down, token, {k: header[k] for k in ("image", "id", "layers", "source")
                                                          if k in header}))
                except (OSError, ValueError, FanoutError) as e:
                    emit({"ev": "note", "msg": f"{down.peer}: {e}"})     # type: ignore[attr-defined]
                    down.close()
                    down = None
        up.send_json({"need": sorted(i for i in need if 0 <= i < len(layers))})
        return _relay_stream(up, down, image, header, have, mine, me, emit)
    except (OSError, ValueError, FanoutError) as e:
        if before and before == header.get("id", before):
            return f"has {image} already; could not relay: {e}"
        raise FanoutError(f"{me}: {e}") from None
    finally:
        for link in (up, down):
            if link is not None:
                link.close()
        if server is not None:
            server.close()


def _relay_stream(up: Link, down: Optional[Link], image: str, header: Dict[str, Any], have: bool, mine: List[int],
                  me: str, emit: Emit) -> str:
    load = None if have else subprocess.Popen(["docker", "load", "-q"], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    meter, load_err, t0 = _Meter(emit, "received"), "", time.monotonic()
    try:
        while True:
            data = up.recv_frame()
            if down is not None:
                try:
                    down.send_frame(data)
                except OSError as e:
                    emit({"ev": "note", "msg": f"forwarding to {down.peer} stopped: {e}"})   # type: ignore[attr-defined]
                    down.close()
                    down = None
            if not data:
                break
            meter.add(len(data))
            if load is not None and not load_err:
                try:
                    load.stdin.write(data)      # type: ignore[union-attr]
                except OSError as e:
                    load_err = f"docker load stopped reading: {e}"
    except BaseException:
        if load is not None:
            load.kill()
            load.wait()
        raise
    up.close()                  # everything arrived: the upstream host may finish
    if down is not None:
        try:
            down.finish()
        except OSError as e:
            emit({"ev": "note", "msg": f"{down.peer} did not confirm the end of the stream: {e}"})  # type: ignore[attr-defined]
    secs = time.monotonic() - t0
    if load is None:
        return f"has {header['id'][:19]} already; relayed {meter.bytes / 1e6:.1f} MB in {secs:.1f} s"
    out, _ = load.communicate()
    if load.returncode != 0 or load_err:
        tail = (out or b"").decode(errors="replace").strip().splitlines()
        raise FanoutError(f"docker load failed: {load_err or (tail[-1] if tail else 'exit ' + str(load.returncode))}")
    got = image_id(image)
    if got != header["id"]:
        raise FanoutError(f"image ID {got} differs from {header.get('source')}'s {header['id']}")
    return (f"loaded {image} ({header['id'][:19]}) from {header.get('source')} over the LAN: "
            f"{meter.bytes / 1e6:.1f} MB for {len(mine)} missing of {len(header['layers'])} layer(s), {secs:.1f} s")


def agent_main(argv: List[str]) -> int:
    """python3 image_fanout_agent.py {send|relay} JOB.json"""
    if len(argv) != 2 or argv[0] not in ("send", "relay"):
        sys.stderr.write(str(agent_main.__doc__) + "\n")
        return 2
    try:
        with open(argv[1]) as f:
            job = json.load(f)
        summary = (agent_send if argv[0] == "send" else agent_relay)(job, _emit_stdout)
    except FanoutError as e:
        _emit_stdout({"ev": "error", "msg": str(e)})
        return 1
    except Exception as e:  # noqa: BLE001 - one line for the control side
        _emit_stdout({"ev": "error", "msg": f"{type(e).__name__}: {e}"})
        return 1
    _emit_stdout({"ev": "done", "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(agent_main(sys.argv[1:]))
