"""``facial-r1 data demo-faces``: procedural faces whose Action Units are visible by construction.

Each face is drawn from an emotion's EMFACS prototype, with variation so the task is about seeing
AUs rather than memorising a picture: face shape, skin tone, hair, background, position, scale,
rotation, pixel noise and per-AU intensity vary; a prototype AU is sometimes dropped and a
compatible extra AU sometimes added. Conflicting AUs (lip corners up and down, lips pressed and
parted, eyes closed and widened, ...) are never drawn together. The emotion label is the
*strictly* nearest prototype by the size of the symmetric difference of AU sets; a face whose
AU set is equally near to two emotions is redrawn. Contempt draws AU12 and AU14 on one side.

Where each AU is drawn (a distinct shape in a fixed region):

=======  ==================================================================
brows    AU1 inner ends up, AU2 outer ends up, AU4 lowered, drawn together, with vertical furrows
eyes     AU5 tall (white above the iris), AU7 flat lower lid and a tension line, AU43 closed
cheeks   AU6 rosy raised cheeks, an arc under the eye and crow's feet
nose     AU9 horizontal wrinkles across the bridge, flared nostrils
mouth    AU10 upper lip raised (upper teeth) with nasolabial folds, AU12 corners up, AU15 down,
         AU16 lower lip down (lower teeth), AU20 wide and flat, AU23 narrow, thin, vertical
         lines, AU24 thin pressed line with bulges above and below, AU25 a dark gap between
         the lips, AU26 wide-open dark mouth and a longer jaw, AU14 crescent dimples beside
         the corners
chin     AU17 a bulging chin boss
=======  ==================================================================

Output (paper layout): ``<root>/<dataset>/{train,test,pool}/NNNNNN.png`` and
``<root>/<dataset>_train.jsonl``, ``<root>/<dataset>_test.jsonl``, ``<root>/<dataset>_pool.jsonl``
(the pool: more labelled faces for the synthesis stage, disjoint from train and test; empty
unless ``pool`` > 0). Faces depend only on (seed, split, index), so a split's faces stay the same
when the other splits' sizes change.

>>> nearest_emotion({"AU6", "AU12", "AU25"})
'happiness'
>>> nearest_emotion({"AU12"}) is None   # as near to happiness as to contempt
True
>>> spec = sample_spec(random.Random(1), "fear")
>>> nearest_emotion(spec.aus)
'fear'
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facial_r1_core.config import checked
from facial_r1_core.prompts import DEFAULT_QUESTION
from facial_r1_core.vocab import BASIC_EMOTIONS, EMOTIONS, au_number, sort_aus

from .faces_draw import DRAWABLE_AUS, draw_face, sample_style

log = logging.getLogger("facial_r1.data.demo_faces")

GENERATOR_VERSION = "demo_faces/1"

# EMFACS prototypes (alternatives listed as separate variants).
PROTOTYPES: dict[str, tuple[frozenset[str], ...]] = {
    "happiness": (frozenset({"AU6", "AU12"}),),
    "sadness": (frozenset({"AU1", "AU4", "AU15"}),),
    "surprise": (frozenset({"AU1", "AU2", "AU5", "AU26"}),),
    "fear": (frozenset({"AU1", "AU2", "AU4", "AU5", "AU7", "AU20", "AU26"}),),
    "anger": (
        frozenset({"AU4", "AU5", "AU7", "AU23"}),
        frozenset({"AU4", "AU5", "AU7", "AU24"}),
    ),
    "disgust": (
        frozenset({"AU9", "AU15", "AU16"}),
        frozenset({"AU10", "AU15", "AU16"}),
    ),
    "contempt": (frozenset({"AU12", "AU14"}),),  # unilateral
    "neutral": (frozenset(),),
}

# Pairs never drawn together (they would move the same feature in opposite ways).
CONFLICTS: frozenset[frozenset[str]] = frozenset(
    frozenset(p)
    for p in (
        ("AU5", "AU43"),
        ("AU7", "AU43"),
        ("AU12", "AU15"),
        ("AU23", "AU24"),
        ("AU23", "AU25"),
        ("AU23", "AU26"),
        ("AU24", "AU25"),
        ("AU24", "AU26"),
        ("AU25", "AU26"),
        ("AU20", "AU23"),
        ("AU20", "AU24"),
        ("AU17", "AU25"),
        ("AU17", "AU26"),
        ("AU17", "AU16"),
        ("AU10", "AU23"),
        ("AU10", "AU24"),
        ("AU16", "AU23"),
        ("AU16", "AU24"),
    )
)


# AUs that appear in no prototype (only as extras) are drawn this many times more often.
EXTRA_ONLY_WEIGHT = 3.0
_EXTRA_ONLY = frozenset(DRAWABLE_AUS) - frozenset().union(
    *(v for vs in PROTOTYPES.values() for v in vs)
)


def conflicts(aus: Iterable[str]) -> list[tuple[str, str]]:
    """The conflicting pairs inside an AU set.

    >>> conflicts({"AU12", "AU15", "AU6"})
    [('AU12', 'AU15')]
    """
    items = sort_aus(aus)
    return [
        (a, b)
        for i, a in enumerate(items)
        for b in items[i + 1 :]
        if frozenset((a, b)) in CONFLICTS
    ]


def prototype_distance(aus: Iterable[str], emotion: str) -> int:
    """Symmetric-difference size between an AU set and the nearest variant of a prototype."""
    s = set(aus)
    return min(len(s ^ variant) for variant in PROTOTYPES[emotion])


def nearest_emotion(aus: Iterable[str], emotions: Sequence[str] = EMOTIONS) -> str | None:
    """The strictly nearest prototype's emotion, or None on a tie."""
    s = set(aus)
    dists = sorted((prototype_distance(s, e), e) for e in emotions)
    if len(dists) > 1 and dists[0][0] == dists[1][0]:
        return None
    return dists[0][1]


@dataclass
class FaceSpec:
    """What one face shows: its AUs and label, and how they were derived from the prototype."""

    emotion: str
    aus: frozenset[str]
    variant: frozenset[str]
    dropped: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    unilateral: bool = False

    def meta(self) -> dict[str, Any]:
        return {
            "prototype": sort_aus(self.variant),
            "dropped": list(self.dropped),
            "extra": list(self.extra),
            "unilateral": self.unilateral,
        }


def sample_spec(
    rng: random.Random,
    emotion: str,
    *,
    p_drop: float = 0.25,
    p_extra: float = 0.4,
    emotions: Sequence[str] = EMOTIONS,
    max_tries: int = 100,
) -> FaceSpec:
    """Draw the AU set of a face labelled ``emotion``: its prototype, perhaps one or two AUs
    dropped (two only from prototypes of five or more), perhaps one compatible extra AU; redrawn
    until ``emotion`` is the strictly nearest prototype among ``emotions``."""
    for _ in range(max_tries):
        variant = rng.choice(PROTOTYPES[emotion])
        aus = set(variant)
        dropped: list[str] = []
        if aus and rng.random() < p_drop:
            n = 2 if len(aus) >= 5 and rng.random() < p_drop else 1
            dropped = rng.sample(sort_aus(aus), n)
            aus -= set(dropped)
        extra: list[str] = []
        if rng.random() < p_extra:
            pool = [
                a
                for a in DRAWABLE_AUS
                if a not in aus and a not in dropped and not conflicts(aus | {a})
            ]
            if pool:  # AUs of no prototype are favoured, or they would be too rare to learn
                weights = [EXTRA_ONLY_WEIGHT if a in _EXTRA_ONLY else 1.0 for a in pool]
                extra = rng.choices(pool, weights=weights)
                aus |= set(extra)
        if conflicts(aus) or nearest_emotion(aus, emotions) != emotion:
            continue
        return FaceSpec(
            emotion,
            frozenset(aus),
            variant,
            tuple(sort_aus(dropped)),
            tuple(extra),
            unilateral=emotion == "contempt",
        )
    variant = PROTOTYPES[emotion][0]
    return FaceSpec(emotion, variant, variant, unilateral=emotion == "contempt")


