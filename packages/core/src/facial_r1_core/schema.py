"""The unified record of the paper's Appendix D.3, streamed from and to JSONL.

One JSON object per line: ``id``, ``dataset``, ``image``, ``question``, ``AUs``, ``labels``,
``description``, ``meta_info``. ``image`` is a path relative to ``<root>/<dataset>/``. An empty
``labels`` list means "not annotated". An empty ``AUs`` list means "not annotated" too, unless
``meta_info.aus_annotated`` says which AUs were coded (``"all"`` or a list of codes): then it
means "AUs coded, none active" (a neutral frame), and :func:`aus_annotated` is True.

>>> rec = Record.create(dataset="Demo", image="a/1.png", question="Which emotion?",
...                     AUs=["au 6", "AU12"], labels=["Happy"])
>>> rec.AUs, rec.labels, rec.id == record_id("Demo", "a/1.png", "Which emotion?")
(['AU6', 'AU12'], ['happiness'], True)
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .vocab import UnknownLabelError, normalize_au, normalize_emotion, record_au, sort_aus

try:  # optional speed-up of the reader; the standard library is the fallback
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads

FIELDS: tuple[str, ...] = (
    "id",
    "dataset",
    "image",
    "question",
    "AUs",
    "labels",
    "description",
    "meta_info",
)
REQUIRED_FIELDS: tuple[str, ...] = ("dataset", "image", "question")


# The per-line outcome codes of the one reader; every verb reports bad input with these.
BAD_INPUT_CODES: tuple[str, ...] = (
    "invalid_json",  # the line is not one JSON value
    "invalid_utf8",  # the line's bytes are not UTF-8
    "line_too_long",  # longer than the line-size limit (see max_line_bytes)
    "schema_error",  # a missing field or a value of the wrong type
    "unknown_label",  # an emotion outside the vocabulary or an impossible AU code (AU99)
    "unsafe_path",  # an absolute image path, a '..' part, or a symlink leaving the dataset folder
    "duplicate_id",  # the id of an earlier record of the same read
)


class RecordError(ValueError):
    """A record that breaks the schema; says which file, line and field, and a ``code`` of
    :data:`BAD_INPUT_CODES`."""

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike | None = None,
        line: int | None = None,
        field: str | None = None,
        code: str | None = None,
    ):
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        self.reason = message
        self.code = code or _code_of(field, message)
        where = ":".join(str(p) for p in (self.path, line) if p is not None)
        prefix = f"{where}: " if where else ""
        fld = f"field '{field}': " if field else ""
        super().__init__(f"{prefix}{fld}{message}")


def _code_of(field: str | None, message: str) -> str:
    if field == "image" and "required" not in message and "non-empty" not in message:
        return "unsafe_path"
    if field in ("AUs", "labels") and "must be" not in message:
        return "unknown_label"
    return "schema_error"


class InputError(ValueError):
    """Input a stage cannot run on (bad records, an output that would overwrite an input);
    stages exit 2 with the message, never a traceback."""


class BadInputError(InputError):
    """Bad records found before any work started; ``errors`` holds each located error."""

    def __init__(self, errors: list[RecordError], *, total: int | None = None, hint: str = ""):
        self.errors = list(errors)
        self.total = total if total is not None else len(self.errors)
        shown = "\n".join(f"  {e}" for e in self.errors[:20])
        more = f"\n  ... and {self.total - 20} more" if self.total > 20 else ""
        super().__init__(
            f"{self.total} bad input record(s); nothing was done:\n{shown}{more}"
            + (f"\n{hint}" if hint else "")
        )


def record_id(dataset: str, image: str, question: str) -> str:
    """The paper's id: md5 of the concatenation ``dataset + image + question``.

    >>> record_id("RAF-DB", "train_00001.jpg", "q")
    '62a60b3aa7d921b48fde19d6718ab922'
    """
    return hashlib.md5(f"{dataset}{image}{question}".encode()).hexdigest()


def check_image_path(image: str) -> str:
    """Reject absolute paths, ``..`` parts, backslashes and empty names; return a POSIX path.

    >>> check_image_path("sub/x.jpg")
    'sub/x.jpg'
    >>> check_image_path("../etc/passwd")
    Traceback (most recent call last):
    ...
    ValueError: image path must stay inside the dataset folder, got '../etc/passwd'
    """
    if not isinstance(image, str) or not image.strip():
        raise ValueError("image path must be a non-empty string")
    if "\\" in image or "\x00" in image:
        raise ValueError(f"image path must use '/' and no NUL bytes, got {image!r}")
    if image.startswith(("/", "~")):
        raise ValueError(f"image path must be relative to the dataset folder, got {image!r}")
    parts = image.split("/")
    if ".." in parts:
        raise ValueError(f"image path must stay inside the dataset folder, got {image!r}")
    if "" in parts or "." in parts:  # normalise a/./b and a//b the way PurePosixPath would
        return check_image_path("/".join(p for p in parts if p not in ("", ".")) or "/")
    return image


@dataclass
class Record:
    """One sample of the unified JSONL."""

    id: str
    dataset: str
    image: str
    question: str
    AUs: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    description: str = ""
    meta_info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        *,
        dataset: str,
        image: str,
        question: str,
        AUs: Iterable[str | int] = (),
        labels: Iterable[str] = (),
        description: str = "",
        meta_info: dict[str, Any] | None = None,
    ) -> Record:
        """Build a record with normalised labels and the paper's id (converters build records
        this way; every record read or written by a verb then passes :meth:`from_dict`, which
        also rejects impossible AU codes such as AU99)."""
        image = check_image_path(image)
        return cls(
            id=record_id(dataset, image, question),
            dataset=dataset,
            image=image,
            question=question,
            AUs=sort_aus(normalize_au(a) for a in AUs),
            labels=_dedupe(normalize_emotion(x) for x in labels),
            description=description,
            meta_info=dict(meta_info or {}),
        )

    @classmethod
    def from_dict(
        cls,
        data: Any,
        *,
        path: str | os.PathLike | None = None,
        line: int | None = None,
        check_id: bool = False,
    ) -> Record:
        """Validate and normalise a parsed JSON object; :class:`RecordError` names the field.

        Unambiguous spellings are normalised (``"Happy"`` -> ``happiness``, ``"au 4"`` ->
        ``AU4``, a lone string label or AU -> a one-item list); anything else is an error.
        """
        return _from_dict(data, path, line, check_id)[0]

    def to_dict(self) -> dict[str, Any]:
        # A direct dict: dataclasses.asdict deep-copies and dominated conversion time.
        return {
            "id": self.id,
            "dataset": self.dataset,
            "image": self.image,
            "question": self.question,
            "AUs": list(self.AUs),
            "labels": list(self.labels),
            "description": self.description,
            "meta_info": self.meta_info,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def image_path(self, root: str | os.PathLike) -> Path:
        """Where the image lies under the paper's layout: ``<root>/<dataset>/<image>``."""
        return Path(root) / self.dataset / self.image

    @property
    def emotion(self) -> str | None:
        """The single ground-truth emotion, or None when unannotated or multi-labelled."""
        return self.labels[0] if len(self.labels) == 1 else None


