"""The one-line error convention: a bad flag, file or row ends the program with ONE line on stderr
(``<prog>: error: ...``) and exit status 2, and nothing already written is touched."""
from __future__ import annotations

import argparse
import math
import sys


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors as one line (no usage dump) and exits with status 2."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(message: str, prog: str = "main.py") -> None:
    """One-line fatal error after parsing (e.g. a CLIP file that does not exist)."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def finite_float(text: str) -> float:
    """argparse ``type=`` for a number flag: a finite float. ``nan`` and ``inf`` parse as floats, but no
    flag means them; refused as a flag error (one line, status 2) before anything is written."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The message of ``exc`` in one line: its first line, without a repeated "ValueError: " prefix; for an
    error re-raised from a DataLoader worker (whose message carries the worker's traceback) the original
    message, which is the text's last line. Without a message: ``empty``, else the exception's type name."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__ if empty is None else empty
    text = lines[-1] if lines[0].startswith("Caught ") else lines[0]
    name = type(exc).__name__
    for prefix in (f"{type(exc).__module__}.{name}: ", f"{name}: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text
