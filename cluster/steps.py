"""PURE: a plan's steps: what runs where (argv, file puts, waits), the read-only check that may skip it, and why."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Union

from .config import Secret

CONTROL = "control"        # the host name of this machine (the operator's)
Argv = tuple[str, ...]
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")   # what a check may hand to an argv (container names)


@dataclass(frozen=True, kw_only=True)
class Cmd:
    """One argv, run on the step's host; `stream` passes output lines to progress as they come."""

    argv: Argv
    timeout: float | None = 600
    stream: bool = False

    def as_dict(self) -> dict:
        return {"argv": list(self.argv)}


@dataclass(frozen=True, kw_only=True)
class Put:
    """A file written over SFTP (never through a command line), its mode set before its content."""

    path: str
    mode: int = 0o644
    text: str = ""
    secrets: tuple[tuple[str, Secret], ...] = ()   # KEY=value lines revealed only when written

    def content(self) -> str:
        return self.text + "".join(f"{k}={v.reveal()}\n" for k, v in self.secrets)

    def as_dict(self) -> dict:
        out = {"put": self.path, "mode": f"{self.mode:04o}"}
        if self.secrets:
            out["env"] = {k: "***" for k, _ in self.secrets}
        else:
            out.update(bytes=len(self.text.encode()), sha256=hashlib.sha256(self.text.encode()).hexdigest())
        return out


@dataclass(frozen=True, kw_only=True)
class Wait:
    """Run a read-only probe until it exits 0; its last output line says what is still missing."""

    argv: Argv
    timeout: float
    interval: float = 2.0
    abort: Argv | None = None       # a probe that, when it exits non-zero, ends the wait early (process died)
    log: Argv | None = None         # printed when the wait fails (the last log lines)

    def as_dict(self) -> dict:
        out: dict = {"wait": list(self.argv), "timeout": self.timeout}
        if self.abort:
            out["abort"] = list(self.abort)
        if self.log:
            out["log"] = list(self.log)
        return out


@dataclass(frozen=True, kw_only=True)
class Http:
    """An HTTP request from this machine; `until` repeats it until it answers 200 (or times out)."""

    url: str
    body: str | None = None          # JSON text; POST when given
    expect: str | None = None        # a string the answer must contain
    until: float | None = None       # seconds to keep trying
    timeout: float = 10              # seconds one request may take (a first completion warms the engine up)
    auth: Secret | None = None
    auth_env: str = "API_KEY"        # the variable the runbook reads the key from (the same as the host's env file)
    abort: tuple[str, Argv] | None = None   # (host, probe): stop waiting when it exits non-zero
    log: tuple[str, Argv] | None = None     # (host, argv) whose output explains a failure

    def as_dict(self) -> dict:
        out: dict = {"http": self.url}
        if self.body is not None:
            out["body"] = self.body
        if self.expect:
            out["expect"] = self.expect
        if self.until:
            out["timeout"] = self.until
        if self.auth is not None:
            out["auth"] = "***"
        if self.abort:
            out["abort"] = {"host": self.abort[0], "argv": list(self.abort[1])}
        if self.log:
            out["log"] = {"host": self.log[0], "argv": list(self.log[1])}
        return out


@dataclass(frozen=True, kw_only=True)
class Copy:
    """Copy a folder's files from one host (or this machine) to the step's host, through this machine."""

    src_host: str
    src: str
    dst: str

    def as_dict(self) -> dict:
        return {"copy": f"{self.src_host}:{self.src}", "to": self.dst}


Op = Union[Cmd, Put, Wait, Http, Copy]


@dataclass(frozen=True, kw_only=True)
class Check:
    """A read-only probe run before the step. The first word of its output decides:
    `skip ...` skips the step (the rest is the reason), `fail ...` stops with that message, the name of
    one of the step's variants runs that variant, anything else (or no output) runs the step's ops."""

    argv: Argv

    def as_dict(self) -> list[str]:
        return list(self.argv)


@dataclass(frozen=True, kw_only=True)
class Step:
    id: str                       # unique in the plan: "<host>/<what>"
    host: str                     # a host name, or CONTROL
    phase: str
    reason: str
    ops: tuple[Op, ...]
    check: Check | None = None
    variants: dict[str, tuple[Op, ...]] = field(default_factory=dict)
    otherwise: tuple[tuple[Op, ...], ...] = ()   # tried in order when ops fail (mirror fallbacks)
    after: tuple[str, ...] = ()   # step ids: when one of them ran, run variant "restart" instead of skipping
    needed_by: tuple[str, ...] = ()   # step ids: skip this step unless one of them will run
    use_output: bool = False      # the check prints names (one a line) that are appended to the first op's argv
    keep: tuple[str, ...] = ()    # with use_output: names that stay (the ones the plan itself runs)
    readonly: bool = False        # changes nothing in the deployment (waits, HTTP checks, the lock)

    def all_ops(self) -> list[Op]:
        return [*self.ops, *(op for alt in self.otherwise for op in alt),
                *(op for ops in self.variants.values() for op in ops)]

    def as_dict(self) -> dict:
        out: dict = {"id": self.id, "host": self.host, "phase": self.phase, "reason": self.reason,
                     "ops": [op.as_dict() for op in self.ops]}
        if self.check:
            out["check"] = self.check.as_dict()
        if self.variants:
            out["variants"] = {k: [op.as_dict() for op in ops] for k, ops in self.variants.items()}
        if self.otherwise:
            out["otherwise"] = [[op.as_dict() for op in ops] for ops in self.otherwise]
        if self.after:
            out["restart_after"] = list(self.after)
        if self.needed_by:
            out["needed_by"] = list(self.needed_by)
        if self.use_output:
            out["use_output"] = True
        if self.keep:
            out["keep"] = list(self.keep)
        if self.readonly:
            out["readonly"] = True
        return out


@dataclass(frozen=True)
class Decision:
    """What a check said: run the ops (variant None), run a variant, skip, or fail."""

    action: str                   # run | skip | fail
    why: str = ""
    variant: str | None = None
    extra: tuple[str, ...] = ()   # names from the check's output (use_output steps)


def decide(step: Step, rc: int, stdout: str) -> Decision:
    """The pure parser behind every check: the first word of the probe's first line."""
    if step.use_output:
        names = tuple(n for n in (ln.strip() for ln in stdout.splitlines()) if NAME.fullmatch(n) and n not in step.keep)
        return Decision("run", f"remove {' '.join(names)}", extra=names) if rc == 0 and names else Decision(
            "skip", "nothing to remove")
    line = next((ln.strip() for ln in stdout.splitlines() if ln.strip()), "")
    word, _, rest = line.partition(" ")
    if rc == 0 and word == "skip":
        return Decision("skip", rest or "already done")
    if rc == 0 and word == "fail":
        return Decision("fail", rest or "the check refused")
    if rc == 0 and word in step.variants:
        return Decision("run", rest or word, variant=word)
    return Decision("run", rest if rc == 0 and rest else "not done yet")


def phases(steps: tuple[Step, ...] | list[Step]) -> list[str]:
    """Phase names in first-seen order."""
    return list(dict.fromkeys(s.phase for s in steps))
