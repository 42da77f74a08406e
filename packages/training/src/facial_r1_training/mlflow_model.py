"""The registered model: an MLflow pyfunc that wraps the Hugging Face model folder.

Every candidate is logged to the MLflow artifact store as an MLflow model, so a registry URI
such as ``models:/facial-r1@champion`` holds the weights themselves, not a path on the machine
that trained them. Layout of one logged model (``mlflow.pyfunc``, artifact ``hf_model``)::

    MLmodel                 flavor python_function, signature, model_config (prompt, limits)
    facial_r1_model.py      three lines that build a FacialR1Model (MLflow "models from code":
                            no pickle; the class is imported from facial-r1-training)
    artifacts/<folder>/     the Hugging Face folder exactly as training saved it (artifact
                            ``hf_model``; for a stage's final model ``artifacts/model/``):
                            config.json, model.safetensors (or shards), tokenizer, processor
    requirements.txt, python_env.yaml, conda.yaml    the versions it was logged with

``mlflow.pyfunc.load_model(uri).predict(rows)`` takes a DataFrame or a list of records with an
``image`` column (base64 PNG or JPEG, a ``data:image/...;base64,`` prefix is accepted) and
returns one dict per row: ``emotion`` (None unless the answer names exactly one), ``aus``,
``reasoning``, ``format_valid`` and the raw ``completion``, parsed with the one parser
(:func:`facial_r1_core.parser.parse_completion`) and generated with our generation backend.
A row whose image is missing, not base64, not an image, or too large (``max_image_bytes``
decoded bytes, ``max_image_pixels`` pixels, checked from the header before decoding) raises
``MlflowException`` with ``INVALID_PARAMETER_VALUE``: MLflow's scoring server answers 400 with
a JSON error naming the row and the reason. Concurrent calls (the scoring server runs each
request in a thread) are combined into shared generation batches.

The folder alone is what ``facial-r1 analyze`` and the vLLM server load: both take the folder
holding ``config.json`` inside the downloaded model.

>>> decode_image("bm90IGFuIGltYWdl", max_bytes=100, max_pixels=100)
Traceback (most recent call last):
...
facial_r1_training.mlflow_model.ImageInputError: not a PNG or JPEG image (cannot identify ...)
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc

log = logging.getLogger("facial_r1.mlflow_model")

HF_ARTIFACT = "hf_model"
IMAGE_COLUMN = "image"
#: Defaults of the logged model's ``model_config`` (override any of them when logging).
DEFAULT_CONFIG: dict[str, Any] = {
    "question": None,  # None: facial_r1_core.prompts.DEFAULT_QUESTION
    "emotions": None,  # None: the 8 emotions (as in training)
    "max_new_tokens": 96,
    "batch_size": 16,
    "max_image_bytes": 8 * 1024 * 1024,
    "max_image_pixels": 4096 * 4096,
    "max_rows": 64,  # rows per request
}
IMAGE_FORMATS = ("PNG", "JPEG")
#: The model's code file (MLflow "models from code": no pickle; the class is imported from
#: the installed facial-r1-training package).
ENTRY_FILE = "facial_r1_model.py"
ENTRY_CODE = """\
import mlflow
from facial_r1_training.mlflow_model import FacialR1Model

mlflow.models.set_model(FacialR1Model())
"""
#: Packages recorded as the model's requirements (pinned to the versions it was logged with).
REQUIREMENTS = ("facial-r1-core", "facial-r1-training", "torch", "transformers", "pillow")


class ImageInputError(ValueError):
    """An image field that cannot be used (the message says why)."""


def decode_image(value: Any, *, max_bytes: int, max_pixels: int):
    """A base64 PNG/JPEG string -> RGB PIL image; ImageInputError names what is wrong."""
    from PIL import Image

    if not isinstance(value, str) or not value.strip():
        raise ImageInputError("the image field must be a non-empty base64 string")
    text = value.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:
        raise ImageInputError(f"image larger than the limit of {max_bytes} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(f"not valid base64 ({exc})") from None
    if len(raw) > max_bytes:
        raise ImageInputError(f"image of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        img = Image.open(io.BytesIO(raw))
    except Exception:
        raise ImageInputError("not a PNG or JPEG image (cannot identify the format)") from None
    if img.format not in IMAGE_FORMATS:
        raise ImageInputError(f"image format {img.format} is not accepted (PNG or JPEG)")
    width, height = img.size
    if width * height > max_pixels:
        raise ImageInputError(
            f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels"
        )
    try:
        img.load()
        return img.convert("RGB")
    except Exception as exc:
        raise ImageInputError(f"image data is corrupt ({type(exc).__name__}: {exc})") from None


def _rows(model_input: Any) -> list[Any]:
    """The request rows as a list of mappings (DataFrame, list of records, or one record)."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, Mapping):
        return [model_input]
    if isinstance(model_input, Sequence) and not isinstance(model_input, str | bytes):
        return list(model_input)
    raise ImageInputError(
        f"expected a DataFrame or a list of records with an '{IMAGE_COLUMN}' column, "
        f"got {type(model_input).__name__}"
    )


