"""Generation backends: batched == one-by-one, per-row temperatures, the vLLM error."""

from __future__ import annotations

import builtins

import pytest
import torch
from facial_r1_core.prompts import EXAMPLE_COMPLETION, synthesis_prompt
from facial_r1_training.generation import (
    GenerationBackend,
    GenerationRequest,
    ScriptedBackend,
    TransformersBackend,
    create_backend,
)
from PIL import Image


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from facial_r1_training.models import build_tiny, load_model_and_processor

    folder = tmp_path_factory.mktemp("gen") / "tiny"
    build_tiny(folder)
    model, processor = load_model_and_processor(folder)
    # A random-init tiny model greedily repeats one token; larger random weights give varied
    # text, so that padding or batching mistakes would show in the outputs.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.copy_(torch.randn(weight.shape, generator=gen) * 0.3)
    return TransformersBackend(model, processor, batch_size=8, max_new_tokens=12, seed=0)


def requests(temps=(0.0, 0.0, 0.0, 0.0)):
    prompts = [
        synthesis_prompt("q", ["anger"], ["AU4"], "anger"),
        synthesis_prompt(
            "q",
            ["anger"],
            ["AU4"],
            "anger",
            prev_response=EXAMPLE_COMPLETION,
            errors=["missing Action Units: AU7"],
        ),
        "short",
        "a slightly longer prompt",
    ]
    return [
        GenerationRequest(
            prompt=p, image=Image.new("RGB", (56, 56), (60 * i, 150, 120)), temperature=t
        )
        for i, (p, t) in enumerate(zip(prompts, temps, strict=True))
    ]


def test_batched_left_padded_equals_one_by_one(backend):
    batched = backend.generate(requests())
    single = [backend.generate([r])[0] for r in requests()]
    assert batched == single
    assert len(set(batched)) == 4  # varied outputs: the comparison means something


def test_per_row_temperature_keeps_greedy_rows_greedy(backend):
    greedy = backend.generate(requests())
    torch.manual_seed(1)
    mixed = backend.generate(requests((0.0, 1.5, 0.0, 1.5)))
    assert mixed[0] == greedy[0] and mixed[2] == greedy[2]
    assert (mixed[1], mixed[3]) != (greedy[1], greedy[3])


def test_micro_batches_and_protocol(backend):
    backend.batch_size = 3
    try:
        assert backend.generate(requests()) == [backend.generate([r])[0] for r in requests()]
    finally:
        backend.batch_size = 8
    assert isinstance(backend, GenerationBackend)
    assert isinstance(ScriptedBackend(lambda r, i: ""), GenerationBackend)