def aus_annotated(record: Record | Mapping[str, Any]) -> bool:
    """Whether the record's ``AUs`` list is ground truth (the one definition every stage uses).

    True when the record names at least one AU, or when ``meta_info.aus_annotated`` is ``"all"``
    or a non-empty list of the AU codes that were coded: an empty ``AUs`` list then means "coded,
    none active". Works on a :class:`Record` or on its dict form.

    >>> aus_annotated({"AUs": [], "meta_info": {"aus_annotated": "all"}})
    True
    >>> aus_annotated({"AUs": []}), aus_annotated({"AUs": ["AU4"]})
    (False, True)
    """
    if isinstance(record, Record):
        aus, meta = record.AUs, record.meta_info
    else:
        aus, meta = record.get("AUs"), record.get("meta_info")
    if aus:
        return True
    coded = meta.get("aus_annotated") if isinstance(meta, Mapping) else None
    return coded == "all" or (isinstance(coded, list) and len(coded) > 0)


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


_AU_CACHE: dict[tuple[type, Any], str | UnknownLabelError] = {}
_LABEL_CACHE: dict[str, str | UnknownLabelError] = {}
_CACHE_MAX = 4096


def _norm_au(value: Any) -> str:
    kind = type(value)
    if kind is not str and kind is not int:
        if kind is bool or kind is float:
            raise UnknownLabelError(f"not an Action Unit code: {value!r} (expected e.g. AU4)")
        raise TypeError
    return _memo(_AU_CACHE, (kind, value), record_au, value)


