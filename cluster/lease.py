"""The cluster lease: a small file on the head naming which operation changes the hosts, renewed while it runs.

A lease, not a lock: it records the owner (user@host of the control machine, pid, command, start) and an expiry in
the head's own clock (`date +%s` there, so the control machine's clock does not matter). The operation renews it
every ttl/3 seconds from a thread; one that stops (killed, connection lost, laptop asleep) lets it expire, and the
next operation takes it over, saying whose it was. `--break-lock` takes a live one. Take, renew and release run
under flock(1) on the head (concurrent takers are serialized: exactly one wins) and write a temp file + mv.
The lease lives in the root-owned state folder (created 0700), never in world-writable /tmp."""

from __future__ import annotations

import getpass
import os
import re
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import Callable

from .delivery.model_steps import STATE_DIR
from .errors import LockHeld, RemoteError
from .executor import Executor, PhaseFailed, Report
from .steps import Check, Cmd, Step

TTL = 90                      # seconds a lease lives after its last renewal
MARK = "held by "             # how the check's `fail` line starts (turned into LockHeld)
Notice = Callable[[str], None]

# Fixed script text; every value arrives as a positional argument:
# $0 lease file, $1 token, $2 ttl, $3 owner, $4 pid, $5 command, $6 break (yes|no).
_PRELUDE = r'''L=$0 tok=$1 ttl=$2 me=$3 pid=$4 cmd=$5 brk=$6 d=${0%/*}
load() { now=$(date +%s); cur=$(cat "$L" 2>/dev/null) || cur=; }
f() { printf '%s\n' "$cur" | sed -n "s/^$1=//p" | head -n 1 | tr -cd '[:print:]' | cut -c 1-100; }
n() { v=$(f "$1"); case $v in ''|*[!0-9]*) echo 0 ;; *) echo "$v" ;; esac; }
state() { if [ -z "$cur" ]; then echo free; elif [ "$(f token)" = "$tok" ]; then echo ours;
  elif [ "$(n expires)" -le "$now" ]; then echo stale; else echo live; fi; }
who() { s=$(n start); t=$(date -u -d "@$s" +%Y-%m-%dT%H:%M:%SZ 2>/dev/null) || t="@$s"
  echo "$(f owner) pid $(f pid) (gpucluster $(f command)), started $t ($((now - s))s ago), last renewed $((now - $(n renewed)))s ago"; }
held() { echo "fail held by $(who), expires in $(($(n expires) - now))s (fix: wait for it to end, or pass --break-lock if it is gone)"; }
need_flock() { command -v flock >/dev/null 2>&1 || { echo "flock (util-linux) is missing on this host: the lease needs it"; exit 1; }; }
umask 077
'''

# Read-only: what taking the lease would do now (the first word decides, see steps.decide).
CHECK = _PRELUDE + r'''load
case $(state) in
free) echo "run take the lease (none held)" ;;
ours) echo "run renew this operation's own lease" ;;
stale) echo "run take over the stale lease of $(who), expired $((now - $(n expires)))s ago" ;;
*) if [ "$brk" = yes ]; then echo "run break the live lease of $(who) (--break-lock)"; else held; fi ;;
esac
'''

TAKE = _PRELUDE + r'''[ -d "$d" ] || mkdir -p -m 700 "$d" || exit 1
need_flock
{ flock -w 30 9 || { echo "could not get $L.lock within 30s"; exit 1; }
  load
  st=$(state)
  if [ "$st" = live ] && [ "$brk" != yes ]; then held; exit 1; fi
  start=$now; [ "$st" = ours ] && start=$(n start)
  printf 'token=%s\nowner=%s\npid=%s\ncommand=%s\nstart=%s\nrenewed=%s\nexpires=%s\n' "$tok" "$me" "$pid" "$cmd" \
    "$start" "$now" "$((now + ttl))" > "$L.$tok.tmp" && mv -f "$L.$tok.tmp" "$L" || exit 1
  echo "took the lease until $((now + ttl)) (the head's clock)"
} 9>>"$L.lock"
'''

# Extends only a lease this operation still owns; never writes one that is gone or someone else's.
RENEW = _PRELUDE + r'''[ -f "$L" ] || { echo "lost the lease was removed (by hand, or broken and then released)"; exit 0; }
need_flock
{ flock -w 20 9 || { echo "retry could not get $L.lock within 20s"; exit 1; }
  load
  if [ -z "$cur" ]; then echo "lost the lease was removed (by hand, or broken and then released)"; exit 0; fi
  if [ "$(f token)" != "$tok" ]; then echo "lost the lease is now held by $(who)"; exit 0; fi
  printf '%s\n' "$cur" | sed -e "s/^renewed=.*/renewed=$now/" -e "s/^expires=.*/expires=$((now + ttl))/" \
    > "$L.$tok.tmp" && mv -f "$L.$tok.tmp" "$L" || exit 1
  echo "ok renewed until $((now + ttl))"
} 9>>"$L.lock"
'''

