"""Validation shared by the configuration dataclasses (``ModelConfig``, ``DataConfig``, ``TrainConfig``)."""
from __future__ import annotations

from typing import Iterable, Mapping


def check_keys(values, allowed: Iterable[str], what: str) -> dict:
    """``dict(values)`` after checking that ``values`` is a mapping whose keys are all in ``allowed``.

    A typo in a YAML file or a checkpoint must fail loudly: ``TypeError`` if ``values`` is not a mapping,
    ``ValueError`` naming the unknown keys (``what`` names the section, e.g. ``"data"``) otherwise.
    """
    if not isinstance(values, Mapping):
        raise TypeError(f"{what} must be a mapping of keys to values, got {type(values).__name__}")
    allowed = sorted(allowed)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; expected a subset of {allowed}")
    return dict(values)
