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


def test_segmented_generation_drops_finished_rows_same_output(backend):
    # Make a few frequent tokens count as end-of-sequence so that rows finish at different
    # steps; segmented generation (finished rows leave the batch) must match one generate call.
    saved = (backend.eos_token_ids, backend.segment_tokens, backend.max_new_tokens)
    tok = backend.tokenizer
    stops = [tok.convert_tokens_to_ids(t) for t in ("e", "a", "s")]
    try:
        backend.eos_token_ids = sorted({*saved[0], *stops})
        backend.max_new_tokens = 16
        backend.segment_tokens = 0
        whole = backend.generate(requests())
        backend.segment_tokens = 3
        segmented = backend.generate(requests())
        torch.manual_seed(3)
        sampled = backend.generate(requests((0.0, 1.0, 0.0, 1.0)))
    finally:
        backend.eos_token_ids, backend.segment_tokens, backend.max_new_tokens = saved
    assert segmented == whole
    lengths = sorted(len(tok(t).input_ids) for t in whole)
    assert lengths[0] < lengths[-1]  # rows really finished at different steps
    assert sampled[0] == whole[0] and sampled[2] == whole[2]


def test_row_sampler_draws_from_tempered_softmax():
    from facial_r1_training.generation import _RowSampler

    torch.manual_seed(0)
    n = 30000
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).repeat(n, 1)
    temps = torch.tensor([1.0] * (n - 2) + [0.0, 2.0])
    out = _RowSampler(temps)(None, logits)
    assert torch.isfinite(out).sum(dim=1).eq(1).all()  # exactly one token left per row
    picks = out.argmax(dim=1)
    freq = torch.bincount(picks[: n - 2], minlength=3).float() / (n - 2)
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015)
    assert picks[n - 2] == 0  # temperature 0: greedy
    hot = _RowSampler(torch.full((n,), 2.0))(None, logits).argmax(dim=1)
    expected = torch.softmax(logits[0] / 2.0, dim=0)
    assert torch.allclose(torch.bincount(hot, minlength=3).float() / n, expected, atol=0.015)
    top1 = _RowSampler(torch.full((100,), 5.0), top_k=1)(None, logits[:100]).argmax(dim=1)
    assert top1.eq(0).all()
