"""Small helpers shared by the node modules."""
from __future__ import annotations

import logging
from enum import Enum

from comfy_api.latest import io

CATEGORY = "DiffuMatting"
_LOG = logging.getLogger(__name__)
_aliases_dropped = False


def schema(*, search_aliases: list[str] | None = None, **kwargs) -> io.Schema:
    """io.Schema(..., search_aliases=...) through its documented constructor.

    search_aliases is a field of the newest ComfyUI's io.Schema; ComfyUI 0.3.75 (the tests' host) has no
    such field, so its constructor refuses the keyword with a TypeError naming it. Then, and only then, the
    schema is built without the aliases (the nodes are still found by name; said once in the log).
    """
    global _aliases_dropped
    try:
        return io.Schema(**kwargs, search_aliases=list(search_aliases or []))
    except TypeError as e:
        if "search_aliases" not in str(e):
            raise
    if not _aliases_dropped:
        _aliases_dropped = True
        _LOG.info("DiffuMatting: this ComfyUI's io.Schema has no search_aliases; node search aliases left out")
    return io.Schema(**kwargs)


def enum_options(enum: type[Enum]) -> list[str]:
    """Combo options from an Enum, in declaration order."""
    return [member.value for member in enum]


def enum_value(enum: type[Enum], value, input_name: str):
    """The member of `enum` for a Combo value, or a ValueError naming the input, the value and the choices.

    Newer ComfyUI refuses an unknown Combo value at queue time; 0.3.75 does not check V3 Combos there, so
    the node checks again when it runs."""
    try:
        return enum(str(value))
    except ValueError:
        raise ValueError(f"{input_name}={value!r} is not one of {enum_options(enum)}; pick one of them") from None
