"""One converter per public dataset; each module defines a :class:`Converter` subclass.

Modules are imported lazily by name so that ``facial-r1 --help`` stays fast.

>>> sorted(CONVERTERS)[:3]
['affectnet', 'bp4d', 'disfa']
"""

from __future__ import annotations

import importlib

from ._base import Converter, LayoutError

# CLI name -> (module, class)
CONVERTERS: dict[str, tuple[str, str]] = {
    "fer2013": ("fer2013", "FER2013Converter"),
    "rafdb": ("rafdb", "RAFDBConverter"),
    "affectnet": ("affectnet", "AffectNetConverter"),
    "rafau": ("rafau", "RAFAUConverter"),
    "disfa": ("disfa", "DISFAConverter"),
    "bp4d": ("bp4d", "BP4DConverter"),
    "faba": ("faba", "FABAConverter"),
    "fea20k": ("fea20k", "FEA20KConverter"),
    "generic": ("generic", "GenericConverter"),
}


def get_converter(name: str) -> type[Converter]:
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in CONVERTERS:
        known = ", ".join(sorted(CONVERTERS))
        raise KeyError(f"unknown dataset {name!r}; known: {known}")
    module, cls = CONVERTERS[key]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def all_converters() -> list[type[Converter]]:
    return [get_converter(name) for name in CONVERTERS]


__all__ = ["CONVERTERS", "Converter", "LayoutError", "all_converters", "get_converter"]
