"""Training data for TRL from the unified JSONL: validation with reasons, SFT and GRPO examples.

Every line read ends up either kept or rejected with a reason (``read == kept + rejected``):

* ``schema``: the line is not a valid record (bad JSON, missing field, unknown label ...);
* ``empty_description``: SFT needs the completion in ``description``;
* ``missing_image`` / ``bad_image``: the image file is absent or does not decode;
* ``no_labels``: GRPO needs AUs or an emotion label for its rewards.

Examples keep image *paths* (``datasets.Image`` decodes lazily), so large sets do not sit in memory.

SFT examples are conversational prompt-completion rows (TRL computes the loss on the completion
only)::

    {"images": [path], "prompt": [{"role": "user", "content": SFT_PROMPT}],
     "completion": [{"role": "assistant", "content": description}],
     "hint_prompt": [{"role": "user", "content": SFT_PROMPT + GROUND_TRUTH_BLOCK}]}

:class:`SFTCollator` swaps in ``hint_prompt`` for a configurable share of the examples of
every batch (so each face is seen both with and without hints over the epochs). GRPO rows are
``{"image": path, "prompt": [...], "AUs": [...], "labels": [...]}``; TRL adds the image block
and passes ``AUs``/``labels`` to the reward functions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from facial_r1_core.prompts import DEFAULT_QUESTION, sft_prompt, synthesis_prompt
from facial_r1_core.schema import Record, aus_annotated, iter_records_lenient, preflight

log = logging.getLogger("facial_r1.data")

REJECT_CODES = ("schema", "empty_description", "missing_image", "bad_image", "no_labels")


@dataclasses.dataclass
class Rejection:
    path: str
    line: int
    code: str
    reason: str
    record_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class LoadReport:
    """Counts of one load: ``read == kept + rejected`` always."""

    read: int = 0
    kept: int = 0
    rejections: list[Rejection] = dataclasses.field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.rejections)

    def by_code(self) -> dict[str, int]:
        return dict(Counter(r.code for r in self.rejections))

    def metrics(self, prefix: str = "data_") -> dict[str, int]:
        out = {
            f"{prefix}read": self.read,
            f"{prefix}kept": self.kept,
            f"{prefix}rejected": self.rejected,
        }
        for code in REJECT_CODES:
            out[f"{prefix}rejected_{code}"] = self.by_code().get(code, 0)
        return out

    def summary(self) -> str:
        codes = ", ".join(f"{k}={v}" for k, v in sorted(self.by_code().items())) or "none"
        return f"read {self.read}, kept {self.kept}, rejected {self.rejected} ({codes})"


@dataclasses.dataclass
class TrainItem:
    record: Record
    image_path: Path


def check_image(path: Path) -> str | None:
    """None when ``path`` is a decodable image, else the reason it is not."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return f"image not found: {path}"
    try:
        with Image.open(path) as img:
            img.load()
            if img.width < 1 or img.height < 1:
                return f"image has no pixels: {path}"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"image does not decode ({type(exc).__name__}: {exc}): {path}"
    return None


def load_records(
    files: Iterable[str | os.PathLike],
    *,
    require_description: bool = False,
    require_labels: bool = False,
    max_samples: int | None = None,
    progress: bool = True,
) -> tuple[list[TrainItem], LoadReport]:
    """Read unified JSONL file(s) leniently; bad records are counted with reasons, never raised.

    A file that does not exist is an error (a wrong path is not bad data).
    """
    from tqdm import tqdm

    report = LoadReport()
    items: list[TrainItem] = []
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"training file not found: {path}")
        root = path.parent
        for res in tqdm(
            iter_records_lenient(path, root=root),
            desc=f"reading {path.name}",
            unit="rec",
            disable=not progress,
            leave=False,
        ):
            report.read += 1
            rec = res.record
            if rec is None:
                err = res.error
                report.rejections.append(
                    Rejection(str(path), res.line, "schema", getattr(err, "reason", str(err)))
                )
                continue

            def reject(code: str, reason: str, rec=rec, line=res.line, path=path) -> None:
                report.rejections.append(Rejection(str(path), line, code, reason, rec.id))

            if require_description and not rec.description.strip():
                reject("empty_description", "description (the completion) is empty")
                continue
            if require_labels and not aus_annotated(rec) and not rec.labels:
                reject("no_labels", "record has neither AUs nor an emotion label")
                continue
            image_path = rec.image_path(root)
            problem = check_image(image_path)
            if problem is not None:
                reject("missing_image" if not image_path.is_file() else "bad_image", problem)
                continue
            items.append(TrainItem(rec, image_path))
            report.kept += 1
    if max_samples is not None and max_samples >= 0 and len(items) > max_samples:
        items = items[:max_samples]
        report.kept = len(items)
    return items, report


