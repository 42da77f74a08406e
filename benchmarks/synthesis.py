"""Benchmark: batched synthesis vs the one-sample-at-a-time loop (the authors' approach).

All loops use the same model instance, the same prompts (inference prompt + ground-truth block,
the error block on retries), the same filter, the same retry budget and temperature schedule.
The batched engine (``facial_r1_training.synthesis``) hands every pending sample (new ones and
retries) to the continuously batching decoder and journals finished samples. The one-at-a-time
loop generates one sample and retries it before moving on, twice: with ``model.generate`` and
the processor per request (how the authors' scripts run), and with our own decoder at batch 1
(so the gain from batching alone shows too).

The input is ``--n`` demo faces drawn fresh from the profile's generator (the pool split, which
no model trained on), or ``--input`` when given.

    python benchmarks/synthesis.py --model runs/pipeline/grpo/model --n 512

Prints accepted samples per second for each loop and the ratios (goal: >= 10x), plus CPU
milliseconds per generation. Not a test.
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core for both loops


class PlainGenerate:
    """One request at a time the way the authors' scripts do it: the processor's chat template
    and image processing, then ``model.generate`` with transformers' own sampling."""

    name = "model.generate"
    batch_size = 1

    def __init__(self, model, processor, max_new_tokens: int, eos_token_ids: list[int]):
        self.model, self.processor = model, processor
        self.max_new_tokens, self.eos_token_ids = max_new_tokens, eos_token_ids

    def generate(self, requests):
        import torch
        from facial_r1_training.generation import user_messages

        (req,) = requests
        messages = user_messages(req.prompt, with_image=True)
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        inputs = self.processor(text=[text], images=[req.image], return_tensors="pt")
        sampling = (
            {"do_sample": True, "temperature": req.temperature, "top_k": 0, "top_p": 1.0}
            if req.temperature > 0
            else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        )
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=self.eos_token_ids,
                pad_token_id=self.processor.tokenizer.pad_token_id,
                **sampling,
            )
        new = out[0, inputs["input_ids"].shape[1] :]
        return [self.processor.tokenizer.decode(new, skip_special_tokens=True)]


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