# Removes only this operation's own lease.
RELEASE = _PRELUDE + r'''[ -f "$L" ] || { echo "no lease to release"; exit 0; }
need_flock
{ flock -w 20 9 || { echo "could not get $L.lock within 20s"; exit 1; }
  load
  if [ -z "$cur" ]; then echo "no lease to release"
  elif [ "$(f token)" = "$tok" ]; then rm -f "$L" && echo "released"
  else echo "left alone: the lease is now held by $(who)"; fi
} 9>>"$L.lock"
'''


def _clean(text: str, limit: int = 100) -> str:
    """One printable line (a value written into the lease file must not add lines to it)."""
    return "".join(c for c in str(text) if c.isprintable())[:limit] or "?"


def me() -> str:
    """user@host of this (the control) machine."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment: the lease still works
        user = "?"
    return _clean(f"{user}@{socket.gethostname()}")


@dataclass(frozen=True, kw_only=True)
class Lease:
    """One operation's lease on a cluster: where it lives and who takes it."""

    cluster: str
    host: str                     # where the file lives: the inventory's head
    command: str                  # up | down | model pull | check network
    owner: str
    pid: int
    token: str                    # random: tells this operation's lease from any other
    ttl: int = TTL
    break_lock: bool = False
    root: str = STATE_DIR

    def __post_init__(self):
        if not re.fullmatch(r"[0-9a-f]{8,64}", self.token):
            raise ValueError("a lease token is hex")

    @property
    def path(self) -> str:
        return f"{self.root}/{self.cluster}.lease"

    def _args(self) -> tuple[str, ...]:
        return (self.path, self.token, str(int(self.ttl)), _clean(self.owner), str(self.pid), _clean(self.command),
                "yes" if self.break_lock else "no")

    def check_argv(self) -> tuple[str, ...]:
        return ("sh", "-c", CHECK, *self._args())

    def take_argv(self) -> tuple[str, ...]:
        return ("sh", "-c", TAKE, *self._args())

    def renew_argv(self) -> tuple[str, ...]:
        return ("sh", "-c", RENEW, *self._args()[:3])

    def release_argv(self) -> tuple[str, ...]:
        return ("sh", "-c", RELEASE, *self._args()[:2])

    def steps(self) -> tuple[list[Step], list[Step]]:
        """(take, release) on the lease's host; phases `lock` and `unlock`."""
        take = Step(id=f"{self.host}/lock", host=self.host, phase="lock", readonly=True,
                    check=Check(argv=self.check_argv()), ops=(Cmd(argv=self.take_argv(), timeout=60),),
                    reason=f"take the cluster lease {self.path} for `{self.command}` (renewed every "
                           f"{max(1, self.ttl // 3)}s while it runs, expires {self.ttl}s after the last renewal)")
        release = Step(id=f"{self.host}/unlock", host=self.host, phase="unlock", readonly=True,
                       reason="release the cluster lease (only this operation's own)",
                       ops=(Cmd(argv=self.release_argv(), timeout=60),))
        return [take], [release]


def for_operation(inv, command: str, *, break_lock: bool = False, ttl: int = TTL, root: str = STATE_DIR) -> Lease:
    """The lease `command` takes on the inventory's head (hosts[].role: head, else the first host)."""
    return Lease(cluster=inv.cluster.name, host=inv.head.name, command=command, owner=me(), pid=os.getpid(),
                 token=secrets.token_hex(8), ttl=ttl, break_lock=break_lock, root=root)


class LeaseLost(LockHeld):
    """Someone else broke this operation's lease (or removed it): it stops at the next phase boundary."""


def _one_line(why: str) -> str:
    """An op failure's cause without the script text (`sh -c <script>` exited N: cause)."""
    m = re.search(r"` exited (\d+): (.*)$", why, re.S)
    return " ".join((m.group(2) if m else why).split())


def _why(e: BaseException) -> str:
    try:
        from .remote import describe
    except ImportError:   # no SSH libraries (every step on this machine)
        return " ".join(f"{type(e).__name__}: {e}".split())
    return describe(e)


