"""``facial-r1 data upscale IN.jsonl --output-dir OUT``: low-resolution images to a target size.

The paper super-resolves FER2013's 48x48 faces to 336x336 (D.2, with a one-step diffusion
upscaler). Default: a high-quality resampler (LANCZOS; ``--method bicubic`` also exists) applied
to every image whose shorter side is below ``--min-side`` (default: ``--size``). A square image
becomes ``size x size``; otherwise the shorter side becomes ``size`` (aspect kept). Other images
are linked unchanged. Images and the JSONL go to a new root (``OUT/<dataset>/<image>``,
``OUT/<IN name>``) so the originals stay untouched; ``meta_info.upscale`` records what was done.

Learned super-resolution hook: ``--method learned --weights MODEL.pt`` runs a TorchScript model
(input ``[1, 3, H, W]`` float in 0-1, output an upscaled image tensor; any factor, the result is
resampled to the exact target). It runs only where its weights file exists; otherwise the command
stops with a clear error and converts nothing. Other upscalers can register through the entry
point group ``facial_r1.upscalers`` (a factory ``f(weights) -> callable(img, size) -> img``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from facial_r1_core.cli import deprecated_flag

from .report import (
    QuarantineWriter,
    Tally,
    eprint,
    record_dict,
    record_json,
    reports_dir,
    summary_line,
    write_report,
)

UpscaleFn = Callable[[Any, tuple[int, int]], Any]


class UpscalerUnavailableError(RuntimeError):
    """The requested upscaler cannot run here (missing weights or library)."""


def target_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Square -> (size, size); otherwise the shorter side becomes ``size``.

    >>> target_size(48, 48, 336), target_size(100, 50, 200)
    ((336, 336), (400, 200))
    """
    if width == height:
        return size, size
    scale = size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resample_upscaler(method: str = "lanczos") -> UpscaleFn:
    from PIL import Image

    filters = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}
    resample = filters[method]

    def run(img, size):
        return img.resize(size, resample=resample)

    run.__name__ = method
    return run


def torchscript_upscaler(weights: str | Path | None) -> UpscaleFn:
    """A learned upscaler from a TorchScript file; :class:`UpscalerUnavailableError` if absent."""
    if not weights:
        raise UpscalerUnavailableError(
            "--method learned needs --weights PATH to a TorchScript super-resolution model "
            "(e.g. an exported one-step diffusion or ESRGAN-style upscaler); none was given. "
            "Use --method lanczos (default) where no weights are available."
        )
    path = Path(weights)
    if not path.is_file():
        raise UpscalerUnavailableError(
            f"learned upscaler weights not found at {path}; nothing was converted. Place the "
            "TorchScript file there, or use --method lanczos (default)."
        )
    try:
        import numpy as np
        import torch
    except ImportError as exc:  # pragma: no cover - the trainer env has torch
        raise UpscalerUnavailableError(f"the learned upscaler needs torch: {exc}") from None
    try:
        model = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise UpscalerUnavailableError(
            f"{path} is not a loadable TorchScript model: {exc}"
        ) from None
    from PIL import Image

    def run(img, size):
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
        with torch.inference_mode():
            result = model(tensor)
        arr = result.squeeze(0).clamp(0, 1).permute(1, 2, 0).mul(255).round().byte().numpy()
        out = Image.fromarray(arr)
        if out.size != tuple(size):
            out = out.resize(size, resample=Image.Resampling.LANCZOS)
        return out.convert(img.mode) if img.mode in ("L", "RGB") else out

    run.__name__ = f"learned:{path.name}"
    return run


def get_upscaler(method: str, weights: str | Path | None = None) -> UpscaleFn:
    if method in ("lanczos", "bicubic"):
        return resample_upscaler(method)
    if method == "learned":
        return torchscript_upscaler(weights)
    from importlib.metadata import entry_points

    for ep in entry_points(group="facial_r1.upscalers"):
        if ep.name == method:
            return ep.load()(weights)
    raise UpscalerUnavailableError(f"unknown upscaler {method!r}: use lanczos, bicubic or learned")


