"""Generation backends shared by synthesis, evaluation and ``facial-r1 analyze``.

A backend turns a list of :class:`GenerationRequest` (one image, one user prompt, one sampling
temperature) into one completion string per request, in order. Three implementations:

- :class:`TransformersBackend`: transformers on CPU or GPU, left padding, micro-batches of
  ``batch_size``, per-row temperatures (rows of one batch may sit at different retry
  temperatures; temperature 0 means greedy), a finished row leaving the batch the step it ends;
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
    #: the row's own random stream (e.g. :func:`sample_seed` of seed, sample id and attempt):
    #: its completion then does not depend on which rows share its batch. None: drawn from the
    #: backend's seeded generator in request order.
    seed: int | None = None


def sample_seed(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (e.g. run seed, sample key, attempt), stable across
    processes and machines.

    >>> sample_seed(0, "3:abc", 1) == sample_seed(0, "3:abc", 1) != sample_seed(0, "3:abc", 2)
    True
    """
    import hashlib

    blob = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


_M1, _M2 = -4658895280553007687, -7723592293110705685  # splitmix64 constants (as int64)
_GOLDEN = -7046029254386353131


def row_uniforms(seeds, steps):
    """One uniform number in [0, 1) per row from its ``seeds`` and decoding ``steps`` (int64
    tensors): a splitmix64-style hash, so a row's draws depend on nothing but its own seed and
    position, never on the batch it decodes in.

    >>> import torch
    >>> u = row_uniforms(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]))
    >>> alone = row_uniforms(torch.tensor([1]), torch.tensor([0]))
    >>> bool(((u >= 0) & (u < 1)).all()), bool(u[0] == alone[0]), len(set(u.tolist()))
    (True, True, 3)
    """
    import torch

    x = seeds.to(torch.int64) + (steps.to(torch.int64) + 1) * _GOLDEN
    x = (x ^ ((x >> 30) & 0x3FFFFFFFF)) * _M1
    x = (x ^ ((x >> 27) & 0x1FFFFFFFFF)) * _M2
    x = x ^ ((x >> 31) & 0x1FFFFFFFF)
    return ((x >> 11) & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)


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


_SENTINEL = "\x00facial-r1-prompt\x00"
_CHAT_FRAMES: dict[tuple[int, Any, bool], tuple[str, ...]] = {}


def chat_text(processor: Any, prompt: str, with_image: bool = True) -> str:
    """The prompt rendered by the processor's chat template, ending with the assistant header.

    The template is rendered once per processor and template around a sentinel, and the prompt
    is spliced in: exact for templates that copy the text verbatim (ours and Qwen's; the
    sentinel must appear once, else every request is rendered), and it saves a Jinja render
    per request.
    """
    key = (id(processor), getattr(processor, "chat_template", None), with_image)
    frame = _CHAT_FRAMES.get(key)
    if frame is None:
        rendered = processor.apply_chat_template(
            user_messages(_SENTINEL, with_image), tokenize=False, add_generation_prompt=True
        )
        parts = rendered.split(_SENTINEL)
        frame = _CHAT_FRAMES[key] = tuple(parts) if len(parts) == 2 else ()
    if frame:
        return frame[0] + prompt + frame[1]
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


def pick_tokens(scores, temperatures, top_k: int = 0, uniforms=None):
    """Next token per row: greedy where the row's temperature is 0, otherwise one draw from
    ``softmax(scores / T)`` (optionally restricted to the ``top_k`` best tokens).

    Sampling inverts the cumulative distribution with one uniform number per row: on CPU this
    is about five times faster than Gumbel-max or ``torch.multinomial``, whose cost is a random
    number per vocabulary entry. ``uniforms`` (one per row, e.g. :func:`row_uniforms`) replaces
    the draws from torch's global generator.

    >>> import torch
    >>> pick_tokens(torch.tensor([[0.1, 3.0, 0.2]]), torch.tensor([0.0])).tolist()
    [1]
    """
    import torch

    scores = scores.float()
    picks = scores.argmax(-1)
    temperatures = temperatures.to(scores.device).view(-1)
    hot = (temperatures > 0).nonzero().squeeze(1)
    if hot.numel() == 0:
        return picks
    sub = scores.index_select(0, hot) / temperatures.index_select(0, hot).unsqueeze(1)
    if 0 < top_k < sub.shape[-1]:
        kth = sub.topk(top_k, dim=-1).values[:, -1:]
        sub = sub.masked_fill(sub < kth, float("-inf"))
    cdf = torch.softmax(sub, dim=-1).cumsum_(dim=-1)
    if uniforms is None:
        u = torch.rand(len(hot), 1, device=scores.device)
    else:
        u = uniforms.to(scores.device).index_select(0, hot).unsqueeze(1).to(cdf.dtype)
    u = u * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=sub.shape[-1] - 1)
    return picks.index_copy_(0, hot, drawn)