class Held:
    """Take the lease, renew it from a thread while the block runs, release it after (on failure and Ctrl-C too).

    Run the operation's steps with `.executor`: when the renewal finds the lease broken by someone else, it stops
    at the next phase boundary with LeaseLost. `.taken` and `.released` hold the lease steps' outcomes."""

    def __init__(self, lease: Lease, hosts, *, progress: Callable[[str], None] = lambda s: None,
                 notice: Notice = lambda s: None, interval: float | None = None, unreachable_ok: bool = False):
        self.lease, self.progress, self.notice = lease, progress, notice
        self.unreachable_ok = unreachable_ok    # go on when the lease's host cannot be reached (the run will say so)
        self.interval = interval if interval is not None else max(1.0, lease.ttl / 3)
        self.ex = Executor(hosts, progress)
        self.executor = Executor(hosts, self._guard)
        self.taken, self.released = Report(), Report()
        self.held = False
        self.lost = ""
        self.stopped_at = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ take
    def __enter__(self) -> "Held":
        take, _ = self.lease.steps()
        said = f"{self.lease.host}: lock: "

        def quiet_takeover(line: str) -> None:   # a takeover is said once, as a notice, below
            if not (line.startswith(said) and line[len(said):].startswith(("take over", "break"))):
                self.progress(line)
        try:
            self.taken = Executor(self.ex.hosts, quiet_takeover).execute(take)
        except PhaseFailed as e:
            self.taken = e.report
            self._refused(take[0], e.failed[0].why)
            return self
        why = self.taken.outcomes[0].why if self.taken.outcomes else ""
        if why.startswith(("take over", "break")):
            self.notice(f"{self.lease.host}: {why}")
        self.held = True
        self._thread = threading.Thread(target=self._renew, name="gpucluster-lease", daemon=True)
        self._thread.start()
        return self

    def _refused(self, step: Step, why: str) -> None:
        """Held by another operation: LockHeld naming it. Anything else (unreachable head, no permission): a
        RemoteError, unless --break-lock, which goes on without a lease (as does an unreachable head when
        unreachable_ok: that run cannot change anything there, and reports the host itself)."""
        if self.unreachable_ok and not why.startswith(MARK) and "` exited " not in why:
            self.taken = Report()
            return
        if not why.startswith(MARK) and "` exited " in why:   # the check said run; the take found it held (raced)
            try:
                d = self.ex.check(step)
                if d.action == "fail" and d.why.startswith(MARK):
                    why = d.why
            except Exception:  # noqa: BLE001 - the first failure is the one to report
                pass
        if why.startswith(MARK):
            raise LockHeld(f"cluster {self.lease.cluster}: the lease on {self.lease.host} is {why}")
        why = _one_line(why)
        if self.lease.break_lock:
            self.notice(f"going on without the cluster lease (--break-lock): {self.lease.host}: {why}")
            return
        raise RemoteError("take the cluster lease", {self.lease.host: f"{why} (the lease lives there; --break-lock "
                                                                       "goes on without it)"})

    # ------------------------------------------------------------------ renew
    def _renew(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                r = self.ex.run(self.lease.host, self.lease.renew_argv(), timeout=max(10.0, self.interval))
                line = next((ln.strip() for ln in r.stdout.splitlines() if ln.strip()), "")
                word, _, rest = line.partition(" ")
                problem = "" if r.ok and word in ("ok", "lost") else (rest if word == "retry" else r.last_line())
            except Exception as e:  # noqa: BLE001 - a lost connection: try again at the next tick
                word, rest, problem = "", "", _why(e)
            if self._stop.is_set():
                return
            if word == "lost" and not problem:
                self.lost = rest
                self.notice(f"{self.lease.host}: lost the cluster lease: {rest}; stopping at the next phase boundary")
                return
            if problem:
                self.notice(f"{self.lease.host}: could not renew the cluster lease ({problem}); trying again in "
                            f"{self.interval:.0f}s (it expires {self.lease.ttl}s after the last renewal)")

    def _guard(self, line: str) -> None:
        """The executor's progress: `== <phase>` starts a phase; a lost lease stops the run there."""
        if line.startswith("== ") and self.lost:
            self.stopped_at = line[3:]
            raise LeaseLost(f"cluster {self.lease.cluster}: stopped before phase {self.stopped_at}: the lease on "
                            f"{self.lease.host} is no longer this operation's ({self.lost}); what ran before stays")
        self.progress(line)

    # ------------------------------------------------------------------ release
    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.held:
            return
        self.held = False
        _, release = self.lease.steps()
        try:
            self.released = self.ex.execute(release)
        except PhaseFailed as e:
            self.released = e.report
            self.notice(f"{self.lease.host}: could not release the cluster lease ({_one_line(e.failed[0].why)}); "
                        f"it expires by itself within {self.lease.ttl}s")
