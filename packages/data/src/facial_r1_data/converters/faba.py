"""FABA-Instruct (Li et al. 2024, EmoLA): instruction data for AU and emotion recognition.

Layout of the release: ``FABAInstruct/{train,eval}/{train,eval}_{au,emotion}_anno.json``, each a
JSON list of ``{source, image, id, conversations: [{from: human, value}, {from: gpt, value}],
landmark}`` with ``image`` relative to the folder above ``FABAInstruct/``, plus the images under
``{train,eval}/images/``. The two annotation files of a part are merged per image: AUs come from
an explicit ``label`` field when present (``"4, 9, 15"``), else from the AU codes the AU answer
names; the emotion comes from the emotion file's ``label`` field (a name, or EmoLA's index order
happiness, sadness, surprise, anger, neutral, disgust, fear). The free-text answers are kept in
``meta_info``. ``train`` -> train, ``eval`` -> test.

>>> aus_from_text("1. AU4 - Brow Lowerer ... 3. AU15 and AU 17")
['AU4', 'AU15', 'AU17']
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from facial_r1_core.schema import Record, check_image_path
from facial_r1_core.vocab import UnknownLabelError, normalize_au, normalize_emotion, sort_aus

from ._base import Converter, Emit, FileImage, Item, LayoutError, Reject

EMOLA_EMOTION_ORDER = (
    "happiness",
    "sadness",
    "surprise",
    "anger",
    "neutral",
    "disgust",
    "fear",
)
PARTS = {"train": "train", "test": "eval"}
_AU_IN_TEXT = re.compile(r"\bAU\s?0*(\d{1,2})\b")


def aus_from_text(text: str) -> list[str]:
    return sort_aus(f"AU{int(n)}" for n in _AU_IN_TEXT.findall(text or ""))


def _turns(entry: dict[str, Any]) -> tuple[str, str]:
    conv = entry.get("conversations") or entry.get("conversation") or []
    human = next((t.get("value", "") for t in conv if t.get("from") == "human"), "")
    gpt = next((t.get("value", "") for t in conv if t.get("from") == "gpt"), "")
    return human.replace("<image>", "").strip(), gpt


def emotion_from_label(value: Any) -> str:
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)
        if not 0 <= index < len(EMOLA_EMOTION_ORDER):
            raise UnknownLabelError(f"emotion index {index} is not 0-6")
        return EMOLA_EMOTION_ORDER[index]
    return normalize_emotion(str(value))


class FABAConverter(Converter):
    name = "faba"
    dataset = "FABA-Instruct"
    title = "FABA-Instruct"
    splits = ("train", "test", "all")

    def _load(self, path: Path) -> list[Any]:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise LayoutError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise LayoutError(f"{path}: expected a JSON list of annotations")
        return data

    def _image_rel(self, image: str) -> str:
        marker = "FABAInstruct/"
        if marker in image:
            image = image.split(marker, 1)[1]
        return image

    def iter_items(self, source: Path, split: str) -> Iterator[Item]:
        root = source / "FABAInstruct" if (source / "FABAInstruct").is_dir() else source
        parts = list(PARTS.items()) if split == "all" else [(split, PARTS[split])]
        stats: Counter[str] = Counter()
        for row_split, part in parts:
            au_file = root / part / f"{part}_au_anno.json"
            emo_file = root / part / f"{part}_emotion_anno.json"
            if not au_file.is_file() and not emo_file.is_file():
                raise LayoutError(f"expected FABA-Instruct annotations {au_file} and/or {emo_file}")
            merged: dict[str, dict[str, Any]] = {}
            order: list[str] = []
            for kind, path in (("au", au_file), ("emotion", emo_file)):
                if not path.is_file():
                    stats[f"{part}_{kind}_file_missing"] += 1
                    continue
                for position, entry in enumerate(self._load(path)):
                    stats[f"{part}_{kind}_entries"] += 1
                    src = {"file": f"{part}/{path.name}", "index": position}
                    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                        key = f"__bad__{part}_{kind}_{position}"
                        merged[key] = {
                            "bad": "entry has no 'image' string",
                            "src": src,
                            "raw": entry,
                        }
                        order.append(key)
                        continue
                    key = self._image_rel(entry["image"])
                    if key not in merged:
                        merged[key] = {"src": src}
                        order.append(key)
                    merged[key][kind] = entry
            for key in order:
                item = merged.pop(key)
                src = item["src"]
                if "bad" in item:
                    yield Reject("schema_error", item["bad"], src, item["raw"])
                    continue
                yield self._item(root, key, item, row_split, src)
        self.stats.update(stats)

    def _item(self, root: Path, image: str, item: dict[str, Any], row_split: str, src) -> Item:
        raw = {k: item[k] for k in ("au", "emotion") if k in item}
        try:
            image = check_image_path(image)
        except ValueError as exc:
            return Reject("unsafe_path", str(exc), src, raw)
        meta: dict[str, Any] = {"split": row_split, "source_image": image}
        aus: list[str] = []
        labels: list[str] = []
        if "au" in item:
            entry = item["au"]
            question, answer = _turns(entry)
            meta.update(
                faba_au_question=question,
                faba_au_answer=answer,
                faba_source=entry.get("source"),
                faba_id=entry.get("id"),
            )
            try:
                if entry.get("label") not in (None, ""):
                    raw_codes = [c for c in re.split(r"[,\s+]+", str(entry["label"])) if c]
                    aus = sort_aus(normalize_au(c) for c in raw_codes)
                    meta["au_label_raw"] = entry["label"]
                else:
                    aus = aus_from_text(answer)
                    meta["aus_from"] = "answer text"
            except UnknownLabelError as exc:
                return Reject("unknown_label", str(exc), src, raw)
            meta["aus_annotated"] = "all"
        if "emotion" in item:
            entry = item["emotion"]
            question, answer = _turns(entry)
            meta.update(
                faba_emotion_question=question,
                faba_emotion_answer=answer,
                faba_source=entry.get("source"),
                faba_id=entry.get("id"),
            )
            if entry.get("label") not in (None, ""):
                try:
                    labels = [emotion_from_label(entry["label"])]
                except UnknownLabelError as exc:
                    return Reject("unknown_label", str(exc), src, raw)
                meta["emotion_label_raw"] = entry["label"]
            else:
                meta["emotion_label_missing"] = True
        if not aus and not labels and "au" not in item:
            return Reject(
                "missing_label",
                "emotion annotation without a 'label' field and no AU annotation for this image",
                src,
                raw,
            )
        record = Record.create(
            dataset=self.dataset,
            image=image,
            question=self.args.question,
            AUs=aus,
            labels=labels,
            meta_info=meta,
        )
        return Emit(record, FileImage(root / image), src)
