"""One error type whose message is a single actionable line."""

from __future__ import annotations


class MechdiffError(Exception):
    """A user-facing error: bad input, params or environment, with a one-line fix."""
