"""One error type whose message is a single actionable line."""

from __future__ import annotations

import pickle

from safetensors import SafetensorError

# what reading a damaged (truncated or half-written) checkpoint raises: torch.load's zip and pickle errors,
# safetensors' and JSON's (ValueError), a missing piece (OSError, KeyError) or a state of the wrong shape (TypeError)
UNREADABLE: tuple[type[BaseException], ...] = (OSError, RuntimeError, KeyError, EOFError, ValueError, TypeError,
                                               pickle.UnpicklingError, SafetensorError)


class MechdiffError(Exception):
    """A user-facing error: bad input, params or environment, with a one-line fix."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message ("" when it has none), cut to `limit` characters: what a one-line
    error quotes of the library error under it."""
    line = (str(exc).splitlines() or [""])[0]
    return line if limit is None else line[:limit]


def why(exc: BaseException) -> str:
    """What a one-line error says of the library error under it: its first line (100 characters at most), else the
    error's type."""
    return first_line(exc, 100) or type(exc).__name__
