"""Image checks and placement shared by convert, clean, validate and upscale.

Every write is atomic (temporary file beside the target, then rename).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

# No symlink mode: a symlink out of the dataset folder is an unsafe path for every reader.
PLACE_MODES = ("link", "copy", "none")
VERIFY_MODES = ("decode", "header", "none")


class ImageProblemError(Exception):
    """A missing or undecodable image; ``reason`` is a quarantine code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def check_image(path: Path, verify: str = "decode") -> None:
    """Raise :class:`ImageProblemError` if ``path`` is missing or (per ``verify``) won't decode."""
    if not path.is_file():
        raise ImageProblemError("missing_image", f"image not found: {path}")
    if verify == "none":
        return
    from PIL import Image

    try:
        with Image.open(path) as img:
            if verify == "header":
                img.verify()
            else:
                img.load()
    except Exception as exc:  # PIL raises many types for bad bytes
        raise ImageProblemError("corrupt_image", f"image does not decode: {path}: {exc}") from None


def image_hook(verify: str = "decode"):
    """:func:`check_image` as the image hook of core's reader: None or ``(reason, detail)``."""

    def hook(path: Path) -> tuple[str, str] | None:
        try:
            check_image(path, verify)
        except ImageProblemError as problem:
            return problem.reason, problem.detail
        return None

    return hook


def _tmp_beside(dest: Path) -> Path:
    """A free temporary name beside ``dest`` that names this process (core's convention), so
    that a later run can remove it if this one is killed."""
    from facial_r1_core.schema import temp_path_for

    dest.parent.mkdir(parents=True, exist_ok=True)
    return temp_path_for(dest)


def place_file(src: Path, dest: Path, mode: str = "link") -> None:
    """Put ``src`` at ``dest`` by hard link (falls back to copy), copy or symlink."""
    if mode == "none":
        return
    src = Path(src)
    dest = Path(dest)
    if dest.exists() and src.exists():
        with contextlib.suppress(OSError):
            if os.path.samefile(src, dest):
                return
    tmp = _tmp_beside(dest)
    try:
        if mode == "symlink":
            os.symlink(src.resolve(), tmp)
        elif mode == "link":
            try:
                os.link(src, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copyfile(src, tmp)
        else:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_image(img, dest: Path) -> None:
    """Atomically save a PIL image; the format follows ``dest``'s suffix (JPEG at quality 95)."""
    dest = Path(dest)
    tmp = _tmp_beside(dest)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}.get(
        dest.suffix.lower(), "PNG"
    )
    try:
        if fmt == "JPEG":
            if img.mode not in ("RGB", "L"):
                img = img.convert("RGB")
            img.save(tmp, fmt, quality=95)
        else:
            img.save(tmp, fmt)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def crop_box(img, box: tuple[int, int, int, int]):
    """Crop ``(x, y, w, h)`` clamped to the image; :class:`ImageProblemError` if nothing is left."""
    x, y, w, h = box
    if w <= 0 or h <= 0:
        raise ImageProblemError("bad_face_box", f"face box {box} has no area")
    left, top = max(0, x), max(0, y)
    right, bottom = min(img.width, x + w), min(img.height, y + h)
    if right <= left or bottom <= top:
        raise ImageProblemError(
            "bad_face_box", f"face box {box} lies outside the {img.width}x{img.height} image"
        )
    return img.crop((left, top, right, bottom))
