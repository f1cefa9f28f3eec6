"""One error type whose message is a single actionable line."""

from __future__ import annotations

import errno
import pickle
import struct
import sys
from collections.abc import Callable

from safetensors import SafetensorError

# what reading a damaged (truncated or half-written) file raises: a missing piece (OSError, KeyError), bad JSON
# (ValueError), a truncated safetensors file or a truncated binary header (struct.error: a cut GGUF file); loading a
# model catches these alone (a RuntimeError there is a bug)
DAMAGED: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, SafetensorError, struct.error)
# ... and reading a checkpoint: also torch.load's zip and pickle errors and a state of the wrong shape (TypeError)
UNREADABLE: tuple[type[BaseException], ...] = (*DAMAGED, RuntimeError, EOFError, TypeError, pickle.UnpicklingError)


class MechdiffError(Exception):
    """A user-facing error: bad input, params or environment, with a one-line fix."""


# where NaN or inf in SAE activations comes from, and the fix (features, feature pages)
NON_FINITE_ACTS = ("the activation store or the SAE it encodes holds non-finite values (rerun the damaged store's "
                   "extract stage, or the SAE's stage)")


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message ("" when it has none), cut to `limit` characters: what a one-line
    error quotes of the library error under it."""
    line = (str(exc).splitlines() or [""])[0]
    return line if limit is None else line[:limit]


def why(exc: BaseException) -> str:
    """What a one-line error says of the library error under it: its first line (100 characters at most), else the
    error's type; a safetensors error is named (its messages do not say what failed)."""
    line = first_line(exc, 100)
    return f"{type(exc).__name__}: {line}" if line and isinstance(exc, SafetensorError) else line or type(exc).__name__


def disk_full(exc: BaseException, free_bytes: int | None = None) -> bool:
    """Whether `exc`, or an error it was raised from, is the disk running full: an OSError with ENOSPC, or a
    library's wrapping of one that keeps only its text (safetensors, zarr's codecs: "os error 28"), or a write
    that failed without saying why (torch.save's "file write failed") while `free_bytes` (the disk's free space,
    when given) is under 256 MiB."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        if free_bytes is not None and free_bytes < 1 << 28 and ("write failed" in text or "failed writing" in text):
            return True
        e = e.__cause__ or e.__context__
    return False


def exit_on_error(main: Callable[[], object], prog: str) -> None:
    """Run a script's `main`; a MechdiffError prints `prog: error: <its line>` to stderr and exits 2 (no traceback).
    The benchmark and known-answer scripts under bench/ end this way, as the stages and the `mechdiff` command do."""
    try:
        main()
    except MechdiffError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