def _norm_label(value: str) -> str:
    return _memo(_LABEL_CACHE, value, normalize_emotion, value)


def _memo(cache: dict, key: Any, normalize: Callable[[Any], str], value: Any) -> str:
    """``normalize(value)`` remembered per key (its UnknownLabelError too), in a bounded cache."""
    hit = cache.get(key)
    if hit is None:
        try:
            hit = normalize(value)
        except UnknownLabelError as exc:
            hit = exc
        if len(cache) < _CACHE_MAX:
            cache[key] = hit
    if isinstance(hit, UnknownLabelError):
        raise hit
    return hit


def _safe_image(image: str) -> str:
    if (
        image
        and image[0] not in "/~"
        and "\\" not in image
        and "\x00" not in image
        and "//" not in image
        and "/." not in "/" + image
        and not image.endswith("/")
    ):
        return image
    return check_image_path(image)


def aus_field(value: Any, path: Any = None, line: int | None = None) -> tuple[list[str], bool]:
    """``(AUs, unchanged)``: the normalised, sorted AU list of a record's ``AUs`` value (a
    lone code becomes a list; empty or missing means none), or :class:`RecordError`."""
    raw = value
    if type(raw) is str and raw:
        raw = [raw]
    elif not raw and type(raw) is not list:
        raw = []
    elif type(raw) is not list:
        raise RecordError(
            f"must be a list of AU codes, got {type(raw).__name__}",
            path=path,
            line=line,
            field="AUs",
            code="schema_error",
        )
    try:
        aus = [_norm_au(a) for a in raw]
    except UnknownLabelError as exc:
        raise RecordError(str(exc), path=path, line=line, field="AUs") from None
    except TypeError:
        raise RecordError(
            "must be a list of AU codes (strings such as 'AU4')",
            path=path,
            line=line,
            field="AUs",
            code="schema_error",
        ) from None
    if len(aus) > 1:
        aus = sort_aus(aus)
    return aus, aus == value


def labels_field(value: Any, path: Any = None, line: int | None = None) -> tuple[list[str], bool]:
    """``(labels, unchanged)``: the normalised emotion list of a record's ``labels`` value
    (``"Happy"`` -> ``["happiness"]``), or :class:`RecordError`."""
    raw = value
    if type(raw) is str and raw:
        raw = [raw]
    elif not raw and type(raw) is not list:
        raw = []
    elif type(raw) is not list:
        raise RecordError(
            f"must be a list of emotion labels, got {type(raw).__name__}",
            path=path,
            line=line,
            field="labels",
            code="schema_error",
        )
    try:
        labels = [_norm_label(x) if type(x) is str else _bad_label(x) for x in raw]
    except UnknownLabelError as exc:
        raise RecordError(str(exc), path=path, line=line, field="labels") from None
    except TypeError:
        raise RecordError(
            "must be a list of emotion labels (strings)",
            path=path,
            line=line,
            field="labels",
            code="schema_error",
        ) from None
    if len(labels) > 1:
        labels = _dedupe(labels)
    return labels, labels == value


