"""``facial-r1 analyze IMAGE...``: the everyday command, reasoning + AUs + emotion per image.

The model is a folder, a hub id (GPU machines) or a registry URI such as
``models:/facial-r1@champion``, resolved through MLflow (the profile's tracking store) and cached
under ``runs/model-cache``. Without ``--model`` it uses ``$FACIAL_R1_MODEL`` or the champion of
the profile's registered model.

Output: one block per image, or ``--json`` for one JSON object per line.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def find_model_dir(root: Path) -> Path | None:
    """The folder under ``root`` holding ``config.json`` (a downloaded registry artifact)."""
    if (root / "config.json").is_file():
        return root
    for candidate in sorted(root.rglob("config.json"), key=lambda p: len(p.parts)):
        return candidate.parent
    return None


def resolve_model(
    value: str,
    profile: dict[str, Any] | None = None,
    *,
    resolve: Callable[[str], Path] = Path,
    cache_root: Path | None = None,
) -> str:
    """A loadable model location for a folder, hub id or ``models:/`` / ``runs:/`` URI."""
    if value.startswith(("models:/", "runs:/")):
        import mlflow
        from facial_r1_core.tracking import existing_tracking_uri, project_home

        uri = existing_tracking_uri(profile or {})  # never creates an empty store
        mlflow.set_tracking_uri(uri)
        key = hashlib.sha256(value.encode()).hexdigest()[:12]
        cache = (cache_root or project_home() / "runs" / "model-cache") / key
        cache.mkdir(parents=True, exist_ok=True)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=value, dst_path=cache))
        except Exception as exc:
            raise FileNotFoundError(
                f"cannot resolve {value} through the MLflow store {uri}: {exc}"
            ) from exc
        folder = find_model_dir(local)
        if folder is None:
            raise FileNotFoundError(f"{value} holds no model folder (no config.json) in {local}")
        return str(folder)
    local = resolve(value)
    if local.exists():
        return str(local)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in value:
        raise FileNotFoundError(f"model folder not found: {local}")
    return value  # a hub id


def analyze_images(
    images: list[str],
    backend,
    *,
    emotions: list[str],
    question: str,
) -> list[dict[str, Any]]:
    """One result dict per image path; unreadable images give an ``error`` entry."""
    from facial_r1_core.prompts import sft_prompt

    from .generation import GenerationRequest, load_image

    results: list[dict[str, Any]] = [{"image": path} for path in images]
    requests, owners = [], []
    for i, path in enumerate(images):
        try:
            img = load_image(path)
        except FileNotFoundError:
            results[i]["error"] = f"image missing: {path}"
            continue
        except Exception as exc:
            results[i]["error"] = f"image undecodable: {path}: {exc}"
            continue
        requests.append(GenerationRequest(prompt=sft_prompt(question, emotions), image=img))
        owners.append(i)
    completions = backend.generate(requests) if requests else []
    for i, text in zip(owners, completions, strict=True):
        results[i].update(describe_completion(text))
    return results


def describe_completion(text: str) -> dict[str, Any]:
    """What a completion says, by core's parser: reasoning, AUs, emotion, format, raw text.

    >>> d = describe_completion("<think>Smile (AU12).</think><answer>happy</answer>")
    >>> d["emotion"], d["aus"], d["reasoning"], d["format_valid"]
    ('happiness', ['AU12'], 'Smile (AU12).', True)
    """
    from facial_r1_core.parser import parse_completion

    parsed = parse_completion(text)
    return {
        "reasoning": parsed.think if parsed.think is not None else text.strip(),
        "aus": list(parsed.aus),
        "emotion": parsed.emotions[0] if len(parsed.emotions) == 1 else None,
        "format_valid": parsed.format_valid,
        "completion": text,
    }


def format_result(result: dict[str, Any]) -> str:
    """Human-readable block for one image.

    >>> print(format_result({"image": "a.png", "reasoning": "Smile (AU12).", "aus": ["AU12"],
    ...                      "emotion": "happiness", "format_valid": True}))
    a.png
      emotion:   happiness
      AUs:       AU12
      reasoning: Smile (AU12).
    """
    if "error" in result:
        return f"{result['image']}\n  error: {result['error']}"
    lines = [
        result["image"],
        f"  emotion:   {result['emotion'] or '(no single emotion in the answer)'}",
        f"  AUs:       {' '.join(result['aus']) or '(none named)'}",
        f"  reasoning: {result['reasoning']}",
    ]
    if not result.get("format_valid"):
        lines.append("  note:      the completion breaks the <think>/<answer> format")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="print the reasoning, AUs and emotion for face images",
        description=(
            "Analyze face images with a trained Facial-R1 model: prints the reasoning, the "
            "Action Units it names and the emotion. Example: facial-r1 analyze face.jpg "
            "--model models:/facial-r1@champion"
        ),
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument(
        "--model",
        default=None,
        help="model folder, hub id, or registry URI models:/NAME@ALIAS "
        "(default: $FACIAL_R1_MODEL, else models:/<mlflow.registered_model>@champion)",
    )
    parser.add_argument("--config", default=None, help="profile YAML (tracking store, emotions)")
    parser.add_argument("--question", default=None, help="question text (default: the standard)")
    parser.add_argument(
        "--emotions",
        default=None,
        help="comma-separated emotions allowed in the answer (default: all 8)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backend", default="transformers", choices=("transformers", "vllm"))
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.set_defaults(func=main)


def main(args) -> int:
    from facial_r1_core.config import ConfigError, load_profile
    from facial_r1_core.prompts import DEFAULT_QUESTION
    from facial_r1_core.stage import config_path
    from facial_r1_core.tracking import registered_model_name

    from .generation import create_backend
    from .stage import set_torch_threads
    from .synthesis import prompt_emotions

    try:
        path = config_path(args.config)
        profile = load_profile(path) if args.config or Path(path).is_file() else {}
    except ConfigError as exc:
        print(f"facial-r1 analyze: configuration error: {exc}", file=sys.stderr)
        return 2
    set_torch_threads((profile.get("run") or {}).get("torch_threads"))
    section = profile.get("evaluate") or {}
    model = (
        args.model
        or os.environ.get("FACIAL_R1_MODEL")
        or f"models:/{registered_model_name(profile)}@champion"
    )
    emotions = prompt_emotions(
        [e.strip() for e in args.emotions.split(",") if e.strip()]
        if args.emotions
        else section.get("emotions")
    )
    try:
        from .stage import StageContext

        home_path = StageContext(
            stage="analyze", section="", profile=profile, config=None, config_hash=""
        ).path
        path = resolve_model(model, profile, resolve=home_path)
        backend = create_backend(
            args.backend,
            path,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens or int(section.get("max_new_tokens", 96)),
            seed=0,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"facial-r1 analyze: {exc}", file=sys.stderr)
        return 1
    results = analyze_images(
        list(args.images), backend, emotions=emotions, question=args.question or DEFAULT_QUESTION
    )
    for result in results:
        if args.json:
            print(json.dumps({k: v for k, v in result.items() if k != "completion"}))
        else:
            print(format_result(result))
            print()
    return 1 if any("error" in r for r in results) else 0
