"""User-facing errors.

A :class:`UserError` is a problem with what the user asked for (a missing path, a bad
config value, a plan this machine cannot run). The CLI prints its message on one line and
exits with code 2, without a traceback unless ``--debug`` is given. Everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; the message says what was wrong and what to do."""

    exit_code = 2


class CheckFailed(Exception):
    """A verification check failed (exit code 1): the message names what failed."""

    exit_code = 1