def _from_dict(
    data: Any, path: Any = None, line: int | None = None, check_id: bool = False
) -> tuple[Record, bool]:
    """``(record, canonical)``: canonical when ``data`` already is the record's schema form
    (every field present, normalised values), so its text may be written unchanged."""

    def fail(message: str, fld: str | None = None) -> RecordError:
        return RecordError(message, path=path, line=line, field=fld)

    if type(data) is not dict:
        raise fail(f"expected a JSON object, got {type(data).__name__}")
    for name in REQUIRED_FIELDS:
        value = data.get(name)
        if value is None and name not in data:
            raise fail("missing required field", name)
        if type(value) is not str or not value.strip():
            raise fail(f"must be a non-empty string, got {value!r}", name)
    image_raw = data["image"]
    try:
        image = _safe_image(image_raw)
    except ValueError as exc:
        raise fail(str(exc), "image") from None
    canonical = image == image_raw
    aus, same = aus_field(data.get("AUs"), path, line)
    canonical = canonical and same
    labels, same = labels_field(data.get("labels"), path, line)
    canonical = canonical and same
    description = data.get("description")
    if not description and type(description) is not str:
        description, canonical = "", False
    elif type(description) is not str:
        raise fail(f"must be a string, got {type(description).__name__}", "description")
    meta = data.get("meta_info")
    if not meta and type(meta) is not dict:
        meta, canonical = {}, False
    elif type(meta) is not dict:
        raise fail(f"must be an object, got {type(meta).__name__}", "meta_info")
    rid = data.get("id")
    if rid is None or rid == "":
        rid, canonical = record_id(data["dataset"], image, data["question"]), False
    elif type(rid) is not str:
        raise fail(f"must be a string, got {type(rid).__name__}", "id")
    elif check_id:
        expected = record_id(data["dataset"], image, data["question"])
        if rid != expected:
            raise fail(f"id {rid!r} is not md5(dataset + image + question) = {expected!r}", "id")
    rec = Record(rid, data["dataset"], image, data["question"], aus, labels, description, meta)
    return rec, canonical


def _bad_label(value: Any) -> str:
    raise TypeError(value)


# --------------------------------------------------------------------------------------------
# the one reader

DEFAULT_MAX_LINE_BYTES = 1 << 20  # 1 MiB: a record with a long reasoning text is a few KB


def max_line_bytes() -> int:
    """The line-size limit of every reader: ``$FACIAL_R1_MAX_LINE_BYTES`` or 1 MiB.

    A longer line is reported (``line_too_long``) and never parsed, so one huge line cannot
    make a stage read or tokenise megabytes.
    """
    text = os.environ.get("FACIAL_R1_MAX_LINE_BYTES", "")
    try:
        value = int(text) if text else DEFAULT_MAX_LINE_BYTES
    except ValueError:
        raise InputError(
            f"FACIAL_R1_MAX_LINE_BYTES must be a number of bytes, got {text!r}"
        ) from None
    return value if value > 0 else DEFAULT_MAX_LINE_BYTES


def iter_raw_lines(
    path: str | os.PathLike, limit: int | None = None
) -> Iterator[tuple[int, bytes, int | None]]:
    """Yield ``(line_number, bytes, oversize)`` for each non-blank line, streaming.

    ``oversize`` is None for a line within ``limit`` bytes (newline excluded); for a longer line
    it is the line's length, the bytes are empty, and the rest of the line is skipped unparsed.
    """
    limit = limit or max_line_bytes()
    with open(path, "rb") as handle:
        readline = handle.readline
        number = 0
        while True:
            raw = readline(limit + 1)
            if not raw:
                return
            number += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                size = len(raw)
                while not raw.endswith(b"\n"):
                    raw = readline(1 << 20)
                    if not raw:
                        break
                    size += len(raw)
                yield number, b"", size - (1 if raw.endswith(b"\n") else 0)
                continue
            if raw.strip():
                yield number, raw, None


