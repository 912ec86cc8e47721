"""The network check agent: stdlib + torch, run on every host at once inside a throwaway container of the
deployment's image (or by hand: `python3 netcheck_agent.py JOB.json`).

It is the sanity test of vLLM's troubleshooting guide ("Incorrect hardware/driver"), bounded and reported:
torch.distributed across all hosts (one rank per GPU, or one per host on CPU), an all-reduce over NCCL (GPUs)
and over GLOO, each result checked. The process started here supervises one process per local rank, never
imports torch itself, and kills them when the job's timeout has passed, so every run ends by itself.

JOB.json: {"host", "master_addr", "master_port", "world", "first_rank", "local", "device": "cuda" | "cpu",
"timeout", "hosts": [{"name", "first_rank", "local"}, ...]}. The engine's per-node environment
(VLLM_HOST_IP, GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, ...) comes from the container's environment.

Output: JSON event lines on stdout ({"ev": "note" | "done" | "error", ...}); the last one, "done" (exit 0) or
"error" (exit 1), carries this host's result as compact JSON text (cluster/netcheck.py parses it).
Everything else (torch's and NCCL's own lines) is passed through on stderr, prefixed with the rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

VERSION = 1
MARK = "NETCHECK "            # a rank's protocol lines on its stdout; anything else is passed through
STEPS = ("preflight", "torch", "init", "nccl", "gloo")
NUMEL = 1024                  # floats per all-reduce (4 KiB)
GRACE = 10.0                  # seconds past the timeout before the supervisor kills a rank that did not stop
MAX_RESULT = 480              # the control keeps 500 characters of an event's text
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def _emit(event: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _one_line(text: Any, limit: int = 160) -> str:
    first = next((ln for ln in str(text).splitlines() if ln.strip()), "")   # torch appends C++ frames
    s = " ".join(first.split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _rank_range(first: int, n: int) -> str:
    return f"rank {first}" if n == 1 else f"ranks {first}-{first + n - 1}"


# ---------------------------------------------------------------- preflight (stdlib, no torch)
def interfaces() -> List[str]:
    try:
        return sorted(name for _, name in socket.if_nameindex())
    except OSError:
        return sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []


def ipv4_of(name: str) -> Optional[str]:
    """The IPv4 address of an interface (SIOCGIFADDR), or None."""
    try:
        import fcntl
        import struct
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            res = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
        return socket.inet_ntoa(res[20:24])
    except (OSError, ImportError, ValueError):
        return None


def _loopback(addr: Optional[str]) -> bool:
    return bool(addr) and (addr.startswith("127.") or addr == "::1")


def preflight(env: Dict[str, str], master_addr: str, host: str, *, have: Optional[List[str]] = None,
              addr_of=ipv4_of, hostname_addr=None) -> Tuple[bool, str, List[str]]:
    """(ok, message, notes): the NICs named by GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME exist and are reachable
    from other hosts; without GLOO_SOCKET_IFNAME, gloo uses the hostname's address (often loopback)."""
    have = interfaces() if have is None else have
    notes: List[str] = []
    said: List[str] = []
    remote = not _loopback(master_addr)
    gloo = env.get("GLOO_SOCKET_IFNAME", "")
    if gloo:
        for name in [n.strip() for n in gloo.split(",") if n.strip()]:
            if name not in have:
                return False, (f"GLOO_SOCKET_IFNAME={gloo}: no interface {name} on {host} (it has "
                               f"{', '.join(have) or 'none'})"), notes
            addr = addr_of(name)
            if remote and _loopback(addr):
                return False, (f"GLOO_SOCKET_IFNAME={gloo}: {name} has {addr}, a loopback address the other "
                               "hosts cannot reach"), notes
            said.append(f"GLOO_SOCKET_IFNAME={name} ({addr or 'no IPv4'})")
            host_ip = env.get("VLLM_HOST_IP")
            if addr and host_ip and addr != host_ip:
                notes.append(f"{name} has {addr}, VLLM_HOST_IP is {host_ip}")
    else:
        try:
            addr = hostname_addr() if hostname_addr else socket.gethostbyname(socket.gethostname())
        except OSError:
            addr = None
        if remote and (addr is None or _loopback(addr)):
            return False, (f"GLOO_SOCKET_IFNAME is unset and this host's name resolves to {addr or 'nothing'}: gloo "
                           "would bind there and the other hosts never connect; set the host's interface in the "
                           "inventory"), notes
        said.append(f"GLOO_SOCKET_IFNAME unset (hostname -> {addr})")
    nccl = env.get("NCCL_SOCKET_IFNAME", "")
    if nccl:
        wanted = [n.strip() for n in nccl.split(",") if n.strip() and not n.strip().startswith("^")]
        for item in wanted:   # NCCL matches prefixes unless the item starts with "="
            exact = item.startswith("=")
            name = item.lstrip("=")
            if not any(h == name if exact else h.startswith(name) for h in have):
                return False, (f"NCCL_SOCKET_IFNAME={nccl}: no interface matches {item} on {host} (it has "
                               f"{', '.join(have) or 'none'})"), notes
        said.append(f"NCCL_SOCKET_IFNAME={nccl}")
    return True, "; ".join(said), notes


