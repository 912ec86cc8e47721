"""PURE: known failure signatures (knowledge/failures.yaml) matched against log lines: cause and fix per finding.

Log lines come from the hosts and are untrusted: control characters and ANSI escapes are removed, every line
and the number of lines are capped, and the excerpt a finding keeps is short, with secret-looking tokens masked."""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import yaml

from .checks import ERROR, WARNING, Finding

PATH = Path(__file__).resolve().parent / "knowledge" / "failures.yaml"
MAX_LINE = 2000            # characters of one line that are matched (a 10 MB line costs no more than this)
MAX_LINES = 3000           # the last lines kept of what is read (failures are at the end of a log)
MAX_READ = 200_000         # items read at most from the iterable (a never-ending stream stops here)
EXCERPT = 160              # characters of the matched line a finding keeps
VALUE = 80                 # characters of a captured value put into a cause

_ANSI = re.compile(r"\x1b\[[0-?]{0,40}[ -/]{0,10}[@-~]|\x1b\][^\x07\x1b]{0,2000}(?:\x07|\x1b\\)?|\x1b[@-_]?")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_SECRETS = (
    # key=value / key: value where the key names a secret
    (re.compile(r"(?i)((?:api[_-]?key|access[_-]?key|token|secret|password|passwd|authorization|credentials?)"
                r"['\"]?\s{0,3}[:=]\s{0,3}['\"]?(?:(?:bearer|basic|token)\s{1,3})?)[^\s'\",;)}\]]{1,400}"), r"\1***"),
    (re.compile(r"(?i)(bearer\s{1,3})[^\s'\",;)}\]]{1,400}"), r"\1***"),
    (re.compile(r"(?i)(--(?:api-key|hf-token|token)[= ]{1,3})[^\s'\",;)}\]]{1,400}"), r"\1***"),
    (re.compile(r"(//[^/\s:@]{1,100}:)[^/\s@]{1,200}@"), r"\1***@"),                  # user:password@ in URLs
    (re.compile(r"\b(?:hf_|sk-|ghp_|gho_|ghs_|github_pat_|glpat-|xox[abpr]-)[A-Za-z0-9_-]{8,400}"), "***"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,2000}\.[A-Za-z0-9_-]{8,2000}\.[A-Za-z0-9_-]{0,2000}"), "***"),   # JWT
)
_LONG = re.compile(r"[A-Za-z0-9+=_-]{32,}")


@dataclass(frozen=True)
class Signature:
    code: str
    severity: str
    regex: re.Pattern
    cause: str
    fix: str
    source: str
    generic: bool = False


@dataclass(frozen=True, kw_only=True)
class LogFinding(Finding):
    """A finding explained from logs: where it was seen, a short cleaned excerpt, and where the wording comes from."""

    host: str | None = None
    component: str | None = None
    excerpt: str = ""
    source: str = ""
    seen: tuple[str, ...] = ()          # every "host component" the same code was seen in (after merge())

    def where(self) -> str:
        if self.seen:
            return ", ".join(self.seen)
        return " ".join(p for p in (self.host, self.component) if p) or "log"

    def line(self) -> str:
        """One line for the user: `host component: code: cause (fix: ...)`."""
        return f"{self.where()}: {self.code}: {self.message} (fix: {self.fix})"

    def as_dict(self) -> dict:
        return {**super().as_dict(), "host": self.host, "component": self.component, "seen": list(self.seen),
                "excerpt": self.excerpt, "source": self.source}


@lru_cache(maxsize=1)
def signatures() -> tuple[Signature, ...]:
    """The table, in order (most specific first)."""
    doc = yaml.safe_load(PATH.read_text())
    out = []
    for i, e in enumerate(doc["signatures"]):
        severity = e.get("severity", ERROR)
        if severity not in (ERROR, WARNING) or not all(e.get(k) for k in ("code", "pattern", "cause", "fix", "source")):
            raise ValueError(f"{PATH}: signature {i} ({e.get('code')}): needs code, pattern, cause, fix, source "
                             "and severity error|warning")
        out.append(Signature(code=e["code"], severity=severity, regex=re.compile(e["pattern"]), cause=e["cause"],
                             fix=e["fix"], source=e["source"], generic=bool(e.get("generic"))))
    return tuple(out)


# ---------------------------------------------------------------- cleaning untrusted text
def clean(line: str) -> str:
    """One log line made safe to match and print: capped, no ANSI escapes, no control or bidi characters."""
    text = line[:MAX_LINE * 2]                      # before any regex work: a huge line costs a bounded amount
    text = _ANSI.sub("", text)
    text = _CONTROL.sub(" ", text.replace("\t", " "))
    return text[:MAX_LINE].strip()