def iter_jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each non-blank line; :class:`RecordError` (with file
    and line) for a line that is not UTF-8 or is longer than :func:`max_line_bytes`."""
    limit = max_line_bytes()
    for number, raw, oversize in iter_raw_lines(path, limit):
        if oversize is not None:
            raise _too_long(path, number, oversize, limit)
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad_utf8(path, number, exc) from None


def _too_long(path, number: int, size: int, limit: int) -> RecordError:
    return RecordError(
        f"line is {size} bytes, longer than the limit of {limit} bytes (FACIAL_R1_MAX_LINE_BYTES)",
        path=path,
        line=number,
        code="line_too_long",
    )


def _bad_utf8(path, number: int | None, exc: UnicodeDecodeError) -> RecordError:
    return RecordError(
        f"invalid UTF-8 at byte {exc.start} of the line",
        path=path,
        line=number,
        code="invalid_utf8",
    )


def parse_json_line(raw: bytes, path: Any = None, number: int | None = None) -> Any:
    """One JSON value from a line's bytes; :class:`RecordError` (invalid_utf8 or invalid_json)."""
    try:
        return _loads(raw)
    except ValueError as exc:  # orjson's and json's decode errors are ValueErrors
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise _bad_utf8(path, number, uexc) from None
        msg = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else exc
        raise RecordError(
            f"invalid JSON: {msg}", path=path, line=number, code="invalid_json"
        ) from None


class IdIndex:
    """An exact set of record ids, about 16 bytes per id.

    The paper's ids (32 lower-case hex digits, an md5) are stored as their 16 bytes, packed in
    buckets chosen by their leading bits (the buckets multiply as the index grows, so a lookup
    scans about half a kilobyte); any other id is kept whole in a set. Two ids are the
    same only when every character matches: no prefix or hash stands in for an id.

    >>> index = IdIndex()
    >>> index.add("a" * 32), index.add("a" * 32), index.add("a" * 16 + "b" * 16), "x" in index
    (True, False, True, False)
    """

    MAX_FILL = 32  # ids per bucket on average before the buckets grow four-fold

    def __init__(self) -> None:
        self._bits = 10
        self._buckets: list[bytearray | None] = [None] * (1 << self._bits)
        self._packed = 0
        self._other: set[str] = set()

    @staticmethod
    def _key(rid: str) -> bytes | None:
        if len(rid) != 32:
            return None
        try:
            key = bytes.fromhex(rid)
        except ValueError:
            return None
        return key if len(key) == 16 and key.hex() == rid else None

    def _slot(self, key: bytes) -> int:
        return ((key[0] << 8) | key[1]) >> (16 - self._bits)

    @staticmethod
    def _in(bucket: bytearray | None, key: bytes) -> bool:
        if bucket is None:
            return False
        i = bucket.find(key)
        while i != -1:
            if not i & 15:
                return True
            i = bucket.find(key, i + 1)
        return False

    def __contains__(self, rid: str) -> bool:
        key = self._key(rid)
        if key is None:
            return rid in self._other
        return self._in(self._buckets[self._slot(key)], key)

    def add(self, rid: str) -> bool:
        """Add ``rid``; True when it was new."""
        key = self._key(rid)
        if key is None:
            if rid in self._other:
                return False
            self._other.add(rid)
            return True
        slot = ((key[0] << 8) | key[1]) >> (16 - self._bits)
        bucket = self._buckets[slot]
        if bucket is None:
            self._buckets[slot] = bytearray(key)
        else:
            i = bucket.find(key)
            while i != -1:
                if not i & 15:
                    return False
                i = bucket.find(key, i + 1)
            bucket += key
        self._packed += 1
        if self._packed > self.MAX_FILL << self._bits and self._bits < 16:
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._buckets
        self._bits += 2
        self._buckets = [None] * (1 << self._bits)
        for bucket in old:
            if bucket is None:
                continue
            for start in range(0, len(bucket), 16):
                key = bytes(bucket[start : start + 16])
                slot = self._slot(key)
                target = self._buckets[slot]
                if target is None:
                    self._buckets[slot] = bytearray(key)
                else:
                    target += key

    def __len__(self) -> int:
        return self._packed + len(self._other)


