"""The training code works on both transformers of requirements/README.md (CPU lock, GPU lock)."""

from __future__ import annotations

import dataclasses

import transformers
from facial_r1_training.trainer_common import checkpointing_keyword


def test_checkpointing_keyword_is_a_training_argument_here():
    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    key = checkpointing_keyword()
    assert key in names
    args = transformers.TrainingArguments(output_dir="unused", use_cpu=True, **{key: True})
    assert getattr(args, key) is True


def test_checkpointing_keyword_falls_back_to_the_older_name():
    @dataclasses.dataclass
    class OlderTrainingArguments:  # transformers 5.20 (the GPU lock) has only the older name
        output_dir: str = ""
        gradient_checkpointing: bool = False

    assert checkpointing_keyword(OlderTrainingArguments) == "gradient_checkpointing"