def upscale(
    source: str | Path,
    out_root: str | Path,
    *,
    root: str | Path | None = None,
    size: int = 336,
    min_side: int | None = None,
    method: str = "lanczos",
    weights: str | Path | None = None,
    link: str = "link",
    progress: bool = False,
) -> dict[str, Any]:

    from facial_r1_core.schema import RecordReader, atomic_write, ensure_not_input
    from PIL import Image
    from tqdm import tqdm

    from .images import ImageProblemError, check_image, place_file, save_image

    source, out_root = Path(source), Path(out_root)
    root = Path(root) if root else source.parent
    if out_root.resolve() == root.resolve():
        raise ValueError("upscale: --output-dir must differ from the input root (originals stay)")
    fn = get_upscaler(method, weights)  # fails before anything is written
    min_side = size if min_side is None else min_side
    tally = Tally()
    upscaled = 0
    out_jsonl = out_root / source.name
    q_path = reports_dir(out_root) / f"{source.stem}.upscale.quarantine.jsonl"
    start = time.perf_counter()
    ensure_not_input([out_jsonl, q_path], [source], "upscale")
    reader = RecordReader(root=root)  # core's one reader: same verdicts as every verb
    with atomic_write(out_jsonl) as fout, atomic_write(q_path) as fq:
        qw = QuarantineWriter(fq)
        for res in tqdm(
            reader.read(source),
            desc=f"upscale {source.name}",
            unit="img",
            disable=not progress,
            mininterval=1.0,
        ):
            tally.read_one()
            src = {"file": source.name, "line": res.line}
            if res.error is not None:
                err = res.error
                tally.reject(err.code)
                fld = f"field '{err.field}': " if err.field else ""
                qw.write(err.code, fld + err.reason, src, res.data if res.data else res.raw)
                continue
            rec = res.record
            src_path = rec.image_path(root)
            dest = rec.image_path(out_root)
            try:
                check_image(src_path, "header")
                with Image.open(src_path) as img:
                    w, h = img.size
                    if min(w, h) < min_side:
                        img.load()
                        new_size = target_size(w, h, size)
                        save_image(fn(img, new_size), dest)
                        rec.meta_info["upscale"] = {
                            "from": [w, h],
                            "to": list(new_size),
                            "method": fn.__name__,
                        }
                        upscaled += 1
                    else:
                        place_file(src_path, dest, link)
            except ImageProblemError as problem:
                tally.reject(problem.reason)
                qw.write(problem.reason, problem.detail, src, record_dict(rec))
                continue
            except OSError as exc:
                tally.reject("corrupt_image")
                qw.write("corrupt_image", f"{src_path}: {exc}", src, record_dict(rec))
                continue
            fout.write(record_json(rec) + "\n")
            tally.keep(rec.labels, rec.AUs)
        tally.check()
    report = {
        "command": "upscale",
        "input": str(source),
        "output": str(out_jsonl),
        "quarantine_file": str(q_path),
        "method": fn.__name__,
        "size": size,
        "min_side": min_side,
        **tally.as_dict(),
        "upscaled": upscaled,
        "linked_unchanged": tally.kept - upscaled,
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    r_path = reports_dir(out_root) / f"{source.stem}.upscale.json"
    write_report(r_path, report)
    report["report_file"] = str(r_path)
    return report


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "upscale",
        help="upscale low-resolution images (LANCZOS by default; learned SR hook)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, help="a JSONL of the layout")
    parser.add_argument("--output-dir", type=Path, help="(required) new dataset root")
    deprecated_flag(
        parser, "--out-root", dest="output_dir", new="--output-dir", required=True, type=Path
    )
    parser.add_argument("--root", type=Path, help="input root (default: the input's folder)")
    parser.add_argument("--size", type=int, default=336, help="target size (default 336)")
    parser.add_argument(
        "--min-side",
        type=int,
        default=None,
        help="upscale images whose shorter side is below this (default --size)",
    )
    parser.add_argument(
        "--method",
        default="lanczos",
        help="lanczos (default), bicubic, learned, or a registered upscaler",
    )
    parser.add_argument("--weights", type=Path, help="weights of the learned upscaler")
    parser.add_argument(
        "--images",
        default="link",
        choices=("link", "copy", "symlink"),
        help="how unchanged images enter the new root",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        report = upscale(
            args.input,
            args.output_dir,
            root=args.root,
            size=args.size,
            min_side=args.min_side,
            method=args.method,
            weights=args.weights,
            link=args.images,
            progress=not args.no_progress,
        )
    except UpscalerUnavailableError as exc:
        eprint(f"facial-r1 data upscale: error: {exc}")
        return 2
    except (OSError, ValueError) as exc:
        eprint(f"facial-r1 data upscale: error: {exc}")
        return 2
    print(
        summary_line(f"upscale ({report['method']} -> {report['size']})", report)
        + f"; upscaled {report['upscaled']}"
    )
    print(f"  jsonl:  {report['output']}\n  report: {report['report_file']}")
    return 0
