"""GRPO's vLLM modes: the profile keys map onto TRL's GRPOConfig in one place
(:func:`facial_r1_training.grpo.vllm_arguments`), and the config builds in the CPU trl, which is
the same trl release as the GPU image's lock (no vLLM here: the config object only)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import trl
from facial_r1_core.config import ConfigError, from_section, load_profile
from facial_r1_training.configs import GRPOStageConfig
from facial_r1_training.grpo import vllm_arguments
from trl import GRPOConfig

REPO = Path(__file__).resolve().parents[1]


def _grpo(path: str, *overrides: str) -> GRPOStageConfig:
    profile = load_profile(REPO / path, list(overrides))
    return from_section(GRPOStageConfig, profile["grpo"], name="grpo")


def _build(args: dict, tmp_path) -> GRPOConfig:
    return GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=8,
        num_generations=8,
        report_to="none",
        **args,
    )


def test_the_gpu_lock_has_the_trl_these_checks_run_on():
    lock = (REPO / "requirements/gpu.lock").read_text(encoding="utf-8")
    (pinned,) = re.findall(r"^trl==(\S+)$", lock, flags=re.M)
    assert pinned == trl.__version__


def test_server_mode_maps_to_grpoconfig(tmp_path):
    cfg = _grpo(
        "configs/qwen2.5-vl-7b-vllm-server.yaml",
        "grpo.vllm_server_host=facial-r1-grpo-0123abcd-vllm.facial-r1.svc",
    )
    args = vllm_arguments(cfg)
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(args) <= names  # every key is a GRPOConfig field of this trl
    built = _build(args, tmp_path)
    assert built.use_vllm is True and built.vllm_mode == "server"
    assert built.vllm_server_host == "facial-r1-grpo-0123abcd-vllm.facial-r1.svc"
    assert built.vllm_server_port == 8000 and built.vllm_server_timeout == 900.0
    assert built.vllm_group_port == 51216
    assert built.vllm_server_base_url is None  # host + port are used
    # the server's size and memory share are its own flags, not the trainer's
    assert "vllm_gpu_memory_utilization" not in args and "vllm_tensor_parallel_size" not in args


def test_colocate_and_off_map_to_grpoconfig(tmp_path):
    cfg = _grpo("configs/qwen2.5-vl-7b.yaml")
    args = vllm_arguments(cfg)
    assert args == {
        "use_vllm": True,
        "vllm_mode": "colocate",
        "vllm_gpu_memory_utilization": 0.3,
        "vllm_tensor_parallel_size": 1,
        "vllm_enable_sleep_mode": True,
    }
    built = _build(args, tmp_path)
    assert built.vllm_mode == "colocate" and built.vllm_gpu_memory_utilization == 0.3
    off = vllm_arguments(_grpo("configs/tiny-cpu.yaml"))
    assert off == {"use_vllm": False} and _build(off, tmp_path).use_vllm is False


def test_server_mode_settings_are_checked():
    with pytest.raises(ValueError, match="vllm_server_host"):
        vllm_arguments(_grpo("configs/qwen2.5-vl-7b-vllm-server.yaml"))
    for override, message in [
        ("grpo.vllm_server_port=0", "must be >= 1"),
        ("grpo.vllm_server_timeout=0", "must be > 0"),
        ("grpo.vllm_group_port=80", "must be >= 1024"),
        ("grpo.vllm_mode=remote", "colocate or server"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _grpo("configs/qwen2.5-vl-7b-vllm-server.yaml", override)
