"""The image-only Qwen2.5-VL processor and the offline byte-level BPE tokenizer of the tiny model.

Why an own processor class: without torchvision, ``Qwen2_5_VLProcessor`` fails on its video
processor and ``AutoProcessor.from_pretrained(folder)`` may silently return only the tokenizer.
:class:`FacialR1VLProcessor` is ``Qwen2_5_VLProcessor`` minus the video processor; importing this
module registers it with ``AutoProcessor``, so ``AutoProcessor.from_pretrained(DIR)`` works offline
once ``facial_r1_training`` is imported (``load_processor`` does that for you).

The chat template is our own Jinja rendering of the Qwen2-VL conversation format
(``<|im_start|>role\\n...<|im_end|>\\n``; an image is
``<|vision_start|><|image_pad|><|vision_end|>``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from transformers import AutoProcessor, PretrainedConfig
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

# Registered first, in this order, so their ids are stable (0..13) as in Qwen's own vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2-VL conversation format, written for this project. Content may be a string or a list of
# {"type": "text"|"image"|"video", ...} blocks (TRL and our stages use both forms).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for block in message['content'] %}"
    "{% if block['type'] == 'image' or 'image' in block or 'image_url' in block %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif block['type'] == 'video' or 'video' in block %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in block %}"
    "{{ block['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class FacialR1VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images and text only (no video processor, no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


# Shipped into every tiny model folder and named in processor_config.json's auto_map, so that
# AutoProcessor.from_pretrained(DIR, trust_remote_code=True) works without this package.
REMOTE_MODULE = "processing_facial_r1"
REMOTE_CODE = '''"""Image-only Qwen2.5-VL processor (no video processor: no torchvision needed)."""

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor


class FacialR1VLProcessor(Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer,
                         video_processor=None, chat_template=chat_template, **kwargs)
'''


def ship_remote_code(folder: str | os.PathLike) -> None:
    """Add the processor module and ``auto_map`` to a saved processor folder."""
    import json
    from pathlib import Path

    folder = Path(folder)
    (folder / f"{REMOTE_MODULE}.py").write_text(REMOTE_CODE)
    config_path = folder / "processor_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["processor_class"] = FacialR1VLProcessor.__name__
    config["auto_map"] = {"AutoProcessor": f"{REMOTE_MODULE}.{FacialR1VLProcessor.__name__}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class _ProcessorRegistryKey(PretrainedConfig):
    """Only a key for ``AutoProcessor.register``: lookup by the saved ``processor_class`` name."""

    model_type = "facial_r1_vl_processor"


AutoProcessor.register(_ProcessorRegistryKey, FacialR1VLProcessor, exist_ok=True)


# EMFACS-style prototypes, only to give the tokenizer typical AU combinations to merge.
_PROTOTYPES: dict[str, tuple[str, ...]] = {
    "happiness": ("AU6", "AU12"),
    "sadness": ("AU1", "AU4", "AU15"),
    "surprise": ("AU1", "AU2", "AU5", "AU26"),
    "fear": ("AU1", "AU2", "AU4", "AU5", "AU7", "AU20", "AU26"),
    "anger": ("AU4", "AU5", "AU7", "AU23", "AU24"),
    "disgust": ("AU9", "AU10", "AU15", "AU16"),
    "contempt": ("AU12", "AU14"),
    "neutral": (),
}


def tokenizer_corpus(extra_texts: Iterable[str] = ()) -> Iterator[str]:
    """The text the tiny tokenizer is trained on: our prompts, AU and emotion vocabulary, tags.

    Frequent text (the constant prompt, AU phrases, tags) is repeated so that BPE merges it into
    long tokens: the tiny model then sees short sequences, which is what makes CPU training fast.
    """
    from facial_r1_core import prompts, vocab

    emotions = list(vocab.EMOTIONS)
    for _ in range(24):  # the chat frame around every prompt, between its special tokens
        yield f"system\n{DEFAULT_SYSTEM}"
        yield "user\n"
        yield "assistant\n"
    for _ in range(4):
        yield prompts.sft_prompt(prompts.DEFAULT_QUESTION, vocab.BASIC_EMOTIONS)
        yield prompts.sft_prompt(prompts.DEFAULT_QUESTION, emotions)
    for emotion, aus in _PROTOTYPES.items():
        yield prompts.ground_truth_block(list(aus), emotion)
        yield from _retry_prompts(emotion, list(aus), emotions)
        for rotate in range(max(1, len(aus))):
            order = aus[rotate:] + aus[:rotate]
            features = ", ".join(f"{vocab.au_phrase(a)} ({a})" for a in order)
            yield (
                f"<think>The face shows {features}. Together these Action Units indicate "
                f"{emotion}.</think>\n<answer>{emotion}</answer>"
            )
    for code in vocab.AU_NAMES:
        for _ in range(3):
            yield f"{vocab.au_phrase(code)} ({code}), "
            yield f"{vocab.AU_NAMES[code]} ({code}). "
    for code, emos in vocab.AU_POSSIBLE_EMOTIONS.items():
        yield f"{vocab.au_phrase(code)} ({code}) often signals {' or '.join(emos)}. "
    for emotion in emotions:
        for _ in range(3):
            yield f"<answer>{emotion}</answer> {emotion}, "
    yield from _teacher_texts()
    yield from extra_texts


def _retry_prompts(emotion: str, aus: list[str], emotions: list[str]) -> Iterator[str]:
    """Synthesis retry prompts whose error blocks hold the filter's real reasons, repeated so
    that BPE merges the error block's fixed wording as it merges the main prompt (a retry
    prompt then costs a few dozen tokens more than a first attempt, not a hundred and fifty)."""
    from facial_r1_core import prompts
    from facial_r1_core.filter import check

    wrong_emotion = next(e for e in emotions if e != emotion)
    extra = "AU26" if "AU26" not in aus else "AU14"
    attempts = [
        (aus[1:] or [extra], emotion),
        ([*aus, extra], emotion),
        (aus, wrong_emotion),
        ([extra], wrong_emotion),
    ]
    for guess_aus, guess in attempts:
        features = ", ".join(f"({a})" for a in guess_aus)
        previous = f"<think>The face shows {features}.</think>\n<answer>{guess}</answer>"
        reasons = check(previous, aus, [emotion]).reasons
        for _ in range(3):
            yield prompts.synthesis_prompt(
                prompts.DEFAULT_QUESTION,
                emotions,
                aus,
                emotion,
                prev_response=previous,
                errors=reasons,
            )


def _teacher_texts(n: int = 400) -> Iterator[str]:
    """Completions in the template teacher's phrasing (facial_r1_data), so seed data is short."""
    import random

    try:
        from facial_r1_data import teacher_template
    except ImportError:  # the data package is optional for the tokenizer
        return
    rng = random.Random(0)
    names = list(_PROTOTYPES)
    for i in range(n):
        emotion = names[i % len(names)]
        aus = [a for a in _PROTOTYPES[emotion] if rng.random() > 0.2]
        try:
            yield teacher_template.template_completion(aus, emotion, rng=rng)
        except Exception:  # a changed teacher must not break the tokenizer
            return
    yield from getattr(teacher_template, "corpus", list)()


