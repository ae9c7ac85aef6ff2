"""Checks of arguments and configuration values shared by the whole package.

Each check raises ``ValueError`` (``TypeError`` for a mapping that is not one) with a message naming the value,
what is expected and what was given, so that a typo in a YAML file, a checkpoint or a call fails loudly and
identically everywhere.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Iterable, Mapping, Optional


def check_keys(values, allowed: Iterable[str], what: str) -> dict:
    """``dict(values)`` after checking that ``values`` is a mapping whose keys are all in ``allowed``.

    ``TypeError`` if ``values`` is not a mapping, ``ValueError`` naming the unknown keys (``what`` names the
    section, e.g. ``"data"``) otherwise.
    """
    if not isinstance(values, Mapping):
        raise TypeError(f"{what} must be a mapping of keys to values, got {type(values).__name__}")
    allowed = sorted(allowed)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; expected a subset of {allowed}")
    return dict(values)


def check_int(name: str, value, minimum: int = 1, allow_none: bool = False) -> Optional[int]:
    """``int(value)`` if it is an integer (Python or numpy, not a bool) ``>= minimum``; ``None`` passes when
    ``allow_none``. ``ValueError`` ``"<name> must be an integer >= <minimum>[ or None], got <value>"`` otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False) -> float:
    """``float(value)`` if it is a finite real number (not a bool) in the interval from ``low`` to ``high``
    (ends included unless ``low_open`` / ``high_open``). ``ValueError`` naming the interval otherwise."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if low == -math.inf and high == math.inf:
            expected = "a finite number"
        else:
            left = "(" if low_open or low == -math.inf else "["
            right = ")" if high_open or high == math.inf else "]"
            expected = f"a number in {left}{low:g}, {high:g}{right}"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)
