"""GRPO rollouts with our continuous-batching decoder (``grpo.rollout_engine: continuous``).

TRL's ``GRPOTrainer`` accepts a ``rollout_func(prompts, trainer)`` that returns
``prompt_ids``, ``completion_ids`` and ``logprobs`` for the per-process prompts (each prompt is
already repeated ``num_generations`` times by the trainer's sampler, one completion per entry).
:func:`make_rollout_func` answers it with :class:`facial_r1_training.generation.TransformersBackend`
on the policy being trained: rows leave the batch the step they end and waiting rows join, so a
group of short completions never waits for the longest one, which is what ``model.generate``
does on a padded batch. The prompt token ids are the ones the decoder fed the model (the chat
template with the image placeholder expanded), so the trainer's forward pass sees exactly the
sequence that was sampled. ``logprobs`` is None: the trainer computes the old log-probabilities
itself, as with its own generation.
"""

from __future__ import annotations

from typing import Any


def _image_and_text(messages: list[dict[str, Any]]) -> tuple[Any, str]:
    """The image and the text of the last user turn of a multimodal prompt."""
    content = messages[-1]["content"]
    if isinstance(content, str):
        return None, content
    image = None
    texts = []
    for part in content:
        if part.get("type") == "image":
            image = part.get("image")
        elif part.get("type") == "text":
            texts.append(part.get("text", ""))
    return image, "".join(texts)


def make_rollout_func(
    processor: Any,
    *,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    top_k: int = 0,
):
    """A ``rollout_func`` for TRL's GRPOTrainer sampling with our decoder at ``temperature``."""
    from .generation import GenerationRequest, TransformersBackend

    state: dict[str, Any] = {}

    def rollout(prompts: list, trainer: Any) -> dict[str, Any]:
        import torch

        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        backend = state.get("backend")
        if backend is None or backend.model is not model:
            backend = state["backend"] = TransformersBackend(
                model, processor, batch_size=batch_size, max_new_tokens=max_new_tokens, top_k=top_k
            )
        requests = []
        for messages in prompts:
            image, text = _image_and_text(messages)
            if image is None:
                raise ValueError("grpo.rollout_engine=continuous needs an image in every prompt")
            requests.append(GenerationRequest(prompt=text, image=image, temperature=temperature))
        was_training = model.training
        try:
            with torch.no_grad():
                encoded = backend._encode(requests)
                backend.generate(requests)
        finally:
            model.train(was_training)
        mask = encoded["attention_mask"].bool().cpu()
        ids = encoded["input_ids"].cpu()
        prompt_ids = [row[m].tolist() for row, m in zip(ids, mask, strict=True)]
        completion_ids = backend.last_token_ids
        if len(completion_ids) != len(prompts):
            raise RuntimeError(
                f"rollout returned {len(completion_ids)} completions for {len(prompts)} prompts"
            )
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout
