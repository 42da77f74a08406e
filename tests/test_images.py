"""docker/: the images install exactly the GPU lock, build nothing with a CUDA compiler, run as
non-root and start from pinned bases. (hadolint runs in `make lint`.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
IMAGES = sorted(p.name for p in DOCKER.glob("*.Dockerfile"))


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def base_images(name: str) -> list[str]:
    ins = instructions(name)
    args = dict(
        a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a
    )  # ARG defaults used in FROM
    bases = []
    for word, rest in ins:
        if word == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            bases.append(image)
    return bases


@pytest.mark.parametrize("name", IMAGES)
def test_pinned_bases_and_non_root(name):
    for image in base_images(name):
        assert re.search(r":[\w.-]+$|@sha256:[0-9a-f]{64}$", image), image
        assert not image.endswith(":latest"), image
    users = [rest for word, rest in instructions(name) if word == "USER"]
    assert users and users[-1].isdigit() and int(users[-1]) != 0, users


def test_trainer_installs_exactly_the_lock():
    runs = " ".join(rest for word, rest in instructions("trainer.Dockerfile") if word == "RUN")
    installs = re.findall(r"pip install ([^&]*)", runs)
    assert any("--no-deps" in i and "gpu.lock" in i and "--only-binary" in i for i in installs)
    sdist = next(i for i in installs if "gpu-sdist.lock" in i)
    assert "--no-deps" in sdist and "DS_BUILD_OPS=0 uv pip install" in runs
    # our packages: never their dependencies (those come from the lock)
    ours = [i for i in installs if "/opt/facial-r1/packages" in i]
    assert ours and all("--no-deps" in i for i in ours)
    # nothing else: no unpinned package names, no flash-attn, no compilers
    assert all("-r " in i or "/opt/facial-r1/packages" in i for i in installs), installs
    assert "flash" not in runs and "nvcc" not in runs and "build-essential" not in runs
    assert "devel" not in base_images("trainer.Dockerfile")[-1]


def test_cuda_base_matches_the_locks_torch_build():
    lock = (REPO / "requirements/gpu.lock").read_text(encoding="utf-8")
    runtime = re.search(r"^nvidia-cuda-runtime==(\d+)\.(\d+)", lock, re.M)
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", base_images("trainer.Dockerfile")[-1])
    assert runtime and cuda and runtime.groups() == cuda.groups()
    assert "ubuntu22.04" in base_images("trainer.Dockerfile")[-1]  # glibc 2.35 = the lock's


def test_inference_image_is_the_trainer_image():
    (base,) = base_images("inference.Dockerfile")
    assert base.startswith("ghcr.io/facial-r1/trainer:")
    runs = " ".join(rest for word, rest in instructions("inference.Dockerfile") if word == "RUN")
    assert "pip install" not in runs  # same environment as the trainer, nothing added