class _Combiner:
    """Runs ``generate`` for concurrent callers in shared batches.

    Each caller queues its requests and takes the run lock; the holder generates everything
    queued so far (its own requests and those of callers waiting behind it), so requests that
    arrive while a batch runs go out together in the next one.
    """

    def __init__(self, generate, max_batch: int):
        self.generate = generate
        self.max_batch = max(1, int(max_batch))
        self._queue: list[dict[str, Any]] = []
        self._queue_lock = threading.Lock()
        self._run_lock = threading.Lock()

    def __call__(self, requests: list[Any]) -> list[str]:
        job: dict[str, Any] = {"requests": requests, "done": False}
        with self._queue_lock:
            self._queue.append(job)
        while True:
            with self._run_lock:
                if job["done"]:
                    break
                with self._queue_lock:
                    batch, total = [], 0
                    while self._queue and (
                        not batch or total + len(self._queue[0]["requests"]) <= self.max_batch
                    ):
                        batch.append(self._queue.pop(0))
                        total += len(batch[-1]["requests"])
                try:
                    texts = self.generate([r for j in batch for r in j["requests"]])
                except BaseException as exc:
                    for j in batch:
                        j.update(done=True, error=exc)
                else:
                    start = 0
                    for j in batch:
                        n = len(j["requests"])
                        j.update(done=True, texts=texts[start : start + n])
                        start += n
        if "error" in job:
            raise job["error"]
        return job["texts"]


class FacialR1Model(mlflow.pyfunc.PythonModel):
    """Face images in, reasoning + AUs + emotion out (see the module docstring)."""

    def load_context(self, context) -> None:
        from facial_r1_core.prompts import DEFAULT_QUESTION, sft_prompt

        from .generation import create_backend
        from .stage import set_torch_threads
        from .synthesis import prompt_emotions

        self.config = {**DEFAULT_CONFIG, **dict(context.model_config or {})}
        set_torch_threads(int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None)
        started = time.monotonic()
        self.backend = create_backend(
            "transformers",
            context.artifacts[HF_ARTIFACT],
            batch_size=int(self.config["batch_size"]),
            max_new_tokens=int(self.config["max_new_tokens"]),
            seed=0,
        )
        log.info("facial-r1 model loaded in %.1f s", time.monotonic() - started)
        self.prompt = sft_prompt(
            self.config["question"] or DEFAULT_QUESTION, prompt_emotions(self.config["emotions"])
        )
        self._combined = _Combiner(self.backend.generate, int(self.config["batch_size"]))

    def predict(self, context, model_input, params=None):
        # Untyped on purpose (MLflow warns about it once): a typed predict makes the scoring
        # server expect {"inputs": ...} instead of the DataFrame formats; the explicit signature
        # logged with the model documents the columns.
        from mlflow.exceptions import MlflowException

        from .analyze import describe_completion
        from .generation import GenerationRequest

        try:
            rows = _rows(model_input)
            if len(rows) > int(self.config["max_rows"]):
                raise ImageInputError(
                    f"{len(rows)} rows in one request; the limit is {self.config['max_rows']}"
                )
            images = []
            for i, row in enumerate(rows):
                if not isinstance(row, Mapping) or IMAGE_COLUMN not in row:
                    raise ImageInputError(f"row {i}: no '{IMAGE_COLUMN}' field")
                try:
                    images.append(
                        decode_image(
                            row[IMAGE_COLUMN],
                            max_bytes=int(self.config["max_image_bytes"]),
                            max_pixels=int(self.config["max_image_pixels"]),
                        )
                    )
                except ImageInputError as exc:
                    raise ImageInputError(f"row {i}: {exc}") from None
        except ImageInputError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        requests = [GenerationRequest(prompt=self.prompt, image=img) for img in images]
        texts = self._combined(requests) if requests else []
        return [describe_completion(text) for text in texts]


