"""Facial-R1 training: models, SFT, GRPO, generation, synthesis, filtering, evaluation."""
