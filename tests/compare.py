"""Compare two outputs of the same work run another way: another batch size, thread count,
engine (local, Ray, server), process, or a resumed run.

BLAS sums in another order for another matrix shape or thread count, so floats (logprobs, nll,
perplexity) may differ in their last digits; everything else may not. `assert_same_output`
compares ids, text, counts, keys (in order), lengths and every other non-float exactly, and floats
within `tol`: absolute up to 1 and relative above it (math.isclose with rel_tol = abs_tol = tol),
since a perplexity of 2e5, the exp of a mean NLL, moves by ~0.1 between two batch shapes.
Where an output holds no float (JSON Lines of `generate` without --logprobs), compare its bytes.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from typing import Any

import numpy as np

FLOAT_TOL = 1e-4

_MISSING = object()
# a number inside plain text (a TSV row, a table): an optional sign, digits, fraction, exponent
_NUMBER = re.compile(
    r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?<![A-Za-z])(?:nan|inf)(?![A-Za-z])"
)


def assert_same_output(actual: Any, expected: Any, tol: float = FLOAT_TOL) -> None:
    """Fail, naming where, unless `actual` and `expected` are the same output but for float noise.

    Each may be bytes or str (a command's output or file: one JSON value, JSON Lines, or plain
    text whose numbers are compared as numbers) or Python values (dicts, lists, numbers, strings,
    NumPy arrays and scalars), walked as parsed JSON is.
    """
    problem = first_difference(actual, expected, tol)
    if problem is not None:
        raise AssertionError(f"outputs differ at {problem}")


def first_difference(actual: Any, expected: Any, tol: float = FLOAT_TOL) -> str | None:
    """Where `actual` first differs from `expected` (a path and both values), or None."""
    if isinstance(actual, bytes | str) and isinstance(expected, bytes | str):
        return _text_difference(actual, expected, tol)
    return _value_difference(actual, expected, "$", tol)


def _text_difference(actual: bytes | str, expected: bytes | str, tol: float) -> str | None:
    try:
        a = actual.decode() if isinstance(actual, bytes) else actual
        b = expected.decode() if isinstance(expected, bytes) else expected
    except UnicodeDecodeError:
        return None if actual == expected else "the raw bytes (not UTF-8 text)"
    a_lines, b_lines = a.split("\n"), b.split("\n")  # a trailing newline is a last empty line
    if len(a_lines) != len(b_lines):
        return f"the line count: {len(a_lines)} != {len(b_lines)} (counting a last empty line)"
    for number, (x, y) in enumerate(zip(a_lines, b_lines, strict=True), start=1):
        if x == y:
            continue
        where = f"line {number}"
        parsed_x, parsed_y = _json_or_missing(x), _json_or_missing(y)
        if parsed_x is not _MISSING and parsed_y is not _MISSING:
            problem = _value_difference(parsed_x, parsed_y, "$", tol)
        else:
            problem = _plain_line_difference(x, y, tol)
        if problem is not None:
            return f"{where}: {problem}"
    return None


def _json_or_missing(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return _MISSING


def _plain_line_difference(x: str, y: str, tol: float) -> str | None:
    """Text between numbers exactly; numbers as numbers (integers exactly)."""
    x_text, y_text = _NUMBER.split(x), _NUMBER.split(y)
    x_numbers, y_numbers = _NUMBER.findall(x), _NUMBER.findall(y)
    if x_text != y_text or len(x_numbers) != len(y_numbers):
        return f"{x!r} != {y!r}"
    for i, (p, q) in enumerate(zip(x_numbers, y_numbers, strict=True)):
        problem = _value_difference(_number(p), _number(q), f"number {i + 1}", tol)
        if problem is not None:
            return f"{problem} in {x!r} != {y!r}"
    return None


def _number(token: str) -> int | float:
    return float(token) if re.search(r"[.eEna]", token) else int(token)


def _value_difference(a: Any, b: Any, path: str, tol: float) -> str | None:
    if isinstance(a, np.ndarray | np.generic):
        a = a.tolist()
    if isinstance(b, np.ndarray | np.generic):
        b = b.tolist()
    kind_a, kind_b = _kind(a), _kind(b)
    if kind_a != kind_b:
        return f"{path}: {a!r} ({kind_a}) != {b!r} ({kind_b})"
    if kind_a == "float":
        return _float_difference(a, b, path, tol)
    if kind_a == "object":
        if list(a) != list(b):
            return f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            problem = _value_difference(a[key], b[key], f"{path}[{key!r}]", tol)
            if problem is not None:
                return problem
        return None
    if kind_a == "array":
        if len(a) != len(b):
            return f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            problem = _value_difference(x, y, f"{path}[{i}]", tol)
            if problem is not None:
                return problem
        return None
    return None if a == b else f"{path}: {a!r} != {b!r}"  # bool, int, str, None, ...: exactly


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def _float_difference(a: float, b: float, path: str, tol: float) -> str | None:
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return None if math.isnan(a) and math.isnan(b) else f"{path}: {a!r} != {b!r}"
    if math.isclose(a, b, rel_tol=tol, abs_tol=tol):  # inf only equals the same inf
        return None
    return f"{path}: {a!r} != {b!r} (off by {abs(a - b):.3g}; allowed {tol:g}, relative above 1)"