class TransformersBackend:
    """Batched decoding with a transformers model: left padding, per-row temperatures, and a
    step-wise loop in which a row leaves the batch (and its KV-cache row is dropped) the step it
    ends, so short completions never pay for the longest one.

    The loop calls the model's forward directly with the positions ``model.generate`` would
    build (3D rotary positions for Qwen2-VL-style models); greedy outputs equal ``generate``'s,
    which the tests check.
    """

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
    ):
        import torch

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
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._position_model = base
        self._vision: dict[int, tuple[Any, Any, Any]] = {}  # id(image) -> (image, pixels, grid)
        self._vision_capacity = 4 * self.batch_size
        self.tokens_generated = 0
        self.row_steps = 0  # decoding work done: sum over steps of the rows still in the batch
        self.prefills = 0  # prompt batches run
        self.joins = 0  # prompt batches that joined a running batch (continuous batching)
        self.last_token_ids: list[list[int]] = []  # the last _decode call's ids (end token kept)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _encode(self, requests: Sequence[GenerationRequest]):
        texts = [chat_text(self.processor, r.prompt, r.image is not None) for r in requests]
        images = [r.image for r in requests if r.image is not None]
        if images and len(images) != len(requests):
            raise ValueError("a batch must be all with images or all without")
        if images and self._image_token is not None:
            return self._encode_with_cached_images(texts, images)
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        return self.processor(**kwargs).to(self.device)

    @property
    def _image_token(self) -> str | None:
        """The image placeholder of Qwen2-VL-style processors (None: use the processor as is)."""
        proc = self.processor
        needed = ("image_token", "image_token_id", "image_processor", "replace_image_token")
        if not all(hasattr(proc, a) for a in needed):
            return None
        return proc.image_token if hasattr(proc.image_processor, "merge_size") else None

    def _pixels(self, images: Sequence[Any]):
        """(pixel_values, image_grid_thw) per image; an image seen recently (a retry of the same
        sample) is not preprocessed again."""
        import torch

        todo = [im for im in {id(im): im for im in images}.values() if id(im) not in self._vision]
        if todo:
            out = self.processor.image_processor(images=todo, return_tensors="pt")
            start = 0
            for im, grid in zip(todo, out["image_grid_thw"], strict=True):
                n = int(grid.prod())
                pixels = out["pixel_values"][start : start + n]
                self._vision[id(im)] = (im, pixels, grid.unsqueeze(0))
                start += n
        parts = [self._vision[id(im)] for im in images]
        while len(self._vision) > self._vision_capacity:  # oldest first
            self._vision.pop(next(iter(self._vision)))
        return (
            torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]),
        )

    def _encode_with_cached_images(self, texts: list[str], images: Sequence[Any]):
        """What the processor returns for (texts, images), with images preprocessed once each:
        the placeholder expanded to one token per merged patch, then tokenised."""
        from transformers import BatchFeature

        from .processing import expand_image_tokens

        proc = self.processor
        pixel_values, grids = self._pixels(images)
        expanded = [
            expand_image_tokens(proc, text, grids[i : i + 1]) for i, text in enumerate(texts)
        ]
        enc = self.tokenizer(expanded, padding=True, return_tensors="pt")
        ids = enc["input_ids"]
        data = {
            "input_ids": ids,
            "attention_mask": enc["attention_mask"],
            "pixel_values": pixel_values,
            "image_grid_thw": grids,
            "mm_token_type_ids": (ids == proc.image_token_id).to(ids.dtype),
        }
        return BatchFeature(data=data).to(self.device)

    def _prefill_positions(self, inputs):
        """Position ids for the prompt, exactly as ``generate`` builds them."""
        kwargs = {k: v for k, v in inputs.items()}
        return self._position_model._prepare_position_ids_for_generation(
            inputs["input_ids"], kwargs
        )

    def _prefill(self, requests: Sequence[GenerationRequest], indices: list[int]) -> _Running:
        """Encode and run the prompts of ``requests``; the rows are ready to pick a first token."""
        import torch

        inputs = self._encode(requests)
        positions = self._prefill_positions(inputs)
        out = self.model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
        self.prefills += 1
        temps = [max(0.0, float(r.temperature)) for r in requests]
        seeds = [
            r.seed if r.seed is not None else int(torch.randint(0, 2**62, ()).item())
            for r in requests
        ]
        return _Running(
            rows=torch.tensor(indices, dtype=torch.long),
            cache=out.past_key_values,
            mask=inputs["attention_mask"],
            last_positions=positions[..., -1:],
            temps=torch.tensor(temps, device=self.device),
            logits=out.logits[:, -1, :],
            seeds=torch.tensor(seeds, dtype=torch.int64),
        )

    def _decode(self, requests: Sequence[GenerationRequest], progress=None) -> list[str]:
        """Continuous batching over ``requests`` (all with images, or all without).

        At most ``batch_size`` rows decode together. A row leaves the batch the step it ends (its
        cache row is dropped); when half the rows have left, waiting requests are prefilled and
        join the running batch, so decode steps stay full and no micro-batch waits for its
        slowest row before the next one starts.
        """
        import torch

        n = len(requests)
        if self.max_new_tokens <= 0 or n == 0:
            return [""] * n
        eos = torch.tensor(self.eos_token_ids, device=self.device)
        tokens = torch.full((n, self.max_new_tokens), self.tokenizer.pad_token_id)
        lengths = torch.zeros(n, dtype=torch.long)
        texts: list[str] = [""] * n
        waiting = list(range(n))
        running: _Running | None = None
        refill_below = max(1, self.batch_size // 2)
        with torch.inference_mode():
            while waiting or running is not None:
                live = 0 if running is None else len(running.rows)
                if waiting and (running is None or (live < refill_below and _can_join(running))):
                    take = waiting[: self.batch_size - live]
                    del waiting[: len(take)]
                    fresh = self._prefill([requests[k] for k in take], take)
                    if running is None:
                        running = fresh
                    else:
                        running = running.join(fresh)
                        self.joins += 1
                self.row_steps += len(running.rows)
                rows = running.rows
                uniforms = row_uniforms(running.seeds, lengths[rows])
                picked = pick_tokens(running.logits, running.temps, self.top_k, uniforms)
                tokens[rows, lengths[rows]] = (
                    picked.cpu()
                )  # the end token too, as generate keeps it
                lengths[rows] += 1
                ended = torch.isin(picked, eos)
                self.tokens_generated += int((~ended).sum())
                ended |= (lengths[rows] >= self.max_new_tokens).to(ended.device)
                for i in rows[ended.cpu()].tolist():
                    texts[i] = self.tokenizer.decode(
                        tokens[i, : lengths[i]], skip_special_tokens=True
                    )
                    if progress is not None:
                        progress.update(1)
                if bool(ended.all()):
                    running = None
                    continue
                if bool(ended.any()):
                    keep = (~ended).nonzero().squeeze(1)
                    running.select(keep)
                    picked = picked[keep]
                running.advance(self.model, picked)
        self.last_token_ids = [tokens[i, : lengths[i]].tolist() for i in range(n)]
        return texts

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        progress = None
        if self.show_progress and len(requests) > self.batch_size:
            from tqdm import tqdm

            progress = tqdm(total=len(requests), desc="generate", unit="sample")
        with_image = [i for i, r in enumerate(requests) if r.image is not None]
        without = [i for i, r in enumerate(requests) if r.image is None]
        out: list[str] = [""] * len(requests)
        for group in (with_image, without):  # a prompt batch is all with images or all without
            if group:
                texts = self._decode([requests[i] for i in group], progress)
                for i, text in zip(group, texts, strict=True):
                    out[i] = text
        if progress is not None:
            progress.close()
        return out


@dataclass
class _Running:
    """The rows decoding together: request indices, KV cache, attention mask, the last position
    ids (``[..., rows, 1]``), temperatures, the logits for each row's next token and each row's
    random seed (CPU)."""

    rows: Any
    cache: Any
    mask: Any
    last_positions: Any
    temps: Any
    logits: Any
    seeds: Any

    def select(self, keep) -> None:
        self.cache.batch_select_indices(keep)
        self.rows = self.rows[keep.cpu()]
        self.mask = self.mask[keep]
        self.last_positions = self.last_positions.index_select(-2, keep)
        self.temps = self.temps[keep]
        self.seeds = self.seeds[keep.cpu()]

    def advance(self, model, picked) -> None:
        """Feed each row's picked token; ``logits`` become the next step's."""
        import torch

        ones = torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.last_positions = self.last_positions + 1
        out = model(
            input_ids=picked.unsqueeze(1),
            attention_mask=self.mask,
            position_ids=self.last_positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.logits = out.logits[:, -1, :]

    def join(self, other: _Running) -> _Running:
        """Append ``other``'s rows: both caches and masks are left-padded to a common length
        (padding is masked out, and positions are explicit, so no row sees a difference)."""
        import torch
        from torch.nn.functional import pad as torch_pad

        length = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t, dim_from_end: int, width: int):
            if width == 0:
                return t
            spec = [0, 0] * (dim_from_end - 1) + [width, 0]
            return torch_pad(t, spec)

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                a = pad(a, 2, length - a.shape[-2])
                b = pad(b, 2, length - b.shape[-2])
                setattr(mine, name, torch.cat([a, b], dim=0))
        self.mask = torch.cat(
            [
                pad(self.mask, 1, length - self.mask.shape[1]),
                pad(other.mask, 1, length - other.mask.shape[1]),
            ]
        )
        self.rows = torch.cat([self.rows, other.rows])
        self.last_positions = torch.cat([self.last_positions, other.last_positions], dim=-2)
        self.temps = torch.cat([self.temps, other.temps])
        self.seeds = torch.cat([self.seeds, other.seeds])
        self.logits = torch.cat([self.logits, other.logits])
        return self


def _can_join(running: _Running) -> bool:
    """Rows can join a running batch whose cache is a plain per-token KV cache."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(running.cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


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

    def _params(self, temperature: float, seed: int | None = None):
        return self._vllm.SamplingParams(
            temperature=max(0.0, float(temperature)),
            top_k=self.top_k if self.top_k > 0 else -1,
            max_tokens=self.max_new_tokens,
            stop=["<|im_end|>"],
            seed=seed,
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
                prompts, [self._params(r.temperature, r.seed) for r in chunk], use_tqdm=True
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