def check_inputs(ctx, files: Iterable[str | os.PathLike], limit: int = 0) -> dict[str, int]:
    """Core's preflight for a training stage: every line of every input through the one reader
    before any work; bad records stop the stage with exit 2 (file:line:field listed), unless
    ``--skip-bad-records`` was given (then they are printed and counted)."""
    import sys

    skip = bool(getattr(getattr(ctx, "args", None), "skip_bad_records", False))
    return preflight(
        [Path(f) for f in files],
        skip_bad=skip,
        limit=limit,
        echo=lambda m: print(m, file=sys.stderr),
    )


def _question(rec: Record, question: str | None) -> str:
    return question or rec.question or DEFAULT_QUESTION


def hint_prompt_text(rec: Record, emotions: Sequence[str], question: str | None = None) -> str:
    """The ground-truth-hinted prompt (synthesis prompt without the error block)."""
    return synthesis_prompt(
        _question(rec, question), emotions, list(rec.AUs), rec.emotion or ", ".join(rec.labels)
    )


def sft_rows(
    items: Sequence[TrainItem], emotions: Sequence[str], question: str | None = None
) -> list[dict[str, Any]]:
    rows = []
    for item in items:
        rec = item.record
        rows.append(
            {
                "images": [str(item.image_path)],
                "prompt": [
                    {"role": "user", "content": sft_prompt(_question(rec, question), emotions)}
                ],
                "completion": [{"role": "assistant", "content": rec.description}],
                "hint_prompt": [
                    {"role": "user", "content": hint_prompt_text(rec, emotions, question)}
                ],
            }
        )
    return rows


def grpo_rows(
    items: Sequence[TrainItem], emotions: Sequence[str], question: str | None = None
) -> list[dict[str, Any]]:
    return [
        {
            "image": str(item.image_path),
            "prompt": [
                {"role": "user", "content": sft_prompt(_question(item.record, question), emotions)}
            ],
            "AUs": list(item.record.AUs),
            "aus_annotated": aus_annotated(item.record),
            "labels": list(item.record.labels),
        }
        for item in items
    ]


def to_dataset(rows: list[dict[str, Any]], image_column: str, *, decode: bool = True):
    """A ``datasets.Dataset`` of ``rows``.

    ``decode=True``: the image column decodes lazily from the stored paths (PIL images, as TRL's
    GRPO trainer expects). ``decode=False`` keeps the paths as strings: :class:`SFTCollator` then
    opens each image once and caches its pixel values, instead of decoding it at every epoch.
    """
    from datasets import Dataset, Image, List

    if not rows:
        raise ValueError("no training examples left after validation")
    ds = Dataset.from_list(rows)
    if not decode:
        return ds
    feature = List(Image()) if isinstance(rows[0][image_column], list) else Image()
    return ds.cast_column(image_column, feature)