@dataclass
class DemoFacesConfig:
    """The ``demo_faces`` section of a profile (documented in configs/README.md)."""

    out_root: str = "data"
    dataset: str = "DemoFaces"
    train: int = checked(1000, ge=0)
    test: int = checked(160, ge=0)
    pool: int = checked(0, ge=0)  # unlabelled-by-the-model faces for the synthesis stage
    image_size: int = checked(56, ge=8)
    oversample: int = checked(4, ge=1)
    seed: int = 0
    p_drop: float = checked(0.25, ge=0, le=1)
    p_extra: float = checked(0.4, ge=0, le=1)
    include_contempt: bool = True
    workers: int = checked(1, ge=1)
    contact_sheet: str = ""
    contact_per_emotion: int = 4


def face_rng(seed: int, split: str, index: int) -> random.Random:
    """The per-face generator: a face depends only on (seed, split, index)."""
    return random.Random(f"{GENERATOR_VERSION}/{seed}/{split}/{index}")


def make_face(cfg: DemoFacesConfig, split: str, index: int, emotions: Sequence[str]):
    """Render face ``index`` of ``split``: returns (image, spec)."""
    rng = face_rng(cfg.seed, split, index)
    emotion = emotions[index % len(emotions)]
    spec = sample_spec(rng, emotion, p_drop=cfg.p_drop, p_extra=cfg.p_extra, emotions=emotions)
    style = sample_style(rng)
    img = draw_face(
        spec.aus,
        style,
        size=cfg.image_size,
        oversample=cfg.oversample,
        unilateral=spec.unilateral,
        noise_seed=rng.getrandbits(63),
    )
    return img, spec


def _render_chunk(task: tuple[DemoFacesConfig, str, Sequence[int], tuple[str, ...], str]):
    cfg, split, indices, emotions, image_dir = task
    rows = []
    for index in indices:
        img, spec = make_face(cfg, split, index, emotions)
        name = f"{split}/{index:06d}.png"
        img.save(os.path.join(image_dir, name), compress_level=1)
        rows.append(_record(cfg, split, index, name, spec))
    return rows


def _record(cfg: DemoFacesConfig, split: str, index: int, name: str, spec: FaceSpec) -> dict:
    from facial_r1_core.schema import Record

    rec = Record.create(
        dataset=cfg.dataset,
        image=name,
        question=DEFAULT_QUESTION,
        AUs=sort_aus(spec.aus),
        labels=[spec.emotion],
        description="",
        meta_info={
            "split": split,
            "index": index,
            "seed": cfg.seed,
            "image_size": cfg.image_size,
            "generator": GENERATOR_VERSION,
            **spec.meta(),
        },
    )
    return rec.to_dict()


@dataclass
class GenerationReport:
    counts: dict[str, int] = field(default_factory=dict)
    emotion_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    au_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    jsonl: dict[str, Path] = field(default_factory=dict)
    image_dir: Path | None = None
    records: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def faces_per_s(self) -> float:
        total = sum(self.counts.values())
        return total / self.seconds if self.seconds > 0 else 0.0


