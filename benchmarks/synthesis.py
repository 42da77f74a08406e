"""Benchmark: batched synthesis vs the one-sample-at-a-time loop (the authors' approach).

Both use the same model instance, the same prompts (inference prompt + ground-truth block, the
error block on retries), the same filter, the same retry budget and temperature schedule. The
sequential loop generates one sample at a time and retries it before moving on; the batched
engine (``facial_r1_training.synthesis``) generates every pending sample (new ones and retries)
in micro-batches and journals finished samples.

    python benchmarks/synthesis.py --model runs/pipeline/grpo/model \
        --input data/DemoFaces_pool.jsonl --n 64 --batch-size 64

Prints accepted samples per second for both and their ratio (goal: >= 10x). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def sequential(records, root, backend, cfg, emotions):
    """The reference loop: per sample, generate, check, retry with the error block."""
    from facial_r1_core.filter import check
    from facial_r1_core.prompts import synthesis_prompt
    from facial_r1_training.generation import GenerationRequest, load_image
    from facial_r1_training.synthesis import temperature_for

    accepted = generated = 0
    for rec in records:
        image = load_image(rec.image_path(root))
        prev, reasons = None, None
        for attempt in range(cfg.max_retries + 1):
            prompt = synthesis_prompt(
                rec.question,
                emotions,
                rec.AUs,
                ", ".join(rec.labels),
                prev_response=prev,
                errors=reasons,
            )
            req = GenerationRequest(
                prompt=prompt, image=image, temperature=temperature_for(attempt, cfg)
            )
            text = backend.generate([req])[0]
            generated += 1
            verdict = check(text, rec.AUs, rec.labels)
            if verdict.accepted:
                accepted += 1
                break
            prev, reasons = text.strip(), verdict.reasons
    return accepted, generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/pipeline/grpo/model")
    parser.add_argument("--input", default="data/DemoFaces_pool.jsonl")
    parser.add_argument("--n", type=int, default=64, help="input records")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from facial_r1_core.schema import Record, read_records, write_jsonl
    from facial_r1_training.generation import TransformersBackend, load_for_inference
    from facial_r1_training.synthesis import SynthesisConfig, prompt_emotions, run

    if not Path(args.model).is_dir() or not Path(args.input).is_file():
        print(
            f"need a trained model ({args.model}) and input ({args.input}): run "
            "`make pipeline` first",
            file=sys.stderr,
        )
        return 2
    records: list[Record] = []
    for rec in read_records(args.input):
        records.append(rec)
        if len(records) >= args.n:
            break
    root = Path(args.input).parent
    emotions = prompt_emotions(None)
    model, processor = load_for_inference(args.model)
    cfg = SynthesisConfig(
        max_retries=args.max_retries,
        temperature=args.temperature,
        temperature_step=0.1,
        max_temperature=1.0,
        max_new_tokens=args.max_new_tokens,
    )

    with tempfile.TemporaryDirectory() as tmp:
        subset = root / f".bench_synthesis_{os.getpid()}.jsonl"
        write_jsonl(subset, records)
        try:
            backend = TransformersBackend(
                model,
                processor,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                seed=0,
            )
            cfg.input_file, cfg.work_dir = str(subset), tmp
            cfg.output_file = str(Path(tmp) / "acc.jsonl")
            cfg.rejected_file = str(Path(tmp) / "rej.jsonl")
            start = time.perf_counter()
            summary, _ = run(cfg, backend, emotions=emotions, fresh=True, progress=False)
            t_batched = time.perf_counter() - start
        finally:
            subset.unlink(missing_ok=True)

    single = TransformersBackend(
        model, processor, batch_size=1, max_new_tokens=args.max_new_tokens, seed=0
    )
    start = time.perf_counter()
    seq_accepted, seq_generated = sequential(records, root, single, cfg, emotions)
    t_seq = time.perf_counter() - start

    batched_rate = summary.accepted / t_batched
    seq_rate = seq_accepted / t_seq
    result = {
        "records": len(records),
        "batch_size": args.batch_size,
        "batched": {
            "accepted": summary.accepted,
            "generated": summary.generated,
            "seconds": round(t_batched, 2),
            "accepted_per_s": round(batched_rate, 2),
        },
        "sequential": {
            "accepted": seq_accepted,
            "generated": seq_generated,
            "seconds": round(t_seq, 2),
            "accepted_per_s": round(seq_rate, 2),
        },
        "speedup": round(batched_rate / seq_rate, 1) if seq_rate else None,
    }
    print(
        f"batched:    {summary.accepted}/{len(records)} accepted, {summary.generated} "
        f"generations in {t_batched:.1f}s -> {batched_rate:.2f} accepted samples/s"
    )
    print(
        f"sequential: {seq_accepted}/{len(records)} accepted, {seq_generated} generations in "
        f"{t_seq:.1f}s -> {seq_rate:.2f} accepted samples/s"
    )
    print(f"speedup: {result['speedup']}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
