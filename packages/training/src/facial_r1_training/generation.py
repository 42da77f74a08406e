"""Generation backends shared by synthesis, evaluation and ``facial-r1 analyze``.

A backend turns a list of :class:`GenerationRequest` (one image, one user prompt, one sampling
temperature) into one completion string per request, in order. Three implementations:

- :class:`TransformersBackend`: ``model.generate`` on CPU or GPU, left padding, micro-batches of
  ``batch_size``, per-row temperatures (rows of one batch may sit at different retry
  temperatures; temperature 0 means greedy), finished rows leaving the batch between segments;
- :class:`VLLMBackend`: vLLM's offline batch API (GPU); ``vllm`` is imported only when the
  backend is built and a missing install is a clear error;
- :class:`ScriptedBackend`: returns completions from a function of the request. It implements
  the same protocol as the real backends, so the synthesis retry logic can be tested
  deterministically and benchmarked without a model.

The chat layout is the one used for training: one user turn holding the image then the prompt
text; the assistant turn is generated.

>>> backend = ScriptedBackend(lambda req, i: f"<think>{req.prompt}</think><answer>fear</answer>")
>>> backend.generate([GenerationRequest(prompt="x"), GenerationRequest(prompt="y")])
['<think>x</think><answer>fear</answer>', '<think>y</think><answer>fear</answer>']
>>> backend.calls, backend.requests_seen
(1, 2)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

BACKENDS = ("transformers", "vllm")


@dataclass
class GenerationRequest:
    """One prompt to complete: the user text, the image (PIL) and the sampling temperature."""

    prompt: str
    image: Any = None
    temperature: float = 0.0
    key: Any = None  # caller's bookkeeping (e.g. the sample index); backends ignore it


@runtime_checkable
class GenerationBackend(Protocol):
    """What synthesis, evaluation and analyze need from a generator."""

    name: str
    batch_size: int

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """One completion per request, in order."""
        ...


def user_messages(prompt: str, with_image: bool = True) -> list[dict[str, Any]]:
    """The conversational user turn used for training: the image first, then the prompt text.

    >>> [c["type"] for c in user_messages("hi")[0]["content"]]
    ['image', 'text']
    """
    from .models import chat_messages

    return chat_messages(prompt, image=with_image)


def chat_text(processor: Any, prompt: str, with_image: bool = True) -> str:
    """The prompt rendered by the processor's chat template, ending with the assistant header."""
    return processor.apply_chat_template(
        user_messages(prompt, with_image), tokenize=False, add_generation_prompt=True
    )


# --------------------------------------------------------------------------------------------
# scripted backend (tests, benchmarks of the scheduling logic)


class ScriptedBackend:
    """A backend whose completions come from ``script(request, index) -> str``.

    ``index`` counts the requests seen so far (0-based), so scripts can vary across retries.
    ``delay_s`` (per call) and ``per_request_s`` simulate the cost of a batched forward pass.
    """

    name = "scripted"

    def __init__(
        self,
        script: Callable[[GenerationRequest, int], str],
        *,
        batch_size: int = 8,
        delay_s: float = 0.0,
        per_request_s: float = 0.0,
    ):
        self.script = script
        self.batch_size = batch_size
        self.delay_s = delay_s
        self.per_request_s = per_request_s
        self.calls = 0
        self.requests_seen = 0
        self.batch_sizes: list[int] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        import time

        out = []
        for req in requests:
            out.append(self.script(req, self.requests_seen))
            self.requests_seen += 1
        self.calls += 1
        self.batch_sizes.append(len(requests))
        if self.delay_s or self.per_request_s:
            time.sleep(self.delay_s + self.per_request_s * len(requests))
        return out


# --------------------------------------------------------------------------------------------
# transformers


class _RowSampler:
    """Logits processor that samples each row at its own temperature (Gumbel-max) and leaves
    only the chosen token; greedy decoding then takes it. Rows at temperature 0 stay greedy.

    Gumbel-max draws exactly from ``softmax(scores / T)`` and avoids ``torch.multinomial``,
    which dominated the sampled batches' step time on CPU.
    """

    def __init__(self, temperatures, top_k: int = 0):
        self.temperatures = temperatures.view(-1, 1)
        self.greedy = temperatures.view(-1) <= 0
        self.top_k = int(top_k)

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float()
        if self.top_k > 0 and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        noise = torch.rand_like(scores).clamp_(min=1e-12)
        sampled = scores / self.temperatures.clamp(min=1e-6) - torch.log(-torch.log(noise))
        choice = torch.where(self.greedy, scores.argmax(-1), sampled.argmax(-1))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice.unsqueeze(1), 0.0)