class SFTCollator:
    """Batches SFT rows for a Qwen2.5-VL-style processor; loss on the completion tokens only.

    For each example the hinted prompt is used with probability ``hint_fraction``, drawn from
    (seed, batch number, position in the batch), so every face is seen both with and without
    hints over the epochs, and a run resumed at step ``s`` (``calls = s * accumulation``) makes
    the same draws as an uninterrupted one. The prompt is rendered with
    the processor's chat template (image block first, generation prompt added); the completion
    text is what the template appends for the assistant turn (content + end-of-turn), found once
    by rendering a sentinel. Rows are ``prompt ids + completion ids``, right-padded; ``labels``
    are -100 outside the completion. (Equivalent to TRL's prompt-completion collator, without
    its per-character prefix search, which dominated the tiny model's step time.)

    Each example is processed on its own (the processor treats the examples of a batch
    independently, so the batch is the same). When its images are given as paths (see
    ``to_dataset(decode=False)``), the image step (pixel values, per image paths, within
    ``cache_bytes``) and the text step (prompt ids with the image tokens expanded, per prompt
    and image grid) are cached, so later epochs only concatenate tensors. The split steps are
    checked once against a full processor call; if they differ, every example goes through the
    processor. PIL images are processed every time.
    """

    _SENTINEL = "\x00COMPLETION\x00"

    def __init__(
        self,
        processor,
        *,
        hint_fraction: float = 0.0,
        seed: int = 0,
        max_length: int | None = None,
        cache_bytes: int = 1 << 30,
    ):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.hint_fraction = float(hint_fraction)
        self.max_length = max_length
        self.seed = seed
        self.calls = 0  # batches collated so far (a resumed run sets it)
        self.hinted = 0
        self.seen = 0
        self.cache_bytes = int(cache_bytes)
        self.cached_bytes = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self._prompt_cache: dict[str, str] = {}
        self._completion_ids: dict[str, list[int]] = {}
        # (rendered prompt, image grids) -> (prompt ids, mm_token_type_ids or None)
        self._prompt_ids: dict[tuple[str, tuple], tuple[list[int], list[int] | None]] = {}
        # image paths -> {"pixel_values": ..., "image_grid_thw": ...}
        self._pixels: dict[tuple[str, ...], dict[str, Any]] = {}
        self._fast: bool | None = None  # split image/text steps verified against the processor
        self._with_mm = False
        self._between, self._suffix = self._completion_frame()

    def _messages(self, text: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    def _render_prompt(self, text: str) -> str:
        cached = self._prompt_cache.get(text)
        if cached is None:
            cached = self.processor.apply_chat_template(
                self._messages(text), add_generation_prompt=True, tokenize=False
            )
            if len(self._prompt_cache) < 10_000:
                self._prompt_cache[text] = cached
        return cached

    def _completion_frame(self) -> tuple[str, str]:
        prompt = self._render_prompt("x")
        full = self.processor.apply_chat_template(
            [*self._messages("x"), {"role": "assistant", "content": self._SENTINEL}],
            tokenize=False,
        )
        if not full.startswith(prompt) or self._SENTINEL not in full:
            raise ValueError("the chat template does not extend the prompt with the assistant turn")
        between, _, suffix = full[len(prompt) :].partition(self._SENTINEL)
        return between, suffix

    def completion_text(self, content: str) -> str:
        return f"{self._between}{content}{self._suffix}"

    def _completion(self, content: str) -> list[int]:
        ids = self._completion_ids.get(content)
        if ids is None:
            text = self.completion_text(content)
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._completion_ids[content] = ids
        return ids

    def _full(self, prompt: str, images: list) -> tuple[list[int], list[int] | None, dict]:
        """One example through the processor: (prompt ids, mm token types or None, pixels)."""
        pil = [_rgb(_open_image(i)) for i in images]
        out = self.processor(
            text=[prompt], images=pil or None, return_tensors="pt", add_special_tokens=False
        )
        keep = out["attention_mask"][0].bool()
        prompt_ids = out["input_ids"][0][keep].tolist()
        mm = out["mm_token_type_ids"][0][keep].tolist() if "mm_token_type_ids" in out else None
        return prompt_ids, mm, {k: out[k] for k in ("pixel_values", "image_grid_thw") if k in out}

    def _image_part(self, paths: tuple[str, ...]) -> dict:
        """Pixel values + grid of an example's images (the processor's image step alone)."""
        pil = [_rgb(_open_image(p)) for p in paths]
        out = self.processor.image_processor(images=pil, return_tensors="pt")
        return {k: out[k] for k in ("pixel_values", "image_grid_thw")}

    def _text_part(self, prompt: str, pixels: dict) -> tuple[list[int], list[int] | None]:
        """The prompt's ids with each image token expanded as the processor expands it."""
        from .processing import expand_image_tokens

        text = expand_image_tokens(self.processor, prompt, pixels["image_grid_thw"])
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        mm = self.processor.create_mm_token_type_ids([ids])[0] if self._with_mm else None
        return ids, mm

    def _check_fast(self, prompt: str, paths: tuple[str, ...]) -> bool:
        """Whether the split image/text steps give exactly the processor's output (checked once)."""
        import torch

        ids, mm, pixels = self._full(prompt, list(paths))
        self._with_mm = mm is not None
        try:
            fast_pixels = self._image_part(paths)
            fast_ids, fast_mm = self._text_part(prompt, fast_pixels)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("SFT collator: per-image caching off (%s: %s)", type(exc).__name__, exc)
            return False
        same = (
            fast_ids == ids
            and fast_mm == mm
            and fast_pixels.keys() == pixels.keys()
            and all(torch.equal(fast_pixels[k], pixels[k]) for k in pixels)
        )
        if not same:
            log.warning("SFT collator: per-image caching off (differs from the processor's output)")
        return same

    def _process(self, prompt: str, images: list) -> tuple[list[int], list[int] | None, dict]:
        """(prompt ids, mm token types or None, image tensors) of one example.

        Images given as paths are cached: pixel values per paths, prompt ids per (prompt, image
        grids), so the shared unhinted prompt is tokenized once per run.
        """
        if not images or not all(isinstance(i, str | os.PathLike) for i in images):
            return self._full(prompt, images)
        paths = tuple(str(i) for i in images)
        if self._fast is None:
            self._fast = self._check_fast(prompt, paths)
        if not self._fast:
            return self._full(prompt, images)
        pixels = self._pixels.get(paths)
        hit = pixels is not None
        if pixels is None:
            pixels = self._image_part(paths)
            size = sum(t.numel() * t.element_size() for t in pixels.values())
            if self.cached_bytes + size <= self.cache_bytes:
                self._pixels[paths] = pixels
                self.cached_bytes += size
        key = (prompt, tuple(tuple(g) for g in pixels["image_grid_thw"].tolist()))
        text = self._prompt_ids.get(key)
        if text is None:
            hit = False
            text = self._text_part(prompt, pixels)
            if len(self._prompt_ids) < 200_000:
                self._prompt_ids[key] = text
        if hit:
            self.cache_hits += 1
        else:
            self.cache_misses += 1
        return text[0], text[1], pixels

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows, labels, mm_rows = [], [], []
        pixel_parts: dict[str, list] = {}
        has_mm = True
        batch = self.calls
        self.calls += 1
        for position, example in enumerate(examples):
            messages = example["prompt"]
            hint = example.get("hint_prompt")
            draw = random.Random(f"{self.seed}/{batch}/{position}").random
            if hint and self.hint_fraction > 0 and draw() < self.hint_fraction:
                messages = hint
                self.hinted += 1
            self.seen += 1
            prompt = self._render_prompt(messages[0]["content"])
            prompt_ids, mm, pixels = self._process(prompt, list(example.get("images") or []))
            for key, value in pixels.items():
                pixel_parts.setdefault(key, []).append(value)
            completion_ids = self._completion(example["completion"][0]["content"])
            ids = prompt_ids + completion_ids
            lab = [-100] * len(prompt_ids) + completion_ids
            if mm is None:
                has_mm = False
            else:
                mm = mm + [0] * len(completion_ids)
            if self.max_length is not None and len(ids) > self.max_length:
                ids, lab = ids[: self.max_length], lab[: self.max_length]
                mm = mm[: self.max_length] if mm is not None else None
            rows.append(ids)
            labels.append(lab)
            mm_rows.append(mm)
        pad = self.tokenizer.pad_token_id
        width = max(len(r) for r in rows)
        out: dict[str, Any] = {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
        }
        if has_mm:
            out["mm_token_type_ids"] = torch.tensor([r + [0] * (width - len(r)) for r in mm_rows])
        for key, parts in pixel_parts.items():
            out[key] = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        return out

    @property
    def hinted_share(self) -> float:
        return self.hinted / self.seen if self.seen else 0.0


def _open_image(image):
    """A PIL image from a path (read fully, file closed) or the image itself."""
    if isinstance(image, str | os.PathLike):
        from PIL import Image

        with Image.open(image) as img:
            img.load()
            return img.copy() if img.mode == "RGB" else img.convert("RGB")
    return image


def _rgb(image):
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image
