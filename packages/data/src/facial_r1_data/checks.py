"""Per-line record checks shared by ``validate`` and ``clean``, fast enough for 1M-line files.

A fast path with cached AU/label normalisation accepts the common case; anything unusual goes
through :meth:`facial_r1_core.schema.Record.from_dict`, whose error names the field.

>>> checker = LineChecker()
>>> checker.check(b'{"dataset": "D", "image": "a.png", "question": "q", "AUs": ["AU4"]}').ok
True
>>> res = checker.check(b'{"dataset": "D", "image": "../a.png", "question": "q"}')
>>> res.ok, res.code, res.field
(False, 'unsafe_path', 'image')
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from facial_r1_core.schema import Record, RecordError, aus_annotated, record_id
from facial_r1_core.vocab import AU_NAMES, UnknownLabelError, normalize_au, normalize_emotion

try:  # optional speed-up; the standard library is the fallback
    import orjson

    _loads = orjson.loads
    _DecodeError: tuple[type[Exception], ...] = (orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads
    _DecodeError = (ValueError,)


_MISSING = object()


@dataclass
class LineCheck:
    ok: bool
    code: str = ""  # invalid_json | schema_error | unsafe_path | unknown_label
    message: str = ""
    field: str | None = None
    data: Any = None
    warnings: list[str] = dc_field(default_factory=list)
    id_key: int = 0
    is_copy: bool = False


def id_key(rid: str) -> int:
    """A 64-bit key of an id for the duplicate index (8 bytes per record)."""
    if len(rid) >= 16:
        try:
            return int(rid[:16], 16)
        except ValueError:
            pass
    return int.from_bytes(hashlib.md5(rid.encode()).digest()[:8], "big")


def error_code(err: RecordError) -> str:
    """The quarantine code of a schema error: unsafe_path, unknown_label or schema_error."""
    if err.field == "image" and "required" not in err.reason and "non-empty" not in err.reason:
        return "unsafe_path"
    if err.field in ("AUs", "labels"):
        return "unknown_label"
    return "schema_error"


class LineChecker:
    """Checks one JSONL line; keeps small caches of normalised AUs and labels."""

    def __init__(self, check_ids: bool = True):
        self.check_ids = check_ids
        self._au: dict[Any, str | None] = {}
        self._label: dict[Any, str | None] = {}

    def _norm_au(self, value) -> str | None:
        if type(value) not in (str, int):  # bool and others: never cached (True == 1)
            try:
                return normalize_au(value)
            except (UnknownLabelError, TypeError):
                return None
        try:
            return self._au[value]
        except KeyError:
            pass
        try:
            result = normalize_au(value)
        except UnknownLabelError:
            result = None
        self._au[value] = result
        return result

    def _norm_label(self, value) -> str | None:
        try:
            return self._label[value]
        except KeyError:
            pass
        except TypeError:
            return None
        try:
            result = normalize_emotion(value) if isinstance(value, str) else None
        except UnknownLabelError:
            result = None
        self._label[value] = result
        return result

    def _fast(self, d: Any) -> tuple[bool, bool]:
        """``(accepted, has_unknown_au)`` for the common case; False sends it to the core."""
        if type(d) is not dict:
            return False, False
        get = d.get
        ds, im, q = get("dataset"), get("image"), get("question")
        if type(ds) is not str or type(im) is not str or type(q) is not str:
            return False, False
        if not ds.strip() or not q.strip() or not im.strip():
            return False, False
        if im[0] in "/~" or ".." in im or "\\" in im or "\x00" in im:
            return False, False
        unknown = False
        aus = get("AUs")
        if aus:
            if type(aus) is not list:
                return False, False
            cache = self._au
            for a in aus:
                kind = type(a)
                code = cache.get(a, _MISSING) if kind is str or kind is int else _MISSING
                if code is _MISSING:
                    code = self._norm_au(a)
                if code is None:
                    return False, False
                if code not in AU_NAMES:
                    unknown = True
        labels = get("labels")
        if labels:
            if type(labels) is str:
                labels = [labels]
            elif type(labels) is not list:
                return False, False
            cache = self._label
            for x in labels:
                if type(x) is not str:
                    return False, False
                code = cache.get(x, _MISSING)
                if code is _MISSING:
                    code = self._norm_label(x)
                if code is None:
                    return False, False
        desc = get("description")
        if desc and type(desc) is not str:
            return False, False
        meta = get("meta_info")
        if meta and type(meta) is not dict:
            return False, False
        rid = get("id")
        return not (rid and type(rid) is not str), unknown

    def check(self, line: bytes | str, path: str | None = None, line_no: int | None = None):
        try:
            d = _loads(line)
        except _DecodeError as exc:
            return LineCheck(False, "invalid_json", f"invalid JSON: {exc}")
        ok, unknown = self._fast(d)
        if not ok:
            try:
                Record.from_dict(d, path=path, line=line_no)
            except RecordError as err:
                return LineCheck(False, error_code(err), err.reason, err.field, d)
            unknown = any(self._norm_au(a) not in AU_NAMES for a in d.get("AUs") or ())
        warnings: list[str] = []
        if unknown:
            bad = [a for a in d["AUs"] if self._norm_au(a) not in AU_NAMES]
            warnings.append(f"AU {bad} outside the AU vocabulary")
        dataset, image, question = d["dataset"], d["image"], d["question"]
        expected = record_id(dataset, image, question)
        rid = d.get("id") or expected
        if self.check_ids and rid != expected:
            warnings.append(f"id {rid!r} is not md5(dataset + image + question) = {expected!r}")
        meta = d.get("meta_info")
        return LineCheck(
            True,
            data=d,
            warnings=warnings,
            id_key=id_key(rid),
            is_copy=bool(meta.get("copy")) if meta else False,
        )


def has_annotation(d: dict[str, Any]) -> bool:
    """True when the record carries an emotion, an AU, or says which AUs were coded (so an
    empty AU list means 'none active', e.g. a neutral DISFA frame)."""
    return bool(d.get("labels")) or aus_annotated(d)


class IdIndex:
    """Set of 64-bit id keys in about 8 bytes each: a sorted numpy array plus a small recent set
    merged into it every ``FLUSH`` additions (a Python set of ints costs ~100 bytes a key).

    >>> index = IdIndex()
    >>> index.add(5); 5 in index, 6 in index
    (True, False)
    """

    FLUSH = 65536

    def __init__(self) -> None:
        import numpy as np

        self._np = np
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()

    def __contains__(self, key: int) -> bool:
        if key in self._recent:
            return True
        arr = self._sorted
        if not arr.size:
            return False
        value = self._np.uint64(key)
        i = int(arr.searchsorted(value))
        return i < arr.size and arr[i] == value

    def add(self, key: int) -> None:
        self._recent.add(key)
        if len(self._recent) >= self.FLUSH:
            self._merge()

    def _merge(self) -> None:
        np = self._np
        recent = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
        self._sorted = np.sort(np.concatenate([self._sorted, recent]))
        self._recent = set()

    def __len__(self) -> int:
        return int(self._sorted.size) + len(self._recent)
