"""Small real fixtures for tests and smoke runs: coloured-face images and unified JSONL.

These are not mocks: real PNG files and real records in the paper's layout
(``<root>/<Dataset>.jsonl`` beside ``<root>/<Dataset>/``), with completions written from the
ground truth, so the tiny model can be trained on them for a few steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from facial_r1_core.prompts import DEFAULT_QUESTION
from facial_r1_core.schema import Record, write_jsonl
from facial_r1_core.vocab import au_phrase

# emotion -> AUs and a colour cue the tiny model can pick up in a few hundred steps
TOY_CLASSES: dict[str, tuple[tuple[str, ...], tuple[int, int, int]]] = {
    "happiness": (("AU6", "AU12"), (230, 200, 60)),
    "sadness": (("AU1", "AU4", "AU15"), (60, 80, 200)),
    "surprise": (("AU1", "AU2", "AU5", "AU26"), (240, 240, 240)),
    "anger": (("AU4", "AU7", "AU23"), (200, 40, 40)),
}


def toy_completion(aus, emotion: str) -> str:
    """A valid ``<think>..</think><answer>..</answer>`` completion from the ground truth.

    >>> toy_completion(["AU6", "AU12"], "happiness")[:41]
    '<think>The face shows cheek raiser (AU6),'
    """
    if aus:
        features = ", ".join(f"{au_phrase(a)} ({a})" for a in aus)
        think = f"The face shows {features}. Together these Action Units indicate {emotion}."
    else:
        think = f"The face is relaxed and calm, which indicates {emotion}."
    return f"<think>{think}</think>\n<answer>{emotion}</answer>"


def write_toy_dataset(
    root: str | os.PathLike,
    n: int = 16,
    *,
    dataset: str = "Toy",
    size: int = 56,
    with_description: bool = True,
    split: str | None = None,
    seed: int = 0,
) -> Path:
    """Write ``n`` toy faces (PNG) and their JSONL; returns the JSONL path."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    root = Path(root)
    image_dir = root / dataset
    image_dir.mkdir(parents=True, exist_ok=True)
    names = list(TOY_CLASSES)
    rows: list[Record] = []
    for i in range(n):
        emotion = names[i % len(names)]
        aus, colour = TOY_CLASSES[emotion]
        img = Image.new("RGB", (size, size), (30, 30, 30))
        draw = ImageDraw.Draw(img)
        jitter = rng.randint(-3, 3)
        draw.ellipse((8 + jitter, 6, size - 8 + jitter, size - 6), fill=colour)
        name = f"{split or 'all'}_{i:04d}.png"
        img.save(image_dir / name)
        rows.append(
            Record.create(
                dataset=dataset,
                image=name,
                question=DEFAULT_QUESTION,
                AUs=list(aus),
                labels=[emotion],
                description=toy_completion(aus, emotion) if with_description else "",
                meta_info={"toy": True},
            )
        )
    path = root / (f"{dataset}_{split}.jsonl" if split else f"{dataset}.jsonl")
    write_jsonl(path, rows)
    return path


def write_profile(path: str | os.PathLike, sections: dict[str, Any]) -> Path:
    """Write a profile YAML (tests)."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def stage_env(home: str | os.PathLike, **extra: str) -> dict[str, str]:
    """The environment of a stage subprocess: project home, one thread, offline hub."""
    env = {
        **os.environ,
        "FACIAL_R1_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **extra,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def kill_when(
    argv: list[str],
    ready,
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 240.0,
    poll_s: float = 0.01,
) -> bool:
    """Start ``argv`` in its own process group and SIGKILL the group as soon as ``ready()`` is
    true (polled every ``poll_s``). Returns True if it was killed, False if it ended first
    (or the timeout passed: then it is killed too and an error is raised)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout_s
    try:
        while proc.poll() is None:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return True
            if time.time() > deadline:
                raise TimeoutError(f"{argv[:5]} neither ended nor became ready in {timeout_s}s")
            time.sleep(poll_s)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def jsonl_lines(path: str | os.PathLike) -> int:
    """Complete lines in a file (0 when it does not exist yet)."""
    try:
        with open(path, "rb") as handle:
            return handle.read().count(b"\n")
    except FileNotFoundError:
        return 0