def is_copy(record: Record) -> bool:
    """A deliberate repeat made by balancing (``meta_info.copy`` or ``.balance_copy``): it may
    share its id with the original."""
    meta = record.meta_info
    return bool(meta and (meta.get("copy") or meta.get("balance_copy")))


def _inside(path: str, boundary: str) -> bool:
    return path == boundary or path.startswith(boundary.rstrip(os.sep) + os.sep)


class PathGuard:
    """Checks that image files resolve inside their folder: a symlink (or a symlinked
    sub-folder) that leads out of it is unsafe. The folder itself may be a link or a mount.

    Resolved folders are cached, so a check costs about one ``lstat`` per image.
    """

    def __init__(self) -> None:
        self._dirs: dict[str, str] = {}

    def _real_dir(self, folder: str) -> str:
        real = self._dirs.get(folder)
        if real is None:
            real = os.path.realpath(folder)
            if len(self._dirs) < 65536:
                self._dirs[folder] = real
        return real

    def resolved(self, path: str | os.PathLike) -> str:
        path = os.fspath(path)
        if os.path.islink(path):
            return os.path.realpath(path)
        folder, name = os.path.split(path)
        return os.path.join(self._real_dir(folder), name)

    def problem(
        self, path: str | os.PathLike, boundaries: Iterable[str | os.PathLike]
    ) -> str | None:
        """None when ``path`` resolves inside one of ``boundaries``, else the reason."""
        target = self.resolved(path)
        for boundary in boundaries:
            if _inside(target, self._real_dir(os.fspath(boundary))):
                return None
        return f"{os.fspath(path)} resolves to {target}, outside the dataset folder (symlink)"


# An image hook returns None for a usable image, or ``(code, message)``.
ImageCheck = Callable[[Path], "tuple[str, str] | None"]


class LineResult:
    """One line of a JSONL read through :class:`RecordReader`: a record or a located error."""

    __slots__ = ("_raw", "canonical", "data", "error", "line", "path", "record")

    def __init__(
        self,
        line: int,
        record: Record | None = None,
        error: RecordError | None = None,
        raw: bytes | str = b"",
        data: Any = None,
        canonical: bool = False,
        path: str | None = None,
    ):
        self.line = line
        self.record = record
        self.error = error
        self._raw = raw
        self.data = data
        self.canonical = canonical
        self.path = path

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def code(self) -> str:
        return self.error.code if self.error is not None else ""

    @property
    def raw(self) -> str:
        """The line's text (invalid bytes replaced), without the newline."""
        raw = self._raw
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        return text.rstrip("\r\n")

    def to_json(self) -> str:
        """The schema form of the record: the line unchanged when it already is, otherwise the
        normalised record (fields beyond the schema are kept after it)."""
        if self.canonical:
            return self.raw
        if self.record is None:
            raise ValueError(f"line {self.line} holds no record: {self.error}")
        data = self.record.to_dict()
        if type(self.data) is dict:
            for key, value in self.data.items():
                if key not in data:
                    data[key] = value
        return json.dumps(data, ensure_ascii=False)