class TransformersBackend:
    """Batched ``model.generate`` with left padding and per-row temperature sampling."""

    name = "transformers"

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        batch_size: int = 16,
        max_new_tokens: int = 96,
        top_k: int = 0,
        seed: int | None = None,
        show_progress: bool = False,
        segment_tokens: int = 32,
    ):
        import torch

        self.segment_tokens = max(0, int(segment_tokens))
        self.model = model
        self.processor = processor
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens)
        self.top_k = int(top_k)
        self.show_progress = show_progress
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = {self.tokenizer.eos_token_id}
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            eos.add(im_end)
        self.eos_token_ids = sorted(e for e in eos if e is not None)
        self.generator_seed = seed
        if seed is not None:
            torch.manual_seed(seed)
        self.model.eval()
        self.tokens_generated = 0

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _encode(self, requests: Sequence[GenerationRequest]):
        texts = [chat_text(self.processor, r.prompt, r.image is not None) for r in requests]
        images = [r.image for r in requests if r.image is not None]
        if images and len(images) != len(requests):
            raise ValueError("a batch must be all with images or all without")
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        return self.processor(**kwargs).to(self.device)

    def _gen_kwargs(self, temps: list[float], max_new_tokens: int) -> dict[str, Any]:
        import torch
        from transformers import LogitsProcessorList

        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,  # sampling, when asked, happens in _RowSampler
            "temperature": None,
            "top_k": None,
            "top_p": None,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.eos_token_ids,
            "return_dict_in_generate": True,
        }
        if any(t > 0 for t in temps):
            row_t = torch.tensor(temps, dtype=torch.float32, device=self.device)
            kwargs["logits_processor"] = LogitsProcessorList([_RowSampler(row_t, self.top_k)])
        return kwargs

    def _rope_holder(self):
        """The module caching Qwen2-VL's per-row ``rope_deltas`` (None for other models)."""
        if not hasattr(self, "_rope_module"):
            self._rope_module = next(
                (m for m in self.model.modules() if hasattr(m, "rope_deltas")), None
            )
        return self._rope_module

    def _generate_batch(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Generate in segments of ``segment_tokens``; finished rows leave the batch between
        segments (their KV cache rows are dropped), so short completions do not pay for the
        longest one. Greedy outputs are identical to a single ``generate`` call."""
        import torch

        inputs = self._encode(requests)
        temps = [max(0.0, float(r.temperature)) for r in requests]
        n_rows = len(requests)
        pieces: list[list[Any]] = [[] for _ in range(n_rows)]
        rows = list(range(n_rows))
        eos = torch.tensor(self.eos_token_ids, device=self.device)
        remaining = self.max_new_tokens
        ids = inputs["input_ids"]
        mask = inputs["attention_mask"]
        cache = None
        holder = self._rope_holder()
        with torch.inference_mode():
            while remaining > 0 and rows:
                step = min(self.segment_tokens or remaining, remaining)
                kwargs = self._gen_kwargs([temps[r] for r in rows], step)
                if cache is None:
                    out = self.model.generate(**inputs, **kwargs)
                else:
                    out = self.model.generate(
                        input_ids=ids, attention_mask=mask, past_key_values=cache, **kwargs
                    )
                new = out.sequences[:, ids.shape[1] :]
                for j, row in enumerate(rows):
                    pieces[row].append(new[j])
                remaining -= step
                finished = torch.isin(new, eos).any(dim=1)
                if remaining <= 0 or bool(finished.all()) or new.shape[1] < step:
                    break
                keep = (~finished).nonzero().squeeze(1)
                cache = out.past_key_values
                if len(keep) < len(rows):
                    cache.batch_select_indices(keep)
                    if holder is not None and holder.rope_deltas is not None:
                        holder.rope_deltas = holder.rope_deltas[keep]
                ones = torch.ones(mask.shape[0], new.shape[1], dtype=mask.dtype, device=mask.device)
                mask = torch.cat([mask, ones], dim=1)[keep]
                ids = out.sequences[keep]
                rows = [rows[int(k)] for k in keep]
        texts = []
        for parts in pieces:
            tokens = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
            real = ~torch.isin(tokens, eos) & (tokens != self.tokenizer.pad_token_id)
            self.tokens_generated += int(real.sum())
            texts.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
        return texts

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        chunks = [
            requests[i : i + self.batch_size] for i in range(0, len(requests), self.batch_size)
        ]
        if self.show_progress and len(chunks) > 1:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc="generate", unit="batch")
        out: list[str] = []
        for chunk in chunks:
            with_img = [r for r in chunk if r.image is not None]
            if with_img and len(with_img) != len(chunk):  # mixed: keep order, two passes
                texts = {}
                for group in (with_img, [r for r in chunk if r.image is None]):
                    for r, t in zip(group, self._generate_batch(group), strict=True):
                        texts[id(r)] = t
                out.extend(texts[id(r)] for r in chunk)
            else:
                out.extend(self._generate_batch(chunk))
        return out


# --------------------------------------------------------------------------------------------
# vLLM


@dataclass
class VLLMOptions:
    """Options passed to ``vllm.LLM`` (GPU profile)."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 8192
    dtype: str = "bfloat16"
    enforce_eager: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class VLLMBackend:
    """vLLM offline batch generation; one ``LLM.generate`` call per micro-batch."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        batch_size: int = 256,
        max_new_tokens: int = 2048,
        top_k: int = 0,
        seed: int | None = None,
        options: VLLMOptions | None = None,
    ):
        try:
            import vllm
        except ImportError as exc:
            raise RuntimeError(
                "backend 'vllm' needs the vllm package (GPU only): install it with "
                "`pip install -e 'packages/training[vllm]'` on a CUDA machine, or use "
                "backend: transformers"
            ) from exc
        from .models import load_processor

        opts = options or VLLMOptions()
        self._vllm = vllm
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens)
        self.top_k = int(top_k)
        self.seed = seed
        self.processor = load_processor(model_path)
        self.llm = vllm.LLM(
            model=str(model_path),
            tensor_parallel_size=opts.tensor_parallel_size,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            max_model_len=opts.max_model_len,
            dtype=opts.dtype,
            enforce_eager=opts.enforce_eager,
            seed=seed if seed is not None else 0,
            limit_mm_per_prompt={"image": 1},
            **opts.extra,
        )

    def _params(self, temperature: float):
        return self._vllm.SamplingParams(
            temperature=max(0.0, float(temperature)),
            top_k=self.top_k if self.top_k > 0 else -1,
            max_tokens=self.max_new_tokens,
            stop=["<|im_end|>"],
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(requests), self.batch_size):
            chunk = requests[i : i + self.batch_size]
            prompts = []
            for r in chunk:
                item: dict[str, Any] = {
                    "prompt": chat_text(self.processor, r.prompt, r.image is not None)
                }
                if r.image is not None:
                    item["multi_modal_data"] = {"image": r.image}
                prompts.append(item)
            results = self.llm.generate(
                prompts, [self._params(r.temperature) for r in chunk], use_tqdm=True
            )
            out.extend(res.outputs[0].text for res in results)
        return out


# --------------------------------------------------------------------------------------------
# factory


def load_image(path: str | os.PathLike):
    """Open an image as RGB, fully decoded; raises OSError/ValueError with the reason."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def create_backend(
    kind: str,
    model_path: str | os.PathLike,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 96,
    top_k: int = 0,
    seed: int | None = None,
    vllm_options: dict[str, Any] | None = None,
    show_progress: bool = False,
) -> GenerationBackend:
    """Build a backend for a model folder (or hub id on GPU machines)."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown generation backend {kind!r}; choose from {', '.join(BACKENDS)}")
    if kind == "vllm":
        opts = dict(vllm_options or {})
        known = {f for f in VLLMOptions.__dataclass_fields__}
        extra = {k: opts.pop(k) for k in list(opts) if k not in known}
        options = VLLMOptions(**opts)
        options.extra.update(extra)
        return VLLMBackend(
            str(model_path),
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            top_k=top_k,
            seed=seed,
            options=options,
        )
    model, processor = load_for_inference(model_path)
    return TransformersBackend(
        model,
        processor,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        seed=seed,
        show_progress=show_progress,
    )


def load_for_inference(model_path: str | os.PathLike):
    """(model, processor) for generation, via the training package's loader."""
    path = Path(model_path)
    if not path.exists() and "/" not in str(model_path):
        raise FileNotFoundError(f"model folder not found: {model_path}")
    from . import models

    return models.load_model_and_processor(str(model_path))