def signature():
    """Input: one string column ``image``; output: the fields of :func:`describe_completion`."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema(
            [
                ColSpec("string", "emotion", required=False),
                ColSpec(Array("string"), "aus"),
                ColSpec("string", "reasoning"),
                ColSpec("boolean", "format_valid"),
                ColSpec("string", "completion"),
            ]
        ),
    )


def requirements() -> list[str]:
    """Our packages and the inference stack, pinned to the installed versions."""
    out = []
    for name in REQUIREMENTS:
        try:
            version = metadata.version(name).split("+", 1)[0]
        except metadata.PackageNotFoundError:
            continue
        out.append(f"{name}=={version}")
    return out


def check_self_contained(model_dir: Path) -> None:
    """Refuse a folder that only works on this machine (a LoRA adapter over a local base)."""
    if (
        not (model_dir / "config.json").is_file()
        and not (model_dir / "adapter_config.json").is_file()
    ):
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json)")
    adapter = model_dir / "adapter_config.json"
    if adapter.is_file():
        import json

        base = json.loads(adapter.read_text()).get("base_model_name_or_path") or ""
        if base.startswith((".", "/", "~")) or Path(base).exists():
            raise ValueError(
                f"{model_dir} is a LoRA adapter over the local folder {base}: merge it first "
                "(model.merge_lora: true, or `facial-r1 model merge-lora`) so the logged model "
                "holds every weight"
            )


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def log_model(
    model_dir: str | os.PathLike,
    *,
    name: str = "model",
    model_config: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
):
    """Log ``model_dir`` as a pyfunc model to the active run; returns MLflow's ModelInfo.

    ``model_info.model_uri`` (``models:/<model_id>``) is what registration uses as the source.
    """
    model_dir = Path(model_dir)
    check_self_contained(model_dir)
    config = {**DEFAULT_CONFIG, **dict(model_config or {})}
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(
            f"unknown model_config key(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_CONFIG)}"
        )
    with tempfile.TemporaryDirectory(prefix="facial-r1-pyfunc-") as tmp:
        code = Path(tmp) / ENTRY_FILE
        code.write_text(ENTRY_CODE, encoding="utf-8")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code),
            artifacts={HF_ARTIFACT: str(model_dir)},
            model_config=config,
            signature=signature(),
            pip_requirements=requirements(),
            tags={k: str(v) for k, v in (tags or {}).items()} or None,
        )


def model_config_from_profile(profile: Mapping[str, Any]) -> dict[str, Any]:
    """The serving settings a profile implies: the evaluation's prompt and token budget."""
    section = profile.get("evaluate") or {}
    config: dict[str, Any] = {}
    if section.get("emotions"):
        config["emotions"] = list(section["emotions"])
    if section.get("max_new_tokens"):
        config["max_new_tokens"] = int(section["max_new_tokens"])
    serving = profile.get("serving") or {}
    config.update({k: v for k, v in serving.items() if k in DEFAULT_CONFIG})
    return config


def log_candidate(ctx, model_dir: str | os.PathLike) -> dict[str, Any]:
    """Log a stage's final model into the stage's run; returns outputs + metrics to report."""
    model_dir = Path(model_dir)
    started = time.monotonic()
    info = log_model(
        model_dir,
        model_config=model_config_from_profile(ctx.profile),
        tags={"stage": ctx.stage, "config_hash": ctx.config_hash},
    )
    seconds = time.monotonic() - started
    size = folder_size(model_dir)
    log.info("logged %s (%.1f MB) as %s in %.1f s", model_dir, size / 1e6, info.model_uri, seconds)
    return {
        "outputs": {"logged_model": info.model_uri, "logged_model_id": info.model_id},
        "metrics": {"logged_model_mb": round(size / 1e6, 3), "log_model_s": round(seconds, 3)},
    }
