"""Benchmark: evaluation throughput (images per second) of batched greedy generation.

    python benchmarks/evaluate.py --model runs/pipeline/grpo/model \
        --input data/DemoFaces_test.jsonl --batch-sizes 1 8 32 64

For each batch size: generation + parsing + metrics over the test set, images per second, and
the headline metrics (identical across batch sizes: greedy decoding with left padding). Not a
test.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/pipeline/grpo/model")
    parser.add_argument("--input", dest="test_file", default="data/DemoFaces_test.jsonl")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--limit", type=int, default=0, help="at most N test records")
    parser.add_argument("--max-new-tokens", type=int, default=80)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from facial_r1_training.evaluation import EvaluateConfig, evaluate, headline
    from facial_r1_training.generation import TransformersBackend, load_for_inference
    from facial_r1_training.synthesis import prompt_emotions

    if not Path(args.model).is_dir() or not Path(args.test_file).is_file():
        print(
            f"need a model ({args.model}) and a test file ({args.test_file}): run "
            "`make pipeline` first",
            file=sys.stderr,
        )
        return 2
    model, processor = load_for_inference(args.model)
    rows = []
    for bs in args.batch_sizes:
        backend = TransformersBackend(
            model, processor, batch_size=bs, max_new_tokens=args.max_new_tokens
        )
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report, _ = evaluate(
                EvaluateConfig(limit=args.limit),
                backend,
                emotions=prompt_emotions(None),
                output_dir=Path(tmp),
                test_file=Path(args.test_file),
                progress=False,
            )
            total = time.perf_counter() - start
        h = headline(report)
        row = {
            "batch_size": bs,
            "images": report["n"],
            "generation_images_per_s": report["images_per_s"],
            "end_to_end_images_per_s": round(report["n"] / total, 2),
            "emotion_accuracy": h["emotion_accuracy"],
            "au_f1_micro": h["au_f1_micro"],
            "format_rate": h["format_rate"],
        }
        rows.append(row)
        print(
            f"batch {bs:>3}: {row['generation_images_per_s']:.1f} images/s generation, "
            f"{row['end_to_end_images_per_s']:.1f} images/s end to end "
            f"(acc {h['emotion_accuracy']:.3f}, AU F1 {h['au_f1_micro']:.3f})"
        )
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