def test_vllm_missing_is_a_clear_error(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(RuntimeError, match="needs the vllm package"):
        create_backend("vllm", tmp_path)
    with pytest.raises(ValueError, match="unknown generation backend"):
        create_backend("onnx", tmp_path)


def _generate_reference(backend, reqs):
    """The oracle: one ``model.generate`` call (greedy) on the same encoded batch."""
    inputs = backend._encode(reqs)
    with torch.inference_mode():
        out = backend.model.generate(
            **inputs,
            max_new_tokens=backend.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_k=None,
            top_p=None,
            pad_token_id=backend.tokenizer.pad_token_id,
            eos_token_id=backend.eos_token_ids,
        )
    new = out[:, inputs["input_ids"].shape[1] :]
    return [backend.tokenizer.decode(row, skip_special_tokens=True) for row in new]


def test_stepwise_decoding_equals_generate_while_rows_leave(backend):
    # Declare tokens the model emits early in two rows as end-of-sequence, so that rows finish
    # at different steps and leave the batch; the outputs must still be model.generate's.
    saved = (backend.eos_token_ids, backend.max_new_tokens)
    tok = backend.tokenizer
    backend.max_new_tokens = 16
    try:
        free_run = [tok(t).input_ids for t in backend.generate(requests())]
        stops = {free_run[0][2], free_run[2][6]}
        backend.eos_token_ids = sorted({*saved[0], *stops})
        work_before = backend.row_steps
        ours = backend.generate(requests())
        work = backend.row_steps - work_before
        reference = _generate_reference(backend, requests())
        torch.manual_seed(3)
        sampled = backend.generate(requests((0.0, 1.0, 0.0, 1.0)))
    finally:
        backend.eos_token_ids, backend.max_new_tokens = saved
    assert ours == reference
    assert len({len(t) for t in ours}) > 1  # rows really finished at different steps
    assert work < 4 * 16  # finished rows stopped costing decode steps
    assert sampled[0] == ours[0] and sampled[2] == ours[2]


def test_waiting_requests_join_the_running_batch(backend):
    # Rows end at different steps (stop tokens taken from a free run); with 4 slots and 12
    # requests of very different prompt lengths, waiting prompts join the running batch when
    # half the rows have left. Every output must still equal generating that request alone.
    long_prompt = requests()[1].prompt
    reqs = [
        GenerationRequest(
            prompt=long_prompt[: 40 * i] if i % 2 else f"face {i}",
            image=Image.new("RGB", (56, 56), (19 * i, 40, 200)),
        )
        for i in range(12)
    ]
    saved = (backend.eos_token_ids, backend.max_new_tokens, backend.batch_size)
    tok = backend.tokenizer
    backend.max_new_tokens = 12
    assert "decode" not in vars(tok)
    try:
        generated: list[list[int]] = []  # the ids each row really generated
        decode = tok.decode
        tok.decode = lambda ids, **kw: generated.append(ids.tolist()) or decode(ids, **kw)
        try:
            for r in reqs:
                backend.generate([r])
        finally:
            del tok.decode
        stops = {ids[1 + i % 7] for i, ids in enumerate(generated)}  # row i ends by step 1 + i % 7
        backend.eos_token_ids = sorted({*saved[0], *stops})
        backend.batch_size = 4
        joins = backend.joins
        ours = backend.generate(reqs)
        joins = backend.joins - joins
        alone = [backend.generate([r])[0] for r in reqs]
    finally:
        backend.eos_token_ids, backend.max_new_tokens, backend.batch_size = saved
    assert ours == alone
    assert joins >= 3
    assert len({len(t) for t in ours}) > 3


def test_full_length_rows_equal_generate(backend):
    assert backend.generate(requests()) == _generate_reference(backend, requests())


def test_pick_tokens_draws_from_tempered_softmax():
    from facial_r1_training.generation import pick_tokens

    torch.manual_seed(0)
    n = 30000
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).repeat(n, 1)
    temps = torch.tensor([1.0] * (n - 2) + [0.0, 2.0])
    picks = pick_tokens(logits, temps)
    freq = torch.bincount(picks[: n - 2], minlength=3).float() / (n - 2)
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015)
    assert picks[n - 2] == 0  # temperature 0: greedy
    hot = pick_tokens(logits, torch.full((n,), 2.0))
    expected = torch.softmax(logits[0] / 2.0, dim=0)
    assert torch.allclose(torch.bincount(hot, minlength=3).float() / n, expected, atol=0.015)
    top1 = pick_tokens(logits[:100], torch.full((100,), 5.0), top_k=1)
    assert top1.eq(0).all()
    top2 = pick_tokens(logits, torch.ones(n), top_k=2)
    assert torch.allclose(
        torch.bincount(top2, minlength=3).float() / n,
        torch.tensor([0.7, 0.2, 0.0]) / 0.9,
        atol=0.015,
    )
    assert pick_tokens(logits[:5], torch.zeros(5)).eq(0).all()


@pytest.mark.parametrize("with_image", [True, False])
def test_chat_text_splices_prompt_exactly_as_the_template_renders(backend, with_image):
    from facial_r1_training.generation import chat_text, user_messages

    processor = backend.processor
    for prompt in ("", "x", "{{ not jinja }}", synthesis_prompt("q", ["fear"], ["AU1"], "fear")):
        expected = processor.apply_chat_template(
            user_messages(prompt, with_image), tokenize=False, add_generation_prompt=True
        )
        assert chat_text(processor, prompt, with_image) == expected


def test_encoding_with_cached_images_equals_the_processor(backend):
    from facial_r1_training.generation import chat_text

    processor = backend.processor
    reqs = requests()
    reqs.append(GenerationRequest(prompt="again", image=reqs[0].image))  # one image twice
    expected = processor(
        text=[chat_text(processor, r.prompt) for r in reqs],
        images=[r.image for r in reqs],
        padding=True,
        return_tensors="pt",
    )
    backend._vision.clear()
    for _ in range(2):  # the second pass takes every image from the cache
        ours = backend._encode(reqs)
        assert sorted(ours.keys()) == sorted(expected.keys())
        for key in expected:
            assert torch.equal(ours[key], expected[key]), key
    assert len(backend._vision) == 4
    backend._vision_capacity = 2
    try:
        backend._encode(requests())
        assert len(backend._vision) == 2
    finally:
        backend._vision_capacity = 4 * backend.batch_size
