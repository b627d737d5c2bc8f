"""Small helpers shared by the node modules."""
from __future__ import annotations

import dataclasses
from enum import Enum

from comfy_api.latest import io

CATEGORY = "DiffuMatting"
_SCHEMA_FIELDS = {f.name for f in dataclasses.fields(io.Schema)}


def schema(*, search_aliases: list[str] | None = None, **kwargs) -> io.Schema:
    """Build an io.Schema; `search_aliases` is passed on hosts whose Schema has that field.

    ComfyUI added Schema.search_aliases after 0.3.75 (the version the tests run against); on older
    hosts the aliases are only left out of the search index, nothing else changes.
    """
    if search_aliases and "search_aliases" in _SCHEMA_FIELDS:
        kwargs["search_aliases"] = list(search_aliases)
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