def generate(
    cfg: DemoFacesConfig, root: str | os.PathLike, *, progress: bool = True
) -> GenerationReport:
    """Write the images and the split JSONLs under ``root``; the dataset appears atomically
    (everything is rendered in a temporary folder, then swapped into place)."""
    from facial_r1_core.schema import write_jsonl

    if cfg.image_size < 16:
        raise ValueError(f"demo_faces.image_size must be >= 16, got {cfg.image_size}")
    if min(cfg.train, cfg.test, cfg.pool) < 0:
        raise ValueError("demo_faces.train, .test and .pool must be >= 0")
    emotions = tuple(EMOTIONS if cfg.include_contempt else BASIC_EMOTIONS)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final_dir = root / cfg.dataset
    tmp_dir = root / f".{cfg.dataset}.tmp-{os.getpid()}"
    _remove_stale(root, cfg.dataset)
    splits = {"train": cfg.train, "test": cfg.test, "pool": cfg.pool}
    report = GenerationReport()
    started = time.perf_counter()
    try:
        for split in splits:
            (tmp_dir / split).mkdir(parents=True, exist_ok=True)
        tasks = []
        chunk = 64
        for split, n in splits.items():
            for start in range(0, n, chunk):
                idx = range(start, min(n, start + chunk))
                tasks.append((cfg, split, idx, emotions, str(tmp_dir)))
        rows: dict[str, list[dict]] = {s: [] for s in splits}
        bar = _progress(sum(splits.values()), progress)
        if cfg.workers > 1 and len(tasks) > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
                for task, out in zip(tasks, pool.map(_render_chunk, tasks), strict=True):
                    rows[task[1]].extend(out)
                    bar.update(len(out))
        else:
            for task in tasks:
                out = _render_chunk(task)
                rows[task[1]].extend(out)
                bar.update(len(out))
        bar.close()
        tmp_jsonl = {}
        for split, items in rows.items():
            tmp_jsonl[split] = root / f".{cfg.dataset}_{split}.jsonl.tmp-{os.getpid()}"
            write_jsonl(tmp_jsonl[split], items)
        # swap the image folder, then the JSONLs, into place
        old_dir = root / f".{cfg.dataset}.old-{os.getpid()}"
        if final_dir.exists():
            os.replace(final_dir, old_dir)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
        for split, path in tmp_jsonl.items():
            target = root / f"{cfg.dataset}_{split}.jsonl"
            os.replace(path, target)
            report.jsonl[split] = target
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        for path in root.glob(f".{cfg.dataset}_*.jsonl.tmp-{os.getpid()}"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    report.seconds = time.perf_counter() - started
    report.image_dir = final_dir
    report.records = rows
    aus: Counter[str] = Counter()
    for split, items in rows.items():
        report.counts[split] = len(items)
        report.emotion_counts[split] = dict(Counter(r["labels"][0] for r in items))
        for r in items:
            aus.update(r["AUs"])
    report.au_counts = {a: aus[a] for a in sorted(aus, key=au_number)}
    return report


def _remove_stale(root: Path, dataset: str) -> None:
    """Remove temporary leftovers of killed runs (their process is gone)."""
    for path in root.glob(f".{dataset}*.*-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(
            total=total, desc="demo faces", unit="face", disable=not enabled, mininterval=0.5
        )
    except ImportError:  # pragma: no cover - tqdm is a dependency

        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()


def contact_sheet(
    records: Sequence[dict],
    root: str | os.PathLike,
    path: str | os.PathLike,
    *,
    per_emotion: int = 4,
    cell: int = 168,
) -> Path:
    """A grid of faces, one column per emotion, each captioned with its label and AUs.

    Images are enlarged with nearest-neighbour sampling, so the sheet shows the pixels the model
    sees. Written atomically as PNG.
    """
    from facial_r1_core.schema import atomic_write
    from PIL import Image, ImageDraw, ImageFont

    by_emotion: dict[str, list[dict]] = {}
    for rec in records:
        label = rec["labels"][0] if rec.get("labels") else "?"
        by_emotion.setdefault(label, []).append(rec)
    columns = [e for e in EMOTIONS if e in by_emotion] + sorted(
        e for e in by_emotion if e not in EMOTIONS
    )
    rows = max((min(per_emotion, len(v)) for v in by_emotion.values()), default=0)
    try:
        font = ImageFont.load_default(size=max(10, cell // 12))
    except TypeError:  # Pillow without FreeType size support
        font = ImageFont.load_default()
    caption = max(14, cell // 5)
    header = max(16, cell // 7)
    sheet = Image.new(
        "RGB", (max(1, len(columns)) * cell, header + rows * (cell + caption)), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for col, emotion in enumerate(columns):
        draw.text((col * cell + 4, 2), emotion.upper(), fill=(0, 0, 0), font=font)
        for row, rec in enumerate(by_emotion[emotion][:per_emotion]):
            with Image.open(Path(root) / rec["dataset"] / rec["image"]) as im:
                img = im.convert("RGB")
            resample = Image.NEAREST if img.width <= cell // 2 else Image.BICUBIC
            img = img.resize((cell - 4, cell - 4), resample)
            x, y = col * cell, header + row * (cell + caption)
            sheet.paste(img, (x + 2, y + 2))
            aus = " ".join(a[2:] for a in rec["AUs"]) or "-"
            draw.text((x + 4, y + cell), f"AU {aus}", fill=(0, 0, 0), font=font)
    path = Path(path)
    with atomic_write(path, "wb", encoding=None) as handle:
        sheet.save(handle, format="PNG")
    return path


# ----------------------------------------------------------------------------- command line


def add_parser(subparsers) -> None:
    from facial_r1_core.cli import deprecated_flag
    from facial_r1_core.stage import add_stage_arguments

    p = subparsers.add_parser(
        "demo-faces",
        help="generate procedural faces whose AUs and emotion are known by construction",
        description=(
            "Generate procedural frontal faces showing Action Units by construction (EMFACS "
            "prototypes of 8 emotions, with nuisance variation, dropped and extra AUs) and write "
            "<root>/<dataset>/{train,test,pool}/*.png with "
            "<root>/<dataset>_{train,test,pool}.jsonl. "
            "Settings come from the profile's demo_faces section; the flags below override it."
        ),
    )
    p.add_argument("--output-dir", default=None, help="dataset root (demo_faces.out_root)")
    deprecated_flag(p, "--out-root", dest="output_dir", new="--output-dir")
    p.add_argument("--train", type=int, default=None, help="train faces (demo_faces.train)")
    p.add_argument("--test", type=int, default=None, help="test faces (demo_faces.test)")
    p.add_argument(
        "--pool",
        type=int,
        default=None,
        help="extra faces for the synthesis stage (demo_faces.pool)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side in pixels, e.g. 56 or 112 (demo_faces.image_size)",
    )
    p.add_argument("--seed", type=int, default=None, help="generator seed (demo_faces.seed)")
    p.add_argument(
        "--workers", type=int, default=None, help="processes for rendering (demo_faces.workers)"
    )
    p.add_argument(
        "--contact-sheet",
        default=None,
        metavar="PATH",
        help="also write a PNG grid of test faces with labels (demo_faces.contact_sheet)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_stage_arguments(p)
    p.set_defaults(func=_handler)


def _handler(args) -> int:
    from facial_r1_core.stage import run_stage

    flags = {
        "out_root": args.output_dir,
        "train": args.train,
        "test": args.test,
        "pool": args.pool,
        "image_size": args.size,
        "seed": args.seed,
        "workers": args.workers,
        "contact_sheet": args.contact_sheet,
    }

    def body(ctx):
        cfg: DemoFacesConfig = ctx.config
        root = ctx.path(cfg.out_root)
        report = generate(cfg, root, progress=not args.no_progress)
        outputs: dict[str, Any] = {
            "root": root,
            "images": report.image_dir,
            **{f"{split}_jsonl": path for split, path in report.jsonl.items()},
        }
        metrics: dict[str, float] = {f"{split}_faces": n for split, n in report.counts.items()}
        metrics["seconds"] = report.seconds
        metrics["faces_per_s"] = report.faces_per_s
        for split, counts in report.emotion_counts.items():
            for emotion, n in counts.items():
                metrics[f"{split}_n_{emotion}"] = n
        for au, n in report.au_counts.items():
            metrics[f"au_count_{au}"] = n
        sheet_path = cfg.contact_sheet
        if sheet_path:
            sheet = contact_sheet(
                report.records.get("test") or report.records.get("train", []),
                root,
                ctx.path(sheet_path),
                per_emotion=cfg.contact_per_emotion,
            )
            outputs["contact_sheet"] = sheet
            ctx.log_artifact(sheet, "demo_faces")
        elif ctx.mlflow_run_id:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                sheet = contact_sheet(
                    report.records.get("test") or report.records["train"],
                    root,
                    Path(tmp) / "contact_sheet.png",
                    per_emotion=cfg.contact_per_emotion,
                )
                ctx.log_artifact(sheet, "demo_faces")
        log.info(
            "wrote %s faces in %.1f s (%.0f faces/s) under %s",
            sum(report.counts.values()),
            report.seconds,
            report.faces_per_s,
            root,
        )
        return outputs, metrics

    return run_stage(
        args,
        stage="data demo-faces",
        section="demo_faces",
        config_cls=DemoFacesConfig,
        body=body,
        flags=flags,
    )
