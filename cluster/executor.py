"""The one executor: runs a plan's steps phase by phase (hosts in parallel), or only their checks (dry run)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from typing import Callable

from .errors import Interrupted, StepFailed
from .steps import CONTROL, Cmd, Copy, Decision, Http, Op, Put, Step, Wait, decide, phases

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def last_line(self) -> str:
        lines = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return lines[-1] if lines else f"exit code {self.rc}"


@dataclass
class Outcome:
    step: Step
    status: str                  # ran | skipped | failed | would-run | would-skip | would-fail
    why: str = ""
    variant: str | None = None
    seconds: float = 0.0
    detail: str = ""             # what the step reported (e.g. the delivery agent's summary)
    names: tuple[str, ...] = ()  # what a use_output check found (appended to the first op)
    fallback: str = ""           # "fallback N worked after: <why the ones before failed>"

    def as_dict(self) -> dict:
        out = {"id": self.step.id, "host": self.step.host, "phase": self.step.phase, "status": self.status,
               "why": self.why}
        if self.variant:
            out["variant"] = self.variant
        if self.names:
            out["names"] = list(self.names)
        if self.detail:
            out["detail"] = self.detail
        if self.seconds:
            out["seconds"] = round(self.seconds, 2)
        if self.fallback:
            out["fallback"] = self.fallback
        return out


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any(o.status == "ran" and not o.step.readonly for o in self.outcomes)

    def by_host(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for o in self.outcomes:
            out.setdefault(o.step.host, []).append(o.as_dict())
        return out


class Executor:
    """Runs steps over `hosts` (remote.Hosts, or None when every step is on this machine)."""

    def __init__(self, hosts, progress: Progress = lambda s: None):
        self.hosts, self.progress = hosts, progress
        self.running: set[str] = set()        # ids of the steps running now, and their phase: for Ctrl-C's line
        self.phase = ""

    # ------------------------------------------------------------------ running one thing
    def run(self, host: str, argv, *, timeout: float | None = 600, on_line: Callable[[str], None] | None = None
            ) -> Result:
        if host == CONTROL:
            return _run_local(list(argv), timeout, on_line)
        h = self.hosts.host(host)
        if on_line is not None:
            from .remote import stream
            rc = stream(self.hosts, h, list(argv), on_line, timeout=timeout)
            return Result(rc, "")
        r = self.hosts.run(h, argv, timeout=timeout)
        return Result(r.rc, r.stdout, r.stderr)

    def check(self, step: Step) -> Decision:
        if step.check is None:
            return Decision("run", "no check: always runs")
        r = self.run(step.host, step.check.argv, timeout=120)
        return decide(step, r.rc, r.stdout)

    # ------------------------------------------------------------------ dry run
    def evaluate(self, steps: list[Step] | tuple[Step, ...]) -> Report:
        """Only the read-only checks: what `execute` would run or skip now, and why."""
        report = Report()
        decisions = self._decide_all(list(steps))
        # steps a later step needs are counted by their own check; earlier ones by what was resolved for them
        will_run = {s.id for s in steps if decisions[s.id].action == "run" and not s.needed_by}
        for s in steps:
            d = self._resolve(s, decisions[s.id], will_run)
            (will_run.add if d.action == "run" else will_run.discard)(s.id)
            report.outcomes.append(Outcome(s, f"would-{d.action}", d.why, d.variant, names=d.extra))
        return report

    def _decide_all(self, steps: list[Step]) -> dict[str, Decision]:
        by_host: dict[str, list[Step]] = {}
        for s in steps:
            by_host.setdefault(s.host, []).append(s)
        out: dict[str, Decision] = {}

        def one(host_steps: list[Step]) -> None:
            for s in host_steps:
                try:
                    out[s.id] = self.check(s)
                except Exception as e:  # noqa: BLE001 - an unreachable host is reported per step
                    out[s.id] = Decision("fail", _describe(e))
        _parallel(list(by_host.values()), one)
        return out

    @staticmethod
    def _resolve(step: Step, d: Decision, ran: set[str]) -> Decision:
        """Apply the cross-step rules: restart after a dependency ran; skip when nobody needs this step."""
        if d.action == "skip" and step.after and ran & set(step.after):
            return Decision("run", f"{', '.join(sorted(ran & set(step.after)))} ran: must rejoin", "restart")
        if d.action == "run" and step.needed_by and not ran & set(step.needed_by):
            return Decision("skip", "no step needs it")
        return d

    # ------------------------------------------------------------------ execution
    def execute(self, steps: list[Step] | tuple[Step, ...], *, keep_going: bool = False) -> Report:
        """Every phase in order, a barrier each: checks first, then each host's steps in order, hosts in parallel.

        A failed phase stops the run and raises PhaseFailed naming every failed host; with keep_going the other hosts go on, a failed host's later steps are skipped, and the failures
        are raised at the end."""
        report = Report()
        try:
            return self._execute(list(steps), report, keep_going)
        except KeyboardInterrupt:
            cut = ", ".join(sorted(self.running)) or "none (between steps)"
            raise Interrupted(f"interrupted (Ctrl-C) in phase {self.phase}; steps cut short: {cut}; what finished "
                              "stays on the hosts: the same command again goes on from there (`down` removes a "
                              "deployment)") from None

    def _execute(self, steps: list[Step], report: Report, keep_going: bool) -> Report:
        ran: set[str] = set()
        failures: list[Outcome] = []
        first_failed = ""
        for phase in phases(steps):
            group = [s for s in steps if s.phase == phase]
            if first_failed and not keep_going:
                break
            if keep_going:
                gone = {o.step.host for o in failures}
                report.outcomes += [Outcome(s, "skipped", "the host failed earlier") for s in group if s.host in gone]
                group = [s for s in group if s.host not in gone]
            if not group:
                continue
            self.progress(f"== {phase}")
            self.phase = phase
            t0 = time.time()
            decisions = self._decide_all(group)
            wanted = {i for s in group for i in s.needed_by}
            later = [s for s in steps if s.id in wanted and s.id not in decisions]
            ahead = self._decide_all(later)     # needed_by: ask now whether those (later) steps will have work
            for s in group + later:
                d = decisions.get(s.id) or ahead[s.id]
                if d.action == "run" and not s.needed_by:
                    ran.add(s.id)
            outcomes: dict[str, Outcome] = {}
            by_host: dict[str, list[Step]] = {}
            for s in group:
                by_host.setdefault(s.host, []).append(s)

            def host_steps(host_group: list[Step]) -> None:
                for s in host_group:
                    d = self._resolve(s, decisions[s.id], ran)
                    outcomes[s.id] = self._one(s, d)
                    if outcomes[s.id].status == "failed":
                        return
            _parallel(list(by_host.values()), host_steps)
            report.phases[phase] = time.time() - t0
            for s in group:
                if s.id in outcomes:
                    report.outcomes.append(outcomes[s.id])
                    if outcomes[s.id].status == "ran":
                        ran.add(s.id)
            failed = [o for o in (outcomes.get(s.id) for s in group) if o and o.status == "failed"]
            if failed and not first_failed:
                first_failed = phase
            failures += failed
        if failures:
            raise PhaseFailed(first_failed, failures, report)
        return report

    def _one(self, step: Step, d: Decision) -> Outcome:
        where = f"{step.host}: {step.id.split('/', 1)[-1]}"
        if d.action == "skip":
            self.progress(f"{where}: ok ({d.why})")
            return Outcome(step, "skipped", d.why)
        if d.action == "fail":
            return Outcome(step, "failed", d.why)
        self.progress(f"{where}: {d.variant + ': ' if d.variant else ''}{d.why if step.check else step.reason}")
        self.running.add(step.id)
        try:
            return self._run_step(step, d, where)
        finally:
            self.running.discard(step.id)

    def _run_step(self, step: Step, d: Decision, where: str) -> Outcome:
        t0 = time.time()
        ops = step.variants[d.variant] if d.variant else step.ops
        if d.extra:
            first = ops[0]
            ops = (replace(first, argv=(*first.argv, *d.extra)), *ops[1:])
        detail = ""
        errors = []
        for i, alternative in enumerate((ops, *([] if d.variant else step.otherwise))):
            try:
                detail = self._ops(step, alternative)
                fell = f"fallback {i} worked after: {'; '.join(errors)}" if i else ""
                if fell:
                    self.progress(f"{where}: {fell}")
                return Outcome(step, "ran", d.why, d.variant, time.time() - t0, detail, d.extra, fell)
            except OpFailed as e:
                errors.append(str(e))
        return Outcome(step, "failed", "; ".join(errors), d.variant, time.time() - t0)

    def _ops(self, step: Step, ops: tuple[Op, ...]) -> str:
        detail = ""
        for op in ops:
            detail = self._op(step, op) or detail
        return detail

    def _op(self, step: Step, op: Op) -> str:
        try:
            if isinstance(op, Cmd):
                return self._cmd(step, op)
            if isinstance(op, Put):
                self._put(step.host, op)
                return ""
            if isinstance(op, Wait):
                return self._wait(step, op)
            if isinstance(op, Http):
                return self._http(op)
            if isinstance(op, Copy):
                from .delivery.control import copy_tree
                return copy_tree(self, op.src_host, op.src, step.host, op.dst, self.progress)
        except OpFailed:
            raise
        except StepFailed as e:
            raise OpFailed(str(e)) from None
        except Exception as e:  # noqa: BLE001 - an SSH or OS failure is this step's failure, in one line
            raise OpFailed(_describe(e)) from None
        raise TypeError(f"unknown op {op!r}")

    def _cmd(self, step: Step, op: Cmd) -> str:
        if not op.stream:
            r = self.run(step.host, op.argv, timeout=op.timeout)
            if not r.ok:
                raise OpFailed(f"`{' '.join(op.argv[:3])}` exited {r.rc}: {r.last_line()}")
            return ""
        events = EventLines(step.host, self.progress)
        r = self.run(step.host, op.argv, timeout=op.timeout, on_line=events.feed)
        if r.rc != 0 or events.error:
            raise OpFailed(events.error or f"`{' '.join(op.argv[:3])}` exited {r.rc}: {events.tail()}")
        return events.summary

    def _put(self, host: str, op: Put) -> None:
        if host == CONTROL:
            folder = os.path.dirname(op.path)
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fd = os.open(op.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, op.mode)
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), op.mode)
                f.write(op.content())
            return
        self.hosts.put_text(self.hosts.host(host), op.path, op.content(), mode=op.mode)

    def _wait(self, step: Step, op: Wait) -> str:
        deadline = time.time() + op.timeout
        last = ""
        while True:
            r = self.run(step.host, op.argv, timeout=max(30.0, op.interval * 5))
            last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.last_line()
            if r.ok:
                return last
            if op.abort is not None and not self.run(step.host, op.abort, timeout=60).ok:
                raise OpFailed(f"{last}; the process it waits for is gone{self._log_tail(step.host, op.log)}")
            if time.time() >= deadline:
                raise OpFailed(f"not within {op.timeout:.0f}s: {last}{self._log_tail(step.host, op.log)}")
            self.progress(f"{step.host}: {step.phase}: {last}")
            time.sleep(op.interval)

    def _log_tail(self, host: str, argv) -> str:
        if not argv:
            return ""
        r = self.run(host, argv, timeout=60)
        return "; last log lines:\n" + r.stdout.rstrip() if r.ok and r.stdout.strip() else ""

    def _http(self, op: Http) -> str:
        deadline = time.time() + (op.until or 0)
        start = said = time.time()
        while True:
            code, text = http(op.url, body=op.body, auth=op.auth.reveal() if op.auth is not None else None,
                              timeout=op.timeout)
            if code == 200 and (not op.expect or op.expect in text):
                return f"HTTP 200 from {op.url}"
            if not op.until:
                raise OpFailed(f"{op.url}: HTTP {code}: {text[:200]}")
            if op.abort is not None and not self.run(op.abort[0], op.abort[1], timeout=60).ok:
                raise OpFailed(f"the server exited while loading{self._log_tail(*op.log) if op.log else ''}")
            if time.time() >= deadline:
                raise OpFailed(f"{op.url} did not answer 200 within {op.until:.0f}s (last: HTTP {code} "
                               f"{text[:120]}){self._log_tail(*op.log) if op.log else ''}")
            waited = time.time() - start
            if time.time() - said >= 30:
                said = time.time()
                self.progress(f"waiting for {op.url}: {waited:.0f}s (HTTP {code or 'no answer'})")
            time.sleep(5 if waited > 20 else 1)


class OpFailed(Exception):
    """One op did not succeed; the message is one line for the user."""


class PhaseFailed(StepFailed):
    """A phase ended with failed steps: every failed host is named, with its cause."""

    def __init__(self, phase: str, failed: list[Outcome], report: Report):
        self.report, self.failed, self.phase = report, failed, phase
        detail = "; ".join(f"{o.step.host}: {o.step.id.split('/', 1)[-1]}: {o.why}" for o in failed)
        super().__init__(f"{phase} failed on {len({o.step.host for o in failed})} host(s): {detail}")


class EventLines:
    """Output of a streamed command: JSON event lines from the delivery agent become progress, others are kept."""

    def __init__(self, host: str, progress: Progress):
        self.host, self.progress = host, progress
        self.other: list[str] = []
        self.error = ""
        self.summary = ""
        self.meter = None

    def feed(self, line: str) -> None:
        try:
            ev = json.loads(line)
        except ValueError:
            ev = None
        if not isinstance(ev, dict) or not isinstance(ev.get("ev"), str):
            self.other = (self.other + [line])[-20:]
            return
        from .delivery.control import on_event
        on_event(self, ev)

    def tail(self) -> str:
        return " | ".join(self.other[-3:]) or "no output"


def http(url: str, *, body: str | None = None, auth: str | None = None, timeout: float = 10) -> tuple[int, str]:
    """(status, text) of one request; 0 and the reason when nothing answered."""
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = f"Bearer {auth}"
    req = urllib.request.Request(url, data=body.encode() if body is not None else None, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http to the deployment
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as e:
        return 0, str(getattr(e, "reason", e))


def _run_local(argv: list[str], timeout: float | None, on_line) -> Result:
    if on_line is None:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError as e:
            return Result(127, "", str(e))
        return Result(r.returncode, r.stdout, r.stderr)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    assert p.stdout is not None
    for line in p.stdout:
        on_line(line.rstrip("\n"))
    return Result(p.wait(), "")


def _parallel(items: list, fn) -> None:
    threads = [threading.Thread(target=fn, args=(item,), daemon=True) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _describe(e: BaseException) -> str:
    from .remote import describe
    return describe(e)