def redact(text: str) -> str:
    """Mask what looks like a secret (tokens, keys, passwords, long random strings)."""
    for rx, repl in _SECRETS:
        text = rx.sub(repl, text)
    return _LONG.sub(lambda m: "***" if re.search(r"\d", m.group()) and re.search(r"[A-Za-z]", m.group())
                     else m.group(), text)


def lines_of(items: Iterable[str | bytes]) -> list[str]:
    """The last MAX_LINES cleaned, non-empty lines of what a source gave (items may hold several lines)."""
    kept: deque[str] = deque(maxlen=MAX_LINES)
    for n, item in enumerate(items):
        if n >= MAX_READ:
            break
        if isinstance(item, bytes):
            item = item[:MAX_LINE * 4].decode("utf-8", "replace")
        elif not isinstance(item, str):
            continue
        # an item longer than this many lines' worth is cut: enough to find an error, bounded in time
        for part in item[:MAX_LINE * MAX_LINES // 10].splitlines():
            part = clean(part)
            if part:
                kept.append(part)
    return list(kept)


def _excerpt(sig: Signature, line: str) -> str:
    text = redact(line)
    m = sig.regex.search(text)
    start = max(0, m.start() - 40) if m else 0
    cut = text[start:start + EXCERPT]
    return ("…" if start else "") + cut + ("…" if start + EXCERPT < len(text) else "")


def _fill(template: str, m: re.Match) -> str:
    values = {k: redact(v)[:VALUE] for k, v in m.groupdict().items() if v is not None}

    class Missing(dict):
        def __missing__(self, key: str) -> str:
            return "?"
    return template.format_map(Missing(values))


# ---------------------------------------------------------------- matching
def explain(lines: Iterable[str | bytes], *, host: str | None = None, component: str | None = None
            ) -> list[LogFinding]:
    """Findings for the known failures in `lines`: one per code, most specific (table order) first; symptoms
    marked generic only when nothing specific matched."""
    table = signatures()
    best: dict[str, tuple[int, Signature, str, re.Match]] = {}
    for line in lines_of(lines):
        for i, sig in enumerate(table):
            m = sig.regex.search(line)
            if m is None:
                continue
            if sig.code not in best or i <= best[sig.code][0]:     # the last such line: usually the error itself
                best[sig.code] = (i, sig, line, m)
            break                                   # a line counts for its most specific signature only
    found = sorted(best.values(), key=lambda b: b[0])
    if any(not sig.generic for _, sig, _, _ in found):
        found = [b for b in found if not b[1].generic]
    return [LogFinding(code=sig.code, severity=sig.severity, message=_fill(sig.cause, m), fix=_fill(sig.fix, m),
                       host=host, component=component, excerpt=_excerpt(sig, line), source=sig.source)
            for _, sig, line, m in found]


def merge(findings: Iterable[LogFinding]) -> list[LogFinding]:
    """One finding per code over several sources (errors first, then table order), listing where it was seen.
    A generic symptom is dropped when any source had a specific cause."""
    order = {s.code: i for i, s in reversed(list(enumerate(signatures())))}
    generic = {s.code for s in signatures() if s.generic} - {s.code for s in signatures() if not s.generic}
    by_code: dict[str, LogFinding] = {}
    seen: dict[str, list[str]] = {}
    for f in findings:
        by_code.setdefault(f.code, f)
        where = f.where()
        if where not in seen.setdefault(f.code, []):
            seen[f.code].append(where)
    out = [replace(f, seen=tuple(seen[c])) for c, f in by_code.items()]
    if any(f.code not in generic for f in out):
        out = [f for f in out if f.code not in generic]
    return sorted(out, key=lambda f: (f.severity != ERROR, order.get(f.code, len(order))))


def summary(findings: list[LogFinding], *, limit: int = 6) -> list[str]:
    """Lines for an error message: the errors (warnings only when no error matched), at most `limit`."""
    errors = [f for f in findings if f.severity == ERROR]
    chosen = errors or findings
    lines = [f.line() for f in chosen[:limit]]
    if len(chosen) > limit:
        lines.append(f"and {len(chosen) - limit} more (gpucluster doctor --logs)")
    return lines


# ---------------------------------------------------------------- reading a stopped container's log file
def stopped_fallback(argv: tuple[str, ...] | list[str]) -> tuple[str, ...] | None:
    """For `docker exec NAME tail -n N PATH` (a log file inside a container that may have exited): the same
    lines read with `docker cp`, which works on stopped containers. None for any other argv."""
    a = list(argv)
    if len(a) == 7 and a[:2] == ["docker", "exec"] and a[3:5] == ["tail", "-n"] and a[5].isdigit():
        name, path, n = a[2], a[6], a[5]
        return ("sh", "-c", 'docker cp "$0:$1" - | tar -xO | tail -n "$2"', name, path, n)
    return None
