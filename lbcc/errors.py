"""Typed errors with exit codes an MLOps step can branch on.

Every error lbcc raises for a user carries a one-paragraph message (what is wrong, what to do) and
the exit code the CLI returns: 1 bad input or usage, 2 the target cannot run what was asked,
3 an accuracy gate the user set was missed.
"""

from __future__ import annotations


class LbccError(Exception):
    """Base class: ``message`` says what is wrong, ``hint`` what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


class BadInputError(LbccError):
    """A model, data file, recipe or option the user gave cannot be used (exit code 1)."""

    exit_code = 1


class TargetError(LbccError):
    """The target cannot run what was asked: an op, dtype or granularity (exit code 2)."""

    exit_code = 2


class PassError(LbccError):
    """A pass failed a precondition on the model it was given; names the pass and the node."""

    exit_code = 1

    def __init__(self, pass_name: str, message: str, hint: str = "", node: str | None = None):
        where = f" at node {node!r}" if node else ""
        super().__init__(f"pass {pass_name!r}{where}: {message}", hint)
        self.pass_name = pass_name
        self.node = node


class AccuracyGateError(LbccError):
    """An accuracy gate the user set was missed; the model and report are still written (exit 3)."""

    exit_code = 3
