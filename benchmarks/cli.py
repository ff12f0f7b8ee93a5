"""Argument types shared by the thin scripts in scripts/."""

from __future__ import annotations

import argparse
import json
from typing import Any


def int_list(text: str) -> tuple[int, ...]:
    """``"1,2,6"`` -> ``(1, 2, 6)``: positive integers, in the order given."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def sorted_int_set(text: str) -> tuple[int, ...]:
    """Like :func:`int_list`, without repeats and in increasing order."""
    return tuple(sorted(set(int_list(text))))


def setting(text: str) -> tuple[str, dict[str, Any]]:
    """``LABEL:key=value,key=value`` (values as JSON, else strings) -> (label, overrides)."""
    label, sep, rest = text.partition(":")
    if not sep or not label.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL:key=value,...; got {text!r}")
    overrides: dict[str, Any] = {}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"expected key=value; got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return label.strip(), overrides
