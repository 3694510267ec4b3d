"""One place for checking user-supplied values: numbers, flags and choices.

Pure Python; nothing here imports SAELens. Every config of this package (and
the allocation functions, the Zipf fit, calibration and the demo) checks its
fields with these helpers, so a bad value fails the same way everywhere: a
``ValueError`` that names the field, says what it must be, and shows what it
got. ``owner`` prefixes the message (``"mutual_choice config: k must be ..."``).

A JSON ``cfg.json`` can carry a string where a number belongs (``"1"``) or a
string where a flag belongs (``"false"``, which Python would read as true):
both are rejected rather than coerced, since a coerced value would train or
load something other than what the file says.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NoReturn, TypeVar

__all__ = ["check_bool", "check_choice", "check_number", "fail"]

T = TypeVar("T")


def fail(name: str, message: str, owner: str | None = None) -> NoReturn:
    """Raise ``ValueError("<owner>: <name> <message>")``."""
    prefix = f"{owner}: " if owner else ""
    raise ValueError(f"{prefix}{name} {message}")


def check_number(
    value: Any,
    name: str,
    *,
    owner: str | None = None,
    integer: bool = False,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    hint: str = "",
) -> Any:
    """Return ``value`` if it is a finite real number within the bounds.

    Args:
        value: the value to check; ``bool`` and strings are not numbers.
        name: the field's name, used in the message.
        owner: what the field belongs to (``"feature_choice config"``).
        integer: require an ``int`` (a float such as ``2.0`` is rejected).
        gt, ge, lt, le: exclusive / inclusive bounds.
        hint: appended to the message (how to fix it).

    Raises:
        ValueError: naming ``name``, its requirement and ``value``.
    """
    kind = "an integer" if integer else "a finite number"
    bounds = [
        f"{op} {bound:g}"
        for op, bound in ((">", gt), (">=", ge), ("<", lt), ("<=", le))
        if bound is not None
    ]
    requirement = kind + (f" {' and '.join(bounds)}" if bounds else "")
    suffix = f"; {hint}" if hint else ""
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if ok and not integer:
        ok = math.isfinite(value)
    if ok:
        ok = (
            (gt is None or value > gt)
            and (ge is None or value >= ge)
            and (lt is None or value < lt)
            and (le is None or value <= le)
        )
    if not ok:
        fail(name, f"must be {requirement}, got {value!r}{suffix}", owner)
    return value


def check_bool(value: Any, name: str, *, owner: str | None = None) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not ``"false"``, not 0)."""
    if not isinstance(value, bool):
        fail(name, f"must be true or false, got {value!r}", owner)
    return value


def check_choice(value: T, name: str, choices: Iterable[Any], *, owner: str | None = None) -> T:
    """Return ``value`` if it is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        listed = ", ".join(repr(c) for c in options)
        fail(name, f"must be one of {listed}; got {value!r}", owner)
    return value
