"""Argument types for the pack's command-line scripts (greenpost.py, train_refiner.py): each parses one flag's
text and checks its range, so a bad value is refused by argparse with a message that names the flag, the
value, what was expected and how to fix it. Plain Python (no torch, no ComfyUI).
"""
from __future__ import annotations

import argparse
import math


def _bounds(lo, hi, lo_open: bool) -> str:
    """The accepted range in words: "0..1", "in (0, 1]", "at least 0", "above 0", "at most 9"."""
    if hi is None:
        return f"above {lo}" if lo_open else f"at least {lo}"
    if lo is None:
        return f"at most {hi}"
    return f"in ({lo}, {hi}]" if lo_open else f"{lo}..{hi}"


def number(flag: str, lo=None, hi=None, *, kind=float, lo_open: bool = False, example=None):
    """argparse `type=` for a `kind` (float or int) number with lo <= value <= hi (value > lo with lo_open;
    None: no bound on that side). example: a good value for the message."""
    word = "a whole number" if kind is int else "a number"
    hint = f"; e.g. {example}" if example is not None else ""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not {word}; give {word} "
                                             f"{_bounds(lo, hi, lo_open)}{hint}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{flag} {text} is not a finite number; give {word} "
                                             f"{_bounds(lo, hi, lo_open)}{hint}")
        low = lo is not None and (v <= lo if lo_open else v < lo)
        if low or (hi is not None and v > hi):
            if lo is not None and hi is not None:
                raise argparse.ArgumentTypeError(f"{flag} {text} is outside {_bounds(lo, hi, lo_open).removeprefix('in ')}; give a "
                                                 f"value in that range{hint}")
            raise argparse.ArgumentTypeError(f"{flag} {text} is too {'small' if low else 'large'}: expected "
                                             f"{word} {_bounds(lo, hi, lo_open)}{hint}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def int_list(flag: str, example: str):
    """argparse `type=` for comma-separated whole numbers (empty items ignored) -> tuple[int, ...]."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected comma-separated integers, e.g. "
                                             f"{example}") from None
    parse.__name__ = "int list"
    return parse