# Where a per-sample block (ground truth, previous-response issues) starts after the prompt.
_BLOCK_STARTS = r"\n### (?:Ground Truth|Previous Response)"


def train_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 2000):
    """Train a byte-level BPE on ``texts`` (default: :func:`tokenizer_corpus`), Qwen specials first.

    Merges may cross word boundaries (no pre-tokenizer regex), so the constant prompt and common
    AU phrases become a handful of tokens; text is only split where a ground-truth or error block
    begins. Returns a ``PreTrainedTokenizerFast`` with left
    padding and our chat template.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(texts if texts is not None else tokenizer_corpus())
    # The constant prompt ends where the per-sample blocks begin: splitting there lets the
    # prompt match its single vocabulary entry directly (ignore_merges), which halves the cost
    # of tokenising a request, at one token more per prompt.
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_BLOCK_STARTS), behavior="merged_with_next"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="left",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def expand_image_tokens(processor, text: str, image_grids) -> str:
    """``text`` with each image placeholder expanded as the processor expands it (one token per
    merged patch), given the images' ``image_grid_thw`` rows in order: what lets the SFT collator
    and the decoder tokenise with cached pixel values instead of a full processor call."""
    token = processor.image_token
    parts = text.split(token)
    if len(parts) - 1 != len(image_grids):
        n_tokens, n_images = len(parts) - 1, len(image_grids)
        raise ValueError(f"the prompt has {n_tokens} image tokens for {n_images} images")
    inputs = {"image_grid_thw": image_grids}
    return parts[0] + "".join(
        processor.replace_image_token(inputs, image_idx=i) + part
        for i, part in enumerate(parts[1:])
    )


def build_image_processor(image_size: int = 56):
    """The PIL Qwen2-VL image processor pinned to ``image_size``**2 pixels (56 px -> 4 tokens)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = int(image_size) * int(image_size)
    return Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)


def build_processor(image_size: int = 56, tokenizer=None) -> FacialR1VLProcessor:
    tokenizer = tokenizer if tokenizer is not None else train_tokenizer()
    return FacialR1VLProcessor(
        image_processor=build_image_processor(image_size),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def load_processor(path_or_id: str | os.PathLike, **kwargs):
    """Load a processor: ours for folders we built, the stock ``AutoProcessor`` otherwise."""
    import json
    from pathlib import Path

    folder = Path(path_or_id)
    config = folder / "processor_config.json"
    if config.is_file():
        try:
            name = json.loads(config.read_text()).get("processor_class")
        except (OSError, ValueError):
            name = None
        if name == FacialR1VLProcessor.__name__:
            return FacialR1VLProcessor.from_pretrained(str(folder), **kwargs)
    return AutoProcessor.from_pretrained(str(path_or_id), **kwargs)
