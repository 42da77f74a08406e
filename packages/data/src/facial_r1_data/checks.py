"""Record checks shared by the data verbs; the per-line reading itself is core's one reader
(:class:`facial_r1_core.schema.RecordReader`), used by every verb.

>>> from facial_r1_core.schema import Record
>>> has_annotation(Record.create(dataset="D", image="a.png", question="q", labels=["fear"]))
True
"""

from __future__ import annotations

from typing import Any

from facial_r1_core.schema import IdIndex, Record, aus_annotated

__all__ = ["IdIndex", "has_annotation"]


def has_annotation(rec: Record | dict[str, Any]) -> bool:
    """True when the record carries an emotion, an AU, or says which AUs were coded (so an
    empty AU list means 'none active', e.g. a neutral DISFA frame)."""
    if isinstance(rec, Record):
        return bool(rec.labels) or aus_annotated(rec)
    return bool(rec.get("labels")) or aus_annotated(rec)
