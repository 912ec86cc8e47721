"""Typed errors; the CLI boundary turns each into one line and an exit code."""

from __future__ import annotations

# Exit codes (documented in README.md).
OK, FAILED, INVALID, REMOTE, LOCKED, INTERRUPTED = 0, 1, 2, 3, 4, 130


class GpuclusterError(Exception):
    """Base error: a message for the user, and the process exit code."""

    exit_code = FAILED


class ConfigError(GpuclusterError):
    """Bad input: names the file, line and field, and the fix."""

    exit_code = INVALID

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None, fix: str | None = None):
        self.file, self.line, self.field, self.fix = file, line, field, fix
        where = ":".join(str(p) for p in (file, line) if p)
        parts = [p for p in (where, field) if p]
        text = ": ".join(parts + [message]) if parts else message
        super().__init__(f"{text} (fix: {fix})" if fix else text)


class RemoteError(GpuclusterError):
    """One or more hosts failed; `failures` maps host name -> reason."""

    exit_code = REMOTE

    def __init__(self, what: str, failures: dict[str, str]):
        self.failures = dict(failures)
        detail = "; ".join(f"{h}: {r}" for h, r in sorted(self.failures.items()))
        super().__init__(f"{what} failed on {len(self.failures)} host(s): {detail}")


class StepFailed(GpuclusterError):
    """A deployment step did not reach its goal (timeout, unhealthy server)."""


class LockHeld(GpuclusterError):
    """Another gpucluster operation holds the cluster lock."""

    exit_code = LOCKED


class Interrupted(GpuclusterError):
    """Ctrl-C (SIGINT) while steps ran: the phase and the steps cut short; what finished stays."""

    exit_code = INTERRUPTED
