"""Argument types shared by the thin scripts in scripts/."""

from __future__ import annotations

import argparse


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
