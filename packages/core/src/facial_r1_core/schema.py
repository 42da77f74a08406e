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
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .vocab import UnknownLabelError, normalize_au, normalize_emotion, sort_aus

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


class RecordError(ValueError):
    """A record that breaks the schema; says which file, line and field."""

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike | None = None,
        line: int | None = None,
        field: str | None = None,
    ):
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        self.reason = message
        where = ":".join(str(p) for p in (self.path, line) if p is not None)
        prefix = f"{where}: " if where else ""
        fld = f"field '{field}': " if field else ""
        super().__init__(f"{prefix}{fld}{message}")


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
        """Build a record with normalised labels and the paper's id."""
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
        """Validate and normalise a parsed JSON object; :class:`RecordError` names the field."""

        def fail(message: str, fld: str | None = None) -> RecordError:
            return RecordError(message, path=path, line=line, field=fld)

        if not isinstance(data, dict):
            raise fail(f"expected a JSON object, got {type(data).__name__}")
        for name in REQUIRED_FIELDS:
            if name not in data:
                raise fail("missing required field", name)
            if not isinstance(data[name], str) or not data[name].strip():
                raise fail(f"must be a non-empty string, got {data[name]!r}", name)
        try:
            image = check_image_path(data["image"])
        except ValueError as exc:
            raise fail(str(exc), "image") from None
        aus_raw = data.get("AUs") or []
        if not isinstance(aus_raw, list):
            raise fail(f"must be a list of AU codes, got {type(aus_raw).__name__}", "AUs")
        try:
            aus = sort_aus(normalize_au(a) for a in aus_raw)
        except UnknownLabelError as exc:
            raise fail(str(exc), "AUs") from None
        labels_raw = data.get("labels") or []
        if isinstance(labels_raw, str):
            labels_raw = [labels_raw]
        if not isinstance(labels_raw, list) or not all(isinstance(x, str) for x in labels_raw):
            raise fail("must be a list of emotion labels", "labels")
        try:
            labels = _dedupe(normalize_emotion(x) for x in labels_raw)
        except UnknownLabelError as exc:
            raise fail(str(exc), "labels") from None
        description = data.get("description") or ""
        if not isinstance(description, str):
            raise fail(f"must be a string, got {type(description).__name__}", "description")
        meta = data.get("meta_info") or {}
        if not isinstance(meta, dict):
            raise fail(f"must be an object, got {type(meta).__name__}", "meta_info")
        expected = record_id(data["dataset"], image, data["question"])
        rid = data.get("id") or expected
        if not isinstance(rid, str):
            raise fail(f"must be a string, got {type(rid).__name__}", "id")
        if check_id and rid != expected:
            raise fail(f"id {rid!r} is not md5(dataset + image + question) = {expected!r}", "id")
        return cls(
            id=rid,
            dataset=data["dataset"],
            image=image,
            question=data["question"],
            AUs=aus,
            labels=labels,
            description=description,
            meta_info=meta,
        )

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


@dataclass
class LineResult:
    """One line of a JSONL read leniently: a record or the error that rejected it."""

    line: int
    record: Record | None = None
    error: RecordError | None = None
    raw: str = ""


def iter_jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each non-blank line, streaming."""
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if text.strip():
                yield number, text


def iter_records_lenient(
    path: str | os.PathLike, *, check_id: bool = False
) -> Iterator[LineResult]:
    """Stream every non-blank line as a record or a located error; never raises on bad lines."""
    for number, text in iter_jsonl_lines(path):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            err = RecordError(
                f"invalid JSON: {exc.msg} at column {exc.colno}", path=path, line=number
            )
            yield LineResult(number, error=err, raw=text)
            continue
        try:
            rec = Record.from_dict(data, path=path, line=number, check_id=check_id)
        except RecordError as err:
            yield LineResult(number, error=err, raw=text)
            continue
        yield LineResult(number, record=rec, raw=text)


def read_records(path: str | os.PathLike, *, check_id: bool = False) -> Iterator[Record]:
    """Stream records; the first bad line raises :class:`RecordError` with file, line, field."""
    for result in iter_records_lenient(path, check_id=check_id):
        if result.error is not None:
            raise result.error
        yield result.record  # type: ignore[misc]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Write to a temporary file beside ``path`` and rename it into place on success.

    A crash inside the block leaves no partial file at ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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


def dataset_jsonl_path(root: str | os.PathLike, dataset: str) -> Path:
    """``<root>/<dataset>.jsonl`` of the paper's layout."""
    return Path(root) / f"{dataset}.jsonl"
