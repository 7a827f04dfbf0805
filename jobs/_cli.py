"""What every `python -m jobs.X` shares: argument types that refuse impossible values, argparse errors
as one line, and the one-line error for unusable inputs (exit 2) instead of a traceback.
"""
from __future__ import annotations

import argparse
import math
import sys

MAX_INT = 2**31 - 1     # every count / size / k the commands take fits a C int (FAISS, Ray, torch)


class Parser(argparse.ArgumentParser):
    """argparse, but an argument error is one line on stderr (`error: PROG: ...`) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see --help)\n")


def _int(s: str, lo: int, what: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < lo:
        raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
    if v > MAX_INT:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_INT}, got {v}")
    return v


def positive_int(s: str) -> int:
    return _int(s, 1, ">= 1")


def nonneg_int(s: str) -> int:
    return _int(s, 0, ">= 0")


def _number(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None


def positive_float(s: str) -> float:
    v = _number(s)
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def fraction(s: str) -> float:
    v = _number(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {s}")
    return v


def finite_float(s: str) -> float:
    v = _number(s)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
    return v


# what unusable inputs raise (bad records, missing/odd paths, corrupt files, impossible values)
INPUT_ERRORS = (ValueError, TypeError, OSError, EOFError, LookupError)


def one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 2000 else msg[:2000] + "…"


def fail(e: BaseException | str, code: int = 2) -> int:
    print(f"error: {one_line(e) if isinstance(e, BaseException) else e}", file=sys.stderr)
    return code


def note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr, flush=True)