class RecordReader:
    """The one reader of unified JSONL records, used by every verb that reads records.

    Each non-blank line becomes a :class:`LineResult`: a normalised :class:`Record` or a
    :class:`RecordError` naming file, line, field and a code of :data:`BAD_INPUT_CODES`:
    a line longer than :func:`max_line_bytes`, invalid UTF-8, invalid JSON, a schema error, an
    unknown label or impossible AU code, an unsafe image path (absolute, ``..``, or -- when a
    ``root`` is given -- a symlink resolving outside ``<root>/<dataset>``), an image problem
    reported by ``image_check``, or an id already read (``unique_ids``; balance copies may
    repeat their original's id). Data verbs quarantine the errors; training verbs stop before
    any work (:func:`preflight`).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
    >>> _ = p.write_bytes(b'{"dataset":"D","image":"a.png","question":"q","labels":"Happy"}\\n'
    ...                   b'{"dataset":"D","image":"a.png","question":"q"}\\n\\xff\\n')
    >>> [(r.line, r.record.labels if r.ok else r.code) for r in RecordReader().read(p)]
    [(1, ['happiness']), (2, 'duplicate_id'), (3, 'invalid_utf8')]
    """

    def __init__(
        self,
        *,
        root: str | os.PathLike | None = None,
        check_id: bool = False,
        unique_ids: bool = True,
        ids: IdIndex | None = None,
        image_check: ImageCheck | None = None,
        max_bytes: int | None = None,
    ):
        self.root = Path(root) if root is not None else None
        self.check_id = check_id
        self.ids = ids if ids is not None else (IdIndex() if unique_ids else None)
        self.image_check = image_check
        self.max_bytes = max_bytes or max_line_bytes()
        self.guard = PathGuard()

    def read(self, path: str | os.PathLike) -> Iterator[LineResult]:
        """Stream ``path``: one :class:`LineResult` per non-blank line."""
        name = str(path)
        for number, raw, oversize in iter_raw_lines(path, self.max_bytes):
            if oversize is not None:
                err = _too_long(name, number, oversize, self.max_bytes)
                yield LineResult(number, error=err, path=name)
                continue
            yield self.check(raw, number, name)

    def check(self, raw: bytes, number: int, path: str) -> LineResult:
        """Check one line's bytes (the id index remembers the ids it accepts)."""
        try:
            data = parse_json_line(raw, path, number)
            record, canonical = _from_dict(data, path, number, self.check_id)
        except RecordError as err:
            return LineResult(number, error=err, raw=raw, path=path)
        result = LineResult(number, record, None, raw, data, canonical, path)
        if self.root is not None:
            image = record.image_path(self.root)
            code, problem = "unsafe_path", self.guard.problem(image, [self.root / record.dataset])
            if problem is None and self.image_check is not None:
                found = self.image_check(image)
                if found is not None:
                    code, problem = found
            if problem is not None:
                return self._fail(result, problem, "image", code)
        if self.ids is not None and not self.ids.add(record.id) and not is_copy(record):
            return self._fail(
                result, f"id {record.id} repeats an earlier record", "id", "duplicate_id"
            )
        return result

    @staticmethod
    def _fail(result: LineResult, message: str, field: str, code: str) -> LineResult:
        result.error = RecordError(
            message, path=result.path, line=result.line, field=field, code=code
        )
        result.record = None
        return result


def iter_records_lenient(
    path: str | os.PathLike,
    *,
    check_id: bool = False,
    root: str | os.PathLike | None = None,
    unique_ids: bool = True,
) -> Iterator[LineResult]:
    """Stream every non-blank line as a record or a located error; never raises on bad lines.

    ``root`` (e.g. the JSONL's folder) also checks that images do not leave their folder.
    """
    yield from RecordReader(root=root, check_id=check_id, unique_ids=unique_ids).read(path)


def read_records(path: str | os.PathLike, *, check_id: bool = False) -> Iterator[Record]:
    """Stream records; the first bad line raises :class:`RecordError` with file, line, field."""
    for result in iter_records_lenient(path, check_id=check_id):
        if result.error is not None:
            raise result.error
        yield result.record  # type: ignore[misc]


SKIP_HINT = (
    "fix the input (`facial-r1 data clean` quarantines bad records with their reasons), "
    "or pass --skip-bad-records to skip them"
)