# ---------------------------------------------------------------- one rank (imports torch)
class Rank:
    """One rank: reports each step as a MARK line; a watcher thread stops it when a peer failed or time is up."""

    def __init__(self, job: Dict[str, Any], local: int, deadline: float):
        self.job, self.local, self.deadline = job, local, deadline
        self.rank = int(job["first_rank"]) + local
        self.world = int(job["world"])
        self.step = "preflight"
        self.store = None         # the rendezvous (the process groups use it too)
        self.side = None          # a second connection to it for progress, failures and the watcher, which a
                                  # process group's blocking wait on the first one cannot hold up
        self.finished = False
        self.pending = ""         # a preflight failure, reported at the rendezvous
        self.leaving = False
        self.info: Dict[str, Any] = {}
        self.lock = threading.Lock()

    # -- reporting
    def say(self, **fields: Any) -> None:
        with self.lock:
            if not self.leaving:   # the first reason to leave is the one that counts
                self._write(fields)

    def _write(self, fields: Dict[str, Any]) -> None:
        sys.stdout.write(MARK + json.dumps({"r": self.rank, **fields}, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    def leave(self, code: int, **fields: Any) -> None:
        """Report why this rank ends, then end it; rank 0 holds the store, so it waits until the peers read why."""
        with self.lock:
            first, self.leaving = not self.leaving, True
            if first:
                self._write({"step": self.step, "ok": False, "info": self.info, **fields})
        if first and self.rank == 0 and self.store is not None:
            time.sleep(3)
        elif not first:
            time.sleep(30)         # the thread that left first ends the process
        os._exit(code)

    def begin(self, step: str) -> float:
        self.step = step
        self.say(step=step, start=True)
        if self.side is not None:
            try:
                self.side.set(f"netcheck/at/{self.rank}", str(STEPS.index(step)))
            except Exception:  # noqa: BLE001 - progress marks are best effort
                pass
        return time.time()

    def left(self) -> float:
        return max(self.deadline - time.time(), 1.0)

    def owner(self, r: int) -> str:
        for h in self.job.get("hosts", []):
            if int(h["first_rank"]) <= r < int(h["first_rank"]) + int(h["local"]):
                return str(h["name"])
        return "?"

    def fail(self, msg: str) -> None:
        """This rank failed on its own: tell the peers through the store, then exit."""
        if self.pending:      # the preflight's finding explains what came after it
            self.step, msg = "preflight", self.pending
        msg = _one_line(msg, 300)
        if self.side is not None and not self.leaving:
            try:
                self.side.set(f"netcheck/fail/{self.rank}", json.dumps({"step": self.step, "msg": msg}))
                self.side.add("netcheck/failed", 1)
            except Exception:  # noqa: BLE001
                pass
        self.leave(1, msg=msg)

    # -- watcher: a peer's failure or the deadline ends this rank with a line that says why
    def watch(self) -> None:
        errors = 0
        while not self.finished:
            time.sleep(0.5)
            if self.finished:
                return
            if time.time() >= self.deadline:
                self.leave(4, timeout=True, msg=f"timeout: {self.step} did not finish within "
                           f"{self.job['timeout']}s{self.behind()}")
            if self.side is None:
                continue
            try:
                failed = self.side.add("netcheck/failed", 0)
                errors = 0
            except Exception:  # noqa: BLE001 - the store went away (rank 0 exited)
                errors += 1
                if errors >= 4 and not self.finished:
                    self.leave(3, peer=True, msg=f"stopped: lost the rendezvous on {self.job['master_addr']}:"
                                                 f"{self.job['master_port']} (rank 0 on {self.owner(0)} exited)")
                continue
            if failed:
                who = self.first_failure()
                if who is not None and not self.finished:
                    r, step, msg = who
                    self.leave(3, peer=True, msg=f"stopped: {self.owner(r)} (rank {r}) failed {step}: {msg}")

    def first_failure(self) -> Optional[Tuple[int, str, str]]:
        for r in range(self.world):
            if r == self.rank:
                continue
            key = f"netcheck/fail/{r}"
            try:
                if self.side.check([key]):
                    doc = json.loads(self.side.get(key).decode())
                    return r, str(doc.get("step", "?")), str(doc.get("msg", ""))
            except Exception:  # noqa: BLE001
                return None
        return None

    def behind(self) -> str:
        """Which hosts this rank was waiting for when time ran out (from the peers' progress marks)."""
        if self.side is None:
            return ""
        mine = STEPS.index(self.step)
        late: Dict[str, str] = {}
        try:
            for r in range(self.world):
                key = f"netcheck/at/{r}"
                at = int(self.side.get(key).decode()) if self.side.check([key]) else -1
                if at < mine:
                    late.setdefault(self.owner(r), "never joined" if at < 2 else f"still at {STEPS[at]}")
        except Exception:  # noqa: BLE001
            return ""
        return "; waiting for " + ", ".join(f"{h} ({why})" for h, why in late.items()) if late else ""

    # -- the checks
    def run(self) -> None:
        job = self.job
        threading.Thread(target=self.watch, daemon=True).start()
        t = self.begin("preflight")
        ok, msg, notes = preflight(dict(os.environ), str(job["master_addr"]), str(job["host"]))
        if ok:
            self.say(step="preflight", ok=True, msg=msg, notes=notes, s=round(time.time() - t, 2))
        else:   # reported once this rank reaches the rendezvous, so that the peers stop at once
            self.pending = msg

        t = self.begin("torch")
        try:
            import torch
            import torch.distributed as dist
        except Exception as e:  # noqa: BLE001 - an image without torch is this host's failure
            self.fail(f"cannot import torch: {type(e).__name__}: {e}")
        cuda = job["device"] == "cuda"
        info = self.info = {"torch": torch.__version__, "cuda": getattr(torch.version, "cuda", None)}
        if cuda:
            if not info["cuda"]:
                self.fail(f"torch {torch.__version__} in this image is a CPU build: no CUDA, no NCCL")
            n = torch.cuda.device_count()
            if n <= self.local:
                self.fail(f"torch sees {n} GPU(s), this host needs {job['local']} (is the NVIDIA container "
                          "runtime there, --gpus?)")
            torch.cuda.set_device(self.local)
            try:
                v = torch.cuda.nccl.version()
                info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
            except Exception:  # noqa: BLE001
                info["nccl"] = None
            info["gpu"] = torch.cuda.get_device_name(self.local)
        self.say(step="torch", ok=True, info=info, s=round(time.time() - t, 2))

        t = self.begin("init")
        from datetime import timedelta
        master, port = str(job["master_addr"]), int(job["master_port"])
        try:
            self.store = dist.TCPStore(master, port, self.world, self.rank == 0, timeout=timedelta(
                seconds=self.left()), wait_for_workers=False)
        except Exception as e:  # noqa: BLE001
            where = "listen on" if self.rank == 0 else "reach the rendezvous of rank 0 on"
            self.fail(f"cannot {where} {master}:{port} ({self.owner(0)}): {_one_line(e, 200)}")
        try:
            self.side = dist.TCPStore(master, port, self.world, False, timeout=timedelta(seconds=30),
                                      wait_for_workers=False)
        except Exception as e:  # noqa: BLE001
            self.fail(f"cannot reach the rendezvous of rank 0 on {master}:{port} ({self.owner(0)}): {_one_line(e, 200)}")
        if self.pending:
            self.step = "preflight"
            self.fail(self.pending)
        self.store.set(f"netcheck/at/{self.rank}", str(STEPS.index("init")))
        self.store.add("netcheck/joined", 1)
        while self.store.add("netcheck/joined", 0) < self.world:
            time.sleep(0.2)          # the watcher reports who is missing when time runs out
        self.reach()
        self.say(step="init", ok=True, msg=f"{self.world} ranks met at {master}:{port}; GLOO addresses reachable",
                 s=round(time.time() - t, 2))

        expected = float(self.world * (self.world + 1) // 2)   # every rank adds rank + 1
        t = self.begin("nccl" if cuda else "gloo")
        try:
            dist.init_process_group(backend="nccl" if cuda else "gloo", store=self.store, rank=self.rank,
                                    world_size=self.world, timeout=timedelta(seconds=self.left()))
        except Exception as e:  # noqa: BLE001
            self.fail(self._explain(e))
        if cuda:
            self._all_reduce(torch, dist, torch.device("cuda", self.local), None, expected, t)
            t = self.begin("gloo")
            try:
                group = dist.new_group(ranks=list(range(self.world)), backend="gloo",
                                       timeout=timedelta(seconds=self.left()))
            except Exception as e:  # noqa: BLE001
                self.fail(self._explain(e))
            self._all_reduce(torch, dist, torch.device("cpu"), group, expected, t)
        else:
            self._all_reduce(torch, dist, torch.device("cpu"), None, expected, t)

        self.store.add("netcheck/done", 1)   # rank 0 holds the store: it leaves last
        self.finished = True
        if self.rank == 0:
            end = time.time() + 10
            while time.time() < end:
                try:
                    if self.store.add("netcheck/done", 0) >= self.world:
                        break
                except Exception:  # noqa: BLE001
                    break
                time.sleep(0.1)
        ender = threading.Thread(target=dist.destroy_process_group, daemon=True)
        ender.start()
        ender.join(timeout=5)     # a slow teardown must not hold the result back
        sys.stdout.flush()
        os._exit(0)

    def reach(self) -> None:
        """Before gloo: every rank listens on the address gloo will use and connects, from that address, to every
        other host's ranks. A NIC that exists but is the wrong one (unroutable address) fails here, by name,
        instead of hanging inside gloo."""
        ifname = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0].strip()
        try:
            addr = ipv4_of(ifname) if ifname else socket.gethostbyname(socket.gethostname())
        except OSError:
            addr = None
        try:
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.bind((addr or "0.0.0.0", 0))
            srv.listen(64)
        except OSError as e:
            self.fail(f"GLOO_SOCKET_IFNAME={ifname or '(unset)'}: cannot listen on {addr}: {e}")

        def accept() -> None:
            while True:
                try:
                    srv.accept()[0].close()
                except OSError:
                    return
        threading.Thread(target=accept, daemon=True).start()
        host_ip = os.environ.get("VLLM_HOST_IP")
        odd = int(bool(addr and host_ip and addr != host_ip))    # gloo's address is not the engine's
        self.store.set(f"netcheck/gloo/{self.rank}", f"{addr or '-'} {srv.getsockname()[1]} {odd}")
        others = [r for r in range(self.world) if self.owner(r) != self.owner(self.rank)]
        if not addr or not others:
            return
        peers, mismatch = {}, {}
        for r in range(self.world):
            while not self.store.check([f"netcheck/gloo/{r}"]):
                time.sleep(0.2)
            a, p, m = self.store.get(f"netcheck/gloo/{r}").decode().split()
            peers[r], mismatch[r] = (a, int(p)), m == "1"
        peers = {r: peers[r] for r in others if peers[r][0] != "-"}
        failed: Dict[int, str] = {}

        def probe(r: int) -> None:
            try:
                socket.create_connection(peers[r], timeout=5, source_address=(addr, 0)).close()
            except OSError as e:
                failed[r] = f"{peers[r][0]}: {e.strerror or e}"
        threads = [threading.Thread(target=probe, args=(r,), daemon=True) for r in peers]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=10)
        self.store.set(f"netcheck/reach/{self.rank}", json.dumps(sorted(failed)))
        self.store.add("netcheck/reached", 1)
        while self.store.add("netcheck/reached", 0) < self.world:
            time.sleep(0.2)
        missed = {r: set(json.loads(self.store.get(f"netcheck/reach/{r}").decode())) for r in range(self.world)}

        def cut_off(r: int) -> bool:     # no rank of another host could connect to it
            return all(r in missed[o] for o in range(self.world) if self.owner(o) != self.owner(r))
        suspects = [r for r in range(self.world) if cut_off(r)]
        if len({self.owner(r) for r in suspects}) > 1:   # two hosts that cannot see each other: which is wrong?
            suspects = [r for r in suspects if mismatch[r]] or suspects   # the one whose NIC is not VLLM_HOST_IP's

        def unreachable(r: int) -> bool:
            return r in suspects
        me = self.owner(self.rank)
        if unreachable(self.rank):
            why = f" ({self.owner(min(failed))} {failed[min(failed)]})" if failed else ""
            self.fail(f"GLOO_SOCKET_IFNAME={ifname or '(unset)'} gives {addr} on {me}: the other hosts cannot "
                      f"connect to it{why}")
        bad = [r for r in sorted(failed) if not unreachable(r)]
        if bad:   # the others reach that host, this one does not: the path from here is broken
            self.fail(f"from GLOO_SOCKET_IFNAME={ifname or '(unset)'} ({addr}) on {me}, {self.owner(bad[0])} cannot "
                      f"be reached ({failed[bad[0]]})")
        # the unreachable host says why itself; its failure stops this rank

    def _all_reduce(self, torch, dist, device, group, expected: float, t0: float) -> None:
        try:
            data = torch.full((NUMEL,), float(self.rank + 1), dtype=torch.float32, device=device)
            dist.all_reduce(data, op=dist.ReduceOp.SUM, group=group)
            if device.type == "cuda":
                torch.cuda.synchronize()
            lo, hi = data.min().item(), data.max().item()
        except Exception as e:  # noqa: BLE001
            self.fail(self._explain(e))
        if lo != expected or hi != expected:
            self.fail(f"all-reduce gave {lo:g}..{hi:g}, expected {expected:g} (sum of rank+1 over "
                      f"{self.world} ranks)")
        self.say(step=self.step, ok=True, msg=f"sum {expected:g} == expected over {self.world} ranks",
                 s=round(time.time() - t0, 2))

    def _explain(self, e: BaseException) -> str:
        text = _one_line(f"{type(e).__name__}: {e}", 240)
        if self.step == "gloo":
            return f"GLOO_SOCKET_IFNAME={os.environ.get('GLOO_SOCKET_IFNAME', '(unset)')}: {text}"
        if self.step == "nccl":
            return f"NCCL_SOCKET_IFNAME={os.environ.get('NCCL_SOCKET_IFNAME', '(unset)')}: {text}"
        return text


def rank_main(job_path: str, local: int, deadline: float) -> int:
    with open(job_path) as f:
        job = json.load(f)
    rank = Rank(job, local, deadline)
    try:
        rank.run()
    except Exception as e:  # noqa: BLE001 - anything unforeseen is still one line for this step
        rank.fail(rank._explain(e))
    return 0


# ---------------------------------------------------------------- the supervisor (one per host)
class RankLog:
    """What one rank reported: step -> its final record; the step it was in."""

    def __init__(self, rank: int):
        self.rank = rank
        self.steps: Dict[str, Dict[str, Any]] = {}
        self.current = "preflight"
        self.info: Dict[str, Any] = {}
        self.notes: List[str] = []
        self.code: Optional[int] = None

    def feed(self, rec: Dict[str, Any]) -> None:
        step = str(rec.get("step", ""))
        if step not in STEPS:
            return
        if rec.get("start"):
            self.current = step
            return
        self.steps[step] = rec
        if isinstance(rec.get("info"), dict) and rec["info"]:
            self.info = rec["info"]
        if isinstance(rec.get("notes"), list):
            self.notes = [str(n) for n in rec["notes"]]


def summarize(job: Dict[str, Any], logs: List[RankLog], killed: bool, seconds: float) -> Tuple[bool, Dict[str, Any]]:
    """This host's result from its ranks' records: per step ok | fail | stopped | timeout | - (not reached)."""
    steps = [s for s in STEPS if s != "nccl" or job["device"] == "cuda"]
    checks: List[List[Any]] = []
    for step in steps:
        if any(c[1] not in ("ok", "-") for c in checks):     # what follows a failure was not reached
            checks.append([step, "-", 0, ""])
            continue
        recs = [lg.steps.get(step) for lg in logs]
        if all(r is not None and r.get("ok") for r in recs):
            checks.append([step, "ok", max(float(r.get("s", 0)) for r in recs), str(recs[0].get("msg", ""))])
            continue
        bad = [r for r in recs if r is not None and not r.get("ok")]
        own = [r for r in bad if not r.get("peer") and not r.get("timeout")]
        if own or bad:
            r = (own or bad)[0]
            status = "fail" if own else ("timeout" if r.get("timeout") else "stopped")
            checks.append([step, status, 0, str(r.get("msg", ""))])
        elif any(lg.current == step and lg.code not in (0, None, -9) for lg in logs):
            lg = next(lg for lg in logs if lg.current == step and lg.code not in (0, None, -9))
            checks.append([step, "fail", 0, f"rank {lg.rank} exited with code {lg.code} during {step} "
                                            "without a result (see its output)"])
        elif killed and any(lg.current == step for lg in logs):
            checks.append([step, "timeout", 0, f"no answer within {job['timeout']}s (killed)"])
        else:
            checks.append([step, "-", 0, ""])
    ok = all(c[1] == "ok" for c in checks)
    info = next((lg.info for lg in logs if lg.info), {})
    notes = sorted({n for lg in logs for n in lg.notes})
    first, n = int(job["first_rank"]), int(job["local"])
    doc = {"netcheck": VERSION, "host": job["host"], "ranks": [first, first + n - 1], "world": int(job["world"]),
           "device": job["device"], "torch": info.get("torch"), "nccl": info.get("nccl"), "gpu": info.get("gpu"),
           "checks": checks, "notes": notes, "s": round(seconds, 1)}
    return ok, doc


def compact(doc: Dict[str, Any]) -> str:
    """The result as JSON text short enough for the control's event line: the other messages and the notes are
    shortened first, the message of the first check that did not pass last."""
    key = next((i for i, c in enumerate(doc["checks"]) if c[1] != "ok"), -1)
    text = ""
    for other, main, notes in ((200, 200, 200), (120, 200, 60), (60, 200, 0), (0, 200, 0), (0, 120, 0), (0, 60, 0),
                               (0, 0, 0)):
        checks = [[c[0], c[1], round(float(c[2]), 2), _one_line(c[3], main if i == key else other)
                   if (main if i == key else other) else ""] for i, c in enumerate(doc["checks"])]
        d = dict(doc, checks=checks, notes=[_one_line(n, notes) for n in doc["notes"]][:2] if notes else [])
        if d.get("gpu"):
            d["gpu"] = _one_line(d["gpu"], 40)
        text = json.dumps(d, separators=(",", ":"))
        if len(text) <= MAX_RESULT:
            return text
    return text


def supervise(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    t0 = time.time()
    deadline = t0 + float(job["timeout"])
    n = int(job["local"])
    logs = [RankLog(int(job["first_rank"]) + i) for i in range(n)]
    _emit({"ev": "note", "msg": f"{_rank_range(int(job['first_rank']), n)} of {job['world']} ({job['device']}), "
                                f"rendezvous {job['master_addr']}:{job['master_port']}, at most {job['timeout']}s"})
    procs = []
    for i in range(n):
        env = dict(os.environ, LOCAL_RANK=str(i), RANK=str(int(job["first_rank"]) + i), WORLD_SIZE=str(job["world"]),
                   MASTER_ADDR=str(job["master_addr"]), MASTER_PORT=str(job["master_port"]))
        procs.append(subprocess.Popen([sys.executable, "-u", os.path.abspath(__file__), "--rank", str(i), job_path,
                                       repr(deadline)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                      stdin=subprocess.DEVNULL, start_new_session=True))
    lock = threading.Lock()

    def read(i: int, p: subprocess.Popen) -> None:
        assert p.stdout is not None
        for raw in p.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(MARK):
                try:
                    rec = json.loads(line[len(MARK):])
                except ValueError:
                    rec = None
                if isinstance(rec, dict):
                    with lock:
                        logs[i].feed(rec)
                    if not rec.get("start"):
                        what = "ok" if rec.get("ok") else "FAILED"
                        _emit({"ev": "note", "msg": _one_line(f"rank {rec.get('r')}: {rec.get('step')} {what}"
                                                              f"{': ' + str(rec['msg']) if rec.get('msg') else ''}",
                                                              300)})
                    continue
            sys.stderr.write(f"[rank {int(job['first_rank']) + i}] {line}\n")
            sys.stderr.flush()
    readers = [threading.Thread(target=read, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for r in readers:
        r.start()
    killed = False
    for p in procs:
        try:
            p.wait(timeout=max(deadline + GRACE - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            killed = True
    if killed:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
                p.wait()
    for r in readers:
        r.join(timeout=5)
    for lg, p in zip(logs, procs):
        lg.code = p.returncode
    ok, doc = summarize(job, logs, killed, time.time() - t0)
    text = compact(doc)
    _emit({"ev": "done", "summary": text} if ok else {"ev": "error", "msg": text})
    return 0 if ok else 1


def main(argv: List[str]) -> int:
    if len(argv) == 4 and argv[0] == "--rank":
        return rank_main(argv[2], int(argv[1]), float(argv[3]))
    if len(argv) != 1:
        sys.stderr.write("usage: netcheck_agent.py JOB.json\n")
        return 2
    return supervise(argv[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
