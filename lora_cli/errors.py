"""Errors the user can act on.

The CLI prints a `LoraCliError` as one clear message (no traceback) and exits 1; anything
else is a bug and is reported as such. Keeping the distinction in one place is what lets the
core raise freely without knowing how it is rendered.
"""

from __future__ import annotations


class LoraCliError(Exception):
    """A problem with the user's input, files or setup, with an optional hint on what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class DataError(LoraCliError):
    """The data file has defects; `issues` holds them (file, line, field, reason)."""

    def __init__(self, message: str, issues=None, hint: str | None = None):
        super().__init__(message, hint)
        self.issues = list(issues or [])


class TrainingInterrupted(LoraCliError):
    """Ctrl-C (or SIGTERM) during training: a checkpoint was saved; exit 128 + the signal's number
    (130 for Ctrl-C) like any program a signal stopped."""

    resume_command: str | None = None  # the command line that continues the run: the CLI knows it, not the core

    def __init__(self, message: str, checkpoint: str | None, exit_code: int = 130):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.exit_code = exit_code


class NonFiniteLoss(LoraCliError):
    """The loss became NaN or infinite; training stopped before the bad step was applied."""


class OutOfMemory(LoraCliError):
    """The GPU ran out of memory; the message says how much was asked for and what lowers it."""