def preflight(
    paths: Iterable[str | os.PathLike],
    *,
    skip_bad: bool = False,
    limit: int = 0,
    echo: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Read every input through the one reader before a stage starts work.

    Bad lines raise :class:`BadInputError` (the stage exits 2) listing file:line:field, unless
    ``skip_bad``: then each is printed through ``echo`` and counted, and the stage skips them.
    Images resolve against each file's folder. ``limit`` reads at most that many lines of each
    file (0 = all). Returns ``{"read": n, "bad": k}``.
    """
    errors: list[RecordError] = []
    read = bad = 0
    for path in paths:
        reader = RecordReader(root=Path(path).parent)
        for count, result in enumerate(reader.read(path), start=1):
            if limit and count > limit:
                break
            read += 1
            if result.error is not None:
                bad += 1
                if len(errors) < 1000:
                    errors.append(result.error)
                if skip_bad and echo is not None:
                    echo(f"skipping bad record: {result.error}")
    if bad and not skip_bad:
        raise BadInputError(errors, total=bad, hint=SKIP_HINT)
    if bad and echo is not None:
        echo(f"skipped {bad} bad record(s) of {read} (--skip-bad-records)")
    return {"read": read, "bad": bad}


def add_skip_bad_records_argument(parser) -> None:
    """The ``--skip-bad-records`` flag of the verbs that stop on bad input."""
    parser.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="skip bad input records (each printed with file:line:field, then counted) "
        "instead of stopping with exit 2 before any work",
    )


# --------------------------------------------------------------------------------------------
# writing: never over an input, atomically, with the umask's permissions


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def ensure_not_input(
    outputs: Iterable[str | os.PathLike | None],
    inputs: Iterable[str | os.PathLike | None],
    what: str = "",
) -> None:
    """Raise :class:`InputError` when an output is one of the inputs: the same path after
    resolving symlinks, or the same file through a hard link. The one check of every verb."""
    ins = [Path(p) for p in inputs if p]
    for out in outputs:
        if not out:
            continue
        out = Path(out)
        for src in ins:
            if _same_file(out, src):
                prefix = f"{what}: " if what else ""
                raise InputError(
                    f"{prefix}output {out} is the input {src}; write to another file "
                    "(an output never overwrites an input)"
                )


_TMP_COUNTER = itertools.count()
_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"


def temp_path_for(target: str | os.PathLike) -> Path:
    """``<dir>/.<name>.tmp-<host>-<pid>-<n>``: a hidden temporary beside ``target`` whose name
    says which process wrote it, so that a later run removes it once that process is gone."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-{_HOST}-{os.getpid()}-{next(_TMP_COUNTER)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def sweep_stale_temps(target: str | os.PathLike) -> int:
    """Remove the temporaries of ``target`` left by dead processes of this host; returns how
    many. Temporaries of live processes and of other hosts are left alone."""
    target = Path(target)
    prefix = f".{target.name}.tmp-{_HOST}-"
    removed = 0
    try:
        entries = [e for e in os.scandir(target.parent) if e.name.startswith(prefix)]
    except OSError:
        return 0
    for entry in entries:
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed += 1
    return removed


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for text in status:
                if text.startswith("Umask:"):
                    return int(text.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_temp(target: str | os.PathLike) -> tuple[int, Path]:
    """Create the temporary of ``target`` (stale ones swept first), mode 0666 minus the umask
    like any new file; returns ``(fd, path)``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(target)
    tmp = temp_path_for(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Write to a temporary file beside ``path`` and rename it into place on success.

    A crash inside the block leaves no partial file at ``path``; a temporary left by a killed
    process is removed by the next write of the same ``path``. The file gets the umask's
    permissions.
    """
    target = Path(path)
    fd, tmp = open_temp(target)
    kwargs = {} if "b" in mode else {"encoding": encoding}
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[Record | dict[str, Any]]) -> int:
    """Atomically write records (or plain dicts) as JSONL; returns the number of lines."""
    count = 0
    with atomic_write(path) as handle:
        for row in rows:
            data = row.to_dict() if isinstance(row, Record) else row
            handle.write(json.dumps(data, ensure_ascii=False) + "\n")
            count += 1
    return count