def fresh_faces(profile: dict, n: int, folder: Path) -> Path:
    """``n`` pool faces from the profile's demo-face generator: labelled, never trained on."""
    from facial_r1_core.config import from_section
    from facial_r1_data.demo_faces import DemoFacesConfig, generate

    cfg = from_section(DemoFacesConfig, profile.get("demo_faces", {}), name="demo_faces")
    cfg.out_root, cfg.train, cfg.test, cfg.pool, cfg.contact_sheet = str(folder), 0, 0, n, ""
    generate(cfg, folder, progress=False)
    return folder / f"{cfg.dataset}_pool.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny-cpu.yaml", help="profile YAML")
    parser.add_argument("--model", default="runs/pipeline/grpo/model")
    parser.add_argument("--input", default="", help="input JSONL (default: fresh demo faces)")
    parser.add_argument("--n", type=int, default=512, help="input records")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = the profile's")
    parser.add_argument("--round-size", type=int, default=-1, help="-1 = the profile's")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0 = the profile's")
    parser.add_argument("--max-retries", type=int, default=-1, help="-1 = the profile's")
    parser.add_argument(
        "--sequential-n", type=int, default=256, help="records for the slow loops (0 = --n)"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from facial_r1_core.config import from_section, load_profile
    from facial_r1_core.schema import Record, read_records, write_jsonl
    from facial_r1_training.generation import TransformersBackend, load_for_inference
    from facial_r1_training.synthesis import SynthesisConfig, prompt_emotions, run

    if not Path(args.model).is_dir():
        print(f"need a trained model ({args.model}): run `make pipeline` first", file=sys.stderr)
        return 2
    profile = load_profile(args.config)
    cfg = from_section(SynthesisConfig, profile.get("synthesize", {}), name="synthesize")
    cfg.batch_size = args.batch_size or cfg.batch_size
    cfg.max_new_tokens = args.max_new_tokens or cfg.max_new_tokens
    cfg.round_size = cfg.round_size if args.round_size < 0 else args.round_size
    cfg.max_retries = cfg.max_retries if args.max_retries < 0 else args.max_retries
    cfg.limit = 0
    emotions = prompt_emotions(cfg.emotions)
    model, processor = load_for_inference(args.model)

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(args.input) if args.input else fresh_faces(profile, args.n, Path(tmp))
        records: list[Record] = []
        for rec in read_records(source):
            records.append(rec)
            if len(records) >= args.n:
                break
        root = source.parent
        subset = root / f".bench_synthesis_{os.getpid()}.jsonl"
        write_jsonl(subset, records)
        try:
            backend = TransformersBackend(
                model,
                processor,
                batch_size=cfg.batch_size,
                max_new_tokens=cfg.max_new_tokens,
                seed=0,
            )
            cfg.input_file, cfg.work_dir = str(subset), tmp
            cfg.output_file = str(Path(tmp) / "acc.jsonl")
            cfg.rejected_file = str(Path(tmp) / "rej.jsonl")
            start, cpu = time.perf_counter(), time.process_time()
            summary, _ = run(cfg, backend, emotions=emotions, fresh=True, progress=False)
            t_batched = time.perf_counter() - start
            cpu_batched = time.process_time() - cpu
        finally:
            subset.unlink(missing_ok=True)

        slow_records = records[: args.sequential_n or len(records)]
        single = TransformersBackend(
            model, processor, batch_size=1, max_new_tokens=cfg.max_new_tokens, seed=0
        )
        loops = {
            "sequential_engine": single,  # our decoder, one sample at a time: batching alone
            "sequential_generate": PlainGenerate(  # the authors' way: model.generate per sample
                model, processor, cfg.max_new_tokens, single.eos_token_ids
            ),
        }
        timings = {}
        for name, loop_backend in loops.items():
            start, cpu = time.perf_counter(), time.process_time()
            accepted, generated = sequential(slow_records, root, loop_backend, cfg, emotions)
            timings[name] = (accepted, generated, time.perf_counter() - start)
            timings[name] += (time.process_time() - cpu,)

    def part(accepted, generated, seconds, cpu_s):
        return {
            "accepted": accepted,
            "generated": generated,
            "seconds": round(seconds, 2),
            "accepted_per_s": round(accepted / seconds, 2),
            "cpu_ms_per_generation": round(1000 * cpu_s / max(1, generated), 2),
        }

    result = {
        "records": len(records),
        "sequential_records": len(slow_records),
        "batch_size": cfg.batch_size,
        "round_size": cfg.round_size,
        "max_new_tokens": cfg.max_new_tokens,
        "max_retries": cfg.max_retries,
        "batched": part(summary.accepted, summary.generated, t_batched, cpu_batched),
        **{name: part(*t) for name, t in timings.items()},
    }
    for name, n in (
        ("batched", len(records)),
        ("sequential_engine", len(slow_records)),
        ("sequential_generate", len(slow_records)),
    ):
        r = result[name]
        print(
            f"{name:20s} {r['accepted']}/{n} accepted, {r['generated']} generations in "
            f"{r['seconds']:.1f}s -> {r['accepted_per_s']:.2f} accepted samples/s "
            f"({r['cpu_ms_per_generation']} CPU ms per generation)"
        )
    rate = result["batched"]["accepted_per_s"]
    for name, label in (
        ("sequential_generate", "vs one at a time with model.generate (the authors' loop)"),
        ("sequential_engine", "vs one at a time on the same decoder (batching alone)"),
    ):
        other = result[name]["accepted_per_s"]
        result[f"speedup_{name}"] = round(rate / other, 1) if other else None
        print(f"speedup {label}: {result[f'speedup_{name}']}x (goal >= 10x)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
